//! `meshctl connect`: this machine, outside the cluster, joins the mesh as an external peer
//! (Kilo's `kgctl connect`) until it is stopped.
//!
//! ```text
//! private key file ─→ public key ─→ Peer NAME: adopt::decide ─→ create / adopt / update / refuse
//! watch Nodes, Peers (registry::cluster::watch) ─→ topology ─→ outside::outside_state (pure)
//!   ─→ reconcile::reconcile (the agent's planner: only the difference) ─→ ConnectKernel
//! SIGINT / SIGTERM ─→ ConnectKernel::remove (interface, routes, guards) and the Peer it made
//! ```
//!
//! The pure parts are [`outside`] (the machine's desired state) and [`adopt`] (whose Peer it
//! is); [`kernel`] is the share of the machine connect owns; [`run`] is the loop. May depend on
//! the CLI's cluster client, the registry's watch, the topology, showconf and the reconciler.

pub mod adopt;
pub mod kernel;
pub mod outside;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use crate::cli::auto_granularity;
use crate::cli::cluster::{Cluster, ClusterCliError};
use crate::cli::peer::{NewPeer, PeerArgError, build};
use crate::desired::DesiredState;
use crate::model::{Granularity, MeshNode, MeshPeer, NodeName, WgKey};
use crate::reconcile::KernelError;
use crate::reconcile::wg::{WgMode, WgOptions, load_or_generate_private_key};
use crate::registry::cluster::{ClientOptions, WatchOptions, watch};
use crate::registry::peer::PeerResource;
use crate::topology::incremental::Event;
use crate::topology::{MeshOptions, build_checked, claims};
use adopt::{Adoption, decide, mark, marked};
use kernel::ConnectKernel;
use outside::{OutsideOptions, outside_state};

/// Everything `meshctl connect` needs.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// The Peer's name.
    pub name: String,
    /// This machine's name, the value of [`adopt::CONNECT_HOST`] on the Peer.
    pub host: String,
    /// How to reach the API server.
    pub client: ClientOptions,
    /// How long each request to the API server may take (zero: no limit).
    pub request_timeout: Duration,
    /// The Peer's allowed IPs, as given; the first is the interface's address.
    pub allowed_ips: Vec<String>,
    /// The Peer's endpoint (`host:port`), when the cluster can reach this machine.
    pub endpoint: Option<String>,
    /// Seconds between the keepalives this machine sends (0: off).
    pub persistent_keepalive: u16,
    /// The private key file; generated (mode 0600) when missing.
    pub private_key: PathBuf,
    /// The interface and its settings.
    pub outside: OutsideOptions,
    /// Period of the full comparison with the kernel, changes or not.
    pub resync: Duration,
    /// Leave the interface, its routes and the Peer in place on exit.
    pub keep: bool,
    /// WireGuard implementation (the agent's `--wireguard`).
    pub wireguard: WgMode,
    /// The userspace WireGuard program.
    pub wireguard_userspace: PathBuf,
    /// The mesh's granularity; `None`: what the agents publish.
    pub granularity: Option<Granularity>,
    /// The mesh subnet (the agents' `--subnet`); `None`: read from the mesh IPs the agents
    /// published, else Kilo's default.
    pub subnet: Option<IpNetwork>,
    /// Node label giving the location when no annotation does.
    pub topology_label: String,
}

