//! The kernel's routing side through rtnetlink: routes, policy rules, interface addresses and
//! MTU, the CNI bridge, and route events.
//!
//! ```text
//! desired::Route / Rule / Bridge ─→ Netlink::{apply_routes, add_rule, ensure_bridge, …} ─→ kernel
//! kernel ─→ Netlink::{read_routes, read_rules, read_link, read_bridge} ─→ reconcile::OwnedState
//! kernel route/rule/link events ─→ Netlink::watch_routes() ─→ "reconcile now"
//! ```
//!
//! **Ownership.** Everything wiremesh installs carries its mark, and only marked objects are ever
//! read back, changed or removed:
//! - routes and rules carry the route protocol [`RTPROT_WIREMESH`] (`proto 104` in `ip route` and
//!   `ip rule`); rules also sit at priority [`RULE_PRIORITY`]. Deletions name the protocol, so the
//!   kernel itself refuses to match a foreign route or rule with the same destination. The
//!   protocol alone is not proof: a route is ours only in one of [`OWN_TABLES`] and as a
//!   blackhole (guard) or through the WireGuard, private or tunnel interface; a rule only when
//!   it looks up one of [`OWN_TABLES`]. Anything else with protocol 104 is never read or removed.
//! - a route is added with `NLM_F_EXCL`: when a foreign route already holds the same destination,
//!   table and metric, the add fails with a "not owned by wiremesh" error instead of replacing,
//!   prepending to or (IPv6) merging into a multipath route with the foreign one.
//! - addresses, MTU and up/down are changed only on the interfaces named in [`Devices`].
//! - the CNI bridge is changed only under its configured name, only if it is a bridge, and deleted
//!   by [`Netlink::cleanup`] only if wiremesh created it (it carries the alias [`BRIDGE_ALIAS`]);
//!   an interface of that name with another kind or another alias is refused.
//! - the WireGuard interface carries the alias [`WG_ALIAS`] ([`Netlink::mark_link`]); see
//!   [`wireguard_owner`] for how a link of that name is judged.
//!
//! **Namespaces and threads.** A netlink socket belongs to the network namespace of the thread
//! that opens it, so [`Netlink::new`] and [`Netlink::watch_routes`] act on the namespace of the
//! calling thread, for the life of the object.
//!
//! **Speed.** Mutations travel on their own socket in batches: up to a few hundred requests in
//! one datagram, several datagrams in flight, one acknowledgement per request matched back by its
//! sequence number (see `send_acked`). The kernel processes a datagram's requests in order.
//!
//! May depend on the desired state, the reconciler's types and constants, `rtnetlink` /
//! `netlink-packet-route`, `tokio`, `futures`, `libc` and `tracing`; never on the topology engine,
//! the registry or Kubernetes.

mod kernel;
mod link;
mod route;
mod rule;
mod watch;

use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::StreamExt;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::proto::ConnectionHandle;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{KernelError, RTPROT_WIREMESH, RULE_PRIORITY};
use crate::desired::{ENCAP_TABLE, MAIN_TABLE, RouteDev};

pub use kernel::NetlinkKernel;
pub use link::{LinkOwner, bridge_owner, wireguard_owner};
pub use route::{RouteDump, RouteResults, StrayRoute};
pub use rule::{RuleDump, StrayRule};

/// The alias (`ip link show` "alias") of a CNI bridge that wiremesh created itself.
pub const BRIDGE_ALIAS: &str = "wiremesh CNI bridge";
/// The alias (`ip link show` "alias") wiremesh puts on the WireGuard interface it creates or
/// adopts; `wiremesh cleanup` deletes a WireGuard interface only when it carries it (or see
/// [`LinkOwner::Unmarked`]).
pub const WG_ALIAS: &str = "wiremesh WireGuard interface";
/// The routing tables wiremesh installs routes in and points rules to: main and
/// [`ENCAP_TABLE`]. Routes and rules with wiremesh's protocol in any other table are not
/// wiremesh's and are never read, changed or removed.
pub const OWN_TABLES: [u32; 2] = [MAIN_TABLE, ENCAP_TABLE];

