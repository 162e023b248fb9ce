//! `meshctl lab` end to end, through the real binary: namespaces, veths, the NAT router, keys,
//! the nodes file, agent supervision, CNI pods, status, check, graph and a complete `down`.
//!
//! Needs root, iproute2, nftables, wireguard-tools, wireguard-go, containernetworking-plugins,
//! tcpdump and ping: run with `--features netns-tests`. Each test uses its own lab name (tests
//! run in parallel) and a guard that runs `lab down` when the test ends, also on panic.
//!
//! The pod scenarios run the real `wiremesh agent` (the binary next to `meshctl`): pods through
//! the real CNI plugins, NAT roaming, status over UAPI, the ping matrix, the underlay capture,
//! and what the agents do when the nodes file changes or a route of theirs is deleted by hand.
//! Waits are bounded polls, never fixed sleeps.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use wiremesh::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use wiremesh::registry::file::load_nodes;

use crate::util::lab::{
    Lab, MESHCTL, first_pod, netns_list, node, peer, poll, require_tools, sh, text,
};

/// Lab names are a test's tag plus the PID: two tests with one tag would share a lab (and its
/// state directory) when they run at the same time.
#[test]
fn every_lab_test_has_a_tag_of_its_own() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut tags: Vec<(String, String)> = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a test file");
        for part in text.split("Lab::new(\"").skip(1) {
            let tag = part.split('"').next().unwrap_or_default().to_owned();
            tags.push((tag, path.display().to_string()));
        }
    }
    assert!(tags.len() > 10, "the scan found no lab tests: {tags:?}");
    tags.sort();
    for w in tags.windows(2) {
        assert_ne!(
            w[0].0, w[1].0,
            "tag {:?} in {} and {}",
            w[0].0, w[0].1, w[1].1
        );
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

/// Wait (up to 20 s) until every node behind NAT has a handshake with each of its peers.
///
/// Why: a NATed node cannot be reached before it has sent something, and its first handshake
/// (sent as soon as its agent configures a peer, thanks to the keepalive) is dropped when it
/// reaches a peer whose agent has not configured the NATed node yet, a few milliseconds later.
/// WireGuard retries only after 5 s (`REKEY_TIMEOUT`): waiting here keeps that out of `check`.
fn wait_for_natted_handshakes(lab: &Lab) {
    let done = poll(Duration::from_secs(20), || {
        let status = lab.status();
        status["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["behind_nat"] == true && n["leader"] == true)
            .all(|n| {
                n["peers"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .all(|p| p["latest_handshake_secs_ago"].as_u64().is_some())
                })
            })
            .then_some(())
    });
    assert!(
        done.is_some(),
        "no handshake of every NATed node with every peer after 20 s: {}",
        lab.status()
    );
}

/// Pods on every node ping each other through the mesh, the underlay carries them only inside
/// WireGuard, status shows the tunnels, and `down` ends every process the agents started.
fn pods_reach_each_other_through_wireguard_only(lab: &Lab, up_args: &[&str]) {
    let up = lab.up(up_args);
    assert!(up.status.success(), "{}", text(&up));
    wait_for_natted_handshakes(lab);

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
fn real_agents_three_clouds_full_mesh_with_a_natted_node_pass_check() {
    require_tools(&[]);
    let lab = Lab::new("rf");
    // The default: the three-clouds mirror, par-1 behind NAT, full mesh.
    pods_reach_each_other_through_wireguard_only(&lab, &[]);
}

/// `nft -f -` of `script` in namespace `netns`; panics unless it succeeds.
fn nft_in(netns: &str, script: &str) {
    use std::io::Write as _;
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(script.as_bytes())?;
            }
            c.wait()
        })
        .expect("nft runs");
    assert!(status.success(), "nft -f in {netns}: {script}");
}

