-- GitOps suspensions; see migrations/sqlite/0006_gitops_suspensions.sql.
CREATE TABLE gitops_suspensions (
    agent_id      BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project_id    BIGINT  NOT NULL,
    reason        TEXT    NOT NULL,
    suspended_by  TEXT    NOT NULL,
    suspended_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project_id)
);
