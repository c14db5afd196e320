//! What the SQLite and PostgreSQL backends share: the SQL (written once, in the dialect both
//! accept: `$n` placeholders, `RETURNING`, `ON CONFLICT`, no engine-specific functions), the
//! row-to-record mapping and the checks around it (name validation, constant-time digest
//! comparison, foreign keys as existence checks).
//!
//! The [`Store`](crate::Store) methods are generated per backend by [`impl_store!`] rather than
//! written once as generic functions over `sqlx::Database`: the generic version needs a bound for
//! every type bound or decoded, per statement, and hides the SQL behind them. Expanded per
//! backend, each copy is type-checked against its own driver. A backend provides a `pool` field
//! and an `async fn write(&self) -> Result<WriteTxn<_>>` (see [`crate::txn`]), which is where the
//! engines really differ.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;

/// The one row an `INSERT … RETURNING` produced. Callers read rows with `fetch_all`, which steps
/// the statement to completion: `fetch_one` stops after the first row, and in autocommit mode the
/// commit then happens when sqlx resets the statement, where a failure (SQLITE_FULL) is dropped
/// and the insert reported as done. (Harmless on PostgreSQL, which returns the one row either way.)
pub(crate) fn single<T>(rows: Vec<T>) -> std::result::Result<T, sqlx::Error> {
    rows.into_iter().next().ok_or(sqlx::Error::RowNotFound)
}

/// Maps a foreign-key violation on an agent reference to `NotFound`: the foreign key is the
/// existence check, so there is no window between check and write.
pub(crate) fn agent_ref_error(agent_id: i64, error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::Database(e) if e.is_foreign_key_violation() => {
            Error::NotFound(format!("agent {agent_id}"))
        }
        e => e.into(),
    }
}

/// Current time in Unix seconds. A clock before 1970 is a misconfiguration we record as 0 rather
/// than fail on: timestamps are informational, never used for authorization.
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Row shape of the authentication query; the digest is compared in constant time before any
/// of it is returned.
#[derive(sqlx::FromRow)]
pub(crate) struct AuthRow {
    pub(crate) token_id: i64,
    pub(crate) digest: String,
    pub(crate) agent_id: i64,
    pub(crate) agent_name: String,
    pub(crate) project_id: i64,
    pub(crate) project_path: String,
}

