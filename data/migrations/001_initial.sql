-- The journal core: one row per run, every tool call, every order intent (written before it reaches the
-- broker), the model's decisions, the daily equity baseline and every alert. Names are a contract
-- (DESIGN.md §2). Money is numeric, times are timestamptz.

CREATE TABLE cycles (
    id                 bigserial PRIMARY KEY,
    run_id             text        NOT NULL,
    trading_date       date        NOT NULL,
    started_at         timestamptz NOT NULL,
    finished_at        timestamptz,
    mode               text        NOT NULL CHECK (mode IN ('trade', 'dry_run', 'guard')),
    broker             text        NOT NULL,
    brain              text        NOT NULL,
    model              text,
    status             text        NOT NULL DEFAULT 'running'
                                   CHECK (status IN ('running', 'ok', 'error', 'skipped', 'halted')),
    summary            text,
    error              text,
    iterations         integer     NOT NULL DEFAULT 0 CHECK (iterations >= 0),
    input_tokens       bigint      NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens      bigint      NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cache_read_tokens  bigint      NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
    cache_write_tokens bigint      NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    cost_usd           numeric NOT NULL DEFAULT 0 CHECK (cost_usd >= 0)
);
CREATE INDEX cycles_trading_date_idx ON cycles (trading_date);
CREATE INDEX cycles_started_at_idx ON cycles (started_at);

CREATE TABLE tool_calls (
    id          bigserial PRIMARY KEY,
    cycle_id    bigint      NOT NULL REFERENCES cycles (id) ON DELETE CASCADE,
    seq         integer     NOT NULL CHECK (seq >= 0),
    name        text        NOT NULL,
    input       jsonb,
    allowed     boolean     NOT NULL,
    reason      text,
    result      jsonb,
    is_error    boolean     NOT NULL DEFAULT false,
    duration_ms integer     CHECK (duration_ms >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tool_calls_cycle_seq_key UNIQUE (cycle_id, seq)
);

CREATE TABLE orders (
    id              bigserial PRIMARY KEY,
    client_order_id text        NOT NULL CONSTRAINT orders_client_order_id_key UNIQUE
                                CHECK (client_order_id <> '' AND octet_length(client_order_id) <= 64),
    cycle_id        bigint      REFERENCES cycles (id) ON DELETE SET NULL,
    symbol          text        NOT NULL,
    side            text        NOT NULL CHECK (side IN ('buy', 'sell')),
    quantity        integer     NOT NULL CHECK (quantity > 0),
    order_type      text        NOT NULL CHECK (order_type IN ('limit', 'market', 'stop', 'stop_limit')),
    limit_price     numeric,
    stop_loss       numeric,
    take_profit     numeric,
    status          text        NOT NULL CHECK (status IN ('pending', 'submitted', 'filled', 'partially_filled',
                                                           'cancelled', 'rejected', 'dry_run', 'unknown')),
    broker_order_id text,
    filled_quantity integer     NOT NULL DEFAULT 0 CHECK (filled_quantity >= 0),
    avg_fill_price  numeric,
    reason          text,
    trading_date    date        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    filled_at       timestamptz
);
CREATE INDEX orders_trading_date_idx ON orders (trading_date);
CREATE INDEX orders_cycle_id_idx ON orders (cycle_id);
CREATE INDEX orders_broker_order_id_idx ON orders (broker_order_id) WHERE broker_order_id IS NOT NULL;
-- unresolved_orders(): the few orders whose fate is still open.
CREATE INDEX orders_unresolved_idx ON orders (created_at)
    WHERE status IN ('pending', 'submitted', 'partially_filled', 'unknown');

CREATE TABLE decisions (
    id         bigserial PRIMARY KEY,
    cycle_id   bigint      REFERENCES cycles (id) ON DELETE CASCADE,
    decision   text        NOT NULL,
    reasoning  text        NOT NULL DEFAULT '',
    confidence double precision,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_cycle_id_idx ON decisions (cycle_id);

CREATE TABLE equity_snapshots (
    id           bigserial PRIMARY KEY,
    trading_date date        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('start_of_day', 'cycle')),
    equity       numeric NOT NULL,
    cash         numeric,
    taken_at     timestamptz NOT NULL
);
-- The daily P&L baseline: one start_of_day row per trading date, the first one wins.
CREATE UNIQUE INDEX equity_snapshots_start_of_day_key ON equity_snapshots (trading_date)
    WHERE kind = 'start_of_day';
CREATE INDEX equity_snapshots_trading_date_idx ON equity_snapshots (trading_date, taken_at);

CREATE TABLE alerts (
    id         bigserial PRIMARY KEY,
    cycle_id   bigint      REFERENCES cycles (id) ON DELETE SET NULL,
    subject    text        NOT NULL,
    message    text        NOT NULL,
    priority   text        NOT NULL DEFAULT 'normal',
    event      text,
    sent       boolean     NOT NULL DEFAULT false,
    error      text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_created_at_idx ON alerts (created_at);
CREATE INDEX alerts_cycle_id_idx ON alerts (cycle_id);