/// Largest request count in one datagram. The kernel caps a datagram at the socket's send buffer
/// (208 KiB by default); 256 route requests take about 20 KiB.
const MAX_CHUNK: usize = 256;
/// Most datagrams in flight at once on the mutation socket.
const MAX_WINDOW: usize = 4;
/// Receive buffer asked for on the mutation socket (root may exceed `rmem_max`).
const BATCH_RCVBUF: usize = 4 << 20;
/// A generous size of one acknowledgement in the receive buffer (its `skb` truesize).
const ACK_BYTES: usize = 1024;
/// How long a batch may wait for its acknowledgements before its requests count as lost.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The names of the interfaces wiremesh manages. Nothing else is ever changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    /// The WireGuard interface (`RouteDev::WireGuard`).
    pub wireguard: String,
    /// The underlay interface holding the node's internal IP (`RouteDev::Private`); see
    /// [`Netlink::private_interface_for`].
    pub private: String,
    /// The IPIP tunnel interface, normally `tunl0` (`RouteDev::Tunnel`).
    pub tunnel: String,
    /// The CNI bridge.
    pub bridge: String,
}

impl Devices {
    /// The interface name `dev` stands for.
    pub fn name(&self, dev: RouteDev) -> &str {
        match dev {
            RouteDev::WireGuard => &self.wireguard,
            RouteDev::Private => &self.private,
            RouteDev::Tunnel => &self.tunnel,
            RouteDev::Blackhole => "blackhole",
        }
    }
}

/// What the kernel answered to one request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Acknowledged without error.
    Ok,
    /// Refused with this (positive) errno.
    Errno(i32),
    /// No answer: the connection closed or the batch timed out.
    Lost,
}

impl Answer {
    /// `Ok` for success and for the errnos in `fine` (e.g. ESRCH on a delete).
    fn into_result(self, fine: &[i32], op: impl FnOnce() -> String) -> Result<(), KernelError> {
        match self {
            Answer::Ok => Ok(()),
            Answer::Errno(e) if fine.contains(&e) => Ok(()),
            Answer::Errno(e) => Err(KernelError::Netlink {
                op: op(),
                message: std::io::Error::from_raw_os_error(e).to_string(),
            }),
            Answer::Lost => Err(KernelError::Netlink {
                op: op(),
                message: "no answer from the kernel (netlink connection closed or timed out)"
                    .into(),
            }),
        }
    }
}

/// How many requests go in one datagram and how many datagrams may be in flight, so that all
/// their acknowledgements fit the receive buffer. An acknowledgement that does not fit is dropped
/// by the kernel (the socket reports ENOBUFS) and its request could never be accounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchLimits {
    chunk: usize,
    window: usize,
}

impl BatchLimits {
    /// Limits for a receive buffer of `rcvbuf` bytes (as `SO_RCVBUF` reports it), half of it kept
    /// free for safety.
    fn for_rcvbuf(rcvbuf: usize) -> BatchLimits {
        let room = (rcvbuf / ACK_BYTES / 2).max(1);
        let chunk = room.min(MAX_CHUNK);
        BatchLimits {
            chunk,
            window: (room / chunk).clamp(1, MAX_WINDOW),
        }
    }
}

/// A handle on one network namespace's routing state, limited to what wiremesh owns.
///
/// Create it with [`Netlink::new`] inside a Tokio runtime (I/O and time enabled), on a thread that
/// is in the namespace to manage. Methods take `&self` and may run concurrently.
pub struct Netlink {
    /// Reads (dumps, single gets); `NETLINK_GET_STRICT_CHK` is on, so the kernel filters dumps.
    handle: rtnetlink::Handle,
    /// Mutations, in batches; forwards every acknowledgement.
    batch: ConnectionHandle<RouteNetlinkMessage>,
    limits: BatchLimits,
    /// Port ids of both sockets: kernel notifications carry the port of the request that caused
    /// them, which tells our own changes apart from someone else's.
    ports: [u32; 2],
    devices: Devices,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("devices", &self.devices)
            .field("ports", &self.ports)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &str) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        op: op.to_owned(),
        source,
    }
}

