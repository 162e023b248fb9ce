//! `meshctl lab`: a throw-away wiremesh cluster on this machine, built from network namespaces,
//! to watch the real agent, the real CNI plugins and userspace WireGuard work together.
//!
//! ```text
//! spec::plan (pure)  → LabSpec: nodes, locations/LANs, NAT, addresses, registry
//! up::up             → namespaces (net), keys, nodes file or API server (apiserver, cluster),
//!                      agents (agent), pods (cni)
//!                      ↳ state file lab.json, written after every step
//! status / check / graph read lab.json (+ UAPI sockets, the API server, ping, tcpdump, and
//!                      the agents' HTTP endpoints on each node's loopback: probe)
//! node::add/remove   → one more node (namespace, Node or file entry, agent, pods), or one less
//! down::down         → processes by PID, CNI DEL, namespaces, files; by state and by prefix
//! ```
//!
//! Two registries: `file` (default) writes `nodes.yaml`, which every agent reads; `kube` starts a
//! real etcd + kube-apiserver in the lab's namespace `wml-<lab>-api` on the underlay, registers
//! one Node per lab node as a kubelet would, and the agents know nothing but that API server.
//! With `--clusters N` (kube only) the nodes are split in order into N clusters, each with its
//! own API server (`wml-<lab>-api`, `wml-<lab>-api2`, …) and mesh subnet, linked by the
//! product's `meshctl multicluster link` ([`link`]); whatever reads the lab's nodes reads them
//! per cluster ([`cluster_view`]: a cluster's Nodes and Peers).
//!
//! Where to start: [`up::up`] for the order of creation, [`spec`] for names and addresses,
//! `docs/lab.md` for the user's view. Every namespace is named `wml-<lab>-…`
//! ([`names::LabName`]); the state lives in `/run/wiremesh-lab/<lab>/`.
//!
//! This is a test harness: it shells out to `ip`, `nft`, `wg`, `sysctl`, `openssl`, `etcd`,
//! `kube-apiserver`, the CNI plugins, `ping` and `tcpdump` with `std::process::Command` (the
//! agent itself uses netlink). It may depend on every library module; nothing in the library
//! depends on it. The only async code is [`cluster`]'s, each request on a thread of its own
//! inside the API namespace.

pub mod agent;
pub mod apiserver;
pub mod bulk;
pub mod chaos;
pub mod check;
pub mod cluster;
pub mod cni;
pub mod down;
mod error;
pub mod failover;
pub mod keys;
pub mod link;
pub mod names;
pub mod net;
pub mod node;
pub mod probe;
pub mod spec;
pub mod state;
pub mod status;
pub mod sys;
pub mod uapi;
pub mod up;

use std::path::Path;

pub use error::LabError;
pub use names::LabName;
pub use state::LabState;

use crate::graph::{GraphOptions, Live, render_dot, render_svg};
use crate::model::{MeshNode, MeshPeer, NodeName};
use crate::registry::annotations::{DEFAULT_TOPOLOGY_LABEL, parse_node};
use crate::registry::file::{Loaded, load_nodes};
use crate::topology::{self, Encapsulate, MeshOptions};

/// Read the state of lab `name` under `root` (root only: the directory holds private keys).
pub fn load(root: &Path, name: &LabName) -> Result<LabState, LabError> {
    sys::require_root()?;
    let dir = name.dir(root);
    if !dir.join(state::STATE_FILE).exists() {
        return Err(LabError::NotFound {
            name: name.to_string(),
            dir: dir.join(state::STATE_FILE),
        });
    }
    LabState::load(&dir)
}

/// Drawing formats of `lab graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    /// Self-contained SVG.
    Svg,
    /// Graphviz DOT.
    Dot,
}

/// Parse Node objects as the agents do; those left out come back as diagnostics, as do the
/// malformed values of the nodes kept.
pub fn parse_nodes(nodes: &[k8s_openapi::api::core::v1::Node]) -> Loaded<MeshNode> {
    let mut out = Loaded::default();
    for n in nodes {
        out.push(parse_node(n, DEFAULT_TOPOLOGY_LABEL));
    }
    out
}

/// One cluster of the lab as its agents see it: its nodes (the nodes file, or the Nodes on
/// its API server with what the agents published), the Peers on its API server (in a
/// multi-cluster lab those the link keeps for the other clusters' segments) and the mesh
/// options its agents run with.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The cluster (1-based).
    pub cluster: usize,
    /// Its nodes, with the diagnostics of those left out.
    pub nodes: Loaded<MeshNode>,
    /// Its Peers (none with the file registry).
    pub peers: Vec<MeshPeer>,
    /// Its agents' mesh options.
    pub opts: MeshOptions,
}

