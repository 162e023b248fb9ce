//! Two nodes as network namespaces joined by a veth, each running the real `wiremesh agent`
//! with userspace WireGuard (lab notes §3, workaround B), for root-only tests of what the agent
//! and `wiremesh cleanup` do to a node's kernel.
//!
//! Every process started in a node namespace runs as
//! `ip netns exec NS sh -c 'mount --bind DIR/run /run && exec wiremesh …'`: `ip netns exec`
//! gives each invocation a private mount namespace, so the agent (and the wireguard-go daemon it
//! spawns, and a later `wiremesh cleanup`) see the node's own directory as `/run`, with the
//! WireGuard control socket at `DIR/run/wireguard/wiremesh0.sock` on the host. The whole of
//! `/run` is covered rather than `/run/wireguard`, so nothing depends on the host's
//! `/run/wireguard`, which a concurrent `meshctl lab down` may remove (and removing a mount
//! point detaches the mounts on it in every other mount namespace).
//!
//! [`AgentNodes`] is a guard: on drop it kills the agents, then every process left in the
//! namespaces (`ip netns pids`: the daemons the agents spawned and that were re-parented), then
//! deletes the namespaces and the temporary directory. Lab notes §10.12: processes first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::netns::{Netns, veth};
use super::wg_netns::run;

/// The agent binary under test.
pub const WIREMESH: &str = env!("CARGO_BIN_EXE_wiremesh");

/// Mounts the node's directory over `/run`, then execs the rest of the arguments.
const SHELL: &str = "mount --bind \"$1\" /run && shift && exec \"$@\"";
/// [`SHELL`], with `/proc/sys` read-only first, as container runtimes mount it in an
/// unprivileged container.
const SHELL_RO_SYSCTL: &str = "mount --bind /proc/sys /proc/sys && \
    mount -o remount,bind,ro /proc/sys && \
    mount --bind \"$1\" /run && shift && exec \"$@\"";

/// One node: a namespace, its directory, its agent.
pub struct AgentNode {
    /// Node name (also `--hostname`).
    pub name: String,
    /// The node's network namespace.
    pub ns: Netns,
    /// Underlay address (on `eth0`).
    pub ip: String,
    /// Pod CIDR; its `.1` is the bridge address.
    pub pod_cidr: String,
    /// The node's private directory (key, CNI config, `run/`, agent log).
    pub dir: PathBuf,
    /// Whether commands started in the node (the agent) see `/proc/sys` read-only.
    pub read_only_proc_sys: bool,
    agent: Option<Child>,
}

impl AgentNode {
    /// The CNI config file the agent writes.
    pub fn cni_config(&self) -> PathBuf {
        self.dir.join("cni.conflist")
    }

    /// The bridge address (`.1` of the pod CIDR).
    pub fn bridge_ip(&self) -> String {
        let base = self.pod_cidr.split('/').next().unwrap();
        let mut octets: Vec<&str> = base.split('.').collect();
        octets[3] = "1";
        octets.join(".")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `ip netns exec NS sh -c 'mount --bind DIR/run /run && exec wiremesh ARGS…'`.
    fn wiremesh(&self, args: &[&str]) -> Command {
        let mut all = vec![WIREMESH];
        all.extend_from_slice(args);
        self.command(&all)
    }

    /// `ip netns exec NS sh -c 'mount --bind DIR/run /run && exec CMD…'`: a command that sees
    /// the node's `/run` as the agent does (`wg` and `wireguard-go` reach the same sockets).
    fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        let shell = if self.read_only_proc_sys {
            SHELL_RO_SYSCTL
        } else {
            SHELL
        };
        c.args(["netns", "exec", &self.ns.name, "sh", "-c", shell, "sh"])
            .arg(self.dir.join("run"))
            .args(cmd)
            .stdin(Stdio::null());
        c
    }

