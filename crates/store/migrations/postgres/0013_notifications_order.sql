-- See migrations/sqlite/0013_notifications_order.sql.
ALTER TABLE notifications ADD COLUMN order_key TEXT;

UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Pending'))
    WHERE dedup_key LIKE 'status:%:Pending';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Success'))
    WHERE dedup_key LIKE 'status:%:Success';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Failed'))
    WHERE dedup_key LIKE 'status:%:Failed';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Superseded'))
    WHERE dedup_key LIKE 'status:%:Superseded';

CREATE INDEX notifications_order ON notifications (receiver, order_key, id)
    WHERE order_key IS NOT NULL;

CREATE TABLE offered_commits (
    agent_id    BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project     TEXT    NOT NULL,
    commit_id   TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project)
);