/// Implements [`Store`](crate::Store) for `$store`, whose write transactions run on `$conn`.
macro_rules! impl_store {
    ($store:ty, $conn:ty) => {
        // In a const block so the imports the expansion needs do not clash with the backend's.
        const _: () = {
            use subtle::ConstantTimeEq;

            use crate::Store;
            use crate::backend::{AuthRow, agent_ref_error, now, single};
            use crate::error::{Error, Result};
            use crate::model::{
                Agent, AgentRow, AuthenticatedAgent, NotificationResult, OutboxMessage,
                PendingNotification, Project, ProjectSource, Suspension, SuspensionRow, SuspensionScope, TokenInfo,
                UserTokenInfo, WebSession,
            };
            use crate::token::{self, AgentToken};
            use crate::validate::{validate_agent_name, validate_project_path};

            impl $store {
                /// Insert-if-missing then read back, on a caller-provided connection so that `register_agent`
                /// can run it inside its transaction. (Writes are serialized on both engines, so reading first
                /// would be safe too; inserting first keeps it race-free even without that.)
                async fn ensure_project_on(conn: &mut $conn, path: &str) -> Result<Project> {
                    sqlx::query(
                        "INSERT INTO projects (path, created_at) VALUES ($1, $2) ON CONFLICT (path) DO NOTHING",
                    )
                    .bind(path)
                    .bind(now())
                    .execute(&mut *conn)
                    .await?;
                    let project =
                        sqlx::query_as::<_, Project>("SELECT id, path, created_at, remote, credentials_file, webhook_secret_file, ssh_key_file, known_hosts_file, verify_allowed_signers_file, verify_gpg_keyring_file FROM projects WHERE path = $1")
                            .bind(path)
                            .fetch_one(&mut *conn)
                            .await?;
                    Ok(project)
                }
            }

            impl $store {
                /// [`Store::enqueue_notification`]'s insert, in the caller's write.
                async fn enqueue_notification_on(
                    conn: &mut $conn,
                    receiver: &str,
                    dedup_key: &str,
                    order_key: Option<&str>,
                    payload: &[u8],
                ) -> Result<bool> {
                    let added = sqlx::query(
                        "INSERT INTO notifications (receiver, dedup_key, order_key, payload, created_at, \
                         next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5) \
                         ON CONFLICT (receiver, dedup_key) DO NOTHING",
                    )
                    .bind(receiver)
                    .bind(dedup_key)
                    .bind(order_key)
                    .bind(payload)
                    .bind(now())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    Ok(added > 0)
                }
            }

            #[async_trait::async_trait]
            impl Store for $store {
                async fn ensure_project(&self, path: &str) -> Result<Project> {
                    validate_project_path(path)?;
                    let mut tx = self.write().await?;
                    let project = Self::ensure_project_on(tx.conn(), path).await?;
                    tx.commit().await?;
                    Ok(project)
                }

                async fn get_project_by_path(&self, path: &str) -> Result<Option<Project>> {
                    validate_project_path(path)?;
                    let project = sqlx::query_as::<_, Project>(
                        "SELECT id, path, created_at, remote, credentials_file, webhook_secret_file, ssh_key_file, known_hosts_file, verify_allowed_signers_file, verify_gpg_keyring_file FROM projects WHERE path = $1",
                    )
                    .bind(path)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(project)
                }

                async fn list_projects(&self) -> Result<Vec<Project>> {
                    let projects =
                        sqlx::query_as::<_, Project>("SELECT id, path, created_at, remote, credentials_file, webhook_secret_file, ssh_key_file, known_hosts_file, verify_allowed_signers_file, verify_gpg_keyring_file FROM projects ORDER BY path")
                            .fetch_all(&self.pool)
                            .await?;
                    Ok(projects)
                }

                async fn get_project(&self, id: i64) -> Result<Option<Project>> {
                    let project = sqlx::query_as::<_, Project>(
                        "SELECT id, path, created_at, remote, credentials_file, webhook_secret_file, ssh_key_file, known_hosts_file, verify_allowed_signers_file, verify_gpg_keyring_file FROM projects WHERE id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(project)
                }

                async fn set_project_source(&self, path: &str, source: &ProjectSource) -> Result<Project> {
                    validate_project_path(path)?;
                    let mut tx = self.write().await?;
                    let project = Self::ensure_project_on(tx.conn(), path).await?;
                    sqlx::query(
                        "UPDATE projects SET remote = $1, credentials_file = $2, webhook_secret_file = $3, \
                         ssh_key_file = $4, known_hosts_file = $5, verify_allowed_signers_file = $6, \
                         verify_gpg_keyring_file = $7 WHERE id = $8",
                    )
                    .bind(&source.remote)
                    .bind(&source.credentials_file)
                    .bind(&source.webhook_secret_file)
                    .bind(&source.ssh_key_file)
                    .bind(&source.known_hosts_file)
                    .bind(&source.verify_allowed_signers_file)
                    .bind(&source.verify_gpg_keyring_file)
                    .bind(project.id)
                    .execute(tx.conn())
                    .await?;
                    tx.commit().await?;
                    Ok(Project {
                        remote: source.remote.clone(),
                        credentials_file: source.credentials_file.clone(),
                        webhook_secret_file: source.webhook_secret_file.clone(),
                        ssh_key_file: source.ssh_key_file.clone(),
                        known_hosts_file: source.known_hosts_file.clone(),
                        verify_allowed_signers_file: source.verify_allowed_signers_file.clone(),
                        verify_gpg_keyring_file: source.verify_gpg_keyring_file.clone(),
                        ..project
                    })
                }

                async fn remove_project(&self, path: &str) -> Result<bool> {
                    validate_project_path(path)?;
                    let mut tx = self.write().await?;
                    let agents: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM agents a JOIN projects p ON p.id = a.project_id WHERE p.path = $1",
                    )
                    .bind(path)
                    .fetch_one(tx.conn())
                    .await?;
                    if agents > 0 {
                        return Err(Error::InUse(format!(
                            "project {path} still has {agents} agent(s); their tokens and records would go with it"
                        )));
                    }
                    let done = sqlx::query("DELETE FROM projects WHERE path = $1")
                        .bind(path)
                        .execute(tx.conn())
                        .await?;
                    tx.commit().await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn register_agent(&self, project_path: &str, name: &str) -> Result<Agent> {
                    validate_project_path(project_path)?;
                    validate_agent_name(name)?;
                    // One transaction so a rejected agent does not leave a freshly created project behind.
                    let mut tx = self.write().await?;
                    let project = Self::ensure_project_on(tx.conn(), project_path).await?;
                    let inserted = sqlx::query_as::<_, Agent>(
                        "INSERT INTO agents (project_id, name, created_at) VALUES ($1, $2, $3) \
                         RETURNING id, project_id, name, created_at",
                    )
                    .bind(project.id)
                    .bind(name)
                    .bind(now())
                    .fetch_all(tx.conn())
                    .await
                    .and_then(single);
                    let agent = match inserted {
                        Ok(agent) => agent,
                        // Rely on the UNIQUE constraint rather than a prior SELECT: it is race-free.
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                            return Err(Error::AlreadyExists(format!(
                                "agent {name:?} in project {project_path:?}"
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    tx.commit().await?;
                    Ok(agent)
                }

                async fn get_agent(&self, id: i64) -> Result<Option<Agent>> {
                    let agent = sqlx::query_as::<_, Agent>(
                        "SELECT id, project_id, name, created_at FROM agents WHERE id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(agent)
                }

                async fn find_agent(&self, project_path: &str, name: &str) -> Result<Option<Agent>> {
                    validate_project_path(project_path)?;
                    validate_agent_name(name)?;
                    let agent = sqlx::query_as::<_, Agent>(
                        "SELECT a.id, a.project_id, a.name, a.created_at \
                         FROM agents a JOIN projects p ON p.id = a.project_id \
                         WHERE p.path = $1 AND a.name = $2",
                    )
                    .bind(project_path)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(agent)
                }

                async fn list_agents(&self) -> Result<Vec<AgentRow>> {
                    let agents = sqlx::query_as::<_, AgentRow>(
                        "SELECT a.id, a.name, a.project_id, p.path AS project_path, a.created_at, \
                         (SELECT MAX(t.last_used_at) FROM agent_tokens t WHERE t.agent_id = a.id) \
                         AS last_used_at \
                         FROM agents a JOIN projects p ON p.id = a.project_id \
                         ORDER BY p.path, a.name",
                    )
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(agents)
                }

                async fn create_token(
                    &self,
                    agent_id: i64,
                    description: &str,
                ) -> Result<(TokenInfo, AgentToken)> {
                    let token = AgentToken::generate();
                    let digest = hex::encode(token::digest(token.expose()));
                    let mut tx = self.write().await?;
                    let info = sqlx::query_as::<_, TokenInfo>(
                        "INSERT INTO agent_tokens (agent_id, digest, description, created_at) \
                         VALUES ($1, $2, $3, $4) \
                         RETURNING id, agent_id, description, created_at, revoked_at, last_used_at",
                    )
                    .bind(agent_id)
                    .bind(&digest)
                    .bind(description)
                    .bind(now())
                    .fetch_all(tx.conn())
                    .await
                    .and_then(single)
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    tx.commit().await?;
                    Ok((info, token))
                }

                async fn list_tokens(&self, agent_id: i64) -> Result<Vec<TokenInfo>> {
                    if self.get_agent(agent_id).await?.is_none() {
                        return Err(Error::NotFound(format!("agent {agent_id}")));
                    }
                    let tokens = sqlx::query_as::<_, TokenInfo>(
                        "SELECT id, agent_id, description, created_at, revoked_at, last_used_at \
                         FROM agent_tokens WHERE agent_id = $1 ORDER BY id",
                    )
                    .bind(agent_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(tokens)
                }

                async fn revoke_token(&self, token_id: i64) -> Result<bool> {
                    // The `revoked_at IS NULL` guard keeps the first revocation time and makes the row count
                    // say whether this call was the one that revoked it.
                    let mut tx = self.write().await?;
                    let result = sqlx::query(
                        "UPDATE agent_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                    )
                    .bind(now())
                    .bind(token_id)
                    .execute(tx.conn())
                    .await?;
                    if result.rows_affected() > 0 {
                        // "Revoked" is only said once the revocation is on disk.
                        tx.commit().await?;
                        return Ok(true);
                    }
                    let exists = sqlx::query_scalar::<_, i64>("SELECT id FROM agent_tokens WHERE id = $1")
                        .bind(token_id)
                        .fetch_optional(tx.conn())
                        .await?
                        .is_some();
                    tx.commit().await?;
                    if exists {
                        Ok(false)
                    } else {
                        Err(Error::NotFound(format!("token {token_id}")))
                    }
                }

                async fn token_active(&self, token_id: i64) -> Result<bool> {
                    // Outer Option: does the row exist; inner: is revoked_at set. A missing token is simply
                    // not active, which is the only thing kas needs to know to drop a stream.
                    let revoked_at = sqlx::query_scalar::<_, Option<i64>>(
                        "SELECT revoked_at FROM agent_tokens WHERE id = $1",
                    )
                    .bind(token_id)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(matches!(revoked_at, Some(None)))
                }

                async fn active_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>> {
                    let mut active = Vec::new();
                    // Both databases take far more bound values than this; chunks keep each
                    // statement short and leave the pool free between them.
                    for chunk in token_ids.chunks(crate::backend::ACTIVE_TOKENS_CHUNK) {
                        // Only numbered placeholders are formatted in; the ids are bound.
                        let sql = sqlx::AssertSqlSafe(crate::backend::active_tokens_sql(chunk.len()));
                        let mut query = sqlx::query_scalar::<_, i64>(sql);
                        for id in chunk {
                            query = query.bind(*id);
                        }
                        active.extend(query.fetch_all(&self.pool).await?);
                    }
                    Ok(active)
                }

                async fn mark_tokens_used(&self, token_ids: &[i64], at: i64) -> Result<()> {
                    for chunk in token_ids.chunks(crate::backend::ACTIVE_TOKENS_CHUNK) {
                        // Only numbered placeholders are formatted in; the ids are bound.
                        let sql = sqlx::AssertSqlSafe(crate::backend::mark_tokens_used_sql(chunk.len()));
                        let mut query = sqlx::query(sql).bind(at);
                        for id in chunk {
                            query = query.bind(*id);
                        }
                        // A transaction per chunk: the write lock is held for one statement.
                        let mut tx = self.write().await?;
                        query.execute(tx.conn()).await?;
                        tx.commit().await?;
                    }
                    Ok(())
                }

                async fn active_user_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>> {
                    let now = now();
                    let mut active = Vec::new();
                    for chunk in token_ids.chunks(crate::backend::ACTIVE_TOKENS_CHUNK) {
                        // Only numbered placeholders are formatted in; the ids are bound.
                        let sql = sqlx::AssertSqlSafe(crate::backend::active_user_tokens_sql(chunk.len()));
                        let mut query = sqlx::query_scalar::<_, i64>(sql).bind(now);
                        for id in chunk {
                            query = query.bind(*id);
                        }
                        active.extend(query.fetch_all(&self.pool).await?);
                    }
                    Ok(active)
                }

                async fn authenticate(&self, token: &str) -> Result<Option<AuthenticatedAgent>> {
                    if !token::has_token_shape(token) {
                        return Ok(None);
                    }
                    let presented = token::digest(token);
                    // Looking up by digest is an indexed equality match on a hash of the secret; any timing
                    // difference it has depends on the digest, which does not help recover a token.
                    let row = sqlx::query_as::<_, AuthRow>(
                        "SELECT t.id AS token_id, t.digest, a.id AS agent_id, a.name AS agent_name, \
                                p.id AS project_id, p.path AS project_path \
                         FROM agent_tokens t \
                         JOIN agents a ON a.id = t.agent_id \
                         JOIN projects p ON p.id = a.project_id \
                         WHERE t.digest = $1 AND t.revoked_at IS NULL",
                    )
                    .bind(hex::encode(presented))
                    .fetch_optional(&self.pool)
                    .await?;
                    let Some(row) = row else {
                        return Ok(None);
                    };
                    // Confirm on the raw bytes in constant time rather than trusting the SQL text match
                    // (collation, case folding) alone. A digest that does not decode fails closed.
                    let mut stored = [0u8; 32];
                    if hex::decode_to_slice(&row.digest, &mut stored).is_err()
                        || !bool::from(stored.ct_eq(&presented))
                    {
                        return Ok(None);
                    }
                    Ok(Some(AuthenticatedAgent {
                        agent_id: row.agent_id,
                        agent_name: row.agent_name,
                        project_id: row.project_id,
                        project_path: row.project_path,
                        token_id: row.token_id,
                    }))
                }

                async fn create_user_token(
                    &self,
                    agent_id: i64,
                    username: &str,
                    memberships: &str,
                    expires_at: i64,
                ) -> Result<(UserTokenInfo, AgentToken)> {
                    if username.is_empty() || username.len() > 255 || username.chars().any(char::is_control) {
                        return Err(Error::InvalidName {
                            what: "username",
                            reason: "must be 1 to 255 printable characters".into(),
                        });
                    }
                    let token = AgentToken::generate();
                    let digest = hex::encode(token::digest(token.expose()));
                    let mut tx = self.write().await?;
                    let info = sqlx::query_as::<_, UserTokenInfo>(
                        "INSERT INTO user_tokens (agent_id, username, digest, memberships, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         RETURNING id, agent_id, username, memberships, created_at, expires_at, revoked_at",
                    )
                    .bind(agent_id)
                    .bind(username)
                    .bind(&digest)
                    .bind(memberships)
                    .bind(now())
                    .bind(expires_at)
                    .fetch_all(tx.conn())
                    .await
                    .and_then(single)
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    tx.commit().await?;
                    Ok((info, token))
                }

                async fn authenticate_user_token(&self, token: &str) -> Result<Option<UserTokenInfo>> {
                    if !token::has_token_shape(token) {
                        return Ok(None);
                    }
                    let presented = token::digest(token);
                    let row = sqlx::query_as::<_, (String, i64, i64, String, String, i64, i64)>(
                        "SELECT digest, id, agent_id, username, memberships, created_at, expires_at \
                         FROM user_tokens WHERE digest = $1 AND revoked_at IS NULL AND expires_at > $2",
                    )
                    .bind(hex::encode(presented))
                    .bind(now())
                    .fetch_optional(&self.pool)
                    .await?;
                    let Some((stored_hex, id, agent_id, username, memberships, created_at, expires_at)) = row
                    else {
                        return Ok(None);
                    };
                    let mut stored = [0u8; 32];
                    if hex::decode_to_slice(&stored_hex, &mut stored).is_err()
                        || !bool::from(stored.ct_eq(&presented))
                    {
                        return Ok(None);
                    }
                    Ok(Some(UserTokenInfo {
                        id,
                        agent_id,
                        username,
                        memberships,
                        created_at,
                        expires_at,
                        revoked_at: None,
                    }))
                }

                async fn revoke_user_token(&self, id: i64) -> Result<bool> {
                    let mut tx = self.write().await?;
                    let result = sqlx::query(
                        "UPDATE user_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                    )
                    .bind(now())
                    .bind(id)
                    .execute(tx.conn())
                    .await?;
                    if result.rows_affected() > 0 {
                        tx.commit().await?;
                        return Ok(true);
                    }
                    // A mistyped id must not read as "revoked already": the caller is told
                    // that no such token exists, as for agent tokens.
                    let exists = sqlx::query_scalar::<_, i64>("SELECT id FROM user_tokens WHERE id = $1")
                        .bind(id)
                        .fetch_optional(tx.conn())
                        .await?
                        .is_some();
                    tx.commit().await?;
                    if exists {
                        Ok(false)
                    } else {
                        Err(Error::NotFound(format!("personal access token {id}")))
                    }
                }

                async fn put_sync_report(
                    &self,
                    agent_id: i64,
                    project: &str,
                    report: &[u8],
                    messages: &[OutboxMessage],
                ) -> Result<bool> {
                    let mut tx = self.write().await?;
                    sqlx::query(
                        "INSERT INTO sync_reports (agent_id, project, report, updated_at) \
                         VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (agent_id, project) \
                         DO UPDATE SET report = excluded.report, updated_at = excluded.updated_at",
                    )
                    .bind(agent_id)
                    .bind(project)
                    .bind(report)
                    .bind(now())
                    .execute(tx.conn())
                    .await
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    let mut added = false;
                    for m in messages {
                        let order_key = m.order_key.as_deref();
                        added |= Self::enqueue_notification_on(
                            tx.conn(), &m.receiver, &m.dedup_key, order_key, &m.payload,
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(added)
                }

                async fn sync_reports(&self, agent_id: i64) -> Result<Vec<(String, Vec<u8>)>> {
                    let reports = sqlx::query_as::<_, (String, Vec<u8>)>(
                        "SELECT project, report FROM sync_reports WHERE agent_id = $1 ORDER BY project",
                    )
                    .bind(agent_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(reports)
                }

                async fn sync_report(&self, agent_id: i64, project: &str) -> Result<Option<Vec<u8>>> {
                    let report = sqlx::query_scalar::<_, Vec<u8>>(
                        "SELECT report FROM sync_reports WHERE agent_id = $1 AND project = $2",
                    )
                    .bind(agent_id)
                    .bind(project)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(report)
                }

                async fn put_config_state(&self, agent_id: i64, state: &[u8]) -> Result<()> {
                    let mut tx = self.write().await?;
                    sqlx::query(
                        "INSERT INTO config_states (agent_id, state, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (agent_id) \
                         DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                    )
                    .bind(agent_id)
                    .bind(state)
                    .bind(now())
                    .execute(tx.conn())
                    .await
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn config_state(&self, agent_id: i64) -> Result<Option<Vec<u8>>> {
                    let state =
                        sqlx::query_scalar::<_, Vec<u8>>("SELECT state FROM config_states WHERE agent_id = $1")
                            .bind(agent_id)
                            .fetch_optional(&self.pool)
                            .await?;
                    Ok(state)
                }

                async fn config_states(&self) -> Result<Vec<(i64, Vec<u8>)>> {
                    let states = sqlx::query_as::<_, (i64, Vec<u8>)>(
                        "SELECT agent_id, state FROM config_states ORDER BY agent_id",
                    )
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(states)
                }

                async fn config_states_since(&self, since: i64) -> Result<Vec<(i64, Vec<u8>)>> {
                    let states = sqlx::query_as::<_, (i64, Vec<u8>)>(
                        "SELECT agent_id, state FROM config_states WHERE updated_at >= $1 \
                         ORDER BY agent_id",
                    )
                    .bind(since)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(states)
                }

                async fn enqueue_notification(
                    &self,
                    receiver: &str,
                    dedup_key: &str,
                    order_key: Option<&str>,
                    payload: &[u8],
                ) -> Result<bool> {
                    let mut tx = self.write().await?;
                    let added =
                        Self::enqueue_notification_on(tx.conn(), receiver, dedup_key, order_key, payload)
                            .await?;
                    tx.commit().await?;
                    Ok(added)
                }

                async fn enqueue_notification_unless(
                    &self,
                    receiver: &str,
                    dedup_key: &str,
                    order_key: Option<&str>,
                    payload: &[u8],
                    unless: &[&str],
                ) -> Result<bool> {
                    let mut tx = self.write().await?;
                    for key in unless {
                        let there = sqlx::query_scalar::<_, i64>(
                            "SELECT id FROM notifications WHERE receiver = $1 AND dedup_key = $2",
                        )
                        .bind(receiver)
                        .bind(*key)
                        .fetch_optional(tx.conn())
                        .await?;
                        if there.is_some() {
                            return Ok(false);
                        }
                    }
                    let added =
                        Self::enqueue_notification_on(tx.conn(), receiver, dedup_key, order_key, payload)
                            .await?;
                    tx.commit().await?;
                    Ok(added)
                }

                async fn claim_notifications(
                    &self,
                    limit: i64,
                    lease_secs: i64,
                    horizon_secs: i64,
                ) -> Result<Vec<PendingNotification>> {
                    let mut tx = self.write().await?;
                    let t = now();
                    // Ordered messages: only the newest of its key (ids grow in the order
                    // messages were queued), and not while another of its key is being sent,
                    // which could reach the receiver after it. Times past the horizon ($3)
                    // are from a clock that stepped back since: passed.
                    let due = sqlx::query_as::<_, PendingNotification>(
                        "SELECT id, receiver, dedup_key, payload, attempts FROM notifications n \
                         WHERE done_at IS NULL \
                         AND (next_attempt_at <= $1 OR next_attempt_at > $3) \
                         AND (claimed_until <= $1 OR claimed_until > $3) \
                         AND (order_key IS NULL OR NOT EXISTS (SELECT 1 FROM notifications o \
                           WHERE o.receiver = n.receiver AND o.order_key = n.order_key \
                           AND (o.id > n.id OR (o.done_at IS NULL \
                             AND o.claimed_until > $1 AND o.claimed_until <= $3)))) \
                         ORDER BY id LIMIT $2",
                    )
                    .bind(t)
                    .bind(limit)
                    .bind(t.saturating_add(horizon_secs))
                    .fetch_all(tx.conn())
                    .await?;
                    for n in &due {
                        sqlx::query("UPDATE notifications SET claimed_until = $1 WHERE id = $2")
                            .bind(t + lease_secs)
                            .bind(n.id)
                            .execute(tx.conn())
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(due)
                }

                async fn finish_notification(&self, id: i64, result: &NotificationResult) -> Result<()> {
                    let mut tx = self.write().await?;
                    let t = now();
                    let query = match result {
                        NotificationResult::Delivered => sqlx::query(
                            "UPDATE notifications SET done_at = $1, outcome = 'delivered', \
                             claimed_until = 0 WHERE id = $2",
                        )
                        .bind(t)
                        .bind(id),
                        NotificationResult::Retry { at, error } => sqlx::query(
                            "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = $1, \
                             last_error = $2, claimed_until = 0 WHERE id = $3",
                        )
                        .bind(*at)
                        .bind(error.as_str())
                        .bind(id),
                        NotificationResult::GaveUp { error } => sqlx::query(
                            "UPDATE notifications SET attempts = attempts + 1, done_at = $1, \
                             outcome = 'given_up', last_error = $2, claimed_until = 0 WHERE id = $3",
                        )
                        .bind(t)
                        .bind(error.as_str())
                        .bind(id),
                    };
                    query.execute(tx.conn()).await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn drop_replaced_notifications(&self, horizon_secs: i64) -> Result<u64> {
                    let mut tx = self.write().await?;
                    let t = now();
                    // One being sent is left to finish: its sender records how it went, then
                    // it is dropped here if it is to be sent again.
                    let dropped = sqlx::query(
                        "UPDATE notifications SET done_at = $1, outcome = 'dropped', claimed_until = 0, \
                         last_error = 'a newer message of its ordering key was queued' \
                         WHERE done_at IS NULL AND (claimed_until <= $1 OR claimed_until > $2) \
                         AND order_key IS NOT NULL \
                         AND EXISTS (SELECT 1 FROM notifications o WHERE o.receiver = notifications.receiver \
                           AND o.order_key = notifications.order_key AND o.id > notifications.id)",
                    )
                    .bind(t)
                    .bind(t.saturating_add(horizon_secs))
                    .execute(tx.conn())
                    .await?
                    .rows_affected();
                    tx.commit().await?;
                    Ok(dropped)
                }

                async fn record_offered_commit(
                    &self,
                    agent_id: i64,
                    project: &str,
                    commit: &str,
                ) -> Result<Option<String>> {
                    let mut tx = self.write().await?;
                    let before = sqlx::query_scalar::<_, String>(
                        "SELECT commit_id FROM offered_commits WHERE agent_id = $1 AND project = $2",
                    )
                    .bind(agent_id)
                    .bind(project)
                    .fetch_optional(tx.conn())
                    .await?;
                    sqlx::query(
                        "INSERT INTO offered_commits (agent_id, project, commit_id, updated_at) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id, project) \
                         DO UPDATE SET commit_id = excluded.commit_id, updated_at = excluded.updated_at",
                    )
                    .bind(agent_id)
                    .bind(project)
                    .bind(commit)
                    .bind(now())
                    .execute(tx.conn())
                    .await
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    tx.commit().await?;
                    Ok(before.filter(|c| c != commit))
                }

                async fn delete_finished_notifications(&self, done_before: i64, limit: i64) -> Result<u64> {
                    let mut tx = self.write().await?;
                    // `done_at IS NOT NULL` is what keeps messages still to send (claimed or
                    // not): only `finish_notification` sets it, for delivered or given up.
                    let deleted = sqlx::query(
                        "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications \
                         WHERE done_at IS NOT NULL AND done_at < $1 ORDER BY done_at, id LIMIT $2)",
                    )
                    .bind(done_before)
                    .bind(limit)
                    .execute(tx.conn())
                    .await?
                    .rows_affected();
                    tx.commit().await?;
                    Ok(deleted)
                }

                async fn create_web_session(
                    &self,
                    session: &WebSession,
                    max_sessions: i64,
                    max_per_subject: i64,
                ) -> Result<()> {
                    let mut tx = self.write().await?;
                    let t = now();
                    sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
                        .bind(t)
                        .execute(tx.conn())
                        .await?;
                    if let Some(subject) = &session.subject {
                        // The subject's newest sessions but one stay: the new one completes them.
                        sqlx::query(
                            "DELETE FROM web_sessions WHERE subject = $1 AND id_digest NOT IN \
                             (SELECT id_digest FROM web_sessions WHERE subject = $1 \
                             ORDER BY expires_at DESC, id_digest DESC LIMIT $2)",
                        )
                        .bind(subject)
                        .bind((max_per_subject - 1).max(0))
                        .execute(tx.conn())
                        .await?;
                    }
                    let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM web_sessions")
                        .fetch_one(tx.conn())
                        .await?;
                    let over = live - max_sessions + 1;
                    if over > 0 {
                        sqlx::query(
                            "DELETE FROM web_sessions WHERE id_digest IN (SELECT id_digest FROM \
                             web_sessions ORDER BY CASE WHEN role = 'admin' THEN 1 ELSE 0 END, \
                             expires_at, id_digest LIMIT $1)",
                        )
                        .bind(over)
                        .execute(tx.conn())
                        .await?;
                    }
                    sqlx::query(
                        "INSERT INTO web_sessions (id_digest, role, subject, username, groups, csrf, \
                         admin_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(&session.id_digest)
                    .bind(&session.role)
                    .bind(&session.subject)
                    .bind(&session.username)
                    .bind(&session.groups)
                    .bind(&session.csrf)
                    .bind(&session.admin_token)
                    .bind(t)
                    .bind(session.expires_at)
                    .execute(tx.conn())
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn web_session(&self, id_digest: &str) -> Result<Option<WebSession>> {
                    let rows = sqlx::query_as::<_, WebSession>(
                        "SELECT id_digest, role, subject, username, groups, csrf, admin_token, \
                         expires_at FROM web_sessions WHERE id_digest = $1 AND expires_at > $2",
                    )
                    .bind(id_digest)
                    .bind(now())
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(rows.into_iter().next())
                }

                async fn delete_web_session(&self, id_digest: &str) -> Result<bool> {
                    let mut tx = self.write().await?;
                    let deleted = sqlx::query("DELETE FROM web_sessions WHERE id_digest = $1")
                        .bind(id_digest)
                        .execute(tx.conn())
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok(deleted > 0)
                }

                async fn list_user_tokens(&self, agent_id: Option<i64>) -> Result<Vec<UserTokenInfo>> {
                    let tokens = sqlx::query_as::<_, UserTokenInfo>(
                        "SELECT id, agent_id, username, memberships, created_at, expires_at, revoked_at \
                         FROM user_tokens WHERE $1 IS NULL OR agent_id = $1 ORDER BY id",
                    )
                    .bind(agent_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(tokens)
                }

                async fn delete_agent(&self, agent_id: i64) -> Result<bool> {
                    let mut tx = self.write().await?;
                    // The agent's rows in other tables go with it (ON DELETE CASCADE).
                    let done = sqlx::query("DELETE FROM agents WHERE id = $1")
                        .bind(agent_id)
                        .execute(tx.conn())
                        .await?;
                    tx.commit().await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn suspend(
                    &self,
                    agent_id: i64,
                    scope: SuspensionScope,
                    reason: &str,
                    suspended_by: &str,
                ) -> Result<Suspension> {
                    let mut tx = self.write().await?;
                    let row = sqlx::query_as::<_, SuspensionRow>(
                        "INSERT INTO gitops_suspensions (agent_id, project_id, reason, suspended_by, suspended_at) \
                         VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (agent_id, project_id) DO UPDATE SET reason = excluded.reason, \
                         suspended_by = excluded.suspended_by, suspended_at = excluded.suspended_at \
                         RETURNING agent_id, project_id, reason, suspended_by, suspended_at",
                    )
                    .bind(agent_id)
                    .bind(scope.column())
                    .bind(reason)
                    .bind(suspended_by)
                    .bind(now())
                    .fetch_all(tx.conn())
                    .await
                    .and_then(single)
                    .map_err(|e| agent_ref_error(agent_id, e))?;
                    tx.commit().await?;
                    Ok(row.into())
                }

                async fn resume(&self, agent_id: i64, scope: SuspensionScope) -> Result<u64> {
                    let mut tx = self.write().await?;
                    let done = match scope {
                        SuspensionScope::Agent => {
                            sqlx::query("DELETE FROM gitops_suspensions WHERE agent_id = $1").bind(agent_id)
                        }
                        SuspensionScope::Project(_) => sqlx::query(
                            "DELETE FROM gitops_suspensions WHERE agent_id = $1 AND project_id = $2",
                        )
                        .bind(agent_id)
                        .bind(scope.column()),
                    }
                    .execute(tx.conn())
                    .await?;
                    tx.commit().await?;
                    Ok(done.rows_affected())
                }

                async fn suspensions(&self, agent_id: Option<i64>) -> Result<Vec<Suspension>> {
                    let rows = sqlx::query_as::<_, SuspensionRow>(
                        "SELECT agent_id, project_id, reason, suspended_by, suspended_at FROM gitops_suspensions \
                         WHERE $1 IS NULL OR agent_id = $1 ORDER BY agent_id, project_id",
                    )
                    .bind(agent_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok(rows.into_iter().map(Suspension::from).collect())
                }

                async fn check(&self) -> Result<()> {
                    // A table read, not `SELECT 1`: SQLite takes its shared lock only for a
                    // statement that reads the database, so a database another process holds
                    // locked passed the check while every token check failed.
                    sqlx::query("SELECT 1 FROM agents LIMIT 1")
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                async fn close(&self) {
                    self.pool.close().await;
                }
            }
        };
    };
}

pub(crate) use impl_store;

/// Token ids per `active_tokens` query.
pub(crate) const ACTIVE_TOKENS_CHUNK: usize = 500;

/// `SELECT … WHERE id IN ($1, …, $n)` for `n` ids (pure; `$N` placeholders work on both
/// backends).
pub(crate) fn active_tokens_sql(n: usize) -> String {
    format!(
        "SELECT id FROM agent_tokens WHERE revoked_at IS NULL AND id IN ({})",
        placeholders(1, n)
    )
}

/// `UPDATE … SET last_used_at = $1 WHERE id IN ($2, …)` for `n` agent token ids, never moving
/// a later time back (two replicas may write out of order) — unless it is more than
/// [`LAST_USE_AHEAD_SECS`] later: written by a clock that has since stepped back, it stayed in
/// the future, "last used" tomorrow, until real time caught up (E14).
pub(crate) fn mark_tokens_used_sql(n: usize) -> String {
    format!(
        "UPDATE agent_tokens SET last_used_at = $1 \
         WHERE (last_used_at IS NULL OR last_used_at < $1 OR last_used_at > $1 + {LAST_USE_AHEAD_SECS}) \
         AND id IN ({})",
        placeholders(2, n)
    )
}

/// How far ahead of a new last use a recorded one may be and still be kept.
pub(crate) const LAST_USE_AHEAD_SECS: i64 = 600;

/// `SELECT … WHERE expires_at > $1 AND id IN ($2, …)` for `n` personal access token ids.
pub(crate) fn active_user_tokens_sql(n: usize) -> String {
    format!(
        "SELECT id FROM user_tokens WHERE revoked_at IS NULL AND expires_at > $1 AND id IN ({})",
        placeholders(2, n)
    )
}

/// `$first, …` — `n` numbered placeholders (pure).
fn placeholders(first: usize, n: usize) -> String {
    let numbered: Vec<String> = (first..first + n).map(|i| format!("${i}")).collect();
    numbered.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn active_user_tokens_sql_binds_the_time_first() {
        assert_eq!(
            super::active_user_tokens_sql(2),
            "SELECT id FROM user_tokens WHERE revoked_at IS NULL AND expires_at > $1 AND id IN ($2, $3)"
        );
    }

    #[test]
    fn active_tokens_sql_numbers_one_placeholder_per_id() {
        assert_eq!(
            super::active_tokens_sql(3),
            "SELECT id FROM agent_tokens WHERE revoked_at IS NULL AND id IN ($1, $2, $3)"
        );
    }
}