/// Why `meshctl connect` stopped. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A flag holds an invalid value.
    #[error(transparent)]
    Flags(#[from] PeerArgError),
    /// The private key file could not be read or written.
    #[error("{0}")]
    Key(#[source] KernelError),
    /// The API server refused or could not be reached.
    #[error(transparent)]
    Cluster(#[from] ClusterCliError),
    /// The Peer of that name is someone else's.
    #[error("{0}")]
    NotOurs(String),
    /// The interface or its routes could not be set up or removed.
    #[error("{0}")]
    Kernel(#[from] KernelError),
    /// The watch of Nodes and Peers ended.
    #[error("the watch of Nodes and Peers ended")]
    WatchEnded,
}

/// What the Peer is to this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerOrigin {
    /// Made (or updated) by `connect` on this host: removed on exit.
    Ours,
    /// Made by hand for this machine's key: used, left on exit.
    Theirs,
}

/// Create, adopt or update the Peer `want`, or say whose it is.
async fn claim_peer(
    cluster: &Cluster,
    want: &PeerResource,
    host: &str,
) -> Result<PeerOrigin, ConnectError> {
    let name = want.metadata.name.clone().unwrap_or_default();
    // Twice at most: a Peer created between our read and our create is decided anew.
    for _ in 0..2 {
        let existing = cluster.peer(&name).await?;
        match decide(existing.as_ref(), want, host) {
            Adoption::Create => match cluster.create_peer(want).await {
                Ok(()) => {
                    info!(peer = %name, "Peer created");
                    return Ok(PeerOrigin::Ours);
                }
                Err(ClusterCliError::PeerExists(_)) => continue,
                Err(e) => return Err(e.into()),
            },
            Adoption::Adopt { ours } => {
                info!(peer = %name, made_by_connect = ours, "Peer adopted as it is");
                return Ok(if ours {
                    PeerOrigin::Ours
                } else {
                    PeerOrigin::Theirs
                });
            }
            Adoption::Update => {
                cluster.update_peer(want).await?;
                info!(peer = %name, "Peer updated (made by connect on this host)");
                return Ok(PeerOrigin::Ours);
            }
            Adoption::Refuse(why) => return Err(ConnectError::NotOurs(why)),
        }
    }
    Err(ConnectError::NotOurs(format!(
        "peer {name} keeps being created by someone else; it is left alone"
    )))
}

/// The nodes and peers the watch has delivered so far.
#[derive(Debug, Default)]
struct Registry {
    nodes: BTreeMap<NodeName, Arc<MeshNode>>,
    peers: BTreeMap<NodeName, MeshPeer>,
    synced: bool,
}

impl Registry {
    fn apply(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::NodeUpsert(n) => {
                    self.nodes.insert(n.name.clone(), n);
                }
                Event::NodeRemove(n) => {
                    self.nodes.remove(&n);
                }
                Event::PeerUpsert(p) => {
                    self.peers.insert(p.name.clone(), p);
                }
                Event::PeerRemove(n) => {
                    self.peers.remove(&n);
                }
            }
        }
    }

    /// This machine's desired state for the nodes and peers known now.
    fn desired(&self, cfg: &ConnectConfig) -> Result<DesiredState, crate::showconf::ShowconfError> {
        let nodes: Vec<MeshNode> = self.nodes.values().map(|n| (**n).clone()).collect();
        let peers: Vec<MeshPeer> = self.peers.values().cloned().collect();
        let opts = MeshOptions {
            granularity: cfg.granularity.unwrap_or_else(|| auto_granularity(&nodes)),
            subnet: cfg
                .subnet
                .or_else(|| crate::multicluster::published_subnet(&nodes))
                .unwrap_or_else(|| MeshOptions::default().subnet),
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_secs()).ok()),
            ..MeshOptions::default()
        };
        let checked = claims::check(&nodes, &opts);
        let topo = build_checked(&checked, &peers, &opts);
        outside_state(&topo, &NodeName(cfg.name.clone()), &opts, &cfg.outside)
    }
}

/// Make the kernel hold `desired`; logs what changed. Errors are logged: the next change or
/// resync tries again.
async fn sync(kernel: &mut ConnectKernel, desired: &DesiredState, key: WgKey, first: &mut bool) {
    match crate::reconcile::reconcile(kernel, desired, key).await {
        Ok(report) => {
            for (op, e) in &report.failed {
                warn!(op = op.kind(), error = %e, "kernel refused an operation");
            }
            if *first && report.failed.is_empty() {
                *first = false;
                info!(
                    interface = %desired.interface.name,
                    address = ?desired.interface.address,
                    peers = desired.peers.len(),
                    routes = desired.routes.len(),
                    "connected"
                );
            } else if !report.is_noop() {
                info!(ops = report.applied_count(), kinds = ?report.applied, "reconciled");
            }
        }
        Err(e) => warn!(error = %e, "cannot read the kernel; trying again later"),
    }
}

