//! The fake agents: each one a real agent connection (its own HTTP/2 connection, its token, the
//! real tunnel pool with only the echo service), all in this one process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tether_transport::{ClientOptions, KasAddress};
use tether_tunnel_agent::{AgentMeta, ConnState, EchoHandler, Handler, Pool, PoolConfig};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub min_idle: usize,
    pub config_stream: bool,
    /// Agents started per second; 0 starts them all at once.
    pub start_rate: u32,
    /// With `--tls`: the CA that signed kas's agent listener's certificate.
    pub ca_cert_file: Option<std::path::PathBuf>,
}

#[derive(Debug)]
struct Agent {
    pool: Arc<Pool>,
    spawned_at: Instant,
    /// When the pool last became `Connected`: microseconds since the fleet's epoch plus one
    /// (0 = never). Written by a watcher of the pool's state, so the time is exact rather than
    /// quantized by loadgen's polling.
    connected_at: Arc<AtomicU64>,
}

/// All fake agents; dropping it (or [`Fleet::stop`]) ends them.
#[derive(Debug)]
pub struct Fleet {
    agents: Vec<Agent>,
    epoch: Instant,
    min_idle: usize,
    config_streams: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

/// What the agents see, counted over the fleet.
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    /// Agents with at least `min_idle` idle tunnel streams.
    pub ready: usize,
    /// Agents whose last attempt failed, by gRPC code.
    pub failing: BTreeMap<String, usize>,
    /// Configuration streams open (when enabled).
    pub config_streams: usize,
}

impl Fleet {
    /// Starts one agent per token. Agents are created at `start_rate` per second (or all at
    /// once); each dials kas lazily, on its pool's first stream; agent `i` dials
    /// `addrs[i % addrs.len()]`.
    pub async fn start(
        addrs: &[KasAddress],
        tokens: Vec<String>,
        opts: &FleetOptions,
    ) -> Result<Fleet> {
        let shutdown = CancellationToken::new();
        let config_streams = Arc::new(AtomicUsize::new(0));
        let client_opts = ClientOptions {
            ca_cert_file: opts.ca_cert_file.clone(),
            ..ClientOptions::default()
        };
        let mut agents = Vec::with_capacity(tokens.len());
        let started = Instant::now();
        for (i, token) in tokens.into_iter().enumerate() {
            if opts.start_rate > 0 {
                // Pace by the clock rather than sleeping per agent: tokio's timer has a 1 ms
                // resolution, too coarse for thousands of agents per second.
                let due = Duration::from_secs_f64(i as f64 / f64::from(opts.start_rate));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            // One channel per agent = one TCP connection per agent, as a fleet of real agentks
            // has; sharing a channel would multiplex them all over one connection.
            let addr = &addrs[i % addrs.len().max(1)];
            let channel = tether_transport::connect_lazy(addr, &client_opts)?;
            let meta = AgentMeta {
                token: tether_tunnel_agent::AgentToken::fixed(token),
                version: concat!("loadgen/", env!("CARGO_PKG_VERSION")).to_string(),
                pod_name: format!("loadgen-{i}"),
                pod_namespace: "loadgen".to_string(),
                cluster_id: Default::default(),
            };
            let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
            handlers.insert(
                tether_protocol::services::ECHO.to_string(),
                Arc::new(EchoHandler),
            );
            let pool = Arc::new(Pool::new(
                // agentk's own pool settings (scale-up step, backoff): with a step of 1 here
                // the reconnect storm once looked fast while real agents took ~20 s.
                PoolConfig {
                    min_idle: opts.min_idle,
                    ..PoolConfig::default()
                },
                channel.clone(),
                meta.clone(),
                handlers,
            ));
            let spawned_at = Instant::now();
            let connected_at = Arc::new(AtomicU64::new(0));
            tokio::spawn(watch_connected(
                Arc::clone(&pool),
                started,
                Arc::clone(&connected_at),
                shutdown.clone(),
            ));
            let (p, stop) = (Arc::clone(&pool), shutdown.clone());
            tokio::spawn(async move { p.run(stop).await });
            if opts.config_stream {
                tokio::spawn(config_stream(
                    channel,
                    meta,
                    Arc::clone(&config_streams),
                    shutdown.clone(),
                ));
            }
            agents.push(Agent {
                pool,
                spawned_at,
                connected_at,
            });
        }
        Ok(Fleet {
            agents,
            epoch: started,
            min_idle: opts.min_idle.max(1),
            config_streams,
            shutdown,
        })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Configuration streams open right now (0 unless they are enabled).
    pub fn config_streams(&self) -> usize {
        self.config_streams.load(Ordering::Relaxed)
    }

    /// How long each agent took to connect: from `origin` (or, without one, from the agent's
    /// own start) to its last connection made after `after`. Sorted; the second value counts
    /// agents with no such connection.
    pub fn connect_times(&self, origin: Option<Instant>, after: Instant) -> (Vec<Duration>, usize) {
        let after_us = after.saturating_duration_since(self.epoch).as_micros();
        let mut times = Vec::with_capacity(self.agents.len());
        let mut missing = 0;
        for a in &self.agents {
            let at = a.connected_at.load(Ordering::Relaxed);
            if at == 0 || u128::from(at - 1) < after_us {
                missing += 1;
                continue;
            }
            let at = self.epoch + Duration::from_micros(at - 1);
            times.push(at.saturating_duration_since(origin.unwrap_or(a.spawned_at)));
        }
        times.sort();
        (times, missing)
    }

    /// Whether agent `i` has no established tunnel stream left (kas is gone for it).
    pub fn is_down(&self, i: usize) -> bool {
        self.agents.get(i).is_some_and(|a| {
            let s = a.pool.stats();
            s.idle + s.busy == 0
        })
    }

    pub fn snapshot(&self) -> FleetSnapshot {
        let mut s = FleetSnapshot {
            config_streams: self.config_streams.load(Ordering::Relaxed),
            ..FleetSnapshot::default()
        };
        for a in &self.agents {
            if a.pool.stats().idle >= self.min_idle {
                s.ready += 1;
            } else if let ConnState::Failed { code, .. } = &*a.pool.state().borrow() {
                *s.failing.entry(format!("{code:?}")).or_default() += 1;
            }
        }
        s
    }

    /// Ends every agent's streams (their connections close when the channels drop).
    pub fn stop(self) {
        self.shutdown.cancel();
    }
}

/// Notes the time of every transition of the pool to `Connected`.
async fn watch_connected(
    pool: Arc<Pool>,
    epoch: Instant,
    connected_at: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut state = pool.state();
    loop {
        if *state.borrow_and_update() == ConnState::Connected {
            let us = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            connected_at.store(us + 1, Ordering::Relaxed);
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// A minimal agentk configuration stream (agentk's own client): it never gets a configuration
/// (the project has no repository); it costs kas what a real agent's idle configuration stream
/// costs.
async fn config_stream(
    channel: Channel,
    meta: AgentMeta,
    open: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) {
    tether_configuration_agent::run(channel, &meta, &mut CountOpen(open), shutdown).await;
}

/// Counts the fleet's open configuration streams.
struct CountOpen(Arc<AtomicUsize>);

impl tether_configuration_agent::StreamEvents for CountOpen {
    fn opened(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn closed(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
