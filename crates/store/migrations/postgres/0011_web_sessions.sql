-- See migrations/sqlite/0011_web_sessions.sql.
CREATE TABLE web_sessions (
    id_digest  TEXT    PRIMARY KEY,
    role       TEXT    NOT NULL,
    subject    TEXT,
    username   TEXT,
    groups     TEXT    NOT NULL DEFAULT '[]',
    csrf       TEXT    NOT NULL,
    admin_token TEXT,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL
);

CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
