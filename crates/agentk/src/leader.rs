//! Leader election among the replicas of one agent (a Deployment with `replicas: 2`, or the
//! surge pod of a rollout): every replica serves tunnel requests, but only the holder of a
//! Kubernetes Lease in the agent's namespace applies and prunes GitOps manifests. Two appliers
//! would both apply and both prune every change.
//!
//! The numbers are client-go's defaults (lease 15 s, renew deadline 10 s, retry 2 s): a leader
//! that cannot renew for the renew deadline stops applying at least 5 s before its lease
//! expires and another replica may take it over. That holds only if a round of the election
//! cannot outlast the deadline: a request to the API server may hang (a connection dropped
//! silently, a slow etcd) and the kube client has no read timeout, so each round is bounded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod metrics;
mod reach;

pub use metrics::ElectionMetrics;
use reach::{Adjusted, Reach, ReachClock};

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading (< `lease_duration`).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as read (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// There is no lease yet: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or its holder let it expire: take it.
    TakeOver,
    /// Another replica holds a live lease.
    Follow { holder: String },
}

/// Decides from the lease's spec (`None`: no lease) whether this replica (`me`) may lead.
/// `unchanged_for`: how long, by this replica's own clock, the lease has been seen unchanged
/// (see [`Observed`]); another holder's lease expires when that passes its duration.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Step {
    let Some(spec) = spec else {
        return Step::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::TakeOver;
    }
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    let expired = spec.renew_time.is_none() || unchanged_for > Duration::from_secs(duration);
    if expired {
        Step::TakeOver
    } else {
        Step::Follow { holder }
    }
}

/// The lease as this replica last read it, and since when (its monotonic clock) it has been
/// unchanged. The holder's `renewTime` is written by the holder's clock: comparing it with
/// ours would let a follower whose clock runs ahead take a lease that is being renewed (two
/// replicas applying), so, as client-go does, a lease counts as expired only once this replica
/// has seen it unchanged for the lease's duration. A replica that starts next to a lease
/// abandoned long ago therefore waits one lease duration before taking it.
#[derive(Debug, Default)]
pub struct Observed {
    seen: Option<(LeaseSpec, Instant)>,
}

impl Observed {
    /// Records `spec` as read at `now`; how long it has been unchanged.
    pub fn unchanged_for(&mut self, spec: Option<&LeaseSpec>, now: Instant) -> Duration {
        let Some(spec) = spec else {
            self.seen = None;
            return Duration::ZERO;
        };
        match &self.seen {
            Some((last, since)) if last == spec => now.saturating_duration_since(*since),
            _ => {
                self.seen = Some((spec.clone(), now));
                Duration::ZERO
            }
        }
    }
}

