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
//! The endpoint is unauthenticated, like Kilo's, and bounded against slow or many clients
//! ([`Limits`]): a request's head must arrive within [`Limits::header_read`] (also the bound on
//! an idle keep-alive connection), its answer is given within [`Limits::request`], a connection
//! lives at most [`Limits::connection`], and at most [`Limits::max_connections`] are open: at the
//! limit a new connection replaces the oldest one not inside a request, so half-sent requests
//! cannot keep `/healthz` from answering.
//!
//! `/metrics` and `/status` read the WireGuard device when asked (on the blocking pool, bounded
//! by [`DEVICE_READ_TIMEOUT`], one read at a time), so handshakes and counters are those of that
//! moment; everything else comes from the loop's [`Observer`], which the loop never waits for.
//!
//! May depend on axum, hyper, tokio, the observer, the metrics renderer, the status document and the
//! WireGuard device's read-only handle. Nothing here writes anything.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tracing::{debug, warn};

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

/// The bounds of the endpoint's connections; [`Limits::default`] is what the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request's head (request line and headers) must arrive within this long after the
    /// connection opened or the previous answer; otherwise the connection is closed. It also
    /// bounds how long an idle keep-alive connection stays open.
    pub header_read: Duration,
    /// A request is answered within this long (503 otherwise).
    pub request: Duration,
    /// A connection is closed this long after it was accepted, whatever it is doing.
    pub connection: Duration,
    /// Connections open at once. At the limit a new connection replaces the oldest one that
    /// is not inside a request (an idle or half-sent one); when every one is inside a request,
    /// the new one is closed.
    pub max_connections: usize,
}

impl Default for Limits {
    /// Heads within 5 s, answers within 10 s, connections live 60 s, 64 at once.
    fn default() -> Self {
        Limits {
            header_read: Duration::from_secs(5),
            request: Duration::from_secs(10),
            connection: Duration::from_secs(60),
            max_connections: 64,
        }
    }
}

/// The open connections, by the order they were accepted.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Connection>,
}

struct Connection {
    /// Requests of this connection being answered.
    busy: Arc<AtomicUsize>,
    /// Closes the connection when sent (or dropped).
    close: oneshot::Sender<()>,
}

impl Connections {
    /// Make room for one more connection under `max`: close the oldest not inside a request.
    /// `false` when every open connection is inside a request.
    fn make_room(&mut self, max: usize) -> bool {
        if self.open.len() < max {
            return true;
        }
        let idle = self
            .open
            .iter()
            .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| self.open.remove(&id)) {
            Some(c) => {
                let _ = c.close.send(());
                true
            }
            None => false,
        }
    }
}

/// Counts one request of a connection as being answered while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

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

    /// Serve on `listener` within [`Limits::default`] until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_with(listener, shutdown, Limits::default()).await
    }

    /// Serve on `listener` within `limits` until `shutdown` completes; the connections open
    /// then are closed. A failed accept (such as too many open files) is retried after 100 ms.
    pub async fn serve_with(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        limits: Limits,
    ) -> std::io::Result<()> {
        let router = self.router();
        let conns = Arc::new(Mutex::new(Connections::default()));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read);
        tokio::pin!(shutdown);
        let mut accept_failing = false;
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        accept_failing = false;
                        stream
                    }
                    Err(e) => {
                        if !accept_failing {
                            warn!(error = %e, "cannot accept a connection on the HTTP endpoint; retrying");
                        }
                        accept_failing = true;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let busy = Arc::new(AtomicUsize::new(0));
            let (close, closed) = oneshot::channel();
            let id = {
                let mut c = conns.lock().unwrap_or_else(PoisonError::into_inner);
                if !c.make_room(limits.max_connections.max(1)) {
                    debug!("HTTP endpoint: every connection is inside a request; refusing one");
                    continue;
                }
                let id = c.next;
                c.next += 1;
                c.open.insert(
                    id,
                    Connection {
                        busy: busy.clone(),
                        close,
                    },
                );
                id
            };
            let router = router.clone();
            let service = hyper::service::service_fn(move |req| {
                let guard = Busy::new(&busy);
                let mut router = router.clone();
                async move {
                    let _guard = guard;
                    let answer = tower_service::Service::call(&mut router, req);
                    Ok::<_, std::convert::Infallible>(
                        match tokio::time::timeout(limits.request, answer).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(never)) => match never {},
                            Err(_) => text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("no answer within {} s\n", limits.request.as_secs()),
                            ),
                        },
                    )
                }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let conns = conns.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        debug!(error = %e, "HTTP connection ended");
                    },
                    _ = closed => debug!("HTTP connection closed to make room"),
                    () = tokio::time::sleep(limits.connection) => debug!("HTTP connection closed at its age limit"),
                }
                conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .open
                    .remove(&id);
            });
        }
        // Close what is still open (each task sees its sender dropped).
        conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .clear();
        Ok(())
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
                        configured_endpoint: t.and_then(|t| t.endpoint.clone()),
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
                    configured_endpoint: t.endpoint.clone(),
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
        unreachable: view.unreachable.clone(),
    }
}

#[cfg(test)]
mod tests {

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
        // What the agent configured, next to where the peer roamed to.
        assert_eq!(p.configured_endpoint.as_deref(), Some("10.200.0.3:51820"));
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

    /// Serve an endpoint on 127.0.0.1 within `limits`; its address.
    async fn serve_local(limits: Limits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = Server::new(Observer::new("fra-1", None));
        tokio::spawn(server.serve_with(listener, std::future::pending(), limits));
        addr
    }

    /// One whole request; the answer's first line.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("answer");
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// Whether the server closes `s` within `bound` (what it sends first does not matter).
    async fn closed_within(s: &mut tokio::net::TcpStream, bound: Duration) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 512];
        tokio::time::timeout(bound, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    fn short() -> Limits {
        Limits {
            header_read: Duration::from_millis(300),
            request: Duration::from_secs(5),
            connection: Duration::from_secs(60),
            max_connections: 8,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_sent_requests_beyond_the_limit_leave_healthz_answering_and_are_closed() {
        use tokio::io::AsyncWriteExt as _;
        let limits = short();
        let addr = serve_local(limits).await;
        let mut slow = Vec::new();
        for _ in 0..3 * limits.max_connections {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                .await
                .expect("half a request");
            slow.push(s);
        }
        assert_eq!(get(addr, "/healthz").await, "HTTP/1.1 200 OK");
        // Every half-sent request is closed: the older ones to make room, the rest when their
        // head did not arrive in time.
        for (i, s) in slow.iter_mut().enumerate() {
            assert!(
                closed_within(s, limits.header_read * 4).await,
                "half-sent connection {i} still open"
            );
        }
        assert_eq!(
            get(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let limits = short();
        let addr = serve_local(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
        // Kept alive, then nothing more is sent.
        assert!(closed_within(&mut s, limits.header_read * 4).await);
    }
}
