//! `meshctl multicluster link|unlink`: keeps, in each of two clusters, one Kilo `Peer` per
//! segment of the other ([`crate::multicluster`] computes them), and removes exactly those.
//!
//! A sync reads the Nodes and Peers of both clusters, checks that their ranges are disjoint
//! (the first sync refuses to write anything otherwise; later ones leave out the segment that
//! overlaps and say so), and sends each cluster only the Peers that differ. `run` syncs again
//! whenever a Node or Peer of either cluster changes (watches, debounced) and every `resync`,
//! until `shutdown` completes.
//!
//! Does network I/O through [`Cluster`] and `kube`'s watcher; logs with `tracing`.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};

use super::auto_granularity;
use super::cluster::{Cluster, ClusterCliError};
use crate::model::{Granularity, MeshNode};
use crate::multicluster::{
    self as mc, Changes, ClusterView, LinkError, claims, diff, linked_names, peer_claims,
    published_subnet,
};
use crate::registry::cluster::peers_api;
use crate::registry::peer::PeerResource;
use crate::topology::MeshOptions;

/// What went wrong while linking. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkCliError {
    /// A request to one of the clusters failed.
    /// (Rendered into the message, not a `#[source]`: the binary prints the chain, and
    /// the cause would come twice.)
    #[error("cluster {name}: {cause}")]
    Cluster {
        /// The cluster's name in the link.
        name: String,
        /// What failed.
        cause: ClusterCliError,
    },
    /// The clusters cannot be linked (names, overlapping ranges).
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// One side of a link: a connection and what the user said about that cluster.
pub struct Side {
    /// The cluster's name in the link (the label value on the Peers written for it).
    pub name: String,
    /// The connection to its API server.
    pub cluster: Cluster,
    /// Its mesh subnet; `None`: read from the mesh IPs its agents published, else Kilo's
    /// default.
    pub subnet: Option<IpNetwork>,
    /// Its service CIDRs to make reachable from the other cluster.
    pub service_cidrs: Vec<IpNetwork>,
    /// Its granularity; `None`: the one its agents publish (default location).
    pub granularity: Option<Granularity>,
}

/// What one cluster holds, read at the start of a sync.
struct Snapshot {
    nodes: Vec<MeshNode>,
    peers: Vec<PeerResource>,
    subnet: IpNetwork,
    granularity: Granularity,
}

/// What a sync did in one cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// The cluster's name.
    pub cluster: String,
    /// Names of the Peers created.
    pub created: Vec<String>,
    /// Names of the Peers replaced.
    pub updated: Vec<String>,
    /// Names of the Peers deleted.
    pub deleted: Vec<String>,
    /// Names wanted but held by Peers the link did not write: left alone.
    pub foreign: Vec<String>,
    /// Names of the Peers the link holds there after the sync.
    pub linked: Vec<String>,
}

/// What one sync did in both clusters, and every problem it saw (remote nodes left out,
/// segments not linked), as lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    /// The first cluster's changes (Peers for the second).
    pub a: Applied,
    /// The second cluster's changes (Peers for the first).
    pub b: Applied,
    /// Problems, one line each, naming the cluster.
    pub problems: Vec<String>,
}

impl Side {
    fn err(&self, cause: ClusterCliError) -> LinkCliError {
        LinkCliError::Cluster {
            name: self.name.clone(),
            cause,
        }
    }

    async fn snapshot(&self, topology_label: &str) -> Result<Snapshot, LinkCliError> {
        let inputs = self
            .cluster
            .inputs(topology_label)
            .await
            .map_err(|e| self.err(e))?;
        let (peers, _) = self.cluster.peers().await.map_err(|e| self.err(e))?;
        let subnet = self
            .subnet
            .or_else(|| published_subnet(&inputs.nodes))
            .unwrap_or_else(|| MeshOptions::default().subnet);
        let granularity = self
            .granularity
            .unwrap_or_else(|| auto_granularity(&inputs.nodes));
        Ok(Snapshot {
            nodes: inputs.nodes,
            peers,
            subnet,
            granularity,
        })
    }