/// `--underlay-mtu 1280`: every agent's automatic MTU is 1280 minus 60 (IPv4 endpoints), the
/// pods get the same, `lab check`'s bulk TCP passes, and the agents' MSS clamp is what keeps
/// TCP alive for pods whose MTU is still 1500 when the nodes drop the ICMP that would teach
/// them the path's MTU: the SYN reaches the other pod with an MSS of 1220 - 40.
#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_1280_byte_underlay_gets_a_1220_byte_tunnel_pods_to_match_and_clamped_tcp() {
    require_tools(&[]);
    let lab = Lab::new("mtu");
    let up = lab.up(&["--underlay-mtu", "1280"]);
    assert!(up.status.success(), "{}", text(&up));
    wait_for_natted_handshakes(&lab);
    let state = lab.state();
    let suffix = |ns: &str| ns.trim_start_matches(&lab.prefix()).to_owned();
    for n in &state.nodes {
        let ns = suffix(&n.netns);
        assert!(
            lab.ip(&ns, &["link", "show", "dev", "eth0"])
                .contains(" mtu 1280 "),
            "{}: the underlay",
            n.name
        );
        let wg = lab.ip(&ns, &["link", "show", "dev", "wiremesh0"]);
        assert!(wg.contains(" mtu 1220 "), "{}: {wg}", n.name);
        let conflist = std::fs::read_to_string(n.conflist()).expect("conflist");
        assert_eq!(
            wiremesh::cni::conflist_mtu(&conflist),
            Some(1220),
            "{}",
            n.name
        );
        let pod = suffix(&n.pods[0].netns);
        let eth0 = lab.ip(&pod, &["link", "show", "dev", "eth0"]);
        assert!(eth0.contains(" mtu 1220 "), "{}'s pod: {eth0}", n.name);
        let clamp = lab.exec(&ns, &["nft", "list", "table", "inet", "wiremesh_mss"]);
        let clamp = text(&clamp);
        assert!(
            clamp.contains("oifname \"wiremesh0\" tcp flags syn / syn,rst counter")
                && clamp.contains("tcp option maxseg size set rt mtu"),
            "{}: {clamp}",
            n.name
        );
    }
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    assert!(check.status.success(), "{report}\n{}", lab.diagnostics());
    assert!(report.contains("; bulk TCP ok;"), "{report}");

    // Pods made before the MTU was known (1500, as with a fixed 1500 elsewhere), behind nodes
    // that drop "fragmentation needed": only the MSS clamp keeps their TCP from stalling.
    let (a, b) = (&state.nodes[0], &state.nodes[1]);
    for n in [a, b] {
        let (ns, pod) = (suffix(&n.netns), suffix(&n.pods[0].netns));
        let port = lab.ip(&ns, &["-o", "link", "show", "master", "wmbr0"]);
        let port = port
            .split(':')
            .nth(1)
            .and_then(|p| p.trim().split('@').next())
            .expect("the pod's port on the bridge")
            .to_owned();
        lab.ip(&pod, &["link", "set", "eth0", "mtu", "1500"]);
        lab.ip(&ns, &["link", "set", &port, "mtu", "1500"]);
        lab.ip(&ns, &["link", "set", "wmbr0", "mtu", "1500"]);
        let block = "table inet icmpblock {\n\tchain out {\n\t\ttype filter hook output \
                     priority filter; policy accept;\n\t\ticmp type destination-unreachable \
                     icmp code frag-needed counter drop\n\t}\n}\n";
        nft_in(&n.netns, block);
    }
    let observer = "table inet seen {\n\tcounter clamped { }\n\tcounter other { }\n\tchain input \
                    {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp flags \
                    syn / syn,ack tcp option maxseg size 1180 counter name \"clamped\"\n\t\ttcp \
                    flags syn / syn,ack tcp option maxseg size != 1180 counter name \"other\"\n\t}\n}\n";
    nft_in(&b.pods[0].netns, observer);
    let to = b.pods[0].addrs().next().expect("pod address");
    let t = wiremesh::lab::bulk::transfer_all(&[(
        a.pods[0].netns.clone(),
        b.pods[0].netns.clone(),
        to,
    )])
    .remove(0);
    assert!(t.ok(), "{}\n{}", t.line(), lab.diagnostics());
    let counter = |name: &str| {
        let o = lab.exec(
            &suffix(&b.pods[0].netns),
            &["nft", "-j", "list", "counter", "inet", "seen", name],
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("nft JSON");
        v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|i| i.get("counter")))
            .and_then(|c| c["packets"].as_u64())
            .expect("counter")
    };
    assert!(counter("clamped") >= 1, "the SYN arrived with MSS 1180");
    assert_eq!(counter("other"), 0, "no SYN arrived unclamped");
    lab.down_and_assert_gone();
}