/// A `KernelError` for a failed rtnetlink request.
fn nl_err(op: impl Into<String>, e: rtnetlink::Error) -> KernelError {
    let message = match &e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    };
    KernelError::Netlink {
        op: op.into(),
        message,
    }
}

/// The positive errno of a refused rtnetlink request.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Wrap `msg` for sending with `flags`; `NLM_F_REQUEST | NLM_F_ACK` are always set.
fn request(msg: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = NetlinkMessage::from(msg);
    m.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    m
}

/// Bind `sock` to a kernel-chosen port now (instead of at the first send) and return the port.
fn bind_port(sock: &mut rtnetlink::sys::Socket) -> Result<u32, KernelError> {
    let addr = sock.bind_auto().map_err(io_err("bind netlink socket"))?;
    Ok(addr.port_number())
}

/// Ask for a receive buffer of `bytes`; returns what the socket got (`SO_RCVBUF`, doubled by the
/// kernel). `SO_RCVBUFFORCE` (root) may exceed `net.core.rmem_max`; else `SO_RCVBUF` is capped.
fn grow_rcvbuf(sock: &rtnetlink::sys::Socket, bytes: usize) -> usize {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local c_int, and the fd is
    // owned by `sock` for the duration of the call.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = sock.set_rx_buf_sz(value);
    }
    sock.get_rx_buf_sz().unwrap_or(0)
}

impl Netlink {
    /// Open the netlink sockets in the calling thread's network namespace and spawn their
    /// connections on the current Tokio runtime. Panics outside a runtime (like `tokio::spawn`).
    pub fn new(devices: Devices) -> Result<Netlink, KernelError> {
        let (mut conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(io_err("open netlink socket"))?;
        let read_port = bind_port(conn.socket_mut().socket_mut())?;
        let (mut bconn, batch, _) = rtnetlink::proto::new_connection::<RouteNetlinkMessage>(
            rtnetlink::sys::protocols::NETLINK_ROUTE,
        )
        .map_err(io_err("open netlink socket"))?;
        // netlink-proto drops plain acknowledgements by default; batches count them.
        bconn.set_forward_ack(true);
        let sock = bconn.socket_mut().socket_mut();
        let write_port = bind_port(sock)?;
        let limits = BatchLimits::for_rcvbuf(grow_rcvbuf(sock, BATCH_RCVBUF));
        debug!(?limits, read_port, write_port, "netlink connections open");
        Ok(Netlink {
            handle,
            batch,
            limits,
            ports: [read_port, write_port],
            devices,
            tasks: vec![tokio::spawn(conn), tokio::spawn(bconn)],
        })
    }

    /// The interfaces this handle manages.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Change the interfaces this handle manages (e.g. once the private interface is known).
    pub fn set_devices(&mut self, devices: Devices) {
        self.devices = devices;
    }

    /// The raw rtnetlink handle (reads; strict checking on), for requests this type lacks.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Send `msgs` (each with `NLM_F_ACK`) in pipelined batches; one answer per message, in order.
    ///
    /// Each chunk goes out as one datagram. The kernel handles its requests in order and answers
    /// each with one acknowledgement carrying the request's sequence number; netlink-proto
    /// numbered the chunk's requests consecutively, and the first answer is the first request's,
    /// so an answer's index is its sequence number minus the first answer's. The receive buffer
    /// is sized (`BatchLimits`) so that no acknowledgement is dropped; if one still were, the
    /// batch would time out and its unanswered requests count as `Lost`.
    ///
    /// The messages are taken from `msgs` a chunk at a time, as the window has room: however
    /// many there are (20,000 when a node leaves a mesh of 5,000), only the window's are built
    /// and held at once.
    async fn send_acked(
        &self,
        msgs: impl IntoIterator<Item = NetlinkMessage<RouteNetlinkMessage>>,
    ) -> Vec<Answer> {
        let chunk = self.limits.chunk;
        let mut it = msgs.into_iter();
        let chunks = std::iter::from_fn(move || {
            let c: Vec<_> = it.by_ref().take(chunk).collect();
            (!c.is_empty()).then_some(c)
        });
        let answers: Vec<Vec<Answer>> = futures::stream::iter(chunks)
            .map(|c| self.send_chunk(c))
            .buffered(self.limits.window)
            .collect()
            .await;
        answers.into_iter().flatten().collect()
    }

    async fn send_chunk(&self, msgs: Vec<NetlinkMessage<RouteNetlinkMessage>>) -> Vec<Answer> {
        let mut answers = vec![Answer::Lost; msgs.len()];
        let Ok(mut replies) = self.batch.request_batch(msgs, SocketAddr::new(0, 0)) else {
            return answers;
        };
        let collect = async {
            let mut first = None;
            while let Some(reply) = replies.next().await {
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        let seq = reply.header.sequence_number;
                        let i = seq.wrapping_sub(*first.get_or_insert(seq)) as usize;
                        if let Some(a) = answers.get_mut(i) {
                            *a = match e.code {
                                None => Answer::Ok,
                                Some(c) => Answer::Errno(c.get().abs()),
                            };
                        }
                    }
                    other => debug!(?other, "unexpected reply to a batched request"),
                }
            }
        };
        if tokio::time::timeout(BATCH_TIMEOUT, collect).await.is_err() {
            warn!("netlink batch timed out; its unanswered requests count as failed");
        }
        answers
    }

    /// Resolve an interface name to its index; `None` if there is no such interface.
    async fn index_of(&self, name: &str) -> Result<Option<u32>, KernelError> {
        Ok(self.link_by_name(name).await?.map(|l| l.header.index))
    }

    /// Remove the routes, rules and bridge wiremesh owns here: every route and rule of ours
    /// (protocol 104, in [`OWN_TABLES`], routes also only blackholes or through the WireGuard,
    /// private or tunnel interface; also those [`Netlink::read_routes`] cannot describe), and
    /// the CNI bridge if wiremesh created it. Nothing else is touched. Tries everything, then
    /// reports the first failure.
    pub async fn cleanup(&self) -> Result<Cleanup, KernelError> {
        let mut errors = Vec::new();
        let mut done = Cleanup::default();
        let rules = self.read_all_own_rules().await.unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        });
        done.rules = tally(self.del_stray_rules(&rules).await, &mut errors);
        let routes = match self.device_indices().await {
            Ok(devs) => self.read_kernel_routes(&devs).await,
            Err(e) => Err(e),
        };
        let routes: Vec<StrayRoute> = match routes {
            Ok(r) => r.iter().map(|r| r.identity()).collect(),
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        done.routes = tally(self.del_stray_routes(&routes).await, &mut errors);
        done.bridge = self.del_own_bridge().await.unwrap_or_else(|e| {
            errors.push(e);
            false
        });
        info!(
            routes = done.routes,
            rules = done.rules,
            bridge = done.bridge,
            failed = errors.len(),
            "netlink cleanup"
        );
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }
}

