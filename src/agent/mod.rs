//! The node agent's loop: registry → incremental engine → desired state → reconciler → kernel.
//!
//! Watches the registry (files for now), turns every change into engine events, and reconciles
//! the kernel when the desired state changed, when the kernel lost something of ours (a route
//! deleted by hand), on a resync period, and after failures (with backoff). Logs what changed
//! and why. May depend on every library module; the kernel is reached only through
//! [`crate::reconcile::Kernel`].

mod watch;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::desired::DesiredDelta;
use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, MeshPeer, NodeName, WgKey};
use crate::reconcile::nft::FirewallMode;
use crate::reconcile::system::{SystemKernel, SystemOptions};
use crate::reconcile::wg::{PrivateKey, WgMode, load_or_generate_private_key};
use crate::reconcile::{self, Kernel, KernelError, Op};
use crate::registry::file::{FileError, NodeCache, load_nodes_cached, load_peers};
use crate::registry::{diff_nodes, diff_peers};
use crate::topology::MeshOptions;
use crate::topology::incremental::{Engine, Update};

pub use watch::FileWatcher;

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

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node: NodeName,
    /// Nodes file (file registry).
    pub nodes: PathBuf,
    /// Peers file (file registry).
    pub peers: Option<PathBuf>,
    /// Private key file.
    pub private_key: PathBuf,
    /// Label giving a node's location.
    pub topology_label: String,
    /// Period of the kernel comparison without changes.
    pub resync_period: Duration,
    /// Kernel-side settings.
    pub kernel: KernelConfig,
    /// Engine options.
    pub mesh: MeshOptions,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The registry could not be read at start.
    #[error(transparent)]
    Registry(#[from] FileError),
    /// The kernel could not be set up or read.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The files could not be watched.
    #[error("watching {path}: {message}")]
    Watch {
        /// The watched path.
        path: String,
        /// What failed.
        message: String,
    },
}

/// What the registry holds now.
struct Snapshot {
    nodes: Vec<MeshNode>,
    peers: Vec<MeshPeer>,
    diagnostics: Vec<Diagnostic>,
}

fn read_registry(
    cfg: &AgentConfig,
    public_key: WgKey,
    cache: &mut NodeCache,
) -> Result<Snapshot, FileError> {
    let n = load_nodes_cached(&cfg.nodes, &cfg.topology_label, cache)?;
    let mut nodes = n.items;
    let mut diagnostics = n.diagnostics;
    let mut peers = Vec::new();
    if let Some(p) = &cfg.peers {
        let p = load_peers(p)?;
        peers = p.items;
        diagnostics.extend(p.diagnostics);
    }
    // The local node's identity is the key this agent holds, whatever the registry says.
    for n in nodes.iter_mut().filter(|n| n.name == cfg.node) {
        if n.key.is_some_and(|k| k != public_key) {
            warn!(node = %cfg.node, published = ?n.key.map(|k| k.to_string()), ours = %public_key,
                "the registry has another public key for this node; using ours");
        }
        n.key = Some(public_key);
    }
    Ok(Snapshot {
        nodes,
        peers,
        diagnostics,
    })
}

/// Log diagnostics that are new since the last read, once each.
fn log_new_diagnostics(seen: &mut BTreeSet<String>, diags: &[Diagnostic]) {
    let now: BTreeSet<String> = diags.iter().map(ToString::to_string).collect();
    for d in now.difference(seen) {
        warn!("{d}");
    }
    *seen = now;
}

fn log_delta(d: &DesiredDelta) {
    for p in &d.peers_upserted {
        info!(peer = %p.name, key = %p.public_key, endpoint = ?p.endpoint.as_ref().map(ToString::to_string),
            allowed_ips = ?p.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(), "peer added or changed");
    }
    for k in &d.peers_removed {
        info!(key = %k, "peer removed");
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

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::CreateInterface => "create-interface",
        Op::ConfigureDevice { .. } => "configure-device",
        Op::SetMtu { .. } => "set-mtu",
        Op::AddAddress { .. } | Op::DelAddress { .. } => "address",
        Op::LinkUp => "link-up",
        Op::UpsertPeer(_) | Op::RemovePeer { .. } => "peer",
        Op::SetBridge(_) => "bridge",
        Op::WriteCni { .. } => "cni-config",
        Op::SetMasquerade(_) | Op::DelMasquerade => "masquerade",
        Op::AddRoute(_) | Op::DelRoute(_) => "route",
        Op::AddRule(_) | Op::DelRule(_) => "rule",
    }
}

/// The operations for `deltas` planned against `known`, and the state they lead to; `None` when
/// a delta needs a full plan.
fn delta_ops(
    deltas: &[DesiredDelta],
    known: &reconcile::OwnedState,
    public_key: WgKey,
) -> Option<(Vec<Op>, reconcile::OwnedState)> {
    let mut next = known.clone();
    let mut all = Vec::new();
    for d in deltas {
        let ops = reconcile::plan::plan_delta(d, &next)?;
        reconcile::plan::simulate(&mut next, &ops, public_key);
        all.extend(ops);
    }
    Some((all, next))
}

