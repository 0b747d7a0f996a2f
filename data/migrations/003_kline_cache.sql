-- K-line cache: Futu's historical K-line quota counts distinct stocks per 30 days, so bars are kept here.

CREATE TABLE kline_cache (
    symbol    text        NOT NULL,
    timeframe text        NOT NULL,
    bar_time  timestamptz NOT NULL,
    open      numeric NOT NULL,
    high      numeric NOT NULL,
    low       numeric NOT NULL,
    close     numeric NOT NULL,
    volume    bigint      NOT NULL CHECK (volume >= 0),
    PRIMARY KEY (symbol, timeframe, bar_time)
);
