//! [`Store`] for [`Metered`]: each method asks the wrapped store and counts a failure under its
//! own operation.

use super::{
    Agent, AgentRow, AuthenticatedAgent, Metered, NotificationResult, Operation, OutboxMessage,
    PendingNotification, Project, ProjectSource, Result, Store, Suspension, SuspensionScope,
    TokenInfo, UserTokenInfo, WebSession,
};
use tether_store::AgentToken;

#[async_trait::async_trait]
impl Store for Metered {
    async fn ensure_project(&self, path: &str) -> Result<Project> {
        let result = self.bounded(self.inner.ensure_project(path)).await;
        self.metrics.seen(Operation::EnsureProject, result)
    }

    async fn get_project_by_path(&self, path: &str) -> Result<Option<Project>> {
        let result = self.bounded(self.inner.get_project_by_path(path)).await;
        self.metrics.seen(Operation::GetProjectByPath, result)
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let result = self.bounded(self.inner.list_projects()).await;
        self.metrics.seen(Operation::ListProjects, result)
    }

    async fn get_project(&self, id: i64) -> Result<Option<Project>> {
        let result = self.bounded(self.inner.get_project(id)).await;
        self.metrics.seen(Operation::GetProject, result)
    }

    async fn set_project_source(&self, path: &str, source: &ProjectSource) -> Result<Project> {
        let result = self
            .bounded(self.inner.set_project_source(path, source))
            .await;
        self.metrics.seen(Operation::SetProjectSource, result)
    }

    async fn remove_project(&self, path: &str) -> Result<bool> {
        let result = self.bounded(self.inner.remove_project(path)).await;
        self.metrics.seen(Operation::RemoveProject, result)
    }

    async fn register_agent(&self, project_path: &str, name: &str) -> Result<Agent> {
        let result = self
            .bounded(self.inner.register_agent(project_path, name))
            .await;
        self.metrics.seen(Operation::RegisterAgent, result)
    }

    async fn get_agent(&self, id: i64) -> Result<Option<Agent>> {
        let result = self.bounded(self.inner.get_agent(id)).await;
        self.metrics.seen(Operation::GetAgent, result)
    }

    async fn find_agent(&self, project_path: &str, name: &str) -> Result<Option<Agent>> {
        let result = self
            .bounded(self.inner.find_agent(project_path, name))
            .await;
        self.metrics.seen(Operation::FindAgent, result)
    }

    async fn list_agents(&self) -> Result<Vec<AgentRow>> {
        let result = self.bounded(self.inner.list_agents()).await;
        self.metrics.seen(Operation::ListAgents, result)
    }

    async fn create_token(
        &self,
        agent_id: i64,
        description: &str,
    ) -> Result<(TokenInfo, AgentToken)> {
        let result = self
            .bounded(self.inner.create_token(agent_id, description))
            .await;
        self.metrics.seen(Operation::CreateToken, result)
    }

    async fn list_tokens(&self, agent_id: i64) -> Result<Vec<TokenInfo>> {
        let result = self.bounded(self.inner.list_tokens(agent_id)).await;
        self.metrics.seen(Operation::ListTokens, result)
    }

    async fn revoke_token(&self, token_id: i64) -> Result<bool> {
        let result = self.bounded(self.inner.revoke_token(token_id)).await;
        self.metrics.seen(Operation::RevokeToken, result)
    }

    async fn token_active(&self, token_id: i64) -> Result<bool> {
        let result = self.bounded(self.inner.token_active(token_id)).await;
        self.metrics.seen(Operation::TokenActive, result)
    }

    async fn active_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>> {
        let result = self.bounded(self.inner.active_tokens(token_ids)).await;
        self.metrics.seen(Operation::ActiveTokens, result)
    }

    async fn mark_tokens_used(&self, token_ids: &[i64], at: i64) -> Result<()> {
        let result = self
            .bounded(self.inner.mark_tokens_used(token_ids, at))
            .await;
        self.metrics.seen(Operation::MarkTokensUsed, result)
    }

