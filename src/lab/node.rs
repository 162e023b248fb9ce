//! `lab node add` and `lab node remove`: a node joins a running lab, or leaves it, the way it
//! would join or leave a cluster.
//!
//! Add: plan it ([`spec::add_node`]: a location's LAN, or a new LAN without NAT), record it in
//! the state, then namespace (and LAN), key, registration (a Node on the API server, or a new
//! nodes file), agent (wait for its CNI configuration) and pods. Remove: unregister it (delete
//! the Node, or rewrite the nodes file) so the other agents drop it at once, then end its
//! processes, detach its pods, delete its namespaces and files. Both save the state after each
//! step, so `lab down` (or `node remove` after a failed `add`) finds whatever exists.
//!
//! Depends on the spec, the state, `net`, `keys`, `agent`, `cluster`, `up` (pods) and `down`
//! (processes, CNI DEL).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::names::LabName;
use super::spec;
use super::state::{LabState, NodeState, Phase, create_dir, write_private};
use super::{LabError, agent, cluster, down, keys, net, sys, up};
use crate::model::WgKey;

/// What `lab node add` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddOptions {
    /// The new node's name.
    pub name: String,
    /// Its location; `None`: a location of its own, named after the node.
    pub location: Option<String>,
    /// Its cluster (1-based, `--cluster`); `None`: the cluster of its location's nodes, else 1.
    pub cluster: Option<usize>,
    /// How long to wait for its agent's CNI configuration.
    pub timeout: Duration,
}

/// What `lab node remove` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveReport {
    /// Whether its Node object was deleted (`kube` registry).
    pub node_deleted: bool,
    /// PIDs ended (agent, WireGuard daemon).
    pub killed: Vec<u32>,
    /// Pods detached.
    pub detached: usize,
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Problems that did not stop the removal.
    pub warnings: Vec<String>,
}

/// Rewrite the nodes file from the state (file registry): the spec's nodes with their keys.
fn write_nodes_file(state: &LabState, lab: &LabName) -> Result<(), LabError> {
    let keys: Vec<WgKey> = state
        .nodes
        .iter()
        .map(|n| {
            n.public_key
                .as_deref()
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| LabError::Options(format!("node {} has no key yet", n.name)))
        })
        .collect::<Result<_, _>>()?;
    let text = spec::render_nodes_file(&state.spec, lab, &keys)?;
    // Atomically: an agent never reads a half-written file.
    let path = state.nodes_file();
    let tmp = state.dir.join(format!(".{}.tmp", super::state::NODES_FILE));
    write_private(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, &path).map_err(LabError::io("rename into place", &path))
}

/// Add a node to the lab `lab` under `root`.
pub fn add(root: &Path, lab: &LabName, opts: &AddOptions) -> Result<LabState, LabError> {
    let mut state = super::load(root, lab)?;
    if state.phase == Phase::Creating {
        return Err(LabError::Options(format!(
            "lab {lab} is not complete (`up` failed or still runs); remove it with meshctl lab \
             down --name {lab}"
        )));
    }
    let agents = state.phase == Phase::Up;
    let binary = match (&state.agent_binary, agents) {
        (Some(b), true) => Some(agent::find_binary(Some(b))?),
        _ => None,
    };
    let location = opts.location.clone().unwrap_or_else(|| opts.name.clone());
    let lans_before = state.spec.lans.len();
    let node = spec::add_node(&mut state.spec, &opts.name, &location, opts.cluster)?;
    let new_lan = state.spec.lans.get(lans_before).cloned();
    if let Some(l) = &new_lan {
        let ns = lab.lan_ns(l.index);
        state.lan_ns.push(ns.clone());
        state.namespaces.push(ns);
    }
    let ns = NodeState::new(lab, &state.dir, &node, state.spec.pods_per_node);
    state.namespaces.push(ns.netns.clone());
    state
        .namespaces
        .extend(ns.pods.iter().map(|p| p.netns.clone()));
    state.nodes.push(ns);
    let i = state.nodes.len() - 1;
    // Recorded before anything exists: `down` and `node remove` find what follows.
    state.save()?;
    if let Some(l) = &new_lan {
        net::create_lan(&state, l)?;
    }
    net::create_node(&state, &node)?;
    create_dir(&state.nodes[i].dir, 0o700)?;
    let key = keys::generate(&state.nodes[i].private_key())?;
    write_private(
        &state.nodes[i].dir.join("key.pub"),
        format!("{key}\n").as_bytes(),
    )?;
    state.nodes[i].public_key = Some(key.to_string());
    state.save()?;
    match (&state.apiserver, state.apiserver_of(node.cluster)) {
        (Some(_), Some(api)) => cluster::register(api, std::slice::from_ref(&node))?,
        (Some(_), None) => {
            return Err(LabError::Options(format!(
                "lab {lab} has no API server for cluster {}",
                node.cluster
            )));
        }
        (None, _) => write_nodes_file(&state, lab)?,
    }
    tracing::info!(node = %node.name, location = %node.location, "node registered");
    let Some(binary) = binary else {
        return Ok(state);
    };
    let (child, proc_ref) = agent::spawn(&state, &state.nodes[i], &binary, &state.agent_args)?;
    state.nodes[i].agent = Some(proc_ref);
    state.save()?;
    let mut children = [child];
    agent::wait_ready(&state.nodes[i..=i], &mut children, opts.timeout)?;
    up::attach_pods(&mut state, i)?;
    agent::check_alive(&state.nodes[i..=i], &mut children)?;
    if node.behind_nat() {
        up::wait_for_natted_handshakes(&state, Duration::from_secs(20));
    }
    Ok(state)
}

/// Remove node `name` from the lab `lab` under `root`.
pub fn remove(root: &Path, lab: &LabName, name: &str) -> Result<RemoveReport, LabError> {
    let mut state = super::load(root, lab)?;
    let (i, node) = state
        .node(name)
        .map(|(i, n)| (i, n.clone()))
        .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {name}")))?;
    let mut report = RemoveReport::default();

    // Unregister first, so the other agents forget the node right away.
    let removed_spec = spec::remove_node(&mut state.spec, name)?;
    state.nodes.remove(i);
    match state.apiserver_of(removed_spec.cluster) {
        Some(api) => report.node_deleted = cluster::delete_node(api, name)?,
        None if state.nodes_file().exists() => write_nodes_file(&state, lab)?,
        None => {}
    }
    tracing::info!(node = %name, "node unregistered");

    let mut namespaces = vec![node.netns.clone()];
    namespaces.extend(node.pods.iter().map(|p| p.netns.clone()));
    let (killed, left) =
        down::end_processes(&namespaces, &node.agent.into_iter().collect::<Vec<_>>());
    report.killed = killed;
    if !left.is_empty() {
        return Err(LabError::Leftovers(
            left.iter().map(|p| format!("process {p}")).collect(),
        ));
    }
    let existing: BTreeSet<String> = sys::netns_list()?.into_iter().collect();
    let (detached, warnings) = down::detach_pods(&node, &existing);
    report.detached = detached;
    report.warnings = warnings;
    for ns in namespaces.iter().rev() {
        if existing.contains(ns) {
            sys::ip(&["netns", "del", ns])?;
            report.namespaces.push(ns.clone());
        }
    }
    for pod in &node.pods {
        let _ = std::fs::remove_file(&pod.result);
    }
    if node.dir.exists() {
        std::fs::remove_dir_all(&node.dir).map_err(LabError::io("remove", &node.dir))?;
    }
    state.namespaces.retain(|n| !namespaces.contains(n));
    state.save()?;
    tracing::info!(node = %removed_spec.name, "node removed");
    Ok(report)
}