/// The agent loop over any kernel. `kernel_events` fires when the kernel lost something of ours.
pub async fn run_with<K: Kernel>(
    cfg: AgentConfig,
    kernel: &mut K,
    public_key: WgKey,
    mut kernel_events: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut watched = vec![cfg.nodes.clone()];
    watched.extend(cfg.peers.clone());
    let (_watcher, mut file_events) = FileWatcher::new(&watched)?;
    let mut cache = NodeCache::default();
    let snap = read_registry(&cfg, public_key, &mut cache)?;
    let mut seen_diags = BTreeSet::new();
    log_new_diagnostics(&mut seen_diags, &snap.diagnostics);
    let mut engine = Engine::new(snap.nodes, snap.peers, cfg.node.clone(), cfg.mesh.clone());
    info!(node = %cfg.node, nodes = engine.nodes().count(), "agent started");
    let mut dirty = true;
    // The kernel state the last reconciliation left; `None` makes the next one read the kernel.
    let mut known: Option<reconcile::OwnedState> = None;
    let mut backoff = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.resync_period,
        cfg.resync_period,
    );
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut kernel_events_open = true;
    // Engine deltas since the last reconciliation; planned against `known` when possible.
    let mut pending: Vec<DesiredDelta> = Vec::new();
    let mut full_needed = true;
    loop {
        if dirty {
            dirty = false;
            let report = match (full_needed, known.take()) {
                (false, Some(k)) => match delta_ops(&pending, &k, public_key) {
                    Some((ops, next)) => {
                        let results = kernel.apply_all(&ops).await;
                        let report = reconcile::Report::from_results(ops, results);
                        if report.failed.is_empty() {
                            known = Some(next);
                        }
                        Some(Ok(report))
                    }
                    None => {
                        known = Some(k);
                        None
                    }
                },
                (_, k) => {
                    known = k;
                    None
                }
            };
            pending.clear();
            let report = match report {
                Some(r) => Some(r),
                None => match engine.desired() {
                    Err(e) => {
                        warn!("{e}; nothing is programmed until it can");
                        None
                    }
                    Ok(desired) => Some(
                        reconcile::reconcile_cached(kernel, &desired, public_key, &mut known).await,
                    ),
                },
            };
            full_needed = false;
            match report {
                None => {}
                Some(Ok(report)) if report.failed.is_empty() => {
                    backoff = Duration::from_secs(1);
                    retry_at = None;
                    if report.is_noop() {
                        debug!("kernel already matches the desired state");
                    } else {
                        let mut kinds: Vec<&str> = report.applied.iter().map(op_kind).collect();
                        kinds.dedup();
                        info!(ops = report.applied.len(), kinds = ?kinds, "kernel reconciled");
                    }
                }
                Some(Ok(report)) => {
                    for (op, e) in &report.failed {
                        warn!(op = op_kind(op), error = %e, "kernel refused an operation");
                    }
                    info!(applied = report.applied.len(), failed = report.failed.len(), retry_in = ?backoff,
                        "kernel partly reconciled; retrying the rest");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    full_needed = true;
                }
                Some(Err(e)) => {
                    warn!(error = %e, retry_in = ?backoff, "cannot read the kernel state");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    full_needed = true;
                }
            }
        }
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down; the mesh stays programmed (use `wiremesh cleanup` to remove it)");
                return Ok(());
            }
            Some(()) = file_events.recv() => {
                // Signals that arrived meanwhile are covered by this one reload.
                while file_events.try_recv().is_ok() {}
                match read_registry(&cfg, public_key, &mut cache) {
                    Err(e) => warn!(error = %e, "cannot read the registry; keeping the last good state"),
                    Ok(snap) => {
                        log_new_diagnostics(&mut seen_diags, &snap.diagnostics);
                        let mut events = diff_nodes(engine.nodes(), &snap.nodes);
                        events.extend(diff_peers(engine.peers(), &snap.peers));
                        debug!(events = events.len(), "registry changed");
                        for ev in events {
                            match engine.apply(ev) {
                                Update::Delta(d) if d.is_empty() => {}
                                Update::Delta(d) => { log_delta(&d); pending.push(d); dirty = true; }
                                Update::Full(_) => { info!("this node can take part in the mesh now"); dirty = true; full_needed = true; }
                                Update::Unavailable(e) => { warn!("{e}"); }
                            }
                        }
                    }
                }
            }
            ev = kernel_events.recv(), if kernel_events_open => {
                match ev {
                    Some(()) => { info!("the kernel lost state of ours; restoring it"); dirty = true; known = None; full_needed = true; }
                    None => kernel_events_open = false,
                }
            }
            _ = resync.tick() => { dirty = true; known = None; full_needed = true; }
            _ = retry => { dirty = true; known = None; full_needed = true; }
        }
    }
}

fn system_options(
    cfg: &KernelConfig,
    mtu: Option<u32>,
    internal_ip: Option<std::net::IpAddr>,
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
        mtu,
        internal_ip,
    })
}

/// Run the agent on this machine's kernel until `shutdown` completes.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let key = load_or_generate_private_key(&cfg.private_key)?;
    let public_key = key.public_key();
    info!(node = %cfg.node, public_key = %public_key, "identity");
    let snap = read_registry(&cfg, public_key, &mut NodeCache::default())?;
    let internal_ip = snap
        .nodes
        .iter()
        .find(|n| n.name == cfg.node)
        .and_then(|n| n.internal_ip)
        .map(|i| i.ip());
    let opts = system_options(&cfg.kernel, cfg.mesh.mtu, internal_ip)?;
    let mut kernel = SystemKernel::new(opts, key).await?;
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
    let events = kernel.netlink().watch_routes()?;
    run_with(cfg, &mut kernel, public_key, events, shutdown).await
}

/// Remove everything wiremesh created on this machine, and nothing else.
pub async fn cleanup(cfg: &KernelConfig) -> Result<(), AgentError> {
    // The key is not needed to delete the interface; a throwaway one keeps the real one unread.
    let opts = system_options(cfg, None, None)?;
    let mut kernel = SystemKernel::new(opts, PrivateKey::generate()).await?;
    kernel.cleanup().await?;
    info!("wiremesh removed from this node");
    Ok(())
}

#[cfg(test)]
mod tests;