    async fn active_user_tokens(&self, token_ids: &[i64]) -> Result<Vec<i64>> {
        let result = self.bounded(self.inner.active_user_tokens(token_ids)).await;
        self.metrics.seen(Operation::ActiveUserTokens, result)
    }

    async fn authenticate(&self, token: &str) -> Result<Option<AuthenticatedAgent>> {
        let result = self.bounded(self.inner.authenticate(token)).await;
        self.metrics.seen(Operation::Authenticate, result)
    }

    async fn create_user_token(
        &self,
        agent_id: i64,
        username: &str,
        memberships: &str,
        expires_at: i64,
    ) -> Result<(UserTokenInfo, AgentToken)> {
        let result = self
            .bounded(
                self.inner
                    .create_user_token(agent_id, username, memberships, expires_at),
            )
            .await;
        self.metrics.seen(Operation::CreateUserToken, result)
    }

    async fn authenticate_user_token(&self, token: &str) -> Result<Option<UserTokenInfo>> {
        let result = self
            .bounded(self.inner.authenticate_user_token(token))
            .await;
        self.metrics.seen(Operation::AuthenticateUserToken, result)
    }

    async fn revoke_user_token(&self, id: i64) -> Result<bool> {
        let result = self.bounded(self.inner.revoke_user_token(id)).await;
        self.metrics.seen(Operation::RevokeUserToken, result)
    }

    async fn put_sync_report(
        &self,
        agent_id: i64,
        project: &str,
        report: &[u8],
        messages: &[OutboxMessage],
    ) -> Result<bool> {
        let put = self
            .inner
            .put_sync_report(agent_id, project, report, messages);
        let result = self.bounded(put).await;
        self.metrics.seen(Operation::PutSyncReport, result)
    }

    async fn sync_reports(&self, agent_id: i64) -> Result<Vec<(String, Vec<u8>)>> {
        let result = self.bounded(self.inner.sync_reports(agent_id)).await;
        self.metrics.seen(Operation::SyncReports, result)
    }

    async fn sync_report(&self, agent_id: i64, project: &str) -> Result<Option<Vec<u8>>> {
        let result = self
            .bounded(self.inner.sync_report(agent_id, project))
            .await;
        self.metrics.seen(Operation::SyncReport, result)
    }

    async fn put_config_state(&self, agent_id: i64, state: &[u8]) -> Result<()> {
        let result = self
            .bounded(self.inner.put_config_state(agent_id, state))
            .await;
        self.metrics.seen(Operation::PutConfigState, result)
    }

    async fn config_state(&self, agent_id: i64) -> Result<Option<Vec<u8>>> {
        let result = self.bounded(self.inner.config_state(agent_id)).await;
        self.metrics.seen(Operation::ConfigState, result)
    }

    async fn config_states(&self) -> Result<Vec<(i64, Vec<u8>)>> {
        let result = self.bounded(self.inner.config_states()).await;
        self.metrics.seen(Operation::ConfigStates, result)
    }

    async fn config_states_since(&self, since: i64) -> Result<Vec<(i64, Vec<u8>)>> {
        let result = self.bounded(self.inner.config_states_since(since)).await;
        self.metrics.seen(Operation::ConfigStates, result)
    }

    async fn enqueue_notification(
        &self,
        receiver: &str,
        dedup_key: &str,
        order_key: Option<&str>,
        payload: &[u8],
    ) -> Result<bool> {
        let result = self
            .bounded(
                self.inner
                    .enqueue_notification(receiver, dedup_key, order_key, payload),
            )
            .await;
        self.metrics.seen(Operation::EnqueueNotification, result)
    }

    async fn enqueue_notification_unless(
        &self,
        receiver: &str,
        dedup_key: &str,
        order_key: Option<&str>,
        payload: &[u8],
        unless: &[&str],
    ) -> Result<bool> {
        let result = self
            .inner
            .enqueue_notification_unless(receiver, dedup_key, order_key, payload, unless)
            .await;
        self.metrics
            .seen(Operation::EnqueueNotificationUnless, result)
    }

