//! What each agent replica (Pod) runs, shared between kas replicas through Redis, so that the
//! configuration in force is decided on all of an agent's replicas wherever they are connected
//! (see [`tether_configuration_server::shared`]).
//!
//! `tether:running:<agent id>` is a hash: one field per configuration stream
//! (`<kas replica id>:<stream>`), its value what that stream's Pod runs and until when the
//! entry counts (Unix seconds). A kas replica writes its entry when a stream's commit changes
//! and removes it when the stream ends, and writes all of its entries again every
//! [`REFRESH`] with [`ENTRY_TTL`] to live. An entry counts only while its kas replica's
//! liveness key (`tether:replica:<id>`, see [`crate::peers`]) exists: a killed replica's
//! entries stop counting within its 10 s, a stopping one's at once (it deletes the key). The
//! survivors remove a dead replica's entries a few seconds later ([`DEPARTED_GRACE`]) and
//! decide again what is in force for its agents (`ConfigService::decide_again`, every few
//! seconds), as no stream of theirs ended to do so.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tether_configuration_server::{DirectoryError, ReplicaRuns, RunningDirectory};
use tether_tunnel_server::service_future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterEvent};

/// How long an entry counts without a refresh, and the refresh period: Redis losing its data
/// leaves each kas replica deciding on its own agent replicas for a refresh period at most.
const ENTRY_TTL: u64 = 180;
const REFRESH: Duration = Duration::from_secs(60);
/// How often removals that failed (Redis unreachable as a stream ended) are tried again: the
/// other kas replicas would otherwise count the ended stream's entry until it expires.
const WITHDRAW_RETRY: Duration = Duration::from_secs(3);

/// How long a dead kas replica's entries are left before they are removed and the agents'
/// configuration decided again: a stopping replica's Pods reconnect to the others within
/// seconds, and deciding before they do would put in force what the Pods already there run.
const DEPARTED_GRACE: Duration = Duration::from_secs(5);

/// One stream's entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    runs: ReplicaRuns,
    /// Unix seconds after which the entry no longer counts.
    until: u64,
}

fn key(agent_id: i64) -> String {
    format!("tether:running:{agent_id}")
}

fn field(kas: u64, stream: u64) -> String {
    format!("{kas}:{stream}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Another kas replica's entry: its field, that kas replica, and what the stream's Pod runs.
#[derive(Debug)]
struct Other {
    field: String,
    kas: u64,
    runs: ReplicaRuns,
}

/// The entries of other kas replicas than `me` not expired at `now` (pure). Unreadable
/// entries (another kas version's) are skipped.
fn others_entries(stored: HashMap<String, String>, me: u64, now: u64) -> Vec<Other> {
    stored
        .into_iter()
        .filter_map(|(field, value)| {
            let kas: u64 = field.split_once(':')?.0.parse().ok()?;
            let entry: Entry = serde_json::from_str(&value).ok()?;
            (kas != me && entry.until > now).then_some(Other {
                field,
                kas,
                runs: entry.runs,
            })
        })
        .collect()
}

/// The fields of `others` whose kas replica is dead and was first found dead (as `since`
/// records, updated here) [`DEPARTED_GRACE`] before `now` (pure).
fn past_grace(
    since: &mut HashMap<u64, Instant>,
    others: Vec<(Other, bool)>,
    now: Instant,
) -> Vec<String> {
    // Long dead ones' entries have expired by now.
    since.retain(|_, at| now.duration_since(*at) < Duration::from_secs(ENTRY_TTL));
    let mut dead = Vec::new();
    for (e, live) in others {
        if live {
            // Back (its key had lapsed): its next death is timed afresh.
            since.remove(&e.kas);
            continue;
        }
        let first = *since.entry(e.kas).or_insert(now);
        if now.duration_since(first) >= DEPARTED_GRACE {
            dead.push(e.field);
        }
    }
    dead
}

/// This kas replica's part of the directory; cheap to share (`Arc`).
pub struct SharedRunning {
    cluster: Cluster,
    /// This replica's entries, by agent and stream, written again at each refresh.
    mine: Mutex<HashMap<(i64, u64), ReplicaRuns>>,
    /// When this replica first found each dead kas replica's entries (see
    /// [`SharedRunning::remove_departed`]).
    dead_since: Mutex<HashMap<u64, Instant>>,
    /// Entries of ended streams whose removal failed, removed again every [`WITHDRAW_RETRY`].
    unwithdrawn: Mutex<HashSet<(i64, u64)>>,
}

impl std::fmt::Debug for SharedRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRunning").finish_non_exhaustive()
    }
}

fn redis_error(e: redis::RedisError) -> DirectoryError {
    DirectoryError(format!("redis: {e}"))
}

impl SharedRunning {
    pub fn new(cluster: Cluster) -> SharedRunning {
        SharedRunning {
            cluster,
            mine: Mutex::default(),
            dead_since: Mutex::default(),
            unwithdrawn: Mutex::default(),
        }
    }

