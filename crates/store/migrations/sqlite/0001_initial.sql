-- Initial schema. Kept to plain types and standard SQL so the PostgreSQL migrations can mirror it
-- table for table: ids are 64-bit integers, timestamps are Unix seconds, digests are hex text.
-- (`INTEGER PRIMARY KEY` is SQLite's rowid alias; PostgreSQL will use an identity column.)

CREATE TABLE projects (
    id          INTEGER PRIMARY KEY,
    path        TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE agents (
    id          INTEGER PRIMARY KEY,
    project_id  BIGINT  NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    -- Agent names are only unique within their project, as in GitLab.
    UNIQUE (project_id, name)
);

CREATE TABLE agent_tokens (
    id           INTEGER PRIMARY KEY,
    agent_id     BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    -- SHA-256 of the token, lowercase hex. The plaintext is never stored: a leaked database
    -- must not let anyone connect as an agent.
    digest       TEXT    NOT NULL UNIQUE CHECK (length(digest) = 64),
    description  TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    -- NULL while the token is usable; set once, never cleared.
    revoked_at   BIGINT
);

-- list_tokens filters by agent; the UNIQUE on digest already indexes authentication look-ups.
CREATE INDEX agent_tokens_agent_id ON agent_tokens (agent_id);
