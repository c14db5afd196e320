-- `kas agent suspend`: while a row covers one of an agent's manifest projects, kas sends it no
-- new commit and agentk applies, prunes and drift-corrects nothing in it. `project_id` 0 covers
-- every manifest project of the agent (project ids start at 1), so a project added to the
-- agent's configuration later is suspended too. Rows go away with their agent.
CREATE TABLE gitops_suspensions (
    agent_id      BIGINT  NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    project_id    BIGINT  NOT NULL,
    reason        TEXT    NOT NULL,
    suspended_by  TEXT    NOT NULL,
    suspended_at  BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, project_id)
);
