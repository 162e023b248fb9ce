//! The node agent's loop: registry → incremental engine → desired state → reconciler → kernel.
//!
//! Watches the registry (files or Kubernetes), turns every change into engine events, and
//! reconciles the kernel when the desired state changed, when the kernel lost something of ours
//! (a route deleted by hand), on a resync period, after failures (with backoff), and right after
//! an address of the WireGuard link went (Linux may have flushed routes silently). Logs what
//! changed and why. When and what to reconcile is decided by a sans-I/O state machine
//! ([`machine`]); this loop only feeds it events and carries out its decisions. A batch's cheap
//! changes (an endpoint move) are reconciled before its costly ones (a join or leave, which in
//! full granularity renumbers half the mesh) are folded in: see `take_events`. On Kubernetes it
//! publishes this node's annotations and re-asserts them when someone else writes them
//! ([`identity`]). May depend on every library module; the kernel is reached only through
//! [`crate::reconcile::Kernel`].
//!
//! What the loop does is visible from outside through an [`observe::Observer`] it writes to
//! (never waiting for a reader), served over HTTP by [`http`] (`--listen`): metrics, liveness,
//! readiness and a status document.

mod cluster;
pub mod forward;
pub mod guards;
pub mod http;
mod icmp;
mod identity;
mod machine;
pub mod metrics;
pub mod observe;
mod port;
mod reach;
pub mod rotate;
mod source;
mod stall;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::desired::DesiredDelta;
use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, MeshPeer, NodeName, WgKey};
use crate::reconcile::nft::FirewallMode;
use crate::reconcile::system::{SystemKernel, SystemOptions};
use crate::reconcile::wg::{PrivateKey, WgMode, load_or_generate_private_key, replace_key_file};
use crate::reconcile::{self, Kernel, KernelError, Op};
use crate::registry::cluster::publish::{self, Publication};
use crate::registry::cluster::{Batch, ClientOptions, ClusterError, WatchOptions};
use crate::registry::file::FileError;
use crate::topology::MeshOptions;
use crate::topology::incremental::{Engine, Event, Update};
use machine::{Machine, Note, Outcome, Plan};

pub use cluster::ClusterLink;
pub use observe::Observer;
pub use source::{FileRegistry, file_source};
pub use source::{Settle, file_source_with};
pub use watch::{ChangeFeed, Changes, FileWatcher};

/// Kernel-side settings shared by the agent and `wiremesh cleanup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// WireGuard interface name.
    pub interface: String,
    /// CNI bridge name.
    pub bridge: String,
    /// `auto`, `kernel` or `userspace`.
    pub wireguard: String,
    /// Userspace WireGuard program.
    pub wireguard_userspace: String,
    /// `auto`, `nftables` or `iptables`.
    pub firewall: String,
    /// Path of the CNI config file.
    pub cni_config: PathBuf,
}

