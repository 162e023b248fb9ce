//! `meshctl lab`: a throw-away wiremesh cluster on this machine, built from network namespaces,
//! to watch the real agent, the real CNI plugins and userspace WireGuard work together.
//!
//! ```text
//! spec::plan (pure)  → LabSpec: nodes, locations/LANs, NAT, addresses
//! up::up             → namespaces (net), keys, nodes file, agents (agent), pods (cni)
//!                      ↳ state file lab.json, written after every step
//! status / check / graph read lab.json (+ UAPI sockets, ping, tcpdump)
//! down::down         → processes by PID, CNI DEL, namespaces, files; by state and by prefix
//! ```
//!
//! Where to start: [`up::up`] for the order of creation, [`spec`] for names and addresses,
//! `docs/lab.md` for the user's view. Every namespace is named `wml-<lab>-…`
//! ([`names::LabName`]); the state lives in `/run/wiremesh-lab/<lab>/`.
//!
//! This is a test harness: it shells out to `ip`, `nft`, `wg`, `sysctl`, the CNI plugins,
//! `ping` and `tcpdump` with `std::process::Command` (the agent itself uses netlink). It may
//! depend on every library module; nothing in the library depends on it. No async code.

pub mod agent;
pub mod check;
pub mod cni;
pub mod down;
mod error;
pub mod keys;
pub mod names;
pub mod net;
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

use crate::graph::{GraphOptions, render_dot, render_svg};
use crate::model::NodeName;
use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use crate::registry::file::load_nodes;
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

/// Draw the lab's mesh from its nodes file, as the agents compute it; `local` highlights a
/// node. Returns the drawing and the engine's warnings.
pub fn graph(
    state: &LabState,
    format: GraphFormat,
    local: Option<&str>,
) -> Result<(String, Vec<String>), LabError> {
    let path = state.nodes_file();
    let loaded = load_nodes(&path, DEFAULT_TOPOLOGY_LABEL).map_err(|source| LabError::From {
        path: path.display().to_string(),
        source,
    })?;
    let opts = MeshOptions {
        granularity: state.spec.granularity,
        subnet: state.spec.mesh_subnet,
        port: state.spec.port,
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    };
    let topo = topology::build(&loaded.items, &[], &opts);
    if let Some(n) = local
        && topo.segment_of(&NodeName(n.to_owned())).is_none()
    {
        return Err(LabError::Options(format!(
            "node {n} does not take part in lab {}",
            state.name
        )));
    }
    let gopts = GraphOptions {
        local: local.map(|n| NodeName(n.to_owned())),
        title: Some(format!("wiremesh lab {}", state.name)),
    };
    let text = match format {
        GraphFormat::Svg => render_svg(&topo, &gopts),
        GraphFormat::Dot => render_dot(&topo, &gopts),
    };
    let warnings = loaded
        .diagnostics
        .iter()
        .chain(&topo.diagnostics)
        .map(ToString::to_string)
        .collect();
    Ok((text, warnings))
}
