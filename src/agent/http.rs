//! The agent's HTTP endpoint (`wiremesh agent --listen ADDR`, default `0.0.0.0:1107` like
//! Kilo's `--listen :1107`), served with axum on hyper 1:
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | every metric, OpenMetrics text ([`super::metrics`]) |
//! | `GET /healthz` | 200 `ok` while the agent loop turns ([`super::observe::LIVENESS_BOUND`]), else 503 and why |
//! | `GET /readyz` | 200 `ready` once the registry listed everything and a reconciliation succeeded, while nothing else holds the listen port, this node takes part and the kernel is not known to differ from the desired state; else 503 and what is awaited, in one line |
//! | `GET /status` | this node's view as JSON ([`crate::status::AgentStatus`]) |
//!
//! `/metrics` and `/status` read the WireGuard device when asked (on the blocking pool, bounded
//! by [`DEVICE_READ_TIMEOUT`], one read at a time), so handshakes and counters are those of that
//! moment; everything else comes from the loop's [`Observer`], which the loop never waits for.
//!
//! May depend on axum, tokio, the observer, the metrics renderer, the status document and the
//! WireGuard device's read-only handle. Nothing here writes anything.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::metrics::{self, Live};
use super::observe::{Observer, View};
use crate::reconcile::KernelError;
use crate::reconcile::wg::{WgPeerStats, WgReader};
use crate::status::{AgentStatus, PeerKind, PeerStatus, STATUS_VERSION};

/// The default listen address, Kilo's `:1107`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1107";

/// The longest a request waits for the WireGuard device (both for a read in progress and for
/// its own); then it answers without live peer data.
pub const DEVICE_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads the WireGuard device's peers as they are now. Blocking; called on the blocking pool.
pub trait DeviceReader: Send + Sync + 'static {
    /// The device's peers, sorted by key; empty when the device does not exist.
    fn peer_stats(&self) -> Result<Vec<WgPeerStats>, KernelError>;
}

impl DeviceReader for WgReader {
    fn peer_stats(&self) -> Result<Vec<WgPeerStats>, KernelError> {
        WgReader::peer_stats(self)
    }
}