    async fn claim_notifications(
        &self,
        limit: i64,
        lease_secs: i64,
        horizon_secs: i64,
    ) -> Result<Vec<PendingNotification>> {
        let result = self
            .bounded(
                self.inner
                    .claim_notifications(limit, lease_secs, horizon_secs),
            )
            .await;
        self.metrics.seen(Operation::ClaimNotifications, result)
    }

    async fn finish_notification(&self, id: i64, result: &NotificationResult) -> Result<()> {
        let result = self
            .bounded(self.inner.finish_notification(id, result))
            .await;
        self.metrics.seen(Operation::FinishNotification, result)
    }

    async fn drop_replaced_notifications(&self, horizon_secs: i64) -> Result<u64> {
        let result = self
            .bounded(self.inner.drop_replaced_notifications(horizon_secs))
            .await;
        self.metrics
            .seen(Operation::DropReplacedNotifications, result)
    }

    async fn record_offered_commit(
        &self,
        agent_id: i64,
        project: &str,
        commit: &str,
    ) -> Result<Option<String>> {
        let result = self
            .bounded(self.inner.record_offered_commit(agent_id, project, commit))
            .await;
        self.metrics.seen(Operation::RecordOfferedCommit, result)
    }

    async fn delete_finished_notifications(&self, done_before: i64, limit: i64) -> Result<u64> {
        let result = self
            .bounded(self.inner.delete_finished_notifications(done_before, limit))
            .await;
        self.metrics
            .seen(Operation::DeleteFinishedNotifications, result)
    }

    async fn create_web_session(
        &self,
        session: &WebSession,
        max_sessions: i64,
        max_per_subject: i64,
    ) -> Result<()> {
        let result = self
            .bounded(
                self.inner
                    .create_web_session(session, max_sessions, max_per_subject),
            )
            .await;
        self.metrics.seen(Operation::CreateWebSession, result)
    }

    async fn web_session(&self, id_digest: &str) -> Result<Option<WebSession>> {
        let result = self.bounded(self.inner.web_session(id_digest)).await;
        self.metrics.seen(Operation::WebSession, result)
    }

    async fn delete_web_session(&self, id_digest: &str) -> Result<bool> {
        let result = self.bounded(self.inner.delete_web_session(id_digest)).await;
        self.metrics.seen(Operation::DeleteWebSession, result)
    }

    async fn list_user_tokens(&self, agent_id: Option<i64>) -> Result<Vec<UserTokenInfo>> {
        let result = self.bounded(self.inner.list_user_tokens(agent_id)).await;
        self.metrics.seen(Operation::ListUserTokens, result)
    }

    async fn delete_agent(&self, agent_id: i64) -> Result<bool> {
        let result = self.bounded(self.inner.delete_agent(agent_id)).await;
        self.metrics.seen(Operation::DeleteAgent, result)
    }

    async fn suspend(
        &self,
        agent_id: i64,
        scope: SuspensionScope,
        reason: &str,
        suspended_by: &str,
    ) -> Result<Suspension> {
        let result = self
            .bounded(self.inner.suspend(agent_id, scope, reason, suspended_by))
            .await;
        self.metrics.seen(Operation::Suspend, result)
    }

    async fn resume(&self, agent_id: i64, scope: SuspensionScope) -> Result<u64> {
        let result = self.bounded(self.inner.resume(agent_id, scope)).await;
        self.metrics.seen(Operation::Resume, result)
    }

    async fn suspensions(&self, agent_id: Option<i64>) -> Result<Vec<Suspension>> {
        let result = self.bounded(self.inner.suspensions(agent_id)).await;
        self.metrics.seen(Operation::Suspensions, result)
    }

    async fn check(&self) -> Result<()> {
        let result = self.bounded(self.inner.check()).await;
        self.metrics.seen(Operation::Check, result)
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
