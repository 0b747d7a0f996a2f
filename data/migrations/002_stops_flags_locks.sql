-- Protective stops each open position lives under, the journal kill switch and the per-account instance
-- lock's holder description (the lock itself is a session-level advisory lock).

CREATE TABLE protective_stops (
    symbol               text        PRIMARY KEY,
    quantity             integer     NOT NULL CHECK (quantity > 0),
    entry_price          numeric NOT NULL,
    stop_loss            numeric NOT NULL,
    take_profit          numeric,
    broker_stop_order_id text,
    source               text        NOT NULL,
    cycle_id             bigint      REFERENCES cycles (id) ON DELETE SET NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE control_flags (
    name   text        PRIMARY KEY,
    value  text        NOT NULL,
    set_at timestamptz NOT NULL DEFAULT now(),
    set_by text        NOT NULL
);

CREATE TABLE instance_locks (
    key        text        PRIMARY KEY,
    holder     text        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
