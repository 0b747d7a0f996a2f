-- Market history for replays (scripts/history.py import|fetch|list) and the replay run register.

-- One row per stock the history knows: the board lot is needed to trade it in a replay.
CREATE TABLE instruments (
    symbol     text        PRIMARY KEY,          -- canonical HK.00700
    name       text        NOT NULL DEFAULT '',
    lot_size   integer     NOT NULL CHECK (lot_size > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Recorded bars, unadjusted HKD. bar_start is the bar's START (Futu labels minute bars by their end: the
-- fetcher converts); a daily bar starts at 00:00 HKT of its session date.
CREATE TABLE market_bars (
    symbol      text        NOT NULL,
    timeframe   text        NOT NULL CHECK (timeframe IN ('1m', '1d')),
    bar_start   timestamptz NOT NULL,
    open        numeric     NOT NULL CHECK (open > 0),
    high        numeric     NOT NULL CHECK (high > 0),
    low         numeric     NOT NULL CHECK (low > 0),
    close       numeric     NOT NULL CHECK (close > 0),
    volume      bigint      NOT NULL CHECK (volume >= 0),
    turnover    numeric,
    source      text        NOT NULL,            -- csv:<file> | futu
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, timeframe, bar_start),
    CHECK (high >= low AND high >= open AND high >= close AND low <= open AND low <= close)
);

-- What a history fetch has completed (symbol, timeframe, day), so an interrupted fetch resumes there.
CREATE TABLE history_fetches (
    symbol     text        NOT NULL,
    timeframe  text        NOT NULL,
    day        date        NOT NULL,
    bars       integer     NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, timeframe, day)
);

-- One row per replay (used in the replay database; each run's journal tables live in schema_name).
CREATE TABLE replay_runs (
    id          bigserial   PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    from_date   date        NOT NULL,
    to_date     date        NOT NULL,
    brain       text        NOT NULL,
    feed        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'ok', 'error', 'stopped')),
    schema_name text,
    settings    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    metrics     jsonb
);

-- Claude replies of replays, by the SHA-256 of the exact request body: re-running a replay is free and repeats.
CREATE TABLE model_response_cache (
    request_sha256 text        PRIMARY KEY,
    model          text        NOT NULL,
    response       jsonb       NOT NULL,             -- content, stop_reason, usage of the original reply
    created_at     timestamptz NOT NULL DEFAULT now()
);