    fn view<'a>(&'a self, s: &'a Snapshot) -> ClusterView<'a> {
        ClusterView {
            name: &self.name,
            nodes: &s.nodes,
            subnet: s.subnet,
            service_cidrs: &self.service_cidrs,
        }
    }

    /// Send `changes` to this cluster. A failed request is reported and the rest still sent:
    /// the next sync retries what did not take.
    async fn apply(&self, changes: &Changes, problems: &mut Vec<String>) -> Applied {
        let mut out = Applied {
            cluster: self.name.clone(),
            foreign: changes.foreign.clone(),
            ..Applied::default()
        };
        for p in &changes.create {
            let name = p.metadata.name.clone().unwrap_or_default();
            match self.cluster.create_peer(p).await {
                Ok(()) => out.created.push(name),
                Err(e) => problems.push(format!("cluster {}: creating {name}: {e}", self.name)),
            }
        }
        for p in &changes.update {
            let name = p.metadata.name.clone().unwrap_or_default();
            match self.cluster.update_peer(p).await {
                Ok(()) => out.updated.push(name),
                Err(e) => problems.push(format!("cluster {}: updating {name}: {e}", self.name)),
            }
        }
        for name in &changes.delete {
            match self.cluster.delete_peer(name).await {
                Ok(()) | Err(ClusterCliError::NoSuchPeer(_)) => out.deleted.push(name.clone()),
                Err(e) => problems.push(format!("cluster {}: deleting {name}: {e}", self.name)),
            }
        }
        for name in &changes.foreign {
            problems.push(format!(
                "cluster {}: Peer {name} exists and was not written by this link: left alone \
                 (rename or delete it to link that segment)",
                self.name
            ));
        }
        out
    }
}

fn mesh_options(s: &Snapshot) -> MeshOptions {
    MeshOptions {
        granularity: s.granularity,
        subnet: s.subnet,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok()),
        ..MeshOptions::default()
    }
}

/// One sync in both directions. With `strict` (the first sync of a link) any overlap between
/// the clusters' ranges refuses the whole link before anything is written; otherwise a segment
/// that overlaps is left out and reported.
pub async fn sync(
    a: &Side,
    b: &Side,
    topology_label: &str,
    strict: bool,
) -> Result<SyncReport, LinkCliError> {
    mc::check_names(&a.name, &b.name)?;
    let (sa, sb) = futures::try_join!(a.snapshot(topology_label), b.snapshot(topology_label))?;
    let (va, vb) = (a.view(&sa), b.view(&sb));
    if strict {
        mc::check(&va, &vb)?;
    }
    let mut problems = Vec::new();
    let mut local_a = claims(&va);
    local_a.extend(peer_claims(&sa.peers, &b.name));
    let in_a = mc::wanted(&vb, &mesh_options(&sb), &local_a);
    let mut local_b = claims(&vb);
    local_b.extend(peer_claims(&sb.peers, &a.name));
    let in_b = mc::wanted(&va, &mesh_options(&sa), &local_b);
    for (side, w) in [(b, &in_a), (a, &in_b)] {
        problems.extend(
            w.diagnostics
                .iter()
                .map(|d| format!("cluster {}: {d}", side.name)),
        );
    }
    let ca = diff(&in_a.peers, &sa.peers, &b.name);
    let cb = diff(&in_b.peers, &sb.peers, &a.name);
    let mut ra = a.apply(&ca, &mut problems).await;
    let mut rb = b.apply(&cb, &mut problems).await;
    ra.linked = names(&in_a.peers, &ca.foreign);
    rb.linked = names(&in_b.peers, &cb.foreign);
    Ok(SyncReport {
        a: ra,
        b: rb,
        problems,
    })
}

fn names(wanted: &[PeerResource], foreign: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .filter(|n| !foreign.contains(n))
        .collect()
}