/// How many of `results` succeeded; the failures go to `errors`.
fn tally(results: Vec<Result<(), KernelError>>, errors: &mut Vec<KernelError>) -> usize {
    let mut ok = 0;
    for r in results {
        match r {
            Ok(()) => ok += 1,
            Err(e) => errors.push(e),
        }
    }
    ok
}

/// What [`Netlink::cleanup`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Routes deleted.
    pub routes: usize,
    /// Rules deleted.
    pub rules: usize,
    /// Whether the CNI bridge was deleted.
    pub bridge: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_limits_keep_acknowledgements_within_half_the_receive_buffer() {
        for rcvbuf in [0, 4096, 212_992 * 2, 8 << 20, usize::MAX / 4] {
            let l = BatchLimits::for_rcvbuf(rcvbuf);
            assert!(l.chunk >= 1 && l.window >= 1 && l.chunk <= MAX_CHUNK);
            if rcvbuf >= 2 * ACK_BYTES {
                assert!(
                    l.chunk * l.window * ACK_BYTES <= rcvbuf / 2,
                    "{rcvbuf}: {l:?}"
                );
            }
        }
        assert_eq!(
            BatchLimits::for_rcvbuf(8 << 20),
            BatchLimits {
                chunk: MAX_CHUNK,
                window: MAX_WINDOW
            }
        );
    }
}