/// The endpoint's state: the observer, and the device once the kernel is set up.
#[derive(Clone)]
pub struct Server {
    observer: Observer,
    device: Arc<OnceLock<Arc<dyn DeviceReader>>>,
    /// Held while a device read runs (also by a read that outlived its request).
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl Server {
    /// An endpoint over `observer`; peers are read once [`Self::set_device`] gave a device.
    pub fn new(observer: Observer) -> Server {
        Server {
            observer,
            device: Arc::new(OnceLock::new()),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The device to read peers from (the first call wins).
    pub fn set_device(&self, device: Arc<dyn DeviceReader>) {
        let _ = self.device.set(device);
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(serve_metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/status", get(status))
            .fallback(not_found)
            .with_state(self)
    }

    /// Serve on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// The device as it is now, or why it could not be read.
    async fn live(&self) -> Live {
        let at = SystemTime::now();
        let Some(device) = self.device.get().cloned() else {
            return Live {
                at,
                peers: Err("the WireGuard device is not set up yet".to_owned()),
            };
        };
        let busy = || "the previous read of the WireGuard device has not returned".to_owned();
        let Ok(guard) =
            tokio::time::timeout(DEVICE_READ_TIMEOUT, self.reading.clone().lock_owned()).await
        else {
            return Live {
                at,
                peers: Err(busy()),
            };
        };
        let read = tokio::task::spawn_blocking(move || {
            // Held until the read returns, however long the request waits.
            let _guard = guard;
            device.peer_stats()
        });
        let peers = match tokio::time::timeout(DEVICE_READ_TIMEOUT, read).await {
            Err(_) => Err(format!(
                "reading the WireGuard device took more than {} s",
                DEVICE_READ_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("reading the WireGuard device: {e}")),
            Ok(Ok(r)) => r.map_err(|e| e.to_string()),
        };
        Live {
            at: SystemTime::now(),
            peers,
        }
    }
}

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn serve_metrics(State(s): State<Server>) -> Response {
    let live = s.live().await;
    let ready = s.observer.readiness().is_ok();
    let body = metrics::render(&s.observer.view(), &live, s.observer.metrics(), ready);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

async fn healthz(State(s): State<Server>) -> Response {
    match s.observer.liveness() {
        Ok(()) => text(StatusCode::OK, "ok\n".to_owned()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<Server>) -> Response {
    match s.observer.readiness() {
        Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn status(State(s): State<Server>) -> Response {
    let live = s.live().await;
    let view = s.observer.view();
    let ready = super::observe::readiness(&view).is_ok();
    let doc = status_document(&view, &live, ready);
    match serde_json::to_string_pretty(&doc) {
        Ok(mut body) => {
            body.push('\n');
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found; this agent serves /metrics, /healthz, /readyz and /status\n".to_owned(),
    )
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The `/status` document: the device's peers as read (named from the view), or, when the
/// device could not be read, the tunnels the agent wants, without handshakes or counters.
pub fn status_document(view: &View, live: &Live, ready: bool) -> AgentStatus {
    let (mut peers, wireguard_error) = match &live.peers {
        Ok(stats) => (
            stats
                .iter()
                .map(|p| {
                    let t = view.tunnels.get(&p.public_key);
                    PeerStatus {
                        name: t.map(|t| t.name.clone()).unwrap_or_default(),
                        kind: t.map_or(PeerKind::Unknown, |t| t.kind),
                        public_key: p.public_key,
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        allowed_ips: p.allowed_ips.clone(),
                        latest_handshake: p.last_handshake.map(unix),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    }
                })
                .collect::<Vec<_>>(),
            None,
        ),
        Err(e) => (
            view.tunnels
                .iter()
                .map(|(k, t)| PeerStatus {
                    name: t.name.clone(),
                    kind: t.kind,
                    public_key: *k,
                    endpoint: t.endpoint.clone(),
                    allowed_ips: t.allowed_ips.clone(),
                    latest_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                })
                .collect(),
            Some(e.clone()),
        ),
    };
    peers.sort_by(|a, b| (&a.name, a.public_key).cmp(&(&b.name, b.public_key)));
    AgentStatus {
        version: STATUS_VERSION,
        node: view.node.clone(),
        public_key: view.public_key,
        time: unix(live.at),
        ready,
        leader: view.leader,
        wireguard_error,
        peers,
        listen_port_conflict: view.listen_port_conflict.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::agent::observe::Tunnel;
    use crate::model::WgKey;

    fn view() -> View {
        View {
            node: "fra-1".into(),
            public_key: Some(WgKey([7; 32])),
            leader: Some(true),
            tunnels: BTreeMap::from([
                (
                    WgKey([1; 32]),
                    Tunnel {
                        name: "par-1".into(),
                        kind: PeerKind::Node,
                        endpoint: Some("10.200.0.3:51820".into()),
                        allowed_ips: vec!["10.42.2.0/24".parse().unwrap()],
                    },
                ),
                (
                    WgKey([2; 32]),
                    Tunnel {
                        name: "hel-1".into(),
                        kind: PeerKind::Node,
                        endpoint: None,
                        allowed_ips: vec![],
                    },
                ),
            ]),
            ..View::default()
        }
    }

    #[test]
    fn status_takes_live_values_from_the_device_and_names_from_the_view() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let live = Live {
            at,
            peers: Ok(vec![
                WgPeerStats {
                    public_key: WgKey([1; 32]),
                    endpoint: Some("10.200.0.254:40000".parse().unwrap()),
                    allowed_ips: vec!["10.42.2.0/24".parse().unwrap()],
                    last_handshake: Some(at - Duration::from_secs(30)),
                    rx_bytes: 5,
                    tx_bytes: 6,
                },
                WgPeerStats {
                    public_key: WgKey([3; 32]),
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ]),
        };
        let doc = status_document(&view(), &live, true);
        assert_eq!(doc.version, STATUS_VERSION);
        assert_eq!(doc.time, 1_700_000_100);
        assert_eq!(doc.leader, Some(true));
        assert_eq!(doc.wireguard_error, None);
        // Sorted by name: the unknown (unnamed) peer first.
        assert_eq!(doc.peers.len(), 2);
        assert_eq!(doc.peers[0].kind, PeerKind::Unknown);
        let p = &doc.peers[1];
        assert_eq!(p.name, "par-1");
        assert_eq!(p.endpoint.as_deref(), Some("10.200.0.254:40000"));
        assert_eq!(p.latest_handshake, Some(1_700_000_070));
        assert_eq!(p.age(doc.time), Some(30));
        assert_eq!((p.rx_bytes, p.tx_bytes), (5, 6));
    }

    #[test]
    fn status_without_the_device_lists_the_wanted_tunnels_and_says_why() {
        let live = Live {
            at: SystemTime::now(),
            peers: Err("no socket".into()),
        };
        let doc = status_document(&view(), &live, false);
        assert_eq!(doc.wireguard_error.as_deref(), Some("no socket"));
        let names: Vec<&str> = doc.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["hel-1", "par-1"]);
        assert!(doc.peers.iter().all(|p| p.latest_handshake.is_none()));
    }
}