    fn mine(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, u64), ReplicaRuns>> {
        self.mine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unwithdrawn(&self) -> std::sync::MutexGuard<'_, HashSet<(i64, u64)>> {
        self.unwithdrawn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes this replica's entries again every [`REFRESH`], and removes those whose removal
    /// failed every [`WITHDRAW_RETRY`], until `stop`.
    pub async fn refresh(self: Arc<Self>, stop: CancellationToken) {
        let retry = {
            let (this, stop) = (Arc::clone(&self), stop.clone());
            crate::modules::every(WITHDRAW_RETRY, stop, move || {
                let this = Arc::clone(&this);
                async move { this.withdraw_again().await }
            })
        };
        tokio::join!(
            crate::modules::every(REFRESH, stop, || self.refresh_once()),
            retry
        );
    }

    async fn withdraw_again(&self) {
        let due: Vec<(i64, u64)> = self.unwithdrawn().iter().copied().collect();
        for (agent_id, stream) in due {
            if let Err(e) = self.delete(agent_id, stream).await {
                tracing::debug!(error = %e, "Cannot remove an ended stream's entry from Redis yet");
                return;
            }
            self.unwithdrawn().remove(&(agent_id, stream));
        }
    }

    async fn refresh_once(&self) {
        let entries: Vec<_> = self.mine().iter().map(|(k, v)| (*k, v.clone())).collect();
        let written = match self.write(&entries).await {
            Ok(()) => self.undo_overtaken(&entries).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "Cannot refresh what this replica's agent replicas run in Redis; trying again at the next refresh");
        }
    }

    /// After a refresh wrote `written`: a stream that ended, or changed commit, meanwhile
    /// had its removal or new entry written before the refresh's, which brought back the old
    /// one; the entry is made right again.
    async fn undo_overtaken(
        &self,
        written: &[((i64, u64), ReplicaRuns)],
    ) -> redis::RedisResult<()> {
        let overtaken: Vec<_> = {
            let mine = self.mine();
            let changed = written.iter().filter(|(k, v)| mine.get(k) != Some(v));
            changed.map(|(k, _)| (*k, mine.get(k).cloned())).collect()
        };
        for ((agent_id, stream), now) in overtaken {
            match now {
                Some(runs) => self.write(&[((agent_id, stream), runs)]).await?,
                None => self.delete(agent_id, stream).await?,
            }
        }
        Ok(())
    }

    async fn delete(&self, agent_id: i64, stream: u64) -> redis::RedisResult<()> {
        let mut conn = self.cluster.connection();
        redis::cmd("HDEL")
            .arg(key(agent_id))
            .arg(field(self.cluster.replica(), stream))
            .query_async::<i64>(&mut conn)
            .await
            .map(drop)
    }

    async fn write(&self, entries: &[((i64, u64), ReplicaRuns)]) -> redis::RedisResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let until = unix_now() + ENTRY_TTL;
        let mut pipe = redis::pipe();
        for ((agent_id, stream), runs) in entries {
            let entry = Entry {
                runs: runs.clone(),
                until,
            };
            let value = serde_json::to_string(&entry).unwrap_or_default();
            pipe.hset(
                key(*agent_id),
                field(self.cluster.replica(), *stream),
                value,
            )
            .ignore();
            pipe.expire(key(*agent_id), ENTRY_TTL as i64).ignore();
        }
        pipe.query_async::<()>(&mut self.cluster.connection()).await
    }

    /// The agent's unexpired entries of the other kas replicas, each with whether its kas
    /// replica is alive (its liveness key exists).
    async fn others(&self, agent_id: i64) -> redis::RedisResult<Vec<(Other, bool)>> {
        let mut conn = self.cluster.connection();
        let stored: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(key(agent_id))
            .query_async(&mut conn)
            .await?;
        let entries = others_entries(stored, self.cluster.replica(), unix_now());
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let replicas: Vec<u64> = entries
            .iter()
            .map(|e| e.kas)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let keys: Vec<String> = replicas
            .iter()
            .map(|r| crate::peers::replica_key(*r))
            .collect();
        let alive: Vec<Option<String>> =
            redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        let alive: HashSet<u64> = replicas
            .into_iter()
            .zip(alive)
            .filter_map(|(r, a)| a.map(|_| r))
            .collect();
        Ok(entries
            .into_iter()
            .map(|e| {
                let live = alive.contains(&e.kas);
                (e, live)
            })
            .collect())
    }

    async fn read_elsewhere(&self, agent_id: i64) -> redis::RedisResult<Vec<ReplicaRuns>> {
        let others = self.others(agent_id).await?;
        Ok(others
            .into_iter()
            .filter_map(|(e, live)| live.then_some(e.runs))
            .collect())
    }

    /// Removes the agent's entries of kas replicas dead for [`DEPARTED_GRACE`] (as this
    /// replica saw); whether this call removed any (several kas replicas may look at once: one
    /// of them decides again).
    async fn remove_departed(&self, agent_id: i64) -> redis::RedisResult<bool> {
        let others = self.others(agent_id).await?;
        let dead = {
            let mut since = self
                .dead_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            past_grace(&mut since, others, Instant::now())
        };
        if dead.is_empty() {
            return Ok(false);
        }
        let removed: i64 = redis::cmd("HDEL")
            .arg(key(agent_id))
            .arg(dead)
            .query_async(&mut self.cluster.connection())
            .await?;
        Ok(removed > 0)
    }
}