/// The spec of a lease held by `me` from `acquired`, renewed `now`.
fn held_spec(
    me: &str,
    timing: Timing,
    acquired: Timestamp,
    now: Timestamp,
    transitions: i32,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(
            i32::try_from(timing.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Runs the election for one agent's lease in `namespace`, publishing whether this replica
/// leads on `leading`, until `shutdown`; then hands the lease back so another replica takes
/// over at its next try instead of after the lease expires.
#[derive(Clone)]
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
    pub metrics: ElectionMetrics,
    /// Whether this replica's tunnel to kas is connected (`None`: taken as always): a leader
    /// cut from kas hands the lease to a connected replica that asks for it ([`reach`]).
    pub kas: Option<watch::Receiver<bool>>,
    /// Until when the last renewal holds (`None`: not leading), for the syncs to check as they
    /// write (`tether_gitops_agent::lease`): a replica woken from a pause must not write before
    /// this loop's next round demotes it.
    pub until: watch::Sender<Option<Instant>>,
}

/// How a round of the election ended.
enum Round {
    Leads,
    Follows,
    /// We must stop leading, then give up this lease (as read) to the replica asking for it.
    HandOver(Box<Lease>),
}

/// How long a replica may be without kas before it counts as cut off: twice the lease, so a
/// kas restart or rollout (agents back within a second or two) moves no lease.
fn kas_grace(timing: Timing) -> Duration {
    timing.lease_duration * 2
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Logs a failed round, once per distinct error: rounds repeat every retry period.
fn log_new_error(last_error: &mut Option<String>, e: &anyhow::Error) {
    let text = format!("{e:#}");
    if last_error.as_deref() != Some(text.as_str()) {
        tracing::error!(error = %text, "Leader election failed; GitOps applies only while this replica holds the lease");
        *last_error = Some(text);
    }
}

/// When a round of the election that starts `now` must end: by the renew deadline of the last
/// renewal while we lead (by then we must know whether we still do), one renew deadline from
/// now otherwise (a hung request must not stop the election for good).
fn round_deadline(
    last_renewal: Option<Instant>,
    now: Instant,
    renew_deadline: Duration,
) -> Instant {
    last_renewal
        .map(|t| t + renew_deadline)
        .filter(|deadline| *deadline > now)
        .unwrap_or(now + renew_deadline)
}

/// Why a round got no answer in time (pure): the API server not answering at all, or answering
/// the read and not the write — which other requests do not show (E12: a slow admission webhook
/// on Leases kept agentk from leading while the log sent the operator to a dead API server).
fn unanswered_round(lease: &str, renew_deadline: Duration, writing: bool) -> String {
    if writing {
        format!(
            "lease {lease}: the API server answered its read but not its write within the renew deadline ({renew_deadline:?}): something delays writes of Leases (an admission webhook on leases? etcd?)"
        )
    } else {
        format!(
            "lease {lease}: no answer from the API server within the renew deadline ({renew_deadline:?})"
        )
    }
}

/// Whether we lead at `now`: only while the lease is provably ours, renewed (a round that
/// started at `last_renewal` succeeded) within the renew deadline.
fn leads(last_renewal: Option<Instant>, now: Instant, renew_deadline: Duration) -> bool {
    last_renewal.is_some_and(|t| now < t + renew_deadline)
}

impl Elector {
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut last_renewal: Option<Instant> = None;
        let mut last_error: Option<String> = None;
        let mut observed = Observed::default();
        let mut clock = ReachClock::new(kas_grace(self.timing));
        let mut said_cut_off = false;
        self.metrics.started(&self.name);
        loop {
            let connected = self.kas.as_ref().is_none_or(|k| *k.borrow());
            let reach = clock.observe(connected, Instant::now());
            self.say_cut_off(&mut said_cut_off, reach, *leading.borrow());
            // The lease says it was renewed when the round started (`try_lead` reads the
            // time first), so the deadline counts from there, not from the answer.
            let started = Instant::now();
            let deadline = round_deadline(last_renewal, started, self.timing.renew_deadline);
            let writing = AtomicBool::new(false);
            let round = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.try_lead(&mut observed, reach, &writing)) => r.unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("{}", unanswered_round(&self.name, self.timing.renew_deadline, writing.load(Ordering::Relaxed))))
                }),
                () = shutdown.cancelled() => break,
            };
            match round {
                Ok(Round::Leads) => {
                    last_renewal = Some(started);
                    last_error = None;
                }
                Ok(Round::Follows) => {
                    last_renewal = None;
                    last_error = None;
                }
                Ok(Round::HandOver(lease)) => {
                    // GitOps stops here before another replica can take the lease.
                    last_renewal = None;
                    self.until.send_replace(None);
                    self.publish(&leading, false);
                    self.hand_over(*lease).await;
                }
                Err(e) => {
                    self.metrics.failed(&self.name);
                    log_new_error(&mut last_error, &e);
                }
            }
            let lead = leads(last_renewal, Instant::now(), self.timing.renew_deadline);
            let until = last_renewal
                .filter(|_| lead)
                .map(|t| t + self.timing.renew_deadline);
            self.until
                .send_if_modified(|u| std::mem::replace(u, until) != until);
            self.publish(&leading, lead);
            tokio::select! {
                () = tokio::time::sleep(self.timing.retry_period) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.until.send_replace(None);
        if *leading.borrow() {
            leading.send_replace(false);
            self.metrics.leading(&self.name, false);
            self.release().await;
        }
    }

    /// Says once, at warn, that the leader has been cut from kas past the grace: no commit
    /// reaches the cluster through it until a connected replica asks for the lease.
    fn say_cut_off(&self, said: &mut bool, reach: Reach, leading: bool) {
        if reach != Reach::CutOff {
            *said = false;
        } else if leading && !std::mem::replace(said, true) {
            tracing::warn!(lease = %self.name, "This replica leads GitOps but has not reached kas for {:?}: it keeps correcting drift and hands the lease to the first replica connected to kas that asks", kas_grace(self.timing));
        }
    }

    fn publish(&self, leading: &watch::Sender<bool>, lead: bool) {
        self.metrics.leading(&self.name, lead);
        leading.send_if_modified(|current| {
            if *current == lead {
                return false;
            }
            if lead {
                tracing::info!(lease = %self.name, identity = %self.identity, "Became the leader: this replica applies GitOps");
            } else {
                tracing::info!(lease = %self.name, identity = %self.identity, "No longer the leader: GitOps stops on this replica");
            }
            *current = lead;
            true
        });
    }

    /// One round: creates, renews or takes over the lease, or asks for it or hands it over
    /// as the kas link of each replica says (`reach`: ours).
    /// One round; `writing` is set once the lease was read and its write is under way.
    async fn try_lead(
        &self,
        observed: &mut Observed,
        reach: Reach,
        writing: &AtomicBool,
    ) -> anyhow::Result<Round> {
        let err = |source: kube::Error| {
            anyhow::Error::new(source).context(format!("lease {}", self.name))
        };
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await.map_err(err)?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let unchanged_for = observed.unchanged_for(spec, Instant::now());
        let fresh = spec
            .and_then(|s| s.lease_duration_seconds)
            .is_some_and(|d| unchanged_for < Duration::from_secs(u64::try_from(d).unwrap_or(0)));
        let annotations = current
            .as_ref()
            .and_then(|l| l.metadata.annotations.clone())
            .unwrap_or_default();
        let step = decide(spec, &self.identity, unchanged_for);
        let step = match reach::adjust(step, &annotations, &self.identity, reach, fresh) {
            Adjusted::Step(step) => step,
            Adjusted::HandOver => {
                return Ok(current.map_or(Round::Follows, |l| Round::HandOver(Box::new(l))));
            }
            Adjusted::AskFor => return self.ask_for(current).await.map_err(err),
        };
        let mut lease = match (step, current) {
            (Step::Follow { holder }, _) => {
                tracing::debug!(%holder, "Another replica leads");
                return Ok(Round::Follows);
            }
            (Step::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(held_spec(&self.identity, self.timing, now, now, 0)),
                };
                writing.store(true, Ordering::Relaxed);
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Round::Leads),
                    Err(e) if is_conflict(&e) => Ok(Round::Follows),
                    Err(e) => Err(err(e)),
                };
            }
            (Step::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let acquired = spec.acquire_time.clone().map_or(now, |t| t.0);
                let transitions = spec.lease_transitions.unwrap_or(0);
                lease.spec = Some(held_spec(
                    &self.identity,
                    self.timing,
                    acquired,
                    now,
                    transitions,
                ));
                lease
            }
            (Step::TakeOver, Some(mut lease)) => {
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0)
                    .saturating_add(1);
                lease.spec = Some(held_spec(
                    &self.identity,
                    self.timing,
                    now,
                    now,
                    transitions,
                ));
                lease
            }
        };
        reach::mark_held(lease.metadata.annotations.get_or_insert_default(), reach);
        // The resourceVersion read above makes this a compare-and-swap: if another replica
        // wrote the lease meanwhile, the API server answers 409 and we do not lead.
        writing.store(true, Ordering::Relaxed);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Leads),
            Err(e) if is_conflict(&e) => Ok(Round::Follows),
            Err(e) => Err(err(e)),
        }
    }

    /// Writes our request for a lease whose holder cannot reach kas (a compare-and-swap: a
    /// renewal in between wins, and we ask again next round).
    async fn ask_for(&self, current: Option<Lease>) -> Result<Round, kube::Error> {
        let Some(mut lease) = current else {
            return Ok(Round::Follows);
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        lease
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(reach::CANDIDATE.to_owned(), self.identity.clone());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::warn!(lease = %self.name, %holder, "The GitOps leader cannot reach kas: asked it for the lease, as this replica can");
                Ok(Round::Follows)
            }
            Err(e) if is_conflict(&e) => Ok(Round::Follows),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease (as read when we decided) to the replica that asked for it: holder
    /// cleared, its request kept so that only it takes the lease while it is fresh.
    async fn hand_over(&self, mut lease: Lease) {
        let candidate = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(reach::CANDIDATE).cloned())
            .unwrap_or_default();
        if let Some(notes) = lease.metadata.annotations.as_mut() {
            notes.remove(reach::CUT_OFF);
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::warn!(lease = %self.name, %candidate, "Handed the GitOps lease to a replica connected to kas: this one has not reached kas for {:?}", kas_grace(self.timing))
            }
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "Handing the GitOps lease over failed; asked again next round")
            }
        }
    }

    /// Gives the lease up (holder cleared) so a follower takes over at its next retry.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "Released the leader lease"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "Releasing the leader lease failed; another replica takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use serde_json::{Value, json};

    use super::*;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// An in-memory Lease API: the lease, how many more requests it answers, and when it last
    /// took a renewal (a replace).
    #[derive(Default)]
    struct Stub {
        lease: Option<Value>,
        answers_left: usize,
        renewed_at: Option<Instant>,
        /// Writes are answered 403, as for a ServiceAccount without rights on Leases.
        refuse_writes: bool,
    }

    impl Stub {
        fn answer(
            &mut self,
            method: &http::Method,
            body: &[u8],
        ) -> Result<http::Response<Full<Bytes>>, BoxError> {
            let (code, value) = match (method, &self.lease) {
                (&http::Method::GET, Some(lease)) => (200, lease.clone()),
                (&http::Method::GET, None) => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                _ if self.refuse_writes => (
                    403,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "Forbidden", "code": 403, "message": "forbidden"}),
                ),
                _ => {
                    let lease: Value = serde_json::from_slice(body)?;
                    self.lease = Some(lease.clone());
                    if method == http::Method::PUT {
                        self.renewed_at = Some(Instant::now());
                    }
                    (200, lease)
                }
            };
            Ok(http::Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&value)?)))?)
        }
    }

    /// A kube client whose Lease API answers `answers` requests and then never again, like an
    /// API server behind a connection that was dropped silently.
    fn freezing_api(answers: usize) -> (kube::Client, Arc<Mutex<Stub>>) {
        let stub = Arc::new(Mutex::new(Stub {
            answers_left: answers,
            ..Stub::default()
        }));
        let state = Arc::clone(&stub);
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let state = Arc::clone(&state);
            async move {
                let method = req.method().clone();
                let body = req.into_body().collect().await?.to_bytes();
                let answer = {
                    let mut st = state.lock().expect("stub");
                    st.answers_left.checked_sub(1).map(|left| {
                        st.answers_left = left;
                        st.answer(&method, &body)
                    })
                };
                match answer {
                    Some(a) => a,
                    None => std::future::pending().await,
                }
            }
        });
        (kube::Client::new(service, "agents"), stub)
    }

    /// Replica `agentk-a`'s election for `agent-1-lock` in `agents`, with the default timing.
    fn elector(client: kube::Client, metrics: ElectionMetrics) -> Elector {
        Elector {
            api: Api::namespaced(client, "agents"),
            name: "agent-1-lock".into(),
            identity: "agentk-a".into(),
            timing: Timing::default(),
            metrics,
            kas: None,
            until: watch::Sender::new(None),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_api_server_stops_answering_stops_leading_by_the_renew_deadline() {
        // Creates the lease (GET, POST), renews it once (GET, PUT), then hears nothing more.
        let (client, stub) = freezing_api(4);
        let timing = Timing::default();
        let elector = elector(client, ElectionMetrics::default());
        let until = elector.until.subscribe();
        let (tx, mut leading) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(elector.run(tx, shutdown.clone()));
        leading.wait_for(|l| *l).await.expect("the elector runs");
        // The syncs' check: the renewal holds until the renew deadline after it.
        let held = (*until.borrow()).expect("leading: until when its renewal holds");
        assert!(held > Instant::now() && held <= Instant::now() + timing.renew_deadline);
        // Time is paused: it moves only when every task waits, so this is exact, not a race.
        let lost = tokio::time::timeout(timing.lease_duration, async {
            leading.wait_for(|l| !*l).await.map(|_| ())
        })
        .await;
        assert!(
            matches!(lost, Ok(Ok(()))),
            "still leading {:?} after the API server went silent",
            timing.lease_duration
        );
        assert_eq!(*until.borrow(), None, "no renewal holds once not leading");
        let renewed = stub.lock().expect("stub").renewed_at;
        let renewed = renewed.expect("one renewal before the silence");
        let after = Instant::now() - renewed;
        assert!(
            after <= timing.renew_deadline,
            "stopped leading {after:?} after the last renewal"
        );
        shutdown.cancel();
        task.await.expect("the elector stops");
    }

    /// The value of `series` in the registry's exposition.
    fn sample(registry: &prometheus_client::registry::Registry, series: &str) -> Option<f64> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_gauge_follows_the_lease_and_refused_lease_writes_are_counted() {
        let (client, stub) = freezing_api(usize::MAX);
        stub.lock().expect("stub").refuse_writes = true;
        let metrics = ElectionMetrics::default();
        let mut registry = prometheus_client::registry::Registry::with_prefix("agentk");
        metrics.register(&mut registry);
        let timing = Timing::default();
        let elector = elector(client, metrics);
        let (gauge, failures) = (
            r#"agentk_leader{lease="agent-1-lock"}"#,
            r#"agentk_leader_election_failures_total{lease="agent-1-lock"}"#,
        );
        let (tx, mut leading) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(elector.run(tx, shutdown.clone()));
        // Time is paused and moves only when every task waits: rounds at 0, 2, 4 and 6 s,
        // each creating the lease in vain.
        tokio::time::sleep(timing.retry_period * 3 + Duration::from_millis(1)).await;
        assert_eq!(sample(&registry, gauge), Some(0.0));
        assert_eq!(sample(&registry, failures), Some(4.0));

        stub.lock().expect("stub").refuse_writes = false;
        leading.wait_for(|l| *l).await.expect("the elector runs");
        assert_eq!(sample(&registry, gauge), Some(1.0));
        let before = sample(&registry, failures).expect("failures");

        // The rights are taken away again: renewals fail, and by the renew deadline it no
        // longer leads.
        stub.lock().expect("stub").refuse_writes = true;
        leading.wait_for(|l| !*l).await.expect("the elector runs");
        assert_eq!(sample(&registry, gauge), Some(0.0));
        let after = sample(&registry, failures).expect("failures");
        assert!(
            after > before,
            "failed renewals counted: {before} -> {after}"
        );
        shutdown.cancel();
        task.await.expect("the elector stops");
    }

    #[test]
    fn a_round_unanswered_at_its_write_names_the_write() {
        let d = Duration::from_secs(10);
        assert_eq!(
            unanswered_round("agent-1-lock", d, false),
            "lease agent-1-lock: no answer from the API server within the renew deadline (10s)"
        );
        assert!(
            unanswered_round("agent-1-lock", d, true)
                .contains("answered its read but not its write within the renew deadline (10s)")
        );
    }

    #[test]
    fn a_round_ends_by_the_renew_deadline_of_the_last_renewal() {
        let (t0, rd) = (Instant::now(), Duration::from_secs(10));
        let s = Duration::from_secs;
        assert_eq!(round_deadline(None, t0, rd), t0 + rd);
        assert_eq!(round_deadline(Some(t0), t0 + s(2), rd), t0 + rd);
        // Renewed too long ago: no longer leading, a full round to acquire again.
        assert_eq!(round_deadline(Some(t0), t0 + rd, rd), t0 + rd + rd);
        assert!(leads(Some(t0), t0 + s(9), rd));
        assert!(!leads(Some(t0), t0 + rd, rd));
        assert!(!leads(None, t0, rd));
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("timestamp")
    }

    fn spec(holder: Option<&str>, renewed: Option<i64>, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "a", s(0)), Step::Create);
    }

    #[test]
    fn our_lease_is_renewed_even_when_expired() {
        assert_eq!(
            decide(Some(&spec(Some("a"), Some(10), 15)), "a", s(90)),
            Step::Renew
        );
    }

    #[test]
    fn a_live_lease_of_another_replica_is_followed() {
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(90), 15)), "a", s(10)),
            Step::Follow { holder: "b".into() }
        );
        // Exactly at expiry it still holds.
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(85), 15)), "a", s(15)),
            Step::Follow { holder: "b".into() }
        );
    }

    #[test]
    fn an_expired_released_or_never_renewed_lease_is_taken_over() {
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(84), 15)), "a", s(16)),
            Step::TakeOver
        );
        assert_eq!(
            decide(Some(&spec(None, Some(99), 15)), "a", s(0)),
            Step::TakeOver
        );
        assert_eq!(
            decide(Some(&spec(Some(""), Some(99), 15)), "a", s(0)),
            Step::TakeOver
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), None, 15)), "a", s(0)),
            Step::TakeOver
        );
    }

    #[test]
    fn expiry_is_timed_by_this_replicas_clock_not_by_the_holders_renew_time() {
        let t0 = Instant::now();
        let mut observed = Observed::default();
        // The holder's clock is 14 s behind ours: by wall clocks its lease, renewed a moment
        // ago, would look 14 s old. Renewed every 2 s, it is never taken.
        for round in 0..10 {
            let renewed = spec(Some("b"), Some(1000 + 2 * round), 15);
            let now = t0 + s(2 * round.unsigned_abs());
            let unchanged = observed.unchanged_for(Some(&renewed), now);
            assert_eq!(
                decide(Some(&renewed), "a", unchanged),
                Step::Follow { holder: "b".into() }
            );
        }
        // The holder stops renewing: taken over once we saw no change for the duration.
        let last = spec(Some("b"), Some(1018), 15);
        let seen = t0 + s(18);
        for (after, expected) in [(s(15), false), (s(16), true)] {
            let unchanged = observed.unchanged_for(Some(&last), seen + after);
            let taken = decide(Some(&last), "a", unchanged) == Step::TakeOver;
            assert_eq!(taken, expected, "{after:?} after the last renewal");
        }
    }

    #[test]
    fn the_defaults_stop_leading_well_before_the_lease_expires() {
        let t = Timing::default();
        assert!(t.renew_deadline + t.retry_period < t.lease_duration);
    }
}
