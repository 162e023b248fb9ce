//! `lab down`: remove everything a lab made, also what a half-failed `up` left, and say so.
//!
//! Order (lab notes §10.12: a namespace whose processes still run outlives `ip netns del`):
//! 1. end every process of the lab by PID: the recorded agents, kube-apiserver and etcd (of
//!    every cluster), the links between clusters, and
//!    every process whose network namespace is one of the lab's (the wireguard-go daemons the
//!    agents spawned, a left-over ping or tcpdump), SIGTERM then SIGKILL;
//! 2. CNI `DEL` for each pod, best effort;
//! 3. delete the namespaces: pods, nodes, LANs (with their NAT routers), the API servers',
//!    underlay; the links inside go with them;
//! 4. remove the lab directory, and the root directory (and `/run/wireguard` if a lab created
//!    it) when no other lab is left.
//!
//! Namespaces are found both in the state file and by the lab's prefix, so a missing or
//! half-written state file still leads to a complete cleanup. Idempotent. Depends on `sys`,
//! `state`, `names` and `cni`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::LabError;
use super::names::LabName;
use super::state::{LabState, NodeState, ProcRef};
use super::up::{RUN_WIREGUARD, RUN_WIREGUARD_MARKER};
use super::{cni, sys};

/// What `down` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// PIDs that were ended.
    pub killed: Vec<u32>,
    /// Pods detached with CNI DEL.
    pub detached: usize,
    /// Problems that did not stop the cleanup (a CNI DEL that failed, an unreadable state file).
    pub warnings: Vec<String>,
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Whether the lab directory was removed.
    pub removed_dir: bool,
}

impl DownReport {
    /// Whether there was nothing to remove.
    pub fn was_empty(&self) -> bool {
        self.killed.is_empty() && self.namespaces.is_empty() && !self.removed_dir
    }
}

fn lab_procs(state: Option<&LabState>, namespaces: &[String]) -> Vec<ProcRef> {
    let mut pids: BTreeSet<u32> = sys::pids_in_netns(namespaces).into_iter().collect();
    if let Some(s) = state {
        pids.extend(
            s.recorded_processes()
                .iter()
                .filter(|p| sys::is_running(p))
                .map(|p| p.pid),
        );
    }
    pids.remove(&std::process::id());
    pids.into_iter().filter_map(sys::proc_ref).collect()
}

/// Remove the lab `name` under `root`.
pub fn down(root: &Path, name: &LabName) -> Result<DownReport, LabError> {
    sys::require_root()?;
    let dir = name.dir(root);
    let mut report = DownReport::default();
    let state = if dir.exists() {
        match LabState::load(&dir) {
            Ok(s) => Some(s),
            Err(e) => {
                report
                    .warnings
                    .push(format!("{e}; cleaning up by the lab prefix only"));
                None
            }
        }
    } else {
        None
    };

    // Deletion order: the state's reversed creation order (pods, nodes, LANs, underlay), then
    // anything else carrying the prefix.
    let existing: BTreeSet<String> = sys::netns_list()?
        .into_iter()
        .filter(|n| name.owns(n))
        .collect();
    let mut order: Vec<String> = Vec::with_capacity(existing.len());
    if let Some(s) = &state {
        order.extend(
            s.namespaces
                .iter()
                .rev()
                .filter(|n| existing.contains(*n))
                .cloned(),
        );
    }
    let strays: Vec<String> = existing
        .iter()
        .filter(|n| !order.contains(n))
        .cloned()
        .collect();
    order.splice(0..0, strays);

    // 1. Processes, by PID. An agent may start a daemon while we signal: look again.
    for _ in 0..3 {
        let procs = lab_procs(state.as_ref(), &order);
        if procs.is_empty() {
            break;
        }
        tracing::info!(pids = ?procs.iter().map(|p| p.pid).collect::<Vec<_>>(), "ending lab processes");
        let left = sys::terminate(&procs, Duration::from_secs(5));
        report
            .killed
            .extend(procs.iter().map(|p| p.pid).filter(|p| !left.contains(p)));
    }

    // 2. CNI DEL, while node and pod namespaces still exist.
    if let Some(s) = &state {
        for node in &s.nodes {
            let (detached, warnings) = detach_pods(node, &existing);
            report.detached += detached;
            report.warnings.extend(warnings);
        }
    }

    // 3. Namespaces.
    let mut failed = Vec::new();
    let mut failed_ns = Vec::new();
    for ns in &order {
        match sys::ip(&["netns", "del", ns]) {
            Ok(_) => report.namespaces.push(ns.clone()),
            Err(e) => {
                failed.push(format!("namespace {ns} ({e})"));
                failed_ns.push(ns.clone());
            }
        }
    }

    // 4. Files.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(LabError::io("remove", &dir))?;
        report.removed_dir = true;
    }
    remove_root_if_last(root);

    // What is left?
    let still: Vec<String> = sys::netns_list()?
        .into_iter()
        .filter(|n| name.owns(n) && !failed_ns.contains(n))
        .map(|n| format!("namespace {n}"))
        .collect();
    failed.extend(still);
    failed.extend(
        lab_procs(state.as_ref(), &[])
            .into_iter()
            .map(|p| format!("process {}", p.pid)),
    );
    if dir.exists() {
        failed.push(dir.display().to_string());
    }
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(LabError::Leftovers(failed))
    }
}