/// Where nodes and peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryConfig {
    /// Files, watched for changes.
    File(FileRegistry),
    /// A Kubernetes API server: Nodes and Peers watched, this node published on its Node.
    Kubernetes(ClientOptions),
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node: NodeName,
    /// Where nodes and peers come from.
    pub registry: RegistryConfig,
    /// Private key file.
    pub private_key: PathBuf,
    /// Label giving a node's location.
    pub topology_label: String,
    /// Period of the kernel comparison without changes.
    pub resync_period: Duration,
    /// Period of the last-seen heartbeat on this node's Node (Kubernetes registry); nodes whose
    /// heartbeat is older than two periods are left out, as Kilo does.
    pub check_in_period: Duration,
    /// How long a location leader found not forwarding is passed over at first (Kubernetes
    /// registry, location granularity; see [`forward`]); `None`: no probe, Kilo's leader.
    pub failover_hold: Option<Duration>,
    /// Kernel-side settings.
    pub kernel: KernelConfig,
    /// Engine options.
    pub mesh: MeshOptions,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status`; `None`: nowhere.
    pub listen: Option<SocketAddr>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The registry could not be read at start.
    #[error(transparent)]
    Registry(#[from] FileError),
    /// The Kubernetes API could not be configured.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The kernel could not be set up or read.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The HTTP endpoint could not listen.
    #[error("cannot listen on {addr} (--listen; `off` disables the endpoint): {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The files could not be watched.
    #[error("watching {path}: {message}")]
    Watch {
        /// The watched path.
        path: String,
        /// What failed.
        message: String,
    },
}

/// What the agent knows about this machine's addresses (for the endpoint it publishes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// Addresses on the interface of the default route.
    pub default_route: Vec<IpNetwork>,
    /// Every address of the machine.
    pub local: Vec<IpNetwork>,
}

/// The agent's inputs besides its configuration.
pub struct Inputs {
    /// Registry changes.
    pub registry: mpsc::Receiver<Batch>,
    /// Writes to Kubernetes (Kubernetes registry only).
    pub cluster: Option<ClusterLink>,
    /// Fires (with the reason) when something of ours changed in the kernel behind our back.
    pub kernel_events: mpsc::Receiver<&'static str>,
    /// This machine's addresses.
    pub host: HostInfo,
    /// Where the loop shows what it does (metrics, readiness, status).
    pub observer: Observer,
    /// The WireGuard device's per-peer counters, sampled to tell unreachable peers (for
    /// relays; Kubernetes registry only). `None`: nothing is judged.
    pub device: Option<Arc<dyn http::DeviceReader>>,
}

/// Log diagnostics that are new since the last read, once each.
fn log_new_diagnostics(seen: &mut BTreeSet<String>, diags: &[Diagnostic]) {
    let now: BTreeSet<String> = diags.iter().map(ToString::to_string).collect();
    for d in now.difference(seen) {
        warn!("{d}");
    }
    *seen = now;
}

/// Batches ready behind the one taken that join it (see the loop), at most.
const MERGE_MAX: usize = 16;

/// The least time between two recomputations for costly events (joins and leaves; see
/// `take_events`). Under sustained churn they gather meanwhile and go in together: each
/// recomputation renumbers the whole mesh once whatever it covers, so at 5,000 nodes in full
/// granularity a recomputation per batch would keep the loop in them and make every cheap
/// change wait behind one. A lone join or leave is not delayed.
const COSTLY_GAP: Duration = Duration::from_millis(250);

/// Peers of one change logged one by one; a bigger change is logged as counts. A node leaving
/// a full mesh renumbers the mesh IPs of every node after it (Kilo's allocation), so one event
/// can change thousands of peers: a line each made the log, not the kernel, the agent's work.
const LOG_PEERS_MAX: usize = 8;

/// One event taken into the engine (debug): what arrived, and `how` ("folded": without an
/// update of its own; "delta": with one).
fn log_event(ev: &Event, how: &str) {
    match ev {
        Event::NodeUpsert(n) => debug!(node = %n.name, location = %n.location,
            endpoint = ?n.endpoint.as_ref().map(ToString::to_string), "node changed ({how})"),
        Event::NodeRemove(n) => debug!(node = %n, "node removed ({how})"),
        Event::PeerUpsert(p) => debug!(peer = %p.name, "peer resource changed ({how})"),
        Event::PeerRemove(n) => debug!(peer = %n, "peer resource removed ({how})"),
    }
}

fn log_delta(d: &DesiredDelta) {
    if d.peers_upserted.len() + d.peers_removed.len() > LOG_PEERS_MAX {
        info!(
            added_or_changed = d.peers_upserted.len(),
            removed = d.peers_removed.len(),
            "peers changed"
        );
    } else {
        for p in &d.peers_upserted {
            info!(peer = %p.name, key = %p.public_key, endpoint = ?p.endpoint.as_ref().map(ToString::to_string),
                allowed_ips = ?p.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(), "peer added or changed");
        }
        for k in &d.peers_removed {
            info!(key = %k, "peer removed");
        }
    }
    if !d.routes_added.is_empty() || !d.routes_removed.is_empty() {
        info!(
            added = d.routes_added.len(),
            removed = d.routes_removed.len(),
            "routes changed"
        );
    }
    if let Some(l) = d.leader {
        info!(leader = l, "leadership changed");
    }
    if let Some(i) = &d.interface {
        info!(address = ?i.address.map(|a| a.to_string()), listen_port = i.listen_port, "interface changed");
    }
}

/// The mesh as the agent holds it: nodes and peers gathered until the registry has listed
/// everything once, then the incremental engine.
enum Mesh {
    Listing {
        nodes: BTreeMap<NodeName, Arc<MeshNode>>,
        peers: BTreeMap<NodeName, MeshPeer>,
    },
    Running(Box<Engine>),
}

/// The agent's own node as it goes into the engine: its key is the one this agent holds, and
/// what it has not published yet (endpoint, internal IP) is what it is about to publish. Its
/// own heartbeat never makes it stale. `retired`: the key a rotation replaced, which the
/// registry may still show until the new one is published (no warning for it).
fn overlay_local(
    n: &mut MeshNode,
    public_key: WgKey,
    retired: Option<WgKey>,
    own: Option<&Publication>,
) {
    if n.key.is_some_and(|k| k != public_key && Some(k) != retired) {
        warn!(node = %n.name, published = ?n.key.map(|k| k.to_string()), ours = %public_key,
            "the registry has another public key for this node; using ours (republishing)");
    }
    n.key = Some(public_key);
    n.last_seen = None;
    if let Some(p) = own {
        if n.endpoint.is_none() {
            n.endpoint.clone_from(&p.endpoint);
        }
        if n.internal_ip.is_none() && !n.no_internal_ip {
            n.internal_ip = p.internal_ip;
        }
    }
}

/// Endpoints of NATed nodes and peers (those with a keepalive) where this node really saw them:
/// the device's endpoint of every such peer that completed a handshake recently.
fn discovered_endpoints(
    engine: &Engine,
    device: Option<&reconcile::plan::WgDeviceState>,
) -> BTreeMap<WgKey, std::net::SocketAddr> {
    let Some(dev) = device else {
        return BTreeMap::new();
    };
    let natted: BTreeSet<WgKey> = engine
        .nodes()
        .filter(|n| n.persistent_keepalive > 0)
        .filter_map(|n| n.key)
        .chain(
            engine
                .peers()
                .filter(|p| p.persistent_keepalive > 0)
                .map(|p| p.key),
        )
        .collect();
    dev.peers
        .iter()
        .filter(|p| {
            natted.contains(&p.public_key)
                && dev.recent_handshakes.binary_search(&p.public_key).is_ok()
        })
        .filter_map(|p| match &p.endpoint {
            Some(crate::model::Endpoint::Addr(a)) => Some((p.public_key, *a)),
            _ => None,
        })
        .collect()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The agent loop over any kernel: thin wiring around [`machine::Machine`], which decides when
/// and what to reconcile; this loop feeds it events and carries its decisions out.
pub async fn run_with<K: Kernel>(
    cfg: AgentConfig,
    kernel: &mut K,
    public_key: WgKey,
    inputs: Inputs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let Inputs {
        mut registry,
        cluster,
        mut kernel_events,
        host,
        observer,
        device,
    } = inputs;
    let mut mesh = Mesh::Listing {
        nodes: BTreeMap::new(),
        peers: BTreeMap::new(),
    };
    let mut machine = Machine::new(now(), cfg.resync_period);
    let mut diags = Diags::default();
    // The kernel state the last reconciliation left; `None` makes the next one read the kernel.
    let mut known: Option<reconcile::OwnedState> = None;
    let mut check_in = tokio::time::interval(cfg.check_in_period);
    check_in.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Turns the loop when nothing happens, so that a loop that turns no more is seen (/healthz).
    let mut heartbeat = tokio::time::interval(observe::HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reach_tick = tokio::time::interval(REACH_PERIOD);
    reach_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let judge_reach = cluster.is_some() && device.is_some();
    // Agents started together must not sample (and make peers anew) in step: both ends of a
    // crossing would then add each other again at the same moment and cross once more.
    let mut stall_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + stall::phase(&public_key),
        stall::STALL_PERIOD,
    );
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut kernel_events_open = true;
    let mut registry_open = true;
    let mut me = Local {
        node: None,
        own: None,
        mesh_ip: None,
        discovered: BTreeMap::new(),
        port: port::PortGuard::new(cfg.mesh.port),
        public_key,
        identity: identity::Identity::new(),
        reach: reach::Reachability::default(),
        failover: cfg.failover_hold.map(forward::Failover::new),
        rotated: None,
        rotation_failed: None,
        retired: None,
        stalls: stall::Stalls::default(),
    };
    let mut public_key = public_key;
    // After a key rotation, or after this node became its location's leader while running: when
    // to make every peer anew, and why, so that a new handshake starts at once instead of after
    // WireGuard's 5 s retry of one the other side refused (it has the new key or leader by then).
    let mut remake_at: Option<(tokio::time::Instant, &'static str)> = None;
    // Whether this node led at the last reconciliation (`None` before the first).
    let mut leading: Option<bool> = None;
    // Leader failover: a thread sends the echo rounds of the watched leader, the loop judges.
    let failover_on = cluster.is_some() && me.failover.is_some();
    let (probe_watch, probe_watched) = tokio::sync::watch::channel(None::<forward::Watch>);
    let (probe_results, mut probe_rounds) = tokio::sync::mpsc::unbounded_channel();
    let mut probe_open = failover_on && spawn_prober(probe_watched, probe_results);
    let mut failover_tick = tokio::time::interval(forward::PROBE_EVERY);
    failover_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failover_resumed = false;
    // Since when the registry has been listed and reachable without a break (for staleness).
    let mut live_since: Option<tokio::time::Instant> = None;
    // Costly events that wait for the cheap ones to reach the kernel, and for the next
    // recomputation the rate limit allows (see `COSTLY_GAP`).
    let mut deferred: Vec<Event> = Vec::new();
    let mut last_costly: Option<tokio::time::Instant> = None;
    let mut costly_at: Option<tokio::time::Instant> = None;
    me.port
        .found(kernel.port_holder(cfg.mesh.port).await, &observer);
    // The guards of the last run first: after a reboot pods may run before the registry is
    // listed (or reachable), and their packets to other nodes must be dropped, not leak.
    let guards_path = guards::path_for(&cfg.private_key);
    let mut guards_saved = restore_guards(kernel, &guards_path).await;
    info!(node = %cfg.node, "agent started; waiting for the registry's first complete list");
    loop {
        observer.turned();
        if let Some(link) = &cluster {
            diags.show(&mesh, &observer, |all| {
                let uid = me.node.as_ref().and_then(|n| n.metadata.uid.clone());
                link.report(all, uid);
            });
        } else {
            diags.show(&mesh, &observer, |_| {});
        }
        if let Mesh::Running(engine) = &mesh
            && let Some(work) = machine.poll()
        {
            let started = tokio::time::Instant::now();
            if work.reread {
                known = None;
            }
            let step = reconcile_step(
                engine,
                work.plan,
                kernel,
                public_key,
                &mut known,
                &diags.registry,
                &observer,
                &mut me.mesh_ip,
            )
            .await;
            // A node that takes over a location while running has only new peers, whose first
            // handshakes may have reached the others before they knew it as the leader.
            // Only a state the engine computed counts: an unavailable one (this node not in the
            // mesh yet, at start) says nothing about leading, and agents started together would
            // otherwise all make their peers anew at the same moment.
            if !matches!(step, Step::Unavailable(_)) {
                let now_leading = me.mesh_ip.is_some();
                if leading == Some(false) && now_leading {
                    remake_at = Some((
                        tokio::time::Instant::now() + REMAKE_AFTER,
                        "after becoming the leader",
                    ));
                }
                leading = Some(now_leading);
            }
            // The kernel drops routes without a word when an address goes: the machine has the
            // kernel read again at once.
            let routes_changed =
                matches!(&step, Step::Report(Ok(r)) if r.applied.contains_key("route"));
            match &step {
                Step::Report(Ok(r)) => observer.reconciled(started.elapsed(), r),
                Step::Report(Err(e)) => observer.read_failed(started.elapsed(), e),
                Step::Unavailable(_) => {}
            }
            if let Step::Report(Ok(r)) = &step {
                let holder = if port::device_failed(r) || me.port.is_held() {
                    kernel.port_holder(cfg.mesh.port).await
                } else {
                    None
                };
                me.port.found(holder, &observer);
                for (op, e) in &r.failed {
                    warn!(op = op.kind(), error = %e, "kernel refused an operation");
                }
            }
            let outcome = match &step {
                Step::Unavailable(why) => Outcome::Unavailable(why.clone()),
                Step::Report(Ok(report)) => Outcome::Applied {
                    report,
                    port_held: me.port.is_held(),
                },
                Step::Report(Err(e)) => Outcome::ReadFailed(e.to_string()),
            };
            say(machine.reconciled(now(), outcome));
            if routes_changed && let Some(k) = &known {
                save_guards(&guards_path, k, &mut guards_saved);
            }
            if let Some(link) = &cluster {
                me.publish(&cfg, link, &host);
            }
        }
        // The costly events held back so that the cheap ones reached the kernel first (see
        // `take_events`): folded now and reconciled at once, unless the last recomputation for
        // costly events was less than `COSTLY_GAP` ago (then when it allows).
        if !deferred.is_empty() && costly_at.is_none() {
            let due = last_costly.map_or_else(tokio::time::Instant::now, |t| t + COSTLY_GAP);
            if due <= tokio::time::Instant::now() {
                fold_held(&mut mesh, &mut machine, &mut deferred, &mut last_costly);
                continue;
            }
            costly_at = Some(due);
        }
        observer.loop_not_ready(machine.not_ready());
        let deadline = tokio::time::Instant::from_std(machine.deadline());
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down; the mesh stays programmed (use `wiremesh cleanup` to remove it)");
                if let Some(link) = &cluster {
                    link.farewell(FAREWELL_WITHIN).await;
                }
                return Ok(());
            }
            batch = registry.recv(), if registry_open => {
                let Some(mut batch) = batch else {
                    warn!("the registry stopped; keeping the mesh as it is");
                    registry_open = false;
                    continue;
                };
                // The registry hands a batch over as soon as the channel has room: this one
                // waited there, frozen, through the last reconciliation, while the rest of the
                // burst gathered behind it. Take that too, or it waits one reconciliation more.
                let mut interrupted = !batch.connected || !batch.synced;
                for _ in 0..MERGE_MAX {
                    tokio::task::yield_now().await;
                    match registry.try_recv() {
                        Ok(later) => {
                            interrupted |= !later.connected || !later.synced;
                            batch.merge(later);
                        }
                        Err(_) => break,
                    }
                }
                if let Some(n) = batch.local {
                    if let Some(link) = &cluster {
                        me.check_identity(&cfg, &n, link, &observer);
                    }
                    let first = me.own.is_none();
                    if me.rotated.is_none() {
                        me.rotated = rotate::done(&n);
                    }
                    let request = rotate::pending(&n, me.rotated.as_deref());
                    me.node = Some(n);
                    if let Some(link) = &cluster
                        && let Some(new) = me.rotate(&cfg, kernel, request)
                    {
                        public_key = new;
                        observer.public_key(new);
                        known = None;
                        machine.kernel_changed();
                        remake_at = Some((
                            tokio::time::Instant::now() + REMAKE_AFTER,
                            "after the key rotation",
                        ));
                        me.publish(&cfg, link, &host);
                    } else if first && let Some(link) = &cluster {
                        // Publish at once what is known before the first reconciliation.
                        me.publish(&cfg, link, &host);
                    }
                }
                observer.registry(batch.connected, batch.synced);
                if let Some(d) = batch.diagnostics {
                    diags.registry = d;
                }
                diags.dirty = true;
                let mut events = batch.events;
                for ev in &mut events {
                    if let Event::NodeUpsert(n) = ev
                        && n.name == cfg.node
                    {
                        overlay_local(Arc::make_mut(n), public_key, me.retired, me.own.as_ref());
                    }
                }
                if interrupted {
                    live_since = None;
                }
                if batch.connected && batch.synced && live_since.is_none() {
                    live_since = Some(tokio::time::Instant::now());
                    if let Some(link) = &cluster {
                        link.reconnected();
                    }
                }
                let later = take_events(&cfg, &mut mesh, &mut machine, &diags.registry, events, batch.synced, &deferred);
                deferred.extend(later);
            }
            ev = kernel_events.recv(), if kernel_events_open => {
                match ev {
                    Some(why) => {
                        info!(why, "the kernel changed state of ours behind our back; reading it again and restoring it");
                        machine.kernel_changed();
                    }
                    None => kernel_events_open = false,
                }
            }
            _ = check_in.tick(), if cluster.is_some() => {
                let Mesh::Running(engine) = &mut mesh else { continue };
                // Kilo's staleness rule, applied only once this agent's own view of the API has
                // been live long enough for every running agent to have published since: an
                // outage never makes nodes stale.
                // Otherwise the last judgement stands (a node left out before an outage is not
                // taken back in because of it).
                if live_since.is_some_and(|t| t.elapsed() >= staleness_grace()) {
                    absorb(&mut machine, engine.set_now(Some(unix_now())), &diags.registry);
                    diags.dirty = true;
                }
                match kernel.read_wireguard().await {
                    Ok(device) => me.discovered = discovered_endpoints(engine, device.as_ref()),
                    Err(e) => debug!(error = %e, "cannot read the WireGuard device for discovered endpoints"),
                }
                if let Some(link) = &cluster {
                    me.publish(&cfg, link, &host);
                }
            }
            _ = reach_tick.tick(), if judge_reach => {
                let (Mesh::Running(engine), Some(device)) = (&mesh, &device) else { continue };
                if sample_reachability(engine, device, kernel, &mut me.reach).await
                    && let Some(link) = &cluster
                {
                    info!(unreachable = ?me.reach.unreachable().iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "segment leaders this node cannot reach directly changed; publishing them (relays go around them)");
                    observer.unreachable(me.reach.unreachable());
                    me.publish(&cfg, link, &host);
                }
            }
            _ = failover_tick.tick(), if probe_open => {
                let (Mesh::Running(engine), Some(f)) = (&mesh, &mut me.failover) else { continue };
                let now = std::time::Instant::now();
                if !failover_resumed {
                    // Reports this node carried before a restart are held again.
                    failover_resumed = true;
                    let own = engine.nodes().find(|n| n.name == cfg.node);
                    f.resume(own.and_then(|n| n.forwarding_failed.clone()).unwrap_or_default(), now);
                }
                f.watch(engine.leader_probe(), now);
                let watched = f.watching().cloned();
                probe_watch.send_if_modified(|w| {
                    let changed = *w != watched;
                    *w = watched;
                    changed
                });
                if f.expire(now) && let Some(link) = &cluster {
                    info!(reported = ?f.reported().iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "a leader's failover hold ended; it may lead its location again");
                    observer.forwarding_failed(&f.reported());
                    me.publish(&cfg, link, &host);
                }
            }
            round = probe_rounds.recv(), if probe_open => {
                let Some((leader, answered)) = round else {
                    probe_open = false;
                    continue;
                };
                let Some(f) = &mut me.failover else { continue };
                let now = std::time::Instant::now();
                if f.watching().is_some_and(|w| w.leader == leader)
                    && f.round(answered, now)
                    && let Some(link) = &cluster
                {
                    warn!(leader = %leader, hold = ?f.hold_of(&leader),
                        "the location's leader forwards nothing to other segments; reporting it (the location fails over to its next candidate)");
                    observer.forwarding_failed(&f.reported());
                    me.publish(&cfg, link, &host);
                }
            }
            _ = tokio::time::sleep_until(remake_at.map_or(deadline, |(t, _)| t)), if remake_at.is_some() => {
                let why = remake_at.take().map_or("", |(_, why)| why);
                match kernel.read_wireguard().await {
                    Ok(Some(dev)) => {
                        remake_peers(kernel, dev.peers.iter()).await;
                        info!(peers = dev.peers.len(), "peers made anew {why}: new handshakes start at once");
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "cannot read the WireGuard device to make its peers anew {why}"),
                }
            }
            _ = stall_tick.tick(), if device.is_some() => {
                let (Mesh::Running(_), Some(device)) = (&mesh, &device) else { continue };
                break_crossed_initiations(device, kernel, &mut me).await;
            }
            _ = tokio::time::sleep_until(costly_at.unwrap_or(deadline)), if costly_at.is_some() => {
                costly_at = None;
                fold_held(&mut mesh, &mut machine, &mut deferred, &mut last_costly);
            }
            _ = heartbeat.tick() => {}
            _ = tokio::time::sleep_until(deadline) => machine.tick(now()),
        }
    }
}

/// Hand a batch's `events` to the mesh: gathered until the registry has listed everything
/// (`synced`), then the engine is made; afterwards into the engine, its updates to `machine`.
///
/// A running mesh takes a batch's cheap events now and returns its costly ones (a node joining
/// or leaving, which renumbers every segment after it in full granularity, an external peer,
/// the local node; see `Engine::split_costly`) for after the next reconciliation, and no
/// sooner than `COSTLY_GAP` after the last recomputation for such events: an endpoint move
/// then reaches the kernel in a reconciliation of its own, instead of waiting behind a
/// renumbering of thousands of peers.
///
/// `held`: costly events still waiting; a new event of an object among them waits behind
/// them, so that each object's events keep their order.
fn take_events(
    cfg: &AgentConfig,
    mesh: &mut Mesh,
    machine: &mut Machine,
    registry: &[Diagnostic],
    events: Vec<Event>,
    synced: bool,
    held: &[Event],
) -> Vec<Event> {
    match mesh {
        Mesh::Listing { nodes, peers } => {
            for ev in events {
                match ev {
                    Event::NodeUpsert(n) => {
                        nodes.insert(n.name.clone(), n);
                    }
                    Event::NodeRemove(n) => {
                        nodes.remove(&n);
                    }
                    Event::PeerUpsert(p) => {
                        peers.insert(p.name.clone(), p);
                    }
                    Event::PeerRemove(n) => {
                        peers.remove(&n);
                    }
                }
            }
            if synced {
                let nodes: Vec<Arc<MeshNode>> = std::mem::take(nodes).into_values().collect();
                let peers: Vec<MeshPeer> = std::mem::take(peers).into_values().collect();
                let engine = Engine::new(nodes, peers, cfg.node.clone(), cfg.mesh.clone());
                info!(node = %cfg.node, nodes = engine.nodes().count(), peers = engine.peers().count(),
                    "registry listed; reconciling");
                *mesh = Mesh::Running(Box::new(engine));
                machine.listed();
            }
            Vec::new()
        }
        Mesh::Running(engine) => {
            debug!(events = events.len(), "registry changed");
            let (now, later) = engine.split_costly(events, held);
            // Event by event while the one delta the machine keeps is still to come; from the
            // second change on the whole state is planned, so the rest is folded in without
            // updates (no diff of the whole mesh per burst).
            let mut now = now.into_iter();
            while machine.wants_deltas() {
                let Some(ev) = now.next() else { break };
                if tracing::enabled!(tracing::Level::DEBUG) {
                    log_event(&ev, "delta");
                }
                engine.apply_batch([ev], |u| absorb(machine, u, registry));
            }
            let rest: Vec<Event> = now.collect();
            if !rest.is_empty() {
                debug!(events = rest.len(), "folding the rest of the batch in");
                fold(engine, machine, rest);
            }
            later
        }
    }
}

/// Fold the costly events `held` back (see `take_events`) into a running mesh and note when
/// (`last`, for `COSTLY_GAP`).
fn fold_held(
    mesh: &mut Mesh,
    machine: &mut Machine,
    held: &mut Vec<Event>,
    last: &mut Option<tokio::time::Instant>,
) {
    if let Mesh::Running(engine) = mesh {
        let events = std::mem::take(held);
        debug!(events = events.len(), "folding the held costly events in");
        fold(engine, machine, events);
        *last = Some(tokio::time::Instant::now());
    }
}

/// Fold `events` into the engine without updates; the machine plans the whole state.
fn fold(engine: &mut Engine, machine: &mut Machine, events: Vec<Event>) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        events.iter().for_each(|ev| log_event(ev, "folded"));
    }
    let started = std::time::Instant::now();
    engine.fold_batch(events);
    debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch folded into the engine"
    );
    machine.folded();
}

/// The loop's clock as the machine takes it: tokio's (paused in tests), as a std `Instant`.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Write a machine's note to the log.
fn say(note: Option<Note>) {
    let Some(note) = note else { return };
    match note {
        // Said once at info: after a restart it shows what was rewritten (an agent that adopts
        // an intact kernel state reports 0 operations).
        Note::FirstReconciliation { ops } => info!(ops, "first reconciliation done"),
        Note::Reconciled { ops: 0 } => debug!("kernel already matches the desired state"),
        Note::Reconciled { ops } => info!(ops, "kernel reconciled"),
        Note::Partial {
            applied,
            failed,
            retry_in,
        } => {
            info!(applied, failed, retry_in = ?retry_in, "kernel partly reconciled; retrying the rest")
        }
        Note::PortHeld { retry_in } => debug!(retry_in = ?retry_in,
            "reconciled, but the listen port is held; probing it again"),
        Note::ReadFailed { error, retry_in } => {
            warn!(error = %error, retry_in = ?retry_in, "cannot read the kernel state")
        }
        Note::Unavailable(why) => warn!(
            "{why}; nothing is programmed until it can (the kernel is kept as it is, and this \
             node is not ready)"
        ),
        Note::Available => info!("this node can take part in the mesh now"),
    }
}

/// An engine update handed to the machine; its delta logged, its unavailability explained by
/// the registry's diagnostics (`registry`).
fn absorb(machine: &mut Machine, u: Update, registry: &[Diagnostic]) {
    let u = match u {
        Update::Delta(d) => {
            if !d.is_empty() {
                log_delta(&d);
            }
            Update::Delta(d)
        }
        Update::Unavailable(e) => Update::Unavailable(e.explained_by(registry)),
        full => full,
    };
    say(machine.update(u));
}

/// What one reconciliation did.
enum Step {
    /// The engine has no state for this node; why.
    Unavailable(String),
    /// Operations applied, or the kernel could not be read.
    Report(Result<reconcile::Report, KernelError>),
}

/// Carry out one reconciliation of `plan`: the delta against `known` when it applies, else the
/// whole desired state. `mesh_ip` follows the desired interface address.
#[allow(clippy::too_many_arguments)]
async fn reconcile_step<K: Kernel>(
    engine: &Engine,
    plan: Plan,
    kernel: &mut K,
    public_key: WgKey,
    known: &mut Option<reconcile::OwnedState>,
    registry: &[Diagnostic],
    observer: &Observer,
    mesh_ip: &mut Option<IpNetwork>,
) -> Step {
    let external: BTreeSet<WgKey> = engine.peers().map(|p| p.key).collect();
    if let Plan::Delta(d) = plan {
        observer.delta(&d, &external);
        if let Some(i) = &d.interface {
            *mesh_ip = i.address;
        }
        // The delta's peers and routes move into the operations, and from them into `known`:
        // a renumbered mesh's thousands are never held twice.
        if let Some(k) = known.take() {
            match reconcile::plan::plan_delta(*d, &k) {
                Some(ops) => {
                    return Step::Report(Ok(reconcile::apply_planned(
                        kernel, ops, k, public_key, known,
                    )
                    .await));
                }
                None => *known = Some(k),
            }
        }
    }
    match engine.desired() {
        Err(e) => Step::Unavailable(e.explained_by(registry).to_string()),
        Ok(desired) => {
            *mesh_ip = desired.interface.address;
            observer.desired(&desired, &external);
            Step::Report(reconcile::reconcile_cached(kernel, desired, public_key, known).await)
        }
    }
}

/// The registry's and the engine's diagnostics, shown (log, observer, Events) when they may
/// have changed.
#[derive(Default)]
struct Diags {
    /// The registry's current diagnostics (parsing).
    registry: Vec<Diagnostic>,
    /// Whether they may have changed since last shown.
    dirty: bool,
    last: Option<Vec<Diagnostic>>,
    seen: BTreeSet<String>,
}

impl Diags {
    /// Show them if they may have changed; `report` gets all of them when they did.
    fn show(&mut self, mesh: &Mesh, observer: &Observer, report: impl FnOnce(Vec<Diagnostic>)) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let mut all = self.registry.clone();
        if let Mesh::Running(engine) = mesh {
            let engine_diags = engine.diagnostics();
            observer.mesh(
                engine.nodes(),
                engine.peers(),
                &self.registry,
                &engine_diags,
            );
            all.extend(engine_diags);
        }
        if self.last.as_ref() != Some(&all) {
            log_new_diagnostics(&mut self.seen, &all);
            report(all.clone());
            self.last = Some(all);
        }
    }
}

/// What the agent knows and says of its own node (Kubernetes registry).
struct Local {
    /// This node's Node object, as last seen.
    node: Option<Box<k8s_openapi::api::core::v1::Node>>,
    /// What the agent last handed to the publisher (the engine's view of this node).
    own: Option<Publication>,
    /// This node's mesh IP as the last desired state had it (published as wireguard-ip).
    mesh_ip: Option<IpNetwork>,
    /// Endpoints of NATed peers where this node saw them.
    discovered: BTreeMap<WgKey, std::net::SocketAddr>,
    /// Whether something else holds the listen port: then the endpoint is not published.
    port: port::PortGuard,
    /// This agent's public key.
    public_key: WgKey,
    /// What the agent owns on its Node, to tell a foreign write.
    identity: identity::Identity,
    /// Which segment leaders this node cannot reach directly (published for relays).
    reach: reach::Reachability,
    /// Which leaders of this location this node reports not forwarding; `None`: failover off.
    failover: Option<forward::Failover>,
    /// The key-rotation request handled last (by this run, or before it as the Node says).
    rotated: Option<String>,
    /// A rotation request that failed (not retried until a new one comes).
    rotation_failed: Option<String>,
    /// The key the last rotation replaced.
    retired: Option<WgKey>,
    /// Peers whose handshake initiations keep crossing ours.
    stalls: stall::Stalls,
}

impl Local {
    /// What to publish: the key, what is detected from this node's Node object (when known) and
    /// host addresses, the mesh IP, the discovered endpoints and the unreachable leaders.
    fn publication(&self, cfg: &AgentConfig, host: &HostInfo) -> Publication {
        let empty = k8s_openapi::api::core::v1::Node::default();
        let node = self.node.as_deref().unwrap_or(&empty);
        Publication {
            key: Some(self.public_key),
            endpoint: publish::detect_endpoint(node, &host.default_route, cfg.mesh.port),
            internal_ip: publish::detect_internal_ip(node, &host.local, &host.default_route),
            wireguard_ip: self.mesh_ip,
            granularity: Some(cfg.mesh.granularity),
            discovered_endpoints: self.discovered.clone(),
            unreachable: self.reach.unreachable().clone(),
            forwarding_failed: self.failover.as_ref().map(forward::Failover::reported),
            key_rotated: self.rotated.clone(),
        }
    }

    /// Carry out rotation `request`: a new key in the key file and the kernel (configured at
    /// the next reconciliation), remembered as handled. Returns the new public key, `None`
    /// when nothing was rotated (nothing asked, or it failed: logged once per request).
    fn rotate<K: Kernel>(
        &mut self,
        cfg: &AgentConfig,
        kernel: &mut K,
        request: rotate::Request,
    ) -> Option<WgKey> {
        let token = match request {
            rotate::Request::None => return None,
            rotate::Request::Invalid(len) => {
                if self.rotation_failed.as_deref() != Some("invalid") {
                    warn!(
                        annotation = rotate::REQUEST,
                        len,
                        max = rotate::MAX_TOKEN,
                        "key rotation request ignored: the value is too long"
                    );
                    self.rotation_failed = Some("invalid".into());
                }
                return None;
            }
            rotate::Request::Rotate(t) if self.rotation_failed.as_ref() == Some(&t) => return None,
            rotate::Request::Rotate(t) => t,
        };
        let key = PrivateKey::generate();
        let new = key.public_key();
        // The file first: a restart must come back with the key the others are told about.
        let done =
            replace_key_file(&cfg.private_key, &key).and_then(|()| kernel.set_private_key(key));
        if let Err(e) = done {
            warn!(error = %e, token = %token, "key rotation failed; the old key stays");
            self.rotation_failed = Some(token);
            return None;
        }
        info!(old = %self.public_key, new = %new, token = %token,
            "key rotated: the new public key is published, the old one is gone");
        self.retired = Some(self.public_key);
        self.public_key = new;
        self.rotated = Some(token);
        Some(new)
    }

    /// Hand what this node publishes now to the publisher (without what the port guard says
    /// this node cannot serve), and remember all of it as what it is about to publish.
    fn publish(&mut self, cfg: &AgentConfig, link: &ClusterLink, host: &HostInfo) {
        let p = self.publication(cfg, host);
        let out = self.port.publication(p.clone());
        self.identity.publishing(&out);
        link.publish(out);
        self.own = Some(p);
    }

    /// Compare this node's Node (`node`, just read) with what the agent owns on it: a value
    /// someone else wrote is an incident (log, Event, metric), and what the agent owns is
    /// written back at once.
    fn check_identity(
        &mut self,
        cfg: &AgentConfig,
        node: &k8s_openapi::api::core::v1::Node,
        link: &ClusterLink,
        observer: &Observer,
    ) {
        let foreign = self.identity.foreign(node);
        if foreign.is_empty() {
            return;
        }
        let text = identity::describe(&foreign);
        warn!(node = %cfg.node, "{text}");
        observer.identity_restored();
        link.restore(text, node.metadata.uid.clone());
    }
}

/// Put back the guards saved by the last run (see [`guards`]); the saved list's fingerprint.
async fn restore_guards<K: Kernel>(kernel: &mut K, path: &std::path::Path) -> u64 {
    let dsts = match guards::load(path) {
        Ok(d) => d,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the saved guards");
            return guards::fingerprint(&[]);
        }
    };
    let saved = guards::fingerprint(&dsts);
    if dsts.is_empty() {
        return saved;
    }
    let ops: Vec<reconcile::Op> = dsts
        .iter()
        .map(|d| {
            reconcile::Op::AddRoute(crate::desired::Route::blackhole(
                crate::desired::MAIN_TABLE,
                *d,
            ))
        })
        .collect();
    let report = reconcile::apply_ops(kernel, ops).await;
    info!(
        guards = dsts.len(),
        failed = report.failed.len(),
        "guards of the last run in place before the registry is listed"
    );
    saved
}

/// Save the destinations `known` guards when they differ from the last saved (`saved`).
fn save_guards(path: &std::path::Path, known: &reconcile::OwnedState, saved: &mut u64) {
    let dsts = guards::of(known);
    let now = guards::fingerprint(&dsts);
    if now == *saved {
        return;
    }
    // Said once per change of the list, not per reconciliation.
    *saved = now;
    if let Err(e) = guards::save(path, &dsts) {
        warn!(path = %path.display(), error = %e, "cannot save the guards");
    }
}

/// How long this agent's view of the API must have been live (listed, connected) before it
/// judges other nodes' last-seen: Kilo's staleness threshold plus the longest wait of a failing
/// publisher. After an outage every running agent has published again within that time.
pub fn staleness_grace() -> Duration {
    Duration::from_secs(2 * crate::topology::CHECK_IN_PERIOD_SECS as u64)
        + cluster::publish_backoff().longest()
}

/// Start the thread that probes the watched leader's forwarding: one echo round per
/// [`forward::PROBE_EVERY`] while something is watched, each result sent to the loop. It ends
/// when the loop drops its receiver. Returns whether it started.
fn spawn_prober(
    watched: tokio::sync::watch::Receiver<Option<forward::Watch>>,
    results: tokio::sync::mpsc::UnboundedSender<(NodeName, bool)>,
) -> bool {
    let run = move || {
        // The identifier tells this agent's replies from other pingers'.
        let mut pinger = icmp::Pinger::new((std::process::id() & 0xffff) as u16);
        let mut failing: Option<String> = None;
        while !results.is_closed() {
            let started = std::time::Instant::now();
            let current = watched.borrow().clone();
            if let Some(w) = current {
                match pinger.round(&w.targets, forward::PROBE_EVERY) {
                    Ok(answered) => {
                        failing = None;
                        if results.send((w.leader, answered)).is_err() {
                            return;
                        }
                    }
                    // No socket, no verdict: a node that cannot probe never reports its leader.
                    Err(e) => {
                        let e = e.to_string();
                        if failing.as_ref() != Some(&e) {
                            warn!(error = %e, "cannot probe the location leader's forwarding (needs CAP_NET_RAW); no failover from this node");
                            failing = Some(e);
                        }
                    }
                }
            }
            std::thread::sleep(forward::PROBE_EVERY.saturating_sub(started.elapsed()));
        }
    };
    match std::thread::Builder::new()
        .name("wiremesh-probe".into())
        .spawn(run)
    {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "cannot start the leader probe; no failover from this node");
            false
        }
    }
}

/// How often the WireGuard device is sampled for unreachable peers.
const REACH_PERIOD: Duration = Duration::from_secs(5);

/// Sample the device's peers into `reach` (segment leaders only: the engine's nodes' keys), and
/// try the direct path of unreachable peers again when due: the peer removed and added again as
/// it was, so its keepalive starts a new handshake. Returns whether the unreachable set changed.
async fn sample_reachability<K: Kernel>(
    engine: &Engine,
    device: &Arc<dyn http::DeviceReader>,
    kernel: &mut K,
    reach: &mut reach::Reachability,
) -> bool {
    let reader = device.clone();
    let stats = match tokio::task::spawn_blocking(move || reader.peer_stats()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "cannot read the WireGuard device for reachability");
            return false;
        }
        Err(e) => {
            debug!(error = %e, "the WireGuard device read did not finish");
            return false;
        }
    };
    let nodes: BTreeSet<WgKey> = engine.nodes().filter_map(|n| n.key).collect();
    let changed = reach.sample(std::time::Instant::now(), &stats, |k| nodes.contains(k));
    let due = reach.probes_due(std::time::Instant::now());
    if !due.is_empty()
        && let Ok(Some(dev)) = kernel.read_wireguard().await
    {
        // Only peers with a keepalive (a relayed one always has one). The peer is made anew,
        // without the old session, so its keepalive needs a handshake: an answer proves the path.
        let probed = dev
            .peers
            .iter()
            .filter(|p| due.contains(&p.public_key) && p.persistent_keepalive != 0);
        remake_peers(kernel, probed).await;
    }
    changed
}

/// How long after a key rotation, or after becoming a leader, the peers are made anew (see
/// [`remake_peers`]): long enough for the others to have learnt of it (one watch event).
const REMAKE_AFTER: Duration = Duration::from_secs(1);

/// Remove each of `peers` and add it again as it was: without its old session and handshake
/// state, its next packet (or keepalive) starts a new handshake at once.
async fn remake_peers<'a, K: Kernel>(
    kernel: &mut K,
    peers: impl Iterator<Item = &'a crate::desired::WgPeer>,
) {
    let ops: Vec<Op> = peers
        .flat_map(|p| {
            [
                Op::RemovePeer {
                    public_key: p.public_key,
                },
                Op::UpsertPeer(Box::new(p.clone())),
            ]
        })
        .collect();
    for (op, r) in ops.iter().zip(kernel.apply_all(&ops).await) {
        if let Err(e) = r {
            debug!(error = %e, op = op.kind(), "cannot make a peer anew");
        }
    }
}

/// Sample the device for peers whose handshake initiations keep crossing ours (see
/// [`stall`]) and make each anew, as the kernel holds it: removed and added again, so it
/// initiates at a moment of its own. Peers the reachability probe owns (unreachable ones) are
/// left to it.
async fn break_crossed_initiations<K: Kernel>(
    device: &Arc<dyn http::DeviceReader>,
    kernel: &mut K,
    me: &mut Local,
) {
    let reader = device.clone();
    let stats = match tokio::task::spawn_blocking(move || reader.peer_stats()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "cannot read the WireGuard device for crossed handshakes");
            return;
        }
        Err(e) => {
            debug!(error = %e, "the WireGuard device read did not finish");
            return;
        }
    };
    let unreachable = me.reach.unreachable();
    let due = me.stalls.sample(std::time::Instant::now(), &stats, |k| {
        !unreachable.contains(k)
    });
    if due.is_empty() {
        return;
    }
    let dev = match kernel.read_wireguard().await {
        Ok(Some(dev)) => dev,
        Ok(None) => return,
        Err(e) => {
            debug!(error = %e, "cannot read the WireGuard device to make peers anew");
            return;
        }
    };
    let made: Vec<&crate::desired::WgPeer> = dev
        .peers
        .iter()
        .filter(|p| due.contains(&p.public_key))
        .collect();
    for p in &made {
        info!(peer = %p.public_key,
            "handshake initiations with this peer keep crossing and none completes; adding it again to break the tie");
    }
    remake_peers(kernel, made.into_iter()).await;
}

fn system_options(
    cfg: &KernelConfig,
    internal_ip: Option<std::net::IpAddr>,
    state_dir: Option<PathBuf>,
) -> Result<SystemOptions, AgentError> {
    let bad = |what: &str, e: String| {
        AgentError::Kernel(KernelError::Unsupported(format!("{what}: {e}")))
    };
    Ok(SystemOptions {
        interface: cfg.interface.clone(),
        bridge: cfg.bridge.clone(),
        wireguard: cfg
            .wireguard
            .parse::<WgMode>()
            .map_err(|e| bad("--wireguard", e.to_string()))?,
        wireguard_userspace: PathBuf::from(&cfg.wireguard_userspace),
        firewall: cfg
            .firewall
            .parse::<FirewallMode>()
            .map_err(|e| bad("--firewall", e.to_string()))?,
        cni_config: cfg.cni_config.clone(),
        internal_ip,
        private_interface: None,
        state_dir,
    })
}

/// The agent's state directory: that of its private key file.
pub fn state_dir(private_key: &std::path::Path) -> PathBuf {
    match private_key.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// This machine's addresses, read over netlink.
async fn host_info(netlink: &crate::reconcile::netlink::Netlink) -> HostInfo {
    let default_route = netlink.default_route_addresses().await.unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the default route's addresses");
        Vec::new()
    });
    let local = netlink.all_addresses().await.unwrap_or_else(|e| {
        warn!(error = %e, "cannot read this machine's addresses");
        Vec::new()
    });
    HostInfo {
        default_route,
        local,
    }
}

/// The longest a stopping agent waits for its last heartbeat to be written.
const FAREWELL_WITHIN: Duration = Duration::from_secs(3);

/// Run the agent on this machine's kernel until `shutdown` completes.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let key = load_or_generate_private_key(&cfg.private_key)?;
    let public_key = key.public_key();
    info!(node = %cfg.node, public_key = %public_key, "identity");
    let observer = Observer::new(&cfg.node.0, Some(public_key));
    // Listening first: probes get answers (not ready yet) while the registry is reached.
    let server = match cfg.listen {
        None => None,
        Some(addr) => Some(serve_http(addr, observer.clone()).await?),
    };
    let probe = crate::reconcile::netlink::Netlink::new(crate::reconcile::netlink::Devices {
        wireguard: cfg.kernel.interface.clone(),
        private: String::new(),
        tunnel: crate::reconcile::system::TUNNEL_DEVICE.into(),
        bridge: cfg.kernel.bridge.clone(),
    })?;
    let host = host_info(&probe).await;
    let (registry, cluster, internal_ip) = match &cfg.registry {
        RegistryConfig::File(files) => {
            // The internal IP from the file, to find the private interface.
            let n = crate::registry::file::load_nodes(&files.nodes, &cfg.topology_label)?;
            let internal_ip = n
                .items
                .iter()
                .find(|n| n.name == cfg.node)
                .and_then(|n| n.internal_ip)
                .map(|i| i.ip());
            (
                file_source(files.clone(), &cfg.topology_label)?,
                None,
                internal_ip,
            )
        }
        RegistryConfig::Kubernetes(opts) => {
            let client = crate::registry::cluster::connect(opts).await?;
            let rx = crate::registry::cluster::watch(
                client.clone(),
                WatchOptions {
                    topology_label: cfg.topology_label.clone(),
                    node: cfg.node.0.clone(),
                },
            );
            // The Node's InternalIP finds the private interface; while the API server cannot be
            // reached, the default route's private address does in the usual case.
            let api = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
            let node = match tokio::time::timeout(Duration::from_secs(10), api.get_opt(&cfg.node.0))
                .await
            {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) => {
                    warn!(node = %cfg.node, "no Node of this name (yet); is --hostname right?");
                    Default::default()
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot read this node's Node object yet");
                    Default::default()
                }
                Err(_) => {
                    warn!("the Kubernetes API does not answer yet");
                    Default::default()
                }
            };
            let internal_ip = publish::detect_internal_ip(&node, &host.local, &host.default_route)
                .map(|n| n.ip());
            let link = ClusterLink::spawn(client, cfg.node.0.clone(), cfg.check_in_period);
            (rx, Some(link), internal_ip)
        }
    };
    let opts = system_options(&cfg.kernel, internal_ip, Some(state_dir(&cfg.private_key)))?;
    let mut kernel = SystemKernel::new(opts, key).await?;
    if let Some(server) = &server {
        server.set_device(Arc::new(kernel.wireguard().reader()));
    }
    if cfg.mesh.encapsulate != crate::topology::Encapsulate::Never
        && kernel
            .netlink()
            .read_link(crate::reconcile::system::TUNNEL_DEVICE)
            .await?
            .is_none()
    {
        warn!(
            encapsulate = ?cfg.mesh.encapsulate,
            "this kernel has no IPIP tunnel (tunl0, module ipip): routes that need encapsulation \
             will fail; run with --encapsulate never where the nodes of a location share a \
             network (`meshctl doctor` lists what is missing)"
        );
    }
    for l in crate::reconcile::port::kilo_links() {
        warn!(interface = %l, "an interface Kilo left is on this node: its address in the mesh \
            subnet may route mesh traffic into it; remove it with `ip link del {l}` after stopping kg");
    }
    let kernel_events = kernel.netlink().watch_routes()?;
    let inputs = Inputs {
        registry,
        cluster,
        kernel_events,
        host,
        observer,
        device: Some(Arc::new(kernel.wireguard().reader())),
    };
    run_with(cfg, &mut kernel, public_key, inputs, shutdown).await
}

/// Listen on `addr` and serve the HTTP endpoint over `observer` in a task of its own, which
/// ends with the runtime. The returned handle takes the WireGuard device once there is one.
pub async fn serve_http(addr: SocketAddr, observer: Observer) -> Result<http::Server, AgentError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    let server = http::Server::new(observer);
    let task = server.clone();
    tokio::spawn(async move {
        if let Err(e) = task.serve(listener, std::future::pending()).await {
            warn!(error = %e, "the HTTP endpoint stopped");
        }
    });
    info!(addr = %local, "serving /metrics, /healthz, /readyz and /status");
    Ok(server)
}

/// Remove everything wiremesh created on this machine, and nothing else; put back the sysctls
/// the agent recorded as changed in `state_dir` (the directory of its private key). Refused,
/// with nothing touched, when something it is named is not wiremesh's.
pub async fn cleanup(cfg: &KernelConfig, state_dir: Option<PathBuf>) -> Result<(), AgentError> {
    // The key is not needed to delete the interface; a throwaway one keeps the real one unread.
    let mut opts = system_options(cfg, None, state_dir.clone())?;
    opts.private_interface = state_dir
        .as_deref()
        .and_then(crate::reconcile::system::load_private_interface);
    let mut kernel = SystemKernel::new(opts, PrivateKey::generate()).await?;
    kernel.cleanup().await?;
    info!("wiremesh removed from this node");
    Ok(())
}

#[cfg(test)]
mod tests;
