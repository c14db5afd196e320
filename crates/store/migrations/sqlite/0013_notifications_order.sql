-- Statuses of one commit on a forge are ordered. A forge shows the last status posted for a
-- commit (and context: the agent), so a `pending` whose delivery failed and was retried after the
-- commit's `success` left the commit pending for good. Messages of one receiver with the same
-- `order_key` (`status:<agent id>:<project>:<commit>`) replace one another: only the newest
-- queued is claimed, never while an older one is being sent, and older ones still queued are
-- dropped (outcome `dropped`). NULL (transitions for people): each is news of its own.
ALTER TABLE notifications ADD COLUMN order_key TEXT;

-- Messages queued before this migration: a status's deduplication key is its ordering key and
-- `:<state>`.
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Pending'))
    WHERE dedup_key LIKE 'status:%:Pending';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Success'))
    WHERE dedup_key LIKE 'status:%:Success';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Failed'))
    WHERE dedup_key LIKE 'status:%:Failed';
UPDATE notifications SET order_key = substr(dedup_key, 1, length(dedup_key) - length(':Superseded'))
    WHERE dedup_key LIKE 'status:%:Superseded';

-- Finds a message's newer and in-flight fellows when claiming.
CREATE INDEX notifications_order ON notifications (receiver, order_key, id)
    WHERE order_key IS NOT NULL;

-- The last commit kas sent each agent of each manifest project, whichever stream or replica
-- sent it. When kas sends a newer one, that commit is superseded unless the agent reported it:
-- agentk cancels its sync and never reports it. Kept in a stream's memory only, a commit sent
-- before the agent's stream reconnected (agentk or kas restarted, another replica) stayed
-- `pending` on forges for good. `project` is the manifest project's path.
CREATE TABLE offered_commits (
    agent_id    BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project     TEXT    NOT NULL,
    commit_id   TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project)
);