/// Run `meshctl connect` until `shutdown` completes, then remove what it made (unless
/// `cfg.keep`).
///
/// Nothing is changed on the machine or in the cluster before the flags, the key and the
/// machine are checked; the interface is set up once the first complete list of Nodes and
/// Peers has arrived, and follows every change after it.
pub async fn run(
    cfg: ConnectConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConnectError> {
    let mut shutdown = std::pin::pin!(shutdown);
    if let Some(dir) = cfg
        .private_key
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| {
                ConnectError::Key(KernelError::Io {
                    op: format!("create {}", dir.display()),
                    source,
                })
            })?;
    }
    let key = load_or_generate_private_key(&cfg.private_key).map_err(ConnectError::Key)?;
    let public_key = key.public_key();
    info!(peer = %cfg.name, %public_key, "identity");
    let want = marked(
        build(&NewPeer {
            name: cfg.name.clone(),
            public_key: public_key.to_string(),
            allowed_ips: cfg.allowed_ips.clone(),
            endpoint: cfg.endpoint.clone(),
            persistent_keepalive: i64::from(cfg.persistent_keepalive),
            preshared_key: None,
        })?,
        &cfg.host,
    );
    let mut wg = WgOptions::new(cfg.wireguard);
    wg.userspace_binary = cfg.wireguard_userspace.clone();
    let mut kernel = ConnectKernel::new(&cfg.outside.interface, key, &wg).await?;
    let cluster = Cluster::connect(&cfg.client, cfg.request_timeout).await?;
    let origin = claim_peer(&cluster, &want, &cfg.host).await?;

    let mut batches = watch(
        cluster.client().clone(),
        WatchOptions {
            topology_label: cfg.topology_label.clone(),
            node: String::new(),
        },
    );
    let mut registry = Registry::default();
    let mut resync = tokio::time::interval(cfg.resync.max(Duration::from_secs(1)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<DesiredState> = None;
    let mut first = true;
    let mut missing_logged = false;
    let ended = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            batch = batches.recv() => match batch {
                Some(b) => {
                    registry.apply(b.events);
                    registry.synced = b.synced;
                }
                None => break Some(ConnectError::WatchEnded),
            },
            _ = resync.tick() => {}
        }
        if !registry.synced {
            continue;
        }
        match registry.desired(&cfg) {
            Ok(desired) => {
                missing_logged = false;
                sync(&mut kernel, &desired, public_key, &mut first).await;
                last = Some(desired);
            }
            // Our Peer deleted by someone, or no node yet: keep what is programmed.
            Err(e) if !missing_logged => {
                missing_logged = true;
                warn!(error = %e, "cannot compute this machine's configuration; keeping it as it is");
            }
            Err(_) => {}
        }
    };
    drop(batches);
    if cfg.keep {
        info!("--keep: the interface, its routes and the Peer stay");
        return ended.map_or(Ok(()), Err);
    }
    let removed = kernel.remove(last.as_ref()).await;
    match &removed {
        Ok(r) => info!(
            interface = %cfg.outside.interface,
            routes = r.routes,
            guards = r.guards,
            "interface and routes removed"
        ),
        Err(e) => warn!(error = %e, "cannot remove the interface"),
    }
    let peer = match origin {
        PeerOrigin::Theirs => {
            info!(peer = %cfg.name, "the Peer was not made by connect: left in place");
            Ok(())
        }
        PeerOrigin::Ours => delete_own_peer(&cluster, &cfg).await,
    };
    if let Some(e) = ended {
        return Err(e);
    }
    removed?;
    peer
}

/// Delete the Peer `cfg.name` if it still carries this host's mark.
async fn delete_own_peer(cluster: &Cluster, cfg: &ConnectConfig) -> Result<(), ConnectError> {
    match cluster.peer(&cfg.name).await? {
        Some(p) if mark(&p) == Some(cfg.host.as_str()) => {
            cluster.delete_peer(&cfg.name).await?;
            info!(peer = %cfg.name, "Peer deleted");
        }
        Some(_) => {
            warn!(peer = %cfg.name, "the Peer was taken over by someone else: left in place")
        }
        None => info!(peer = %cfg.name, "the Peer is already gone"),
    }
    Ok(())
}
