//! `meshctl lab` end to end, through the real binary: namespaces, veths, the NAT router, keys,
//! the nodes file, agent supervision, CNI pods, status, check, graph and a complete `down`.
//!
//! Needs root, iproute2, nftables, wireguard-tools, wireguard-go, containernetworking-plugins,
//! tcpdump, ping and jq: run with `--features netns-tests`. Each test uses its own lab name
//! (tests run in parallel) and a guard that runs `lab down` when the test ends, also on panic.
//!
//! Until the real agent lands, the pod-to-pod tests run `tests/util/lab-stub-agent.sh` as the
//! agent: it programs each node once from `meshctl plan` with wireguard-go, wg and ip, so the
//! harness (pods through the real CNI plugins, NAT roaming, status over UAPI, the ping matrix,
//! the underlay capture, cleanup of daemons the agents spawned) is tested against real
//! WireGuard traffic. [`Agent::Real`] runs the same scenarios against `wiremesh agent`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::registry::file::load_nodes;

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");
const ROOT: &str = "/run/wiremesh-lab";

/// Which agent a pod-to-pod scenario runs.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `Real` is used once the agent's kernel code is merged.
enum Agent {
    /// `tests/util/lab-stub-agent.sh` (programs each node once from `meshctl plan`).
    Stub,
    /// The `wiremesh` binary next to `meshctl`.
    Real,
}

impl Agent {
    fn args(self) -> Vec<String> {
        match self {
            Agent::Stub => vec![
                "--agent".to_owned(),
                format!(
                    "{}/tests/util/lab-stub-agent.sh",
                    env!("CARGO_MANIFEST_DIR")
                ),
            ],
            Agent::Real => Vec::new(),
        }
    }
}

