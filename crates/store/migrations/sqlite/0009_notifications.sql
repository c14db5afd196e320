-- The notification outbox: messages kas owes its receivers (webhooks, chat, commit statuses).
-- A message is written once per (receiver, dedup_key), so an event seen again (after a restart,
-- or by another replica) is not sent twice; delivery retries survive restarts.
CREATE TABLE notifications (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    receiver        TEXT    NOT NULL,
    dedup_key       TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    created_at      BIGINT  NOT NULL,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    -- A replica sending the message holds it until then; another takes it over after.
    claimed_until   BIGINT  NOT NULL DEFAULT 0,
    -- Set once delivered or given up (`outcome`: delivered, given_up).
    done_at         BIGINT,
    outcome         TEXT,
    last_error      TEXT,
    UNIQUE (receiver, dedup_key)
);

CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE done_at IS NULL;
