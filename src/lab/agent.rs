//! Starting the `wiremesh agent` of each node, and watching it while the lab comes up.
//!
//! Each agent runs as lab notes workaround B: `ip netns exec <node> sh -c 'mount --bind
//! <nodedir>/wireguard /run/wireguard && exec wiremesh agent …'`. `ip netns exec` gives every
//! invocation its own mount namespace, so the bind mount is private to that agent (and the
//! wireguard-go it spawns): every node can name its interface `wiremesh0` while its control
//! socket is reachable from the host at `<nodedir>/wireguard/wiremesh0.sock`. `ip` and `sh`
//! both exec, so the PID we get is the agent's. Agents get their own process group, so a
//! Ctrl-C at the terminal that ran `lab up` does not stop them.
//!
//! Depends on the state (paths), `sys` (process checks) and `std::process`.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::LabError;
use super::state::{LabState, NodeState, ProcRef, create_dir};
use super::sys;
use crate::topology::DEFAULT_SUBNET;

/// Where each agent serves its HTTP endpoint: the loopback of its own node namespace (each
/// namespace has its own), so nothing of it reaches the host or the underlay.
pub const AGENT_LISTEN: &str = "127.0.0.1:1107";

/// The shell line each agent is started with: `$1` is the directory to bind over
/// `/run/wireguard`, the rest is the agent's command line.
pub const AGENT_SHELL: &str = "mount --bind \"$1\" /run/wireguard && shift && exec \"$@\"";

/// The `wiremesh` binary: `explicit`, else the one next to the running executable.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let exe =
                std::env::current_exe().map_err(LabError::io("locate", "current executable"))?;
            exe.parent().map(|d| d.join("wiremesh")).ok_or_else(|| {
                LabError::Options("the running executable has no directory".into())
            })?
        }
    };
    let path = std::fs::canonicalize(&path).map_err(|_| {
        LabError::Options(format!(
            "agent binary {} not found; build it (cargo build --bin wiremesh) or pass --agent PATH",
            path.display()
        ))
    })?;
    match sys::find_program(&path.to_string_lossy()) {
        Some(p) => Ok(p),
        None => Err(LabError::Options(format!(
            "agent binary {} is not an executable file",
            path.display()
        ))),
    }
}

/// The agent's arguments (after the binary) for `node`: the nodes file, or with the Kubernetes
/// registry only the agent kubeconfig of its cluster's API server (its address and the agent's
/// token); the mesh subnet of its cluster in a multi-cluster lab, else the lab's when it is not
/// the agent's default (an IPv6-only lab).
pub fn agent_args(state: &LabState, node: &NodeState, extra: &[String]) -> Vec<OsString> {
    let cluster = state.spec.cluster_of(&node.name);
    let api = state.apiserver_of(cluster).or(state.apiserver.as_ref());
    let registry: [OsString; 2] = match api {
        Some(api) => ["--kubeconfig".into(), api.agent_kubeconfig().into()],
        None => ["--nodes".into(), state.nodes_file().into()],
    };
    let mut args: Vec<OsString> = vec![
        "agent".into(),
        "--hostname".into(),
        node.name.clone().into(),
    ];
    args.extend(registry);
    let rest: Vec<OsString> = vec![
        "--private-key".into(),
        node.private_key().into(),
        "--granularity".into(),
        state.spec.granularity.to_string().into(),
        "--encapsulate".into(),
        "never".into(),
        "--wireguard".into(),
        "userspace".into(),
        "--cni-config".into(),
        node.conflist().into(),
        "--log-level".into(),
        "info".into(),
        "--listen".into(),
        AGENT_LISTEN.into(),
    ];
    args.extend(rest);
    let subnet = state.spec.mesh_subnet_of(cluster);
    if state.spec.multi_cluster() || DEFAULT_SUBNET.parse() != Ok(subnet) {
        args.extend(["--subnet".into(), subnet.to_string().into()]);
    }
    args.extend(extra.iter().map(OsString::from));
    args
}

/// Start the agent of `node` (creating its WireGuard, IPAM and CNI directories first); its
/// output goes to the node's `agent.log`.
pub fn spawn(
    state: &LabState,
    node: &NodeState,
    binary: &Path,
    extra: &[String],
) -> Result<(Child, ProcRef), LabError> {
    for d in [node.wireguard_dir(), node.ipam_dir()] {
        create_dir(&d, 0o700)?;
    }
    if let Some(cni_dir) = node.conflist().parent() {
        create_dir(cni_dir, 0o755)?;
    }
    let log_path = node.agent_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(LabError::io("open", &log_path))?;
    let log2 = log.try_clone().map_err(LabError::io("open", &log_path))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns, "sh", "-c", AGENT_SHELL, "sh"])
        .arg(node.wireguard_dir())
        .arg(binary)
        .args(agent_args(state, node, extra))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    tracing::info!(node = %node.name, netns = %node.netns, "starting agent");
    let child = cmd.spawn().map_err(|source| LabError::Spawn {
        program: "ip netns exec … wiremesh agent".to_owned(),
        source,
    })?;
    let pid = child.id();
    // The start time is read at once; should the process already be gone, it is reported
    // by the caller's next check.
    let start_time = sys::start_time(pid).unwrap_or_default();
    Ok((child, ProcRef { pid, start_time }))
}