impl RunningDirectory for SharedRunning {
    fn publish(
        &self,
        agent_id: i64,
        stream: u64,
        runs: ReplicaRuns,
    ) -> BoxFuture<'_, Result<(), DirectoryError>> {
        // Kept before it is written: a failed write is made good at the next refresh.
        self.mine().insert((agent_id, stream), runs.clone());
        self.unwithdrawn().remove(&(agent_id, stream));
        Box::pin(async move {
            let entries = [((agent_id, stream), runs)];
            self.write(&entries).await.map_err(redis_error)
        })
    }

    fn withdraw(&self, agent_id: i64, stream: u64) -> BoxFuture<'_, Result<(), DirectoryError>> {
        self.mine().remove(&(agent_id, stream));
        Box::pin(async move {
            let deleted = self.delete(agent_id, stream).await;
            if deleted.is_err() {
                self.unwithdrawn().insert((agent_id, stream));
            }
            deleted.map_err(redis_error)
        })
    }

    fn elsewhere(&self, agent_id: i64) -> BoxFuture<'_, Result<Vec<ReplicaRuns>, DirectoryError>> {
        Box::pin(async move { self.read_elsewhere(agent_id).await.map_err(redis_error) })
    }

    fn departed(&self, agent_id: i64) -> BoxFuture<'_, Result<bool, DirectoryError>> {
        Box::pin(async move { self.remove_departed(agent_id).await.map_err(redis_error) })
    }

    fn in_force_changed(&self, agent_id: i64) -> BoxFuture<'_, Result<(), DirectoryError>> {
        Box::pin(async move {
            let event = ClusterEvent::ConfigInForce {
                agent_id,
                from: self.cluster.replica(),
            };
            self.cluster.publish(event).await.map_err(redis_error)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stored(kas: u64, stream: u64, commit: &str, until: u64) -> (String, String) {
        let entry = Entry {
            runs: ReplicaRuns {
                replica: format!("ns/pod-{stream}"),
                commit: commit.into(),
                at: 1,
            },
            until,
        };
        (field(kas, stream), serde_json::to_string(&entry).unwrap())
    }

    #[test]
    fn only_other_replicas_unexpired_entries_count() {
        let all: HashMap<String, String> = [
            stored(1, 10, "mine", 200),
            stored(2, 11, "theirs", 200),
            stored(2, 12, "expired", 99),
            ("3:13".into(), "not json".into()),
            ("garbage".into(), "{}".into()),
        ]
        .into();
        let got = others_entries(all, 1, 100);
        let commits: Vec<(&str, u64, &str)> = got
            .iter()
            .map(|e| (e.field.as_str(), e.kas, e.runs.commit.as_str()))
            .collect();
        assert_eq!(commits, vec![("2:11", 2, "theirs")]);
    }

    fn other(kas: u64, stream: u64) -> Other {
        Other {
            field: field(kas, stream),
            kas,
            runs: ReplicaRuns {
                replica: format!("ns/pod-{stream}"),
                commit: "c1".into(),
                at: 1,
            },
        }
    }

    #[test]
    fn a_dead_replicas_entries_are_removed_only_after_the_grace() {
        let mut since = HashMap::new();
        let t0 = Instant::now();
        let look = |since: &mut HashMap<u64, Instant>, live2: bool, at: Instant| {
            let others = vec![
                (other(2, 10), live2),
                (other(2, 11), live2),
                (other(3, 12), true),
            ];
            past_grace(since, others, at)
        };
        assert!(look(&mut since, false, t0).is_empty(), "just found dead");
        assert!(look(&mut since, false, t0 + DEPARTED_GRACE / 2).is_empty());
        assert_eq!(
            look(&mut since, false, t0 + DEPARTED_GRACE),
            ["2:10", "2:11"]
        );
        // Alive again (its key had lapsed), then dead: timed afresh.
        assert!(look(&mut since, true, t0 + DEPARTED_GRACE * 2).is_empty());
        assert!(look(&mut since, false, t0 + DEPARTED_GRACE * 3).is_empty());
    }

    #[test]
    fn an_entry_travels_as_flat_json() {
        let (_, text) = stored(1, 10, "c1", 5);
        assert_eq!(
            text,
            r#"{"replica":"ns/pod-10","commit":"c1","at":1,"until":5}"#
        );
    }
}