    /// Run `CMD…` in the node with the node's `/run`, to its end; panics unless it succeeds.
    /// Only commands that exit (or daemonize, like `wireguard-go NAME`) belong here.
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = self
            .command(cmd)
            .output()
            .expect("start a command in the node");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `GET http://127.0.0.1:1107PATH` of the node's agent (its default `--listen`), with curl
    /// inside the node: the status code and the body. Up to three tries while nothing answers
    /// (a busy machine); then the code is 0.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:1107{path}");
        let mut answer = (0, String::new());
        for _ in 0..3 {
            let out = self
                .ns
                .try_exec(&["curl", "-s", "-m", "5", "-w", "\n%{http_code}", &url]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
            answer = (code.trim().parse().unwrap_or(0), body.to_owned());
            if answer.0 != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        answer
    }

    /// Start `wiremesh agent` (full mesh, no encapsulation, userspace WireGuard).
    pub fn start(&mut self, nodes_file: &Path) {
        self.start_with(nodes_file, &[]);
    }

    /// [`Self::start`] with more arguments (e.g. `--interface NAME`).
    pub fn start_with(&mut self, nodes_file: &Path, extra: &[&str]) {
        let log = File::create(self.dir.join("agent.log")).unwrap();
        let err = log.try_clone().unwrap();
        let key = self.dir.join("key");
        let cni = self.cni_config();
        let child = self
            .wiremesh(
                &[
                    "agent",
                    "--hostname",
                    &self.name,
                    "--nodes",
                    nodes_file.to_str().unwrap(),
                    "--private-key",
                    key.to_str().unwrap(),
                    "--granularity",
                    "full",
                    "--encapsulate",
                    "never",
                    "--wireguard",
                    "userspace",
                    "--cni-config",
                    cni.to_str().unwrap(),
                    "--log-level",
                    "info",
                ]
                .iter()
                .chain(extra)
                .copied()
                .collect::<Vec<_>>(),
            )
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start the agent");
        self.agent = Some(child);
    }

    /// Stop the agent with SIGTERM (SIGKILL after 5 s) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the agent still runs.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Run `wiremesh cleanup --cni-config DIR/cni.conflist --private-key DIR/key` in the node
    /// (same `/run` as the agent had, so it reaches the node's userspace WireGuard daemon; the
    /// agent's state directory, so it restores what the agent recorded).
    pub fn cleanup(&self) -> Output {
        self.cleanup_with(&[])
    }

    /// [`Self::cleanup`] with more arguments (e.g. `--interface NAME`).
    pub fn cleanup_with(&self, extra: &[&str]) -> Output {
        let cni = self.cni_config();
        let key = self.dir.join("key");
        let mut args = vec![
            "cleanup",
            "--cni-config",
            cni.to_str().unwrap(),
            "--private-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.wiremesh(&args).output().expect("run wiremesh cleanup")
    }

    /// `sysctl -n KEY` inside the node's namespace, trimmed.
    pub fn sysctl(&self, key: &str) -> String {
        self.ns.exec(&["sysctl", "-n", key], None).trim().to_owned()
    }

    /// PIDs of every process in the node's network namespace.
    pub fn pids(&self) -> Vec<i32> {
        let o = Command::new("ip")
            .args(["netns", "pids", &self.ns.name])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// Two nodes `a` and `b` on one veth (`eth0`, 10.77.0.1 and .2/24), pod CIDRs 10.78.1.0/24 and
/// 10.78.2.0/24, keys generated with `wg genkey`, and a nodes file listing both, each in its own
/// location. Nothing is started yet.
pub struct AgentNodes {
    /// Node a, then node b.
    pub nodes: Vec<AgentNode>,
    /// The nodes file both agents read.
    pub nodes_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentNodes {
    /// Build the namespaces, the veth, the keys and the nodes file. `prefix` names the
    /// namespaces (`<prefix>-<pid>-<n>`).
    pub fn new(prefix: &str) -> AgentNodes {
        let dir = tempfile::Builder::new()
            .prefix("wm-agent-netns-")
            .tempdir()
            .unwrap();
        let mut nodes = Vec::new();
        for (i, name) in ["a", "b"].iter().enumerate() {
            let ns = Netns::new(prefix);
            // Link-local addresses usable at once: the routing table does not change under a
            // snapshot while DAD runs.
            for key in ["all", "default"] {
                ns.sysctl(&format!("net.ipv6.conf.{key}.accept_dad=0"));
            }
            let node_dir = dir.path().join(name);
            std::fs::create_dir_all(node_dir.join("run/wireguard")).unwrap();
            nodes.push(AgentNode {
                name: (*name).to_owned(),
                ns,
                ip: format!("10.77.0.{}", i + 1),
                pod_cidr: format!("10.78.{}.0/24", i + 1),
                dir: node_dir,
                read_only_proc_sys: false,
                agent: None,
            });
        }
        veth(
            &nodes[0].ns,
            "eth0",
            &["10.77.0.1/24"],
            &nodes[1].ns,
            "eth0",
            &["10.77.0.2/24"],
        );
        let mut items = String::new();
        for n in &nodes {
            let key = run("wg", &["genkey"], None);
            let key = key.trim();
            std::fs::write(n.dir.join("key"), format!("{key}\n")).unwrap();
            std::fs::set_permissions(
                n.dir.join("key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            let public = run("wg", &["pubkey"], Some(&format!("{key}\n")));
            items.push_str(&format!(
                "- apiVersion: v1
  kind: Node
  metadata:
    name: {name}
    labels:
      topology.kubernetes.io/region: loc-{name}
    annotations:
      kilo.squat.ai/key: {public}
      kilo.squat.ai/force-endpoint: {ip}:51820
      kilo.squat.ai/internal-ip: {ip}/24
      kilo.squat.ai/location: loc-{name}
  spec:
    podCIDR: {cidr}
    podCIDRs: [{cidr}]
  status:
    addresses:
    - type: InternalIP
      address: {ip}
    - type: Hostname
      address: {name}
",
                name = n.name,
                public = public.trim(),
                ip = n.ip,
                cidr = n.pod_cidr,
            ));
        }
        let nodes_file = dir.path().join("nodes.yaml");
        std::fs::write(
            &nodes_file,
            format!("apiVersion: v1\nkind: NodeList\nitems:\n{items}"),
        )
        .unwrap();
        AgentNodes {
            nodes,
            nodes_file,
            _dir: dir,
        }
    }

    /// Start both agents.
    pub fn start(&mut self) {
        let file = self.nodes_file.clone();
        for n in &mut self.nodes {
            n.start(&file);
        }
    }

    /// Both agents' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- agent {}:\n{}", n.name, n.log()))
            .collect()
    }
}

impl Drop for AgentNodes {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
        // Whatever is left (wireguard-go daemons re-parented away from the agents, a ping).
        for n in &self.nodes {
            for pid in n.pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while !n.pids().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The namespaces (fields) and the temporary directory are dropped after this.
    }
}