/// CNI `DEL` for every pod of `node` that was attached or whose namespace is among `existing`,
/// best effort (with the ADD result as `prevResult`); needs the node's namespace. Returns how
/// many were detached and what failed.
pub fn detach_pods(node: &NodeState, existing: &BTreeSet<String>) -> (usize, Vec<String>) {
    let mut detached = 0;
    let mut warnings = Vec::new();
    let Ok(text) = std::fs::read_to_string(node.conflist()) else {
        return (0, warnings);
    };
    let Ok(list) = serde_json::from_str::<serde_json::Value>(&text) else {
        warnings.push(format!("{}: not JSON", node.conflist().display()));
        return (0, warnings);
    };
    if !existing.contains(&node.netns) {
        return (0, warnings);
    }
    for pod in &node.pods {
        let added: Option<serde_json::Value> = std::fs::read_to_string(&pod.result)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if added.is_none() && !existing.contains(&pod.netns) {
            continue; // never attached
        }
        let at = cni::Attachment {
            node_ns: node.netns.clone(),
            pod_ns: pod.netns.clone(),
            ifname: "eth0".to_owned(),
            ipam_dir: node.ipam_dir(),
        };
        match cni::del(&list, &at, added.as_ref()) {
            Ok(()) => detached += 1,
            Err(e) => warnings.push(e.to_string()),
        }
    }
    (detached, warnings)
}

/// End every process in `namespaces` and the processes `also` (when they still run): SIGTERM,
/// then SIGKILL; looks again for daemons started meanwhile. Returns the PIDs ended and those
/// left.
pub fn end_processes(namespaces: &[String], also: &[ProcRef]) -> (Vec<u32>, Vec<u32>) {
    let mut killed = Vec::new();
    let mut left = Vec::new();
    for _ in 0..3 {
        let mut pids: BTreeSet<u32> = sys::pids_in_netns(namespaces).into_iter().collect();
        pids.extend(also.iter().filter(|p| sys::is_running(p)).map(|p| p.pid));
        pids.remove(&std::process::id());
        let procs: Vec<ProcRef> = pids.into_iter().filter_map(sys::proc_ref).collect();
        if procs.is_empty() {
            break;
        }
        left = sys::terminate(&procs, Duration::from_secs(5));
        killed.extend(procs.iter().map(|p| p.pid).filter(|p| !left.contains(p)));
    }
    (killed, left)
}

/// Remove the root directory once no lab is left in it; also `/run/wireguard` when a lab
/// created it and it is empty.
fn remove_root_if_last(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let others = rd
        .filter_map(Result::ok)
        .any(|e| e.file_name() != RUN_WIREGUARD_MARKER);
    if others {
        return;
    }
    let marker = root.join(RUN_WIREGUARD_MARKER);
    if marker.exists() {
        // Fails (and is left alone) when something else put a file there.
        let _ = std::fs::remove_dir(RUN_WIREGUARD);
        let _ = std::fs::remove_file(&marker);
    }
    let _ = std::fs::remove_dir(root);
}
