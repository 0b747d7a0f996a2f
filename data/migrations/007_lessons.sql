-- Reflection (issue 14): every few closed round trips one extra model call reviews them and writes 1-3
-- lessons. lesson_reviews journals every review, including the failed, over-budget and discarded ones;
-- lessons holds what was kept. Lessons are advisory text for the model's first message: safety.py never
-- reads these tables.

CREATE TABLE lesson_reviews (
    id                 bigserial PRIMARY KEY,
    cycle_id           bigint      REFERENCES cycles (id) ON DELETE SET NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    status             text        NOT NULL
                                   CHECK (status IN ('ok', 'discarded', 'invalid', 'failed', 'over_budget')),
    trade_ids          bigint[]    NOT NULL,  -- orders.id of each reviewed round trip's entry
    model              text,
    input_tokens       bigint      NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens      bigint      NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cache_read_tokens  bigint      NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
    cache_write_tokens bigint      NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    cost_usd           numeric     NOT NULL DEFAULT 0 CHECK (cost_usd >= 0),
    discarded          jsonb       NOT NULL DEFAULT '[]',  -- [{text, setup, trade_ids, confidence, reason}]
    error              text
);
CREATE INDEX lesson_reviews_created_at_idx ON lesson_reviews (created_at);

CREATE TABLE lessons (
    id              bigserial PRIMARY KEY,
    review_id       bigint           NOT NULL REFERENCES lesson_reviews (id) ON DELETE CASCADE,
    created_at      timestamptz      NOT NULL DEFAULT now(),
    text            text             NOT NULL CHECK (char_length(text) BETWEEN 1 AND 300),
    setup           text             NOT NULL,
    trade_ids       bigint[]         NOT NULL,
    confidence      double precision NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    active          boolean          NOT NULL DEFAULT true,
    review_cost_usd numeric          NOT NULL DEFAULT 0 CHECK (review_cost_usd >= 0),
    updated_at      timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX lessons_active_idx ON lessons (created_at DESC) WHERE active;