/// Cluster `cluster` (1-based) of the lab as its agents see it.
pub fn cluster_view(state: &LabState, cluster: usize) -> Result<ClusterView, LabError> {
    let opts = mesh_options(state, cluster);
    match &state.apiserver {
        Some(_) => {
            let api = state.apiserver_of(cluster).ok_or_else(|| {
                LabError::Options(format!("lab {} has no cluster {cluster}", state.name))
            })?;
            let (nodes, peers) = cluster::mesh(api)?;
            Ok(ClusterView {
                cluster,
                nodes,
                peers: peers.items,
                opts,
            })
        }
        None => {
            let path = state.nodes_file();
            let nodes =
                load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).map_err(|source| LabError::From {
                    path: path.display().to_string(),
                    source,
                })?;
            Ok(ClusterView {
                cluster,
                nodes,
                peers: Vec::new(),
                opts,
            })
        }
    }
}

/// Every cluster of the lab as its agents see it, in order.
pub fn cluster_views(state: &LabState) -> Result<Vec<ClusterView>, LabError> {
    clusters(state)
        .into_iter()
        .map(|k| cluster_view(state, k))
        .collect()
}

/// The lab's cluster indexes (1-based): `[1]` unless `--clusters`.
pub fn clusters(state: &LabState) -> Vec<usize> {
    let v: Vec<usize> = state.spec.clusters.iter().map(|c| c.index).collect();
    if v.is_empty() { vec![1] } else { v }
}

/// The nodes of cluster `cluster` as its agents see them: the nodes file, or with the
/// Kubernetes registry the Nodes on the cluster's API server, with what the agents published.
pub fn mesh_nodes(state: &LabState, cluster: usize) -> Result<Loaded<MeshNode>, LabError> {
    match state.apiserver_of(cluster) {
        Some(api) => Ok(parse_nodes(&cluster::nodes(api)?)),
        None => cluster_view(state, cluster).map(|v| v.nodes),
    }
}

/// The mesh options the agents of cluster `cluster` run with (its mesh subnet).
pub fn mesh_options(state: &LabState, cluster: usize) -> MeshOptions {
    MeshOptions {
        granularity: state.spec.granularity,
        subnet: state.spec.mesh_subnet_of(cluster),
        port: state.spec.port,
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    }
}

/// Draw one cluster of the lab from its nodes (file or API server) and Peers, as its agents
/// compute it; `local` highlights a node; `cluster` chooses the cluster (default: `local`'s,
/// else 1; the other clusters appear as its Peers); `live` colours the tunnels by the
/// handshakes every agent reports (an agent that does not answer leaves its tunnels unknown,
/// with a warning). Returns the drawing and the warnings.
pub fn graph(
    state: &LabState,
    format: GraphFormat,
    local: Option<&str>,
    cluster: Option<usize>,
    live: bool,
    view: crate::graph::View,
) -> Result<(String, Vec<String>), LabError> {
    let k = cluster.unwrap_or_else(|| local.map_or(1, |n| state.spec.cluster_of(n)));
    if !clusters(state).contains(&k) {
        return Err(LabError::Options(format!(
            "--cluster {k}: lab {} has clusters 1 to {}",
            state.name,
            clusters(state).len()
        )));
    }
    let v = cluster_view(state, k)?;
    let (loaded, opts) = (&v.nodes, &v.opts);
    let checked = topology::claims::check(&loaded.items, opts);
    let topo = topology::build_checked(&checked, &v.peers, opts);
    if let Some(n) = local
        && topo.segment_of(&NodeName(n.to_owned())).is_none()
    {
        return Err(LabError::Options(format!(
            "node {n} does not take part in lab {}",
            state.name
        )));
    }
    let mut warnings: Vec<String> = loaded
        .diagnostics
        .iter()
        .chain(&topo.diagnostics)
        .map(ToString::to_string)
        .collect();
    let live = live.then(|| {
        let mut docs = Vec::new();
        for (_, r) in probe::all_statuses(state) {
            match r {
                Ok(d) => docs.push(d),
                Err(e) => {
                    warnings.push(format!("{e}; tunnels only it reports are drawn as unknown"))
                }
            }
        }
        Live::from_status(&docs)
    });
    let gopts = GraphOptions {
        local: local.map(|n| NodeName(n.to_owned())),
        title: Some(if state.spec.multi_cluster() {
            format!("wiremesh lab {}, cluster{k}", state.name)
        } else {
            format!("wiremesh lab {}", state.name)
        }),
        live,
        view,
    };
    let text = match format {
        GraphFormat::Svg => render_svg(&topo, &gopts),
        GraphFormat::Dot => render_dot(&topo, &gopts),
    };
    Ok((text, warnings))
}
