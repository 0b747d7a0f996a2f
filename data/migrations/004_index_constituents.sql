-- Index constituents, read from the gateway once per trading day (they change quarterly). Saves the plate
-- requests (one per index) on every later cycle and guard pass of the day.

CREATE TABLE index_constituents (
    index_name   text        NOT NULL,
    trading_date date        NOT NULL,
    symbols      text[]      NOT NULL,
    fetched_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (index_name, trading_date)
);
