-- Personal access tokens for people using the Kubernetes API through an agent. Each is scoped to
-- one agent, expires, and carries the memberships (GitLab-style project/group roles) kas
-- authorizes `user_access` with, as JSON. Only the SHA-256 of the token is stored.
CREATE TABLE user_tokens (
    id           INTEGER PRIMARY KEY,
    agent_id     BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    username     TEXT    NOT NULL,
    digest       TEXT    NOT NULL UNIQUE CHECK (length(digest) = 64),
    memberships  TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    revoked_at   BIGINT
);

CREATE INDEX user_tokens_agent_id ON user_tokens (agent_id);
