//! The links of a multi-cluster lab (`lab up --clusters N`): the product's own
//! `meshctl multicluster link`, one process per pair of clusters, run by the lab as it runs the
//! agents and the API servers.
//!
//! ```text
//! wml-<lab>-api (cluster 1's API namespace, on the underlay: it reaches every API server)
//!   meshctl multicluster link --kubeconfig apiserver/admin.kubeconfig
//!       --remote-kubeconfig apiserver2/admin.kubeconfig --name cluster1 --remote-name cluster2
//!   → in cluster 1 one Peer per segment of cluster 2 (label wiremesh.io/linked-cluster=cluster2)
//!     and in cluster 2 one per segment of cluster 1
//! ```
//!
//! The process is started with `ip netns exec` (which execs: the PID is meshctl's), in its own
//! process group, output to `<labdir>/link-<a>-<b>.log`; its PID and start time go into the
//! state, so `lab down` ends exactly it (it also ends every process in the lab's namespaces).
//! The binary is the running meshctl's own executable. Depends on the state, `sys` and
//! `cluster` (the Peers).

use std::ffi::OsString;
use std::path::Path;
use std::process::Child;

use super::LabError;
use super::state::{LabState, LinkState, ProcRef};
use super::{cluster, sys};

/// The name of cluster `k` in `state` (`cluster<k>`).
fn cluster_name(state: &LabState, k: usize) -> String {
    state
        .spec
        .cluster(k)
        .map_or_else(|| format!("cluster{k}"), |c| c.name.clone())
}

/// The link's arguments after the meshctl binary: both clusters' admin kubeconfigs, names and
/// mesh subnets (given, not read from what the agents published: that needs a leader of each
/// cluster to have published already).
pub fn link_args(state: &LabState, link: &LinkState) -> Result<Vec<OsString>, LabError> {
    let kubeconfig = |k: usize| {
        state
            .apiserver_of(k)
            .map(|a| a.admin_kubeconfig())
            .ok_or_else(|| LabError::Options(format!("lab {} has no cluster {k}", state.name)))
    };
    Ok(vec![
        "multicluster".into(),
        "link".into(),
        "--kubeconfig".into(),
        kubeconfig(link.cluster)?.into(),
        "--remote-kubeconfig".into(),
        kubeconfig(link.remote)?.into(),
        "--name".into(),
        cluster_name(state, link.cluster).into(),
        "--remote-name".into(),
        cluster_name(state, link.remote).into(),
        "--subnet".into(),
        state.spec.mesh_subnet_of(link.cluster).to_string().into(),
        "--remote-subnet".into(),
        state.spec.mesh_subnet_of(link.remote).to_string().into(),
    ])
}

/// Start `link` with `meshctl` in its namespace; output appended to its log.
pub fn spawn(
    state: &LabState,
    link: &LinkState,
    meshctl: &Path,
) -> Result<(Child, ProcRef), LabError> {
    tracing::info!(
        netns = %link.netns,
        cluster = link.cluster,
        remote = link.remote,
        "starting meshctl multicluster link"
    );
    let mut args = vec![meshctl.as_os_str().to_owned()];
    args.extend(link_args(state, link)?);
    super::apiserver::spawn_in(&link.netns, &args, &link.log, "meshctl multicluster link")
}

/// Fail with the log's tail when one of `links` (their `children`, in order) has exited.
pub fn check_alive(links: &[LinkState], children: &mut [Child]) -> Result<(), LabError> {
    for (link, child) in links.iter().zip(children.iter_mut()) {
        let status = child
            .try_wait()
            .map_err(LabError::io("wait for", &link.log))?;
        if let Some(status) = status {
            return Err(LabError::Command {
                command: format!(
                    "meshctl multicluster link (cluster{} and cluster{})",
                    link.cluster, link.remote
                ),
                status: status.to_string(),
                stderr: format!(
                    "exited while the lab waited for the clusters to be linked; last lines of \
                     {}:\n{}",
                    link.log.display(),
                    sys::tail(&link.log, 15)
                ),
            });
        }
    }
    Ok(())
}

/// What the links' Peers still lack: for each link, both ways, every pod CIDR of a node of one
/// cluster that no Peer of the other cluster labelled with its name carries. Empty when every
/// cluster holds the others' segments.
pub fn missing_peers(state: &LabState) -> Result<Vec<String>, LabError> {
    let mut out = Vec::new();
    for link in &state.links {
        for (here, there) in [(link.cluster, link.remote), (link.remote, link.cluster)] {
            let Some(api) = state.apiserver_of(here) else {
                continue;
            };
            let name = cluster_name(state, there);
            let peers = cluster::linked_peers(api, &name)?;
            for n in state.spec.nodes.iter().filter(|n| n.cluster == there) {
                for cidr in &n.pod_cidrs {
                    let carried = peers
                        .iter()
                        .flat_map(|p| &p.allowed_ips)
                        .any(|a| a.contains(cidr.network()) && a.prefix() <= cidr.prefix());
                    if !carried {
                        out.push(format!(
                            "{} has no Peer for {}'s pod CIDR {cidr} ({name})",
                            cluster_name(state, here),
                            n.name
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::names::LabName;
    use crate::lab::spec::{SpecOptions, plan};

    #[test]
    fn a_two_cluster_lab_links_cluster1_to_cluster2_with_both_admin_kubeconfigs() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions {
            registry: crate::lab::spec::Registry::Kube,
            clusters: 2,
            ..SpecOptions::generated(4, 2)
        })
        .unwrap();
        let state = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 0);
        assert_eq!(state.links.len(), 1);
        let link = &state.links[0];
        assert_eq!(link.netns, "wml-wm-api");
        assert_eq!(
            link.log,
            Path::new("/run/wiremesh-lab/wm/link-cluster1-cluster2.log")
        );
        let line: Vec<String> = link_args(&state, link)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            line.join(" "),
            "multicluster link --kubeconfig /run/wiremesh-lab/wm/apiserver/admin.kubeconfig \
             --remote-kubeconfig /run/wiremesh-lab/wm/apiserver2/admin.kubeconfig \
             --name cluster1 --remote-name cluster2 --subnet 10.4.0.0/16 \
             --remote-subnet 10.5.0.0/16"
        );
    }
}