/// The lines of `lab check`'s report a lab of `families` must show: every pair answered in
/// each family, bulk TCP in each family, no plaintext pod packet and WireGuard seen.
fn assert_check_passes_in(lab: &Lab, families: &[&str], pairs: usize) -> String {
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    assert!(check.status.success(), "{report}\n{}", lab.diagnostics());
    for family in ["IPv4", "IPv6"] {
        let line = format!("  {family}: {pairs} pairs, 0 lost packets\n");
        let bulk = format!("({family} ");
        if families.contains(&family) {
            assert!(report.contains(&line), "{family}: {report}");
            assert_eq!(
                report
                    .lines()
                    .filter(|l| l.contains(&bulk) && l.ends_with(", ok"))
                    .count(),
                2,
                "bulk TCP both ways in {family}: {report}"
            );
        } else {
            assert!(
                !report.contains(&format!("  {family}: ")),
                "no {family} pings: {report}"
            );
            assert!(!report.contains(&bulk), "no {family} bulk TCP: {report}");
        }
    }
    assert!(
        report.contains("  0 packets from or to pod CIDRs or the mesh subnet"),
        "{report}"
    );
    assert!(
        report.contains(
            "no plaintext pod packets on the underlay ok; WireGuard seen on the underlay ok"
        ),
        "{report}"
    );
    report
}

/// `--ipv6`: an underlay without IPv4, endpoints, internal IPs, pod CIDRs and mesh IPs in IPv6;
/// every agent's automatic MTU is 1500 minus IPv6's 80; pods reach the underlay through the
/// agent's IPv6 masquerade; every pod reaches every pod over IPv6, bulk TCP goes through, and
/// the underlay carries only WireGuard (over IPv6 UDP, the only family it has).
#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn an_ipv6_only_lab_meshes_over_ipv6_and_check_passes_with_only_wireguard_on_the_underlay() {
    require_tools(&[]);
    let lab = Lab::new("v6");
    let up = lab.up(&["--ipv6"]);
    assert!(up.status.success(), "{}", text(&up));
    let state = lab.state();
    for (i, n) in state.nodes.iter().enumerate() {
        let ns = format!("n{}", i + 1);
        assert_eq!(
            lab.addrs(&ns, "eth0").trim(),
            "",
            "{}: no IPv4 underlay",
            n.name
        );
        let eth0 = lab.ip(&ns, &["-6", "-o", "addr", "show", "dev", "eth0"]);
        assert!(
            eth0.contains(&format!("fd00:200::{}/64", i + 1)),
            "{}: {eth0}",
            n.name
        );
        let wg = lab.ip(&ns, &["addr", "show", "dev", "wiremesh0"]);
        assert!(wg.contains(" mtu 1420 "), "{}: {wg}", n.name);
        assert!(
            wg.contains(&format!("inet6 fd00:4::{}/64", i + 1)),
            "{}: a mesh IP from fd00:4::/64: {wg}",
            n.name
        );
        assert!(!wg.contains("inet "), "{}: {wg}", n.name);
        let pod = n.pods[0].addrs().collect::<Vec<_>>();
        assert!(
            pod.len() == 1 && pod[0].is_ipv6(),
            "{}'s pod: {pod:?}",
            n.name
        );
        // The underlay edge has no route to any pod CIDR: only the agent's IPv6 masquerade
        // gets the pod an answer.
        assert!(
            lab.pod_pings(&n.pods[0].netns, "fd00:200::fe"),
            "{}'s pod reaches the underlay edge, masqueraded\n{}",
            n.name,
            lab.diagnostics()
        );
    }
    assert_check_passes_in(&lab, &["IPv6"], 6);
    lab.down_and_assert_gone();
}