/// `meshctl args…` (with `MESHCTL` set for the stub agent).
fn meshctl(args: &[&str]) -> Output {
    Command::new(MESHCTL)
        .args(args)
        .env("MESHCTL", MESHCTL)
        .output()
        .expect("meshctl runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn netns_list() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn host_links() -> BTreeSet<String> {
    String::from_utf8_lossy(&sh("ip", &["-o", "link"]).stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect()
}

fn require_tools(extra: &[&str]) {
    assert!(
        wiremesh::lab::sys::require_root().is_ok(),
        "the lab tests must run as root"
    );
    for tool in [
        "ip",
        "nft",
        "wg",
        "wireguard-go",
        "tcpdump",
        "ping",
        "sysctl",
    ]
    .iter()
    .chain(extra)
    {
        assert!(
            wiremesh::lab::sys::find_program(tool).is_some(),
            "the lab tests need `{tool}`"
        );
    }
    assert!(
        Path::new("/usr/lib/cni/bridge").exists(),
        "the lab tests need containernetworking-plugins"
    );
}

/// A lab that is taken down when the test ends, whatever happened.
struct Lab {
    name: String,
    links_before: BTreeSet<String>,
}

impl Lab {
    /// A lab name unique to this test and process: `tag` + PID digits, at most 8 characters.
    fn new(tag: &str) -> Lab {
        assert!(tag.len() <= 3);
        let name = format!("{tag}{}", std::process::id() % 100_000);
        // Leftovers of an earlier run of this process number would make `up` refuse.
        let _ = meshctl(&["lab", "down", "--name", &name]);
        Lab {
            name,
            links_before: host_links(),
        }
    }

    fn prefix(&self) -> String {
        format!("wml-{}-", self.name)
    }

    fn dir(&self) -> PathBuf {
        Path::new(ROOT).join(&self.name)
    }

    fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--name", &self.name]);
        meshctl(&all)
    }

    fn up(&self, args: &[&str]) -> Output {
        let mut all = vec!["lab", "up"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "meshctl {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ip netns exec <lab ns> args…`.
    fn exec(&self, suffix: &str, args: &[&str]) -> Output {
        let ns = self.ns(suffix);
        let mut all = vec!["netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn addrs(&self, suffix: &str, dev: &str) -> String {
        let o = sh(
            "ip",
            &[
                "-n",
                &self.ns(suffix),
                "-o",
                "-4",
                "addr",
                "show",
                "dev",
                dev,
            ],
        );
        assert!(o.status.success(), "{suffix} {dev}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Take the lab down and assert that nothing of it is left.
    fn down_and_assert_gone(&self) {
        let out = self.ok(&["lab", "down"]);
        assert!(out.contains("removed"), "{out}");
        let left: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix()))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
        assert!(!self.dir().exists(), "{} left", self.dir().display());
        let ours: BTreeSet<&str> = ["br0", "up0", "eth1", "wiremesh0", "wmbr0"].into();
        let new_links: Vec<String> = host_links()
            .difference(&self.links_before)
            .filter(|l| ours.contains(l.as_str()) || l.starts_with('n') || l.starts_with('l'))
            .cloned()
            .collect();
        assert!(
            new_links.is_empty(),
            "links in the host namespace: {new_links:?}"
        );
        let again = self.ok(&["lab", "down"]);
        assert!(again.contains("nothing to remove"), "{again}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = meshctl(&["lab", "down", "--name", &self.name]);
    }
}

/// `lab`'s only requirement that can be checked without root: it refuses, with exit code 2
/// and a message saying what it needs, before touching anything.
#[test]
fn without_root_every_lab_command_exits_2_saying_it_needs_root() {
    for args in [
        &["lab", "up"][..],
        &["lab", "status", "-o", "json"],
        &["lab", "down", "--name", "x"],
    ] {
        let mut cmd = Command::new(MESHCTL);
        cmd.args(args);
        if wiremesh::lab::sys::require_root().is_ok() {
            cmd.uid(65534).gid(65534);
        }
        let o = cmd.output().expect("meshctl runs");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(
                "meshctl lab needs root (network namespaces, WireGuard): run it with sudo"
            ),
            "{err}"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn no_agents_lab_has_underlay_nat_keys_and_files_and_down_removes_everything() {
    require_tools(&[]);
    let lab = Lab::new("na");
    let up = lab.up(&["--no-agents", "--nodes", "3", "--locations", "3"]);
    assert!(up.status.success(), "{}", text(&up));

    // Namespaces: underlay, one LAN per location, one per node; no pods without agents.
    let ours: BTreeSet<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&lab.prefix()))
        .collect();
    let want: BTreeSet<String> = ["ul", "l1", "l2", "l3", "n1", "n2", "n3"]
        .iter()
        .map(|s| lab.ns(s))
        .collect();
    assert_eq!(ours, want);

    // Public nodes: eth0 on the underlay, eth1 on their LAN. The node behind NAT (node3, in the
    // last location): only eth0 on its LAN, default route via the router.
    assert!(lab.addrs("n1", "eth0").contains("10.200.0.1/24"));
    assert!(lab.addrs("n1", "eth1").contains("10.210.1.11/24"));
    assert!(lab.addrs("n2", "eth0").contains("10.200.0.2/24"));
    assert!(lab.addrs("n3", "eth0").contains("10.210.3.11/24"));
    assert!(lab.addrs("l3", "up0").contains("10.200.0.3/24"));
    assert!(lab.addrs("ul", "br0").contains("10.200.0.254/24"));
    let ports = String::from_utf8_lossy(
        &sh(
            "ip",
            &["-n", &lab.ns("ul"), "-o", "link", "show", "master", "br0"],
        )
        .stdout,
    )
    .into_owned();
    for port in ["n1@", "n2@", "l3@"] {
        assert!(
            ports.contains(port),
            "{port} not on the underlay bridge: {ports}"
        );
    }
    let route =
        String::from_utf8_lossy(&sh("ip", &["-n", &lab.ns("n3"), "route"]).stdout).into_owned();
    assert!(route.contains("default via 10.210.3.1"), "{route}");

    // The NAT router masquerades its LAN and lets in only answers.
    let rules = lab.exec("l3", &["nft", "list", "table", "ip", "wiremesh_lab"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("oifname \"up0\" ip saddr 10.210.3.0/24 counter"),
        "{rules}"
    );
    assert!(rules.contains("masquerade"), "{rules}");

    // Behind NAT reaches the underlay; the underlay does not reach behind NAT.
    let out = lab.exec("n3", &["ping", "-c", "1", "-W", "2", "10.200.0.1"]);
    assert!(
        out.status.success(),
        "NATed node cannot reach node1: {}",
        text(&out)
    );
    let rules = lab.exec("l3", &["nft", "list", "table", "ip", "wiremesh_lab"]);
    let masqueraded: u64 = String::from_utf8_lossy(&rules.stdout)
        .lines()
        .find(|l| l.contains("masquerade"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        masqueraded >= 1,
        "the ping did not go through the masquerade rule"
    );
    let out = lab.exec("n1", &["ping", "-c", "1", "-W", "1", "10.210.3.11"]);
    assert!(
        !out.status.success(),
        "node1 reached the NATed node: {}",
        text(&out)
    );

    // Files: state, nodes file with the lab's addresses and each node's key pair.
    let dir = lab.dir();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    assert_eq!(state["phase"], "no-agents");
    let nodes = load_nodes(&dir.join("nodes.yaml"), DEFAULT_TOPOLOGY_LABEL).unwrap();
    assert!(nodes.diagnostics.is_empty(), "{:?}", nodes.diagnostics);
    let names: Vec<&str> = nodes.items.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node1", "node2", "node3"]);
    for n in &nodes.items {
        let key_file = dir.join("nodes").join(n.name.as_str()).join("key");
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(&key_file).unwrap())
            .output()
            .unwrap();
        child.stdout.retain(|b| !b.is_ascii_whitespace());
        assert_eq!(
            Some(String::from_utf8(child.stdout).unwrap()),
            n.key.map(|k| k.to_string()),
            "{}: the published key is not the private key's",
            n.name
        );
    }
    let n3 = &nodes.items[2];
    assert_eq!(
        n3.endpoint.as_ref().unwrap().to_string(),
        "10.210.3.11:51820"
    );
    assert_eq!(n3.persistent_keepalive, 25);
    assert_eq!(
        nodes.items[0].endpoint.as_ref().unwrap().to_string(),
        "10.200.0.1:51820"
    );
    assert_eq!(nodes.items[0].persistent_keepalive, 0);

    // Status and graph work without agents.
    let status: serde_json::Value =
        serde_json::from_str(&lab.ok(&["lab", "status", "-o", "json"])).unwrap();
    assert_eq!(status["nodes"][2]["name"], "node3");
    assert_eq!(status["nodes"][2]["behind_nat"], true);
    assert_eq!(status["nodes"][0]["agent_running"], false);
    let dot = lab.ok(&["lab", "graph", "--format", "dot"]);
    assert!(dot.contains("\"node1\" -> \"node3\""), "{dot}");

    // A second `up` of the same name is refused; `check` needs pods.
    let again = lab.up(&["--no-agents"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let check = lab.run(&["lab", "check"]);
    assert!(!check.status.success());

    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn up_fails_clearly_when_an_agent_exits_and_down_cleans_up_after_it() {
    require_tools(&[]);
    let lab = Lab::new("ax");
    let up = lab.up(&["--agent", "/bin/false"]);
    assert_eq!(up.status.code(), Some(1), "{}", text(&up));
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains("lab up failed: the agent of node"), "{err}");
    assert!(err.contains("exited (exit status: 1)"), "{err}");
    assert!(
        err.contains(&format!("meshctl lab down --name {}", lab.name)),
        "{err}"
    );
    // What up built is left for inspection, and status says how far it got.
    assert!(netns_list().contains(&lab.ns("ul")));
    let status = lab.ok(&["lab", "status"]);
    assert!(status.contains("incomplete"), "{status}");
    assert!(status.contains("exited"), "{status}");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn down_without_a_state_file_still_removes_every_namespace_of_the_lab() {
    require_tools(&[]);
    let lab = Lab::new("ns");
    let up = lab.up(&["--no-agents", "--nodes", "2", "--locations", "2"]);
    assert!(up.status.success(), "{}", text(&up));
    std::fs::remove_file(lab.dir().join("lab.json")).unwrap();
    let down = lab.run(&["lab", "down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cleaning up by the lab prefix only"),
        "{}",
        text(&down)
    );
    assert!(
        String::from_utf8_lossy(&down.stdout).contains("5 namespaces deleted"),
        "{}",
        text(&down)
    );
    assert!(!netns_list().iter().any(|n| n.starts_with(&lab.prefix())));
    assert!(!lab.dir().exists());
}

/// Pods on every node ping each other through the mesh, the underlay carries them only inside
/// WireGuard, status shows the tunnels, and `down` ends every process the agents started.
fn pods_reach_each_other_through_wireguard_only(lab: &Lab, up_args: &[&str], agent: Agent) {
    let mut args: Vec<String> = up_args.iter().map(|s| (*s).to_owned()).collect();
    args.extend(agent.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = lab.up(&args);
    assert!(up.status.success(), "{}", text(&up));

    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains("no plaintext pod packets on the underlay ok"),
        "{report}"
    );
    assert!(
        report.contains("WireGuard seen on the underlay ok"),
        "{report}"
    );
    assert!(!report.contains("LOSS"), "{report}");

    let status: serde_json::Value =
        serde_json::from_str(&lab.ok(&["lab", "status", "-o", "json"])).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    for n in nodes {
        assert_eq!(n["agent_running"], true, "{n}");
        assert!(!n["pods"][0]["ips"].as_array().unwrap().is_empty(), "{n}");
        if n["leader"] == true {
            let peers = n["peers"].as_array().unwrap();
            assert!(!peers.is_empty(), "leader without peers: {n}");
            for p in peers {
                assert!(
                    p["latest_handshake_secs_ago"].as_u64().is_some(),
                    "no handshake after the check: {n}"
                );
                assert!(p["rx_bytes"].as_u64().unwrap() > 0, "{p}");
            }
        }
    }
    let svg = lab.ok(&["lab", "graph"]);
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");

    // Every process in the lab's node namespaces (agents and their WireGuard daemons) must be
    // gone after down.
    let mut pids = Vec::new();
    for i in 1..=nodes.len() {
        let o = sh("ip", &["netns", "pids", &lab.ns(&format!("n{i}"))]);
        pids.extend(
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned),
        );
    }
    assert!(
        pids.len() > nodes.len(),
        "expected agents and daemons: {pids:?}"
    );
    lab.down_and_assert_gone();
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        assert!(
            matches!(state, None | Some("Z")),
            "process {pid} of the lab still runs"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn stub_agents_three_clouds_full_mesh_with_a_natted_node_pass_check() {
    require_tools(&["jq"]);
    let lab = Lab::new("sf");
    // The default: the three-clouds mirror, par-1 behind NAT, full mesh.
    pods_reach_each_other_through_wireguard_only(&lab, &[], Agent::Stub);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn stub_agents_location_mesh_with_a_natted_lan_pass_check() {
    require_tools(&["jq"]);
    let lab = Lab::new("sl");
    pods_reach_each_other_through_wireguard_only(
        &lab,
        &["--nodes", "4", "--locations", "2", "--pods", "2"],
        Agent::Stub,
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn check_fails_and_names_the_flow_when_pod_traffic_leaks_onto_the_underlay() {
    require_tools(&["jq"]);
    let lab = Lab::new("lk");
    let mut args = vec!["--nat".to_owned(), "0".to_owned()];
    args.extend(Agent::Stub.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = lab.up(&args);
    assert!(up.status.success(), "{}", text(&up));
    // fra-1 forgets its tunnel route to hel-1's pods: they now leave by the default route,
    // in plaintext, onto the underlay.
    let del = sh("ip", &["-n", &lab.ns("n1"), "route", "del", "10.42.1.0/24"]);
    assert!(del.status.success(), "{}", text(&del));
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(
        report.contains("plaintext on the underlay: 10.42.0.2 > 10.42.1.2 icmp"),
        "{report}"
    );
    assert!(
        report.contains("no plaintext pod packets on the underlay FAILED"),
        "{report}"
    );
    lab.down_and_assert_gone();
}
