-- no-transaction
-- Ids are never handed out twice. `INTEGER PRIMARY KEY` alone gives a new row the largest id
-- plus one, so deleting the newest agent and registering another gave the new agent the deleted
-- one's id: kas authorized it by the deleted agent's configuration, and the new agentk took
-- over the deleted one's `inventory-<id>-…` ConfigMaps and `agent-<id>-lock` Lease in its
-- cluster. Tokens are revoked by id (`kas token revoke <id>`, `kas user-token revoke <id>`, the
-- revocations replicas publish) and project ids are named in agent configurations and
-- suspensions: none of these may come back either. AUTOINCREMENT keeps the largest id ever used (in `sqlite_sequence`).
--
-- SQLite cannot add AUTOINCREMENT to a table, so each table is rebuilt as SQLite's documented
-- procedure says (https://www.sqlite.org/lang_altertable.html#otheralter): foreign keys off,
-- which only takes effect outside a transaction (hence `no-transaction` above and our own
-- BEGIN/COMMIT), so that dropping a parent table deletes no child row; each new table created,
-- filled with the old rows and ids, renamed over the old one; the indexes created again; the
-- foreign keys checked before committing. Nothing else refers to these tables (no trigger, no
-- view), and the children's REFERENCES name the tables, which are the new ones once renamed.
-- Inserting the old ids sets each new table's counter to the largest one. Should kas be killed
-- between COMMIT and sqlx recording the migration, it runs again on the next start: harmless,
-- as nothing was written in between.
PRAGMA foreign_keys = OFF;

BEGIN IMMEDIATE;

-- Violations already there (a row deleted by hand with the sqlite3 shell, whose foreign keys
-- are off) are kept as they are; the rebuild must not add any.
CREATE TEMP TABLE migration_0012_violations AS
    SELECT count(*) AS n FROM pragma_foreign_key_check;

CREATE TABLE projects_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    path        TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL,
    remote                       TEXT,
    credentials_file             TEXT,
    webhook_secret_file          TEXT,
    ssh_key_file                 TEXT,
    known_hosts_file             TEXT,
    verify_allowed_signers_file  TEXT,
    verify_gpg_keyring_file      TEXT
);
INSERT INTO projects_new (id, path, created_at, remote, credentials_file, webhook_secret_file,
                          ssh_key_file, known_hosts_file, verify_allowed_signers_file,
                          verify_gpg_keyring_file)
    SELECT id, path, created_at, remote, credentials_file, webhook_secret_file, ssh_key_file,
           known_hosts_file, verify_allowed_signers_file, verify_gpg_keyring_file
    FROM projects;
DROP TABLE projects;
ALTER TABLE projects_new RENAME TO projects;

CREATE TABLE agents_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  BIGINT  NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    -- Agent names are only unique within their project, as in GitLab.
    UNIQUE (project_id, name)
);
INSERT INTO agents_new (id, project_id, name, created_at)
    SELECT id, project_id, name, created_at FROM agents;
DROP TABLE agents;
ALTER TABLE agents_new RENAME TO agents;

CREATE TABLE agent_tokens_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id     BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    -- SHA-256 of the token, lowercase hex. The plaintext is never stored: a leaked database
    -- must not let anyone connect as an agent.
    digest       TEXT    NOT NULL UNIQUE CHECK (length(digest) = 64),
    description  TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    -- NULL while the token is usable; set once, never cleared.
    revoked_at   BIGINT
);
INSERT INTO agent_tokens_new (id, agent_id, digest, description, created_at, revoked_at)
    SELECT id, agent_id, digest, description, created_at, revoked_at FROM agent_tokens;
DROP TABLE agent_tokens;
ALTER TABLE agent_tokens_new RENAME TO agent_tokens;
-- list_tokens filters by agent; the UNIQUE on digest already indexes authentication look-ups.
CREATE INDEX agent_tokens_agent_id ON agent_tokens (agent_id);

CREATE TABLE user_tokens_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id     BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    username     TEXT    NOT NULL,
    digest       TEXT    NOT NULL UNIQUE CHECK (length(digest) = 64),
    memberships  TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    revoked_at   BIGINT
);
INSERT INTO user_tokens_new (id, agent_id, username, digest, memberships, created_at,
                             expires_at, revoked_at)
    SELECT id, agent_id, username, digest, memberships, created_at, expires_at, revoked_at
    FROM user_tokens;
DROP TABLE user_tokens;
ALTER TABLE user_tokens_new RENAME TO user_tokens;
CREATE INDEX user_tokens_agent_id ON user_tokens (agent_id);

-- Fails the migration (the transaction is never committed, the database stays as it was) if
-- the rebuild left a row pointing at nothing.
CREATE TEMP TABLE migration_0012_check (ok INTEGER NOT NULL CHECK (ok));
INSERT INTO migration_0012_check
    SELECT (SELECT count(*) FROM pragma_foreign_key_check) <= n
    FROM migration_0012_violations;
DROP TABLE migration_0012_check;
DROP TABLE migration_0012_violations;

COMMIT;

-- The connection goes on being used; kas's connections enforce foreign keys.
PRAGMA foreign_keys = ON;