/// `--dual-stack`: both families on every link and in every pod, the mesh over IPv4; each agent
/// masquerades its pods' IPv6 CIDR too (pods reach the underlay edge in both families); every
/// pod reaches every other pod's IPv4 and IPv6 address, bulk TCP goes through in both, and no
/// plaintext pod packet of either family crosses the underlay.
#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_dual_stack_lab_gives_pods_both_families_and_check_passes_in_each() {
    require_tools(&[]);
    let lab = Lab::new("ds");
    let up = lab.up(&["--dual-stack"]);
    assert!(up.status.success(), "{}", text(&up));
    let state = lab.state();
    for (i, n) in state.nodes.iter().enumerate() {
        let ns = format!("n{}", i + 1);
        assert!(
            lab.addrs(&ns, "eth0")
                .contains(&format!("10.200.0.{}/24", i + 1))
        );
        let eth0 = lab.ip(&ns, &["-6", "-o", "addr", "show", "dev", "eth0"]);
        assert!(eth0.contains(&format!("fd00:200::{}/64", i + 1)), "{eth0}");
        let pod = n.pods[0].addrs().collect::<Vec<_>>();
        assert!(
            pod.len() == 2 && pod[0].is_ipv4() && pod[1].is_ipv6(),
            "{}'s pod: {pod:?}",
            n.name
        );
        let nat = text(&lab.exec(&ns, &["nft", "list", "set", "inet", "wiremesh", "sources6"]));
        assert!(
            nat.contains(&format!("fd00:201:0:{}::/64", i + 1)),
            "{}: {nat}",
            n.name
        );
        // The underlay edge has no route to any pod CIDR: only masquerading, in each family,
        // gets the pod an answer.
        for edge in ["10.200.0.254", "fd00:200::fe"] {
            assert!(
                lab.pod_pings(&n.pods[0].netns, edge),
                "{}'s pod reaches {edge}, masqueraded\n{}",
                n.name,
                lab.diagnostics()
            );
        }
    }
    assert_check_passes_in(&lab, &["IPv4", "IPv6"], 6);
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn real_agents_location_mesh_with_a_natted_lan_pass_check() {
    require_tools(&[]);
    let lab = Lab::new("rl");
    pods_reach_each_other_through_wireguard_only(
        &lab,
        &["--nodes", "4", "--locations", "2", "--pods", "2"],
    );
}

// -- helpers of the scenarios below ----------------------------------------------------------

