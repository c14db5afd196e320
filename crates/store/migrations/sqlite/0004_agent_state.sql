-- What kas must remember about each agent across restarts. The payloads are opaque records
-- encoded by kas; the store keeps them byte for byte (BLOB here, BYTEA in PostgreSQL).

-- The last sync report per manifest project an agent syncs; `project` is kas's key for it.
CREATE TABLE sync_reports (
    agent_id    BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project     TEXT    NOT NULL,
    report      BLOB    NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project)
);

-- The configuration state of an agent, one row per agent.
CREATE TABLE config_states (
    agent_id    BIGINT  NOT NULL PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    state       BLOB    NOT NULL,
    updated_at  BIGINT  NOT NULL
);
