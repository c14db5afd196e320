//! `/metrics` (Prometheus text), `/liveness` and `/readiness` over plain HTTP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Mutex<Registry>>,
    /// `/readiness` answers 200 while this is true.
    pub ready: watch::Receiver<bool>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

async fn metrics(State(ep): State<Endpoint>) -> impl IntoResponse {
    let mut body = String::new();
    let res = {
        let reg = ep
            .metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        prometheus_client::encoding::text::encode(&mut body, &reg)
    };
    match res {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

async fn readiness(State(ep): State<Endpoint>) -> impl IntoResponse {
    if *ep.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The router, for mounting into another server (kas's internal API) or serving alone.
pub fn router(ep: Endpoint) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/liveness", get(|| async { "ok\n" }))
        .route("/readiness", get(readiness))
        .with_state(ep)
}

/// Serves the endpoint on `listener`, under [`crate::LIMITS`], until `shutdown`.
pub async fn serve(listener: TcpListener, ep: Endpoint, shutdown: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        net_network = "tcp",
        net_address = addr.map(|a| a.to_string()).unwrap_or_default(),
        "Observability endpoint is up"
    );
    crate::serve_limited(listener, router(ep), crate::LIMITS, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_liveness_and_readiness() {
        let mut reg = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        reg.register("probe", "a probe", c);
        let (tx, rx) = watch::channel(false);
        let ep = Endpoint {
            metrics: Arc::new(Mutex::new(reg)),
            ready: rx,
        };
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(l, ep, stop.clone()));
        assert!(get(addr, "/liveness").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readiness").await.starts_with("HTTP/1.1 503"));
        tx.send_replace(true);
        assert!(get(addr, "/readiness").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("probe_total 1"), "{m}");
        stop.cancel();
        task.await.expect("join");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// `<prefix>_build_info{version, commit} 1`: which build runs where, for dashboards and for
/// alerts on version skew between replicas.
pub fn register_build_info(
    reg: &mut prometheus_client::registry::Registry,
    version: &'static str,
    commit: &'static str,
) {
    let info = prometheus_client::metrics::family::Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels { version, commit }).set(1);
    reg.register(
        "build_info",
        "The version and commit of this build (always 1)",
        info,
    );
}