/// Resumes a process stopped with SIGSTOP when dropped, so a failing test never leaves an agent
/// frozen (`lab down` would still SIGKILL it, but its log would be misleading).
struct Stopped(Pid);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = Pid::from_raw(i32::try_from(pid).unwrap());
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP to the agent");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The first pods of nodes `a` and `b` ping each other both ways.
fn pods_ping_both_ways(lab: &Lab, status: &serde_json::Value, a: &str, b: &str) {
    let (pod_a, ip_a) = first_pod(node(status, a));
    let (pod_b, ip_b) = first_pod(node(status, b));
    assert!(lab.pod_pings(&pod_a, &ip_b), "{pod_a} -> {ip_b}");
    assert!(lab.pod_pings(&pod_b, &ip_a), "{pod_b} -> {ip_a}");
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn a_lost_tunnel_route_drops_pod_traffic_instead_of_leaking_it_check_names_a_real_leak_and_the_agent_restores_both()
 {
    require_tools(&[]);
    let lab = Lab::new("lk");
    let up = lab.up(&["--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let pid = node(&lab.status(), "fra-1")["agent_pid"].as_u64().unwrap();
    {
        // The agent restores a deleted route of its own within a second: freeze it first.
        let _frozen = Stopped::new(u32::try_from(pid).unwrap());
        // fra-1 forgets its tunnel route to hel-1's pods: the guard (a blackhole at the lowest
        // priority) now holds the destination, so the pods' packets are dropped, not sent by
        // the default route.
        let n1 = lab.ns("n1");
        let del_then_check = |route: &[&str]| {
            let del = sh("ip", &[&["-n", &n1, "route", "del"][..], route].concat());
            assert!(del.status.success(), "{}", text(&del));
            let check = lab.run(&["lab", "check"]);
            let report = text(&check);
            assert_eq!(check.status.code(), Some(1), "{report}");
            report
        };
        let report = del_then_check(&["10.42.1.0/24", "dev", "wiremesh0"]);
        assert!(
            report.contains("no plaintext pod packets on the underlay ok"),
            "{report}"
        );
        // Without the guard too, they leave in plaintext onto the underlay, and check says so.
        let report = del_then_check(&["blackhole", "10.42.1.0/24", "metric", "4294967295"]);
        assert!(
            report.contains("plaintext on the underlay: 10.42.0.2 > 10.42.1.2 icmp"),
            "{report}"
        );
        assert!(
            report.contains("no plaintext pod packets on the underlay FAILED"),
            "{report}"
        );
    }
    // Thawed, the agent sees the route and its guard are gone and puts both back.
    let back = poll(Duration::from_secs(5), || {
        let routes = lab.own_routes("n1");
        (routes.contains("10.42.1.0/24 dev wiremesh0") && routes.contains("blackhole 10.42.1.0/24"))
            .then_some(())
    });
    assert!(
        back.is_some(),
        "route or guard not restored: {}",
        lab.own_routes("n1")
    );
    let check = lab.run(&["lab", "check"]);
    assert!(check.status.success(), "{}", text(&check));
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn real_agent_restores_a_route_of_its_own_deleted_by_hand_within_a_second() {
    require_tools(&[]);
    let lab = Lab::new("rr");
    let up = lab.up(&["--nodes", "2", "--locations", "2", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        lab.own_routes("n1").contains("10.201.2.0/24"),
        "{}",
        lab.own_routes("n1")
    );
    let del = sh(
        "ip",
        &["-n", &lab.ns("n1"), "route", "del", "10.201.2.0/24"],
    );
    assert!(del.status.success(), "{}", text(&del));
    let deleted = Instant::now();
    let back = poll(Duration::from_secs(1), || {
        lab.own_routes("n1").contains("10.201.2.0/24").then_some(())
    });
    assert!(
        back.is_some(),
        "route not back after {:?}: {}",
        deleted.elapsed(),
        lab.own_routes("n1")
    );
    let status = lab.status();
    pods_ping_both_ways(&lab, &status, "node1", "node2");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn node_removed_from_the_file_loses_its_peers_and_routes_everywhere() {
    require_tools(&[]);
    let lab = Lab::new("rm");
    let up = lab.up(&["--nodes", "3", "--locations", "3", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let gone_key = lab.public_key("node3");
    let status = lab.status();
    for n in ["node1", "node2"] {
        assert!(peer(node(&status, n), &gone_key).is_some(), "{status}");
    }

    lab.remove_node("node3");
    let removed = Instant::now();
    let settled = poll(Duration::from_secs(15), || {
        let status = lab.status();
        let clean = [("node1", "n1"), ("node2", "n2")].iter().all(|(n, ns)| {
            peer(node(&status, n), &gone_key).is_none()
                && !lab
                    .ip(ns, &["route", "show", "table", "all"])
                    .contains("10.201.3.0/24")
        });
        clean.then_some(status)
    });
    let Some(status) = settled else {
        panic!(
            "node3 still known after 15 s: {}\nnode1 routes:\n{}",
            lab.status(),
            lab.ip("n1", &["route", "show", "table", "all"])
        );
    };
    eprintln!("node3 forgotten everywhere after {:?}", removed.elapsed());
    pods_ping_both_ways(&lab, &status, "node1", "node2");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn location_leader_removed_from_the_file_hands_over_to_the_other_node_of_its_location() {
    require_tools(&[]);
    let lab = Lab::new("ll");
    let up = lab.up(&["--nodes", "4", "--locations", "2", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let status = lab.status();
    assert_eq!(status["granularity"], "location", "{status}");
    let loc1: Vec<&serde_json::Value> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["location"] == "loc1")
        .collect();
    assert_eq!(loc1.len(), 2, "{status}");
    let (old, new): (Vec<_>, Vec<_>) = loc1.into_iter().partition(|n| n["leader"] == true);
    assert_eq!(old.len(), 1, "one leader in loc1: {status}");
    let old = old[0]["name"].as_str().unwrap().to_owned();
    let new = new[0]["name"].as_str().unwrap().to_owned();
    // Node i lives in namespace n<i>.
    let new_ns = format!("n{}", new.trim_start_matches("node"));
    let loc2: Vec<String> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["location"] == "loc2")
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(loc2.len(), 2, "{status}");

    let new_key = lab.public_key(&new);
    let old_key = lab.public_key(&old);
    // Before: loc2's leader tunnels to the old leader only.
    for m in status["nodes"].as_array().unwrap() {
        if m["location"] == "loc2" && m["leader"] == true {
            assert!(
                peer(m, &old_key).is_some() && peer(m, &new_key).is_none(),
                "{status}"
            );
        }
    }

    lab.remove_node(&old);
    let removed = Instant::now();
    let settled = poll(Duration::from_secs(15), || {
        let status = lab.status();
        let n = node(&status, &new);
        let mesh_ip = n["mesh_ip"].as_str()?.to_owned();
        let leading = n["leader"] == true
            && !n["peers"].as_array()?.is_empty()
            && lab
                .ip(&new_ns, &["-o", "addr", "show", "dev", "wiremesh0"])
                .contains(&format!("{mesh_ip}/"));
        // The leader of loc2 tunnels to the new leader, not to the old one.
        let followed = status["nodes"].as_array()?.iter().any(|m| {
            m["location"] == "loc2"
                && m["leader"] == true
                && peer(m, &new_key).is_some()
                && peer(m, &old_key).is_none()
        });
        (leading && followed).then_some(status)
    });
    let Some(status) = settled else {
        panic!("{new} did not take over loc1 within 15 s: {}", lab.status());
    };
    eprintln!("{new} leads loc1 after {:?}", removed.elapsed());

    let (pod, ip) = first_pod(node(&status, &new));
    for other in &loc2 {
        let (other_pod, other_ip) = first_pod(node(&status, other));
        assert!(lab.pod_pings(&pod, &other_ip), "{pod} -> {other_ip}");
        assert!(lab.pod_pings(&other_pod, &ip), "{other_pod} -> {ip}");
    }
    lab.down_and_assert_gone();
}

/// `meshctl doctor peers` names a blocked listen port. In the three-clouds lab, fra-1's agent
/// starts behind an nft rule (in fra-1's namespace) that drops UDP to 51820, so no handshake
/// with fra-1 ever completes. On fra-1 the doctor finds the rule and says to open UDP 51820 on
/// fra-1; on par-1 (behind NAT, with keepalive, so it keeps sending) it says fra-1 never
/// answered and to open UDP 51820 on fra-1's firewall.
#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn doctor_peers_names_a_listen_port_blocked_by_nftables_and_the_node_behind_it() {
    require_tools(&[]);
    let lab = Lab::new("dr");
    // The rule goes in before node1's agent starts: a wrapper around the agent binary, run in
    // the node's namespace like the agent itself.
    let dir = std::env::temp_dir().join(format!("wm-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let wrapper = dir.join("agent.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" --hostname fra-1 \"*)\n  nft -f - <<'EOF'\n\
             table inet wmblock {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             udp dport 51820 drop\n  }}\n}}\nEOF\n;;\nesac\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_wiremesh")
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let up = lab.up(&["--agent", wrapper.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(up.status.success(), "lab up: {}", text(&up));
    let nodes = lab.dir().join("nodes.yaml");
    let nodes = nodes.to_str().expect("utf-8 path");
    let doctor = |suffix: &str| -> Option<serde_json::Value> {
        let out = lab.exec(
            suffix,
            &[MESHCTL, "doctor", "peers", "-o", "json", "--nodes", nodes],
        );
        serde_json::from_slice(&out.stdout).ok()
    };
    let finding = |report: &serde_json::Value, peer: &str, cause: &str| -> Option<String> {
        report["findings"]
            .as_array()?
            .iter()
            .find(|f| f["peer"] == peer && f["cause"] == cause)
            .and_then(|f| f["advice"].as_str().map(str::to_owned))
    };
    let on_fra = poll(Duration::from_secs(30), || {
        finding(&doctor("n1")?, "hel-1", "local-firewall")
    })
    .unwrap_or_else(|| panic!("fra-1's doctor: {:?}", doctor("n1")));
    assert!(
        on_fra.contains("fra-1's firewall drops UDP 51820")
            && on_fra.contains("inet wmblock input: udp dport 51820 drop")
            && on_fra.contains("Open UDP 51820 on fra-1"),
        "{on_fra}"
    );
    let on_par = poll(Duration::from_secs(30), || {
        finding(&doctor("n3")?, "fra-1", "no-answer")
    })
    .unwrap_or_else(|| panic!("par-1's doctor: {:?}", doctor("n3")));
    assert!(
        on_par.contains("Open UDP 51820 on fra-1's firewall"),
        "{on_par}"
    );
}