/// Wait until the CNI configuration of each of `nodes` exists, failing as soon as an agent
/// exits. `agents[i]` belongs to `nodes[i]`.
pub fn wait_ready(
    nodes: &[NodeState],
    agents: &mut [Child],
    timeout: Duration,
) -> Result<(), LabError> {
    let t0 = Instant::now();
    loop {
        check_alive(nodes, agents)?;
        if nodes.iter().all(|n| n.conflist().is_file()) {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            let waiting: Vec<String> = nodes
                .iter()
                .filter(|n| !n.conflist().is_file())
                .map(|n| format!("{} ({})", n.name, n.conflist().display()))
                .collect();
            return Err(LabError::Timeout {
                what: format!("the agents' CNI configuration: {}", waiting.join(", ")),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Fail with the agent's log tail if one of `agents` (of `nodes`, in order) has exited.
pub fn check_alive(nodes: &[NodeState], agents: &mut [Child]) -> Result<(), LabError> {
    for (node, child) in nodes.iter().zip(agents.iter_mut()) {
        let status = child
            .try_wait()
            .map_err(LabError::io("wait for", node.agent_log()))?;
        if let Some(status) = status {
            return Err(LabError::AgentExited {
                node: node.name.clone(),
                status: status.to_string(),
                log: node.agent_log(),
                tail: sys::tail(&node.agent_log(), 15),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::names::LabName;
    use crate::lab::spec::{SpecOptions, plan};

    #[test]
    fn agent_command_line_follows_the_agent_contract() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions::generated(2, 2)).unwrap();
        let state = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 0);
        let args: Vec<String> = agent_args(&state, &state.nodes[1], &["--x".to_owned()])
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "agent --hostname node2 --nodes /run/wiremesh-lab/wm/nodes.yaml \
             --private-key /run/wiremesh-lab/wm/nodes/node2/key --granularity full \
             --encapsulate never --wireguard userspace \
             --cni-config /run/wiremesh-lab/wm/nodes/node2/cni/10-wiremesh.conflist \
             --log-level info --listen 127.0.0.1:1107 --x"
        );
    }

    #[test]
    fn with_the_kube_registry_the_agent_gets_only_the_agent_kubeconfig() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions {
            registry: crate::lab::spec::Registry::Kube,
            ..SpecOptions::generated(2, 2)
        })
        .unwrap();
        let state = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 0);
        let args: Vec<String> = agent_args(&state, &state.nodes[0], &[])
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(
            line.starts_with(
                "agent --hostname node1 --kubeconfig \
                 /run/wiremesh-lab/wm/apiserver/agent.kubeconfig --private-key"
            ),
            "{line}"
        );
        assert!(!line.contains("--nodes"), "{line}");
        assert_eq!(state.namespaces[..2], ["wml-wm-ul", "wml-wm-api"]);
    }

    #[test]
    fn each_agent_of_a_two_cluster_lab_gets_its_clusters_kubeconfig_and_mesh_subnet() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions {
            registry: crate::lab::spec::Registry::Kube,
            clusters: 2,
            ..SpecOptions::generated(4, 2)
        })
        .unwrap();
        let state = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 0);
        let line = |i: usize| {
            agent_args(&state, &state.nodes[i], &[])
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (i, kubeconfig, subnet) in [
            (0, "apiserver/agent.kubeconfig", "--subnet 10.4.0.0/16"),
            (1, "apiserver/agent.kubeconfig", "--subnet 10.4.0.0/16"),
            (2, "apiserver2/agent.kubeconfig", "--subnet 10.5.0.0/16"),
            (3, "apiserver2/agent.kubeconfig", "--subnet 10.5.0.0/16"),
        ] {
            let l = line(i);
            assert!(
                l.contains(&format!("--kubeconfig /run/wiremesh-lab/wm/{kubeconfig} ")),
                "{l}"
            );
            assert!(l.ends_with(subnet), "{l}");
        }
    }

    #[test]
    fn only_an_ipv6_lab_gives_the_agents_its_mesh_subnet() {
        use crate::lab::spec::Family;
        let name: LabName = "wm".parse().unwrap();
        for (family, subnet) in [
            (Family::Ipv4, None),
            (Family::DualStack, None),
            (Family::Ipv6, Some("--subnet fd00:4::/64")),
        ] {
            let spec = plan(&SpecOptions {
                nat: Some(0),
                family,
                ..SpecOptions::generated(2, 2)
            })
            .unwrap();
            let state = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 0);
            let line = agent_args(&state, &state.nodes[0], &[])
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ");
            match subnet {
                Some(s) => assert!(line.ends_with(s), "{family}: {line}"),
                None => assert!(!line.contains("--subnet"), "{family}: {line}"),
            }
        }
    }
}
