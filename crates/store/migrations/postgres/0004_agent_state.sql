-- What kas must remember about each agent across restarts; see
-- migrations/sqlite/0004_agent_state.sql. The payloads are opaque records kept byte for byte.

-- The last sync report per manifest project an agent syncs; `project` is kas's key for it and is
-- listed in byte order, hence "C".
CREATE TABLE sync_reports (
    agent_id    BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project     TEXT    COLLATE "C" NOT NULL,
    report      BYTEA   NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project)
);

-- The configuration state of an agent, one row per agent.
CREATE TABLE config_states (
    agent_id    BIGINT  NOT NULL PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    state       BYTEA   NOT NULL,
    updated_at  BIGINT  NOT NULL
);