fn log_applied(r: &Applied, remote: &str) {
    for n in &r.created {
        tracing::info!(cluster = %r.cluster, peer = %n, "linked a segment of cluster {remote}");
    }
    for n in &r.updated {
        tracing::info!(cluster = %r.cluster, peer = %n, "updated the link to a segment of cluster {remote}");
    }
    for n in &r.deleted {
        tracing::info!(cluster = %r.cluster, peer = %n, "unlinked a segment of cluster {remote}");
    }
}

/// A stream that yields once for every change of a Node or Peer of `cluster`.
fn changes(cluster: &Cluster) -> impl futures::Stream<Item = ()> + Send + use<> {
    let client = cluster.client().clone();
    let cfg = watcher::Config::default();
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), cfg.clone())
        .default_backoff()
        .map(|_| ());
    let peers = watcher::watcher(peers_api(client), cfg)
        .default_backoff()
        .map(|_| ());
    futures::stream::select(nodes, peers)
}

/// How long `run` waits after a change for more before it syncs.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Link `a` and `b` and keep them in sync until `shutdown` completes: a first strict sync
/// (an overlap is an error, nothing written), then a sync after every change in either cluster
/// (watches, debounced by [`DEBOUNCE`]) and every `resync`. A failed sync is logged and retried
/// at the next change or after at most `resync`. Returns the first sync's error, else `Ok` once
/// stopped. Problems are logged when they change, not at every sync.
pub async fn run(
    a: &Side,
    b: &Side,
    topology_label: &str,
    resync: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LinkCliError> {
    let first = sync(a, b, topology_label, true).await?;
    log_applied(&first.a, &b.name);
    log_applied(&first.b, &a.name);
    let mut shown: BTreeSet<String> = BTreeSet::new();
    show_problems(&first.problems, &mut shown);
    tracing::info!(
        a = %a.name, b = %b.name,
        linked_in_a = first.a.linked.len(), linked_in_b = first.b.linked.len(),
        "clusters linked; keeping them in sync"
    );
    let mut events = Box::pin(futures::stream::select(
        changes(&a.cluster),
        changes(&b.cluster),
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            ev = events.next() => {
                if ev.is_none() {
                    // The watches ended (they only do when their runtime stops): poll instead.
                    tokio::time::sleep(resync).await;
                }
                // Take the rest of a burst before syncing.
                let until = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(Some(())) = tokio::time::timeout_at(until, events.next()).await {}
            }
            () = tokio::time::sleep(resync) => {}
        }
        match sync(a, b, topology_label, false).await {
            Ok(r) => {
                log_applied(&r.a, &b.name);
                log_applied(&r.b, &a.name);
                show_problems(&r.problems, &mut shown);
            }
            Err(e) => tracing::warn!("sync failed, retrying at the next change: {e}"),
        }
    }
}

fn show_problems(now: &[String], shown: &mut BTreeSet<String>) {
    let now: BTreeSet<String> = now.iter().cloned().collect();
    for p in now.difference(shown) {
        tracing::warn!("{p}");
    }
    for p in shown.difference(&now) {
        tracing::info!("resolved: {p}");
    }
    *shown = now;
}

/// Delete, in each cluster, the Peers the link wrote for the other; nothing else. Returns the
/// names deleted in `a` and in `b`.
pub async fn unlink(a: &Side, b: &Side) -> Result<(Vec<String>, Vec<String>), LinkCliError> {
    mc::check_names(&a.name, &b.name)?;
    let mut out = (Vec::new(), Vec::new());
    for (side, remote, deleted) in [(a, &b.name, &mut out.0), (b, &a.name, &mut out.1)] {
        let (peers, _) = side.cluster.peers().await.map_err(|e| side.err(e))?;
        for name in linked_names(&peers, remote) {
            match side.cluster.delete_peer(&name).await {
                Ok(()) | Err(ClusterCliError::NoSuchPeer(_)) => deleted.push(name),
                Err(e) => return Err(side.err(e)),
            }
        }
    }
    Ok(out)
}
