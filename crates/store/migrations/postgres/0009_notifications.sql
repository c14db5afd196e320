-- The notification outbox; see migrations/sqlite/0009_notifications.sql.
CREATE TABLE notifications (
    id              BIGSERIAL PRIMARY KEY,
    receiver        TEXT    NOT NULL,
    dedup_key       TEXT    NOT NULL,
    payload         BYTEA   NOT NULL,
    created_at      BIGINT  NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    claimed_until   BIGINT  NOT NULL DEFAULT 0,
    done_at         BIGINT,
    outcome         TEXT,
    last_error      TEXT,
    UNIQUE (receiver, dedup_key)
);

CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE done_at IS NULL;
