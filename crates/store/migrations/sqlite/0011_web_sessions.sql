-- The web UI's logins, so they survive a kas restart and are shared by every replica on the
-- same database. The session id in the browser's cookie is stored only as its SHA-256 digest.
CREATE TABLE web_sessions (
    id_digest  TEXT    PRIMARY KEY,
    -- admin or viewer.
    role       TEXT    NOT NULL,
    -- The person logged in with OpenID Connect; NULL for the admin-token login.
    subject    TEXT,
    username   TEXT,
    -- JSON list of the person's groups.
    groups     TEXT    NOT NULL DEFAULT '[]',
    csrf       TEXT    NOT NULL,
    -- For the admin-token login: a fingerprint of the admin token it was opened with; the
    -- session ends when that token is rotated.
    admin_token TEXT,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL
);

CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
