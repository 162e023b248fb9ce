//! The real agent next to state that is not its own: routes, a routing table, a policy rule, an
//! nftables table and links created before it starts are left exactly as they were, while the
//! agent runs and after `wiremesh cleanup`; and `wiremesh cleanup` leaves nothing of wiremesh
//! behind (interface, bridge, routes, rules, nftables table, CNI file, WireGuard daemon).
//!
//! Needs root, iproute2, nftables, wireguard-tools, wireguard-go and ping: run with
//! `--features netns-tests`. The nodes are [`AgentNodes`]: two namespaces on a veth.

use std::time::{Duration, Instant};

use crate::util::agent_netns::{AgentNode, AgentNodes};

/// The kernel state wiremesh does not own, as text, volatile fields removed: routes of every
/// table without `proto 104` and without our devices, rules without ours, the nftables ruleset
/// without `inet wiremesh` and `inet wiremesh_mss` (stateless: no counter values), links and
/// addresses without ours.
///
/// IPv6 `anycast` routes are left out too: the kernel adds a subnet-router anycast route per
/// link when forwarding is switched on, which the agent does (a node forwards pod traffic).
fn foreign_snapshot(n: &AgentNode) -> String {
    let ours = |l: &str| {
        l.starts_with("anycast ")
            || l.contains("proto 104")
            || l.contains("dev wiremesh0")
            || l.contains("dev wmbr0")
            || l.contains(": wiremesh0")
            || l.contains(": wmbr0")
    };
    let mut out = String::new();
    for (what, args) in [
        ("routes v4", &["-4", "route", "show", "table", "all"][..]),
        ("routes v6", &["-6", "route", "show", "table", "all"]),
        ("rules v4", &["-d", "-4", "rule", "show"]),
        ("rules v6", &["-d", "-6", "rule", "show"]),
        ("links", &["-o", "link", "show"]),
        ("addresses", &["-o", "addr", "show"]),
    ] {
        out.push_str(&format!("# {what}\n"));
        for line in n.ns.ip(args).lines().filter(|l| !ours(l)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# nftables\n");
    let ruleset = n.ns.exec(&["nft", "-s", "list", "ruleset"], None);
    let mut skipping = false;
    for line in ruleset.lines() {
        if line.starts_with("table inet wiremesh ") || line.starts_with("table inet wiremesh_mss ")
        {
            skipping = true;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
        if skipping && line == "}" {
            skipping = false;
        }
    }
    out
}

/// Foreign state in node a: a static route, a route in table 200, a rule to table 200, an
/// nftables table, a veth pair and a bridge with an address.
fn make_foreign_state(a: &AgentNode) {
    let ns = &a.ns;
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/16",
        "via",
        "10.77.0.2",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.97.0.0/16",
        "via",
        "10.77.0.2",
        "table",
        "200",
    ]);
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.98.0.0/16",
        "lookup",
        "200",
        "pref",
        "500",
    ]);
    ns.exec(
        &["nft", "-f", "-"],
        Some(
            "table inet foreign {\n  chain c {\n    type filter hook forward priority 0; policy accept;\n    counter\n  }\n}\n",
        ),
    );
    ns.ip(&["link", "add", "fv0", "type", "veth", "peer", "name", "fv1"]);
    ns.ip(&["link", "add", "fbr0", "type", "bridge"]);
    ns.ip(&["link", "set", "fv1", "master", "fbr0"]);
    ns.ip(&["addr", "add", "10.96.0.1/24", "dev", "fbr0"]);
    for l in ["fv0", "fv1", "fbr0"] {
        ns.ip(&["link", "set", l, "up"]);
    }
}

/// Snapshot until two in a row, 500 ms apart, agree (a link coming up adds its routes a moment
/// later), for at most 10 s.
fn settled_snapshot(n: &AgentNode) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = foreign_snapshot(n);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = foreign_snapshot(n);
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Whether `from` pings `to` from address `src` (`ping -I`).
fn pings(n: &AgentNode, src: &str, to: &str) -> bool {
    n.ns.try_exec(&["ping", "-n", "-c", "1", "-W", "1", "-I", src, to])
        .status
        .success()
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn agent_and_cleanup_leave_foreign_state_exactly_as_it_was_and_cleanup_leaves_nothing_of_ours() {
    let mut mesh = AgentNodes::new("wm-fo");
    make_foreign_state(&mesh.nodes[0]);
    let before = settled_snapshot(&mesh.nodes[0]);
    for must in [
        "10.99.0.0/16 via 10.77.0.2 dev eth0 proto static",
        "10.97.0.0/16 via 10.77.0.2 dev eth0 table 200",
        "from 10.98.0.0/16 lookup 200",
        "table inet foreign",
        "fbr0",
        "fv0@fv1",
        "10.96.0.1/24",
    ] {
        assert!(
            before.contains(must),
            "{must} not in the snapshot:\n{before}"
        );
    }

    mesh.start();
    let (a_src, b_bridge) = (mesh.nodes[0].bridge_ip(), mesh.nodes[1].bridge_ip());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pings(&mesh.nodes[0], &a_src, &b_bridge) {
        assert!(
            Instant::now() < deadline,
            "no ping {a_src} -> {b_bridge} through the tunnel after 30 s\n{}",
            mesh.logs()
        );
        for n in &mut mesh.nodes {
            assert!(n.agent_running(), "agent {} exited\n{}", n.name, n.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = &mesh.nodes[0];
    assert!(
        !a.ns.ip(&["route", "show", "proto", "104"]).is_empty(),
        "the mesh works without routes of ours?"
    );
    assert_eq!(
        foreign_snapshot(a),
        before,
        "the running agent changed foreign state"
    );

    // Stop a's agent (it leaves its state in place), then clean up.
    mesh.nodes[0].stop();
    let a = &mesh.nodes[0];
    assert!(
        a.cni_config().exists(),
        "the agent wrote no CNI config\n{}",
        a.log()
    );
    let out = a.cleanup();
    assert!(
        out.status.success(),
        "wiremesh cleanup failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    let cleanup_log = String::from_utf8_lossy(&out.stderr).into_owned();

    let links = a.ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains(": wiremesh0"), "{links}\n{cleanup_log}");
    assert!(!links.contains(": wmbr0"), "{links}\n{cleanup_log}");
    for family in ["-4", "-6"] {
        let routes =
            a.ns.ip(&[family, "route", "show", "table", "all", "proto", "104"]);
        assert!(routes.is_empty(), "routes of ours left: {routes}");
        let rules = a.ns.ip(&["-d", family, "rule", "show"]);
        assert!(!rules.contains("proto 104"), "rules of ours left: {rules}");
    }
    let tables = a.ns.exec(&["nft", "list", "tables"], None);
    assert!(!tables.contains("inet wiremesh"), "{tables}");
    assert!(!a.cni_config().exists(), "CNI config left");
    assert!(
        a.pids().is_empty(),
        "processes left in the node (wireguard-go?): {:?}\n{cleanup_log}",
        a.pids()
    );
    assert!(
        !a.dir.join("run/wireguard/wiremesh0.sock").exists(),
        "control socket left"
    );
    assert_eq!(
        foreign_snapshot(a),
        before,
        "cleanup changed foreign state\n{cleanup_log}"
    );
}

/// A conflist flannel writes (what a cluster migrating from flannel has in `/etc/cni/net.d`).
const FLANNEL_CONFLIST: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

/// `wiremesh cleanup` in `n` with `extra` arguments: (succeeded, stderr).
fn cleanup(n: &AgentNode, extra: &[&str]) -> (bool, String) {
    let out = n.cleanup_with(extra);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn cleanup_refuses_an_interface_bridge_or_cni_file_that_is_not_wiremeshs_and_touches_nothing() {
    let mesh = AgentNodes::new("wm-fc");
    let a = &mesh.nodes[0];
    let ns = &a.ns;
    // An ordinary veth named like the argument, with an address and a route.
    ns.ip(&["link", "add", "v1", "type", "veth", "peer", "name", "v1p"]);
    ns.ip(&["addr", "add", "10.61.0.1/24", "dev", "v1"]);
    ns.ip(&["link", "set", "v1", "up"]);
    ns.ip(&["link", "set", "v1p", "up"]);
    // A TUN device without wiremesh's mark under a name other than wiremesh0 (someone's
    // userspace VPN, or a link of an older wiremesh: the message says how to remove it).
    ns.ip(&["tuntap", "add", "wg7", "mode", "tun"]);
    // Someone else's bridge (it carries their alias).
    ns.ip(&["link", "add", "docker0", "type", "bridge"]);
    ns.ip(&["link", "set", "docker0", "alias", "docker bridge"]);
    // Something of ours that a refused cleanup must leave too: a guard route.
    ns.ip(&[
        "route",
        "add",
        "blackhole",
        "10.42.9.0/24",
        "proto",
        "104",
        "metric",
        "4294967295",
    ]);
    let before = foreign_snapshot(a);
    let guard = || a.ns.ip(&["route", "show", "proto", "104"]);
    assert!(guard().contains("10.42.9.0/24"));

    for (args, why) in [
        (&["--interface", "v1"][..], "veth"),
        (&["--interface", "eth0"], "veth"),
        (&["--interface", "lo"], "without a link kind"),
        (&["--interface", "wg7"], "ip link del wg7"),
        (&["--bridge", "docker0"], "docker bridge"),
        (&["--bridge", "v1"], "not a bridge"),
    ] {
        let (ok, err) = cleanup(a, args);
        assert!(!ok, "{args:?} accepted:\n{err}");
        assert!(err.contains("refused, nothing removed"), "{args:?}: {err}");
        assert!(
            err.contains("not wiremesh's") || err.contains("without wiremesh's mark"),
            "{args:?}: {err}"
        );
        assert!(err.contains(why), "{args:?}: {err}");
        assert_eq!(
            foreign_snapshot(a),
            before,
            "{args:?} changed foreign state"
        );
        assert!(guard().contains("10.42.9.0/24"), "{args:?} removed a route");
    }
    assert!(
        a.ns.ip(&["addr", "show", "dev", "v1"])
            .contains("10.61.0.1/24")
    );

    // A flannel conflist at --cni-config: refused, kept byte for byte.
    std::fs::write(a.cni_config(), FLANNEL_CONFLIST).unwrap();
    let (ok, err) = cleanup(a, &[]);
    assert!(!ok, "a flannel conflist accepted:\n{err}");
    assert!(err.contains("--cni-config"), "{err}");
    assert_eq!(
        std::fs::read_to_string(a.cni_config()).unwrap(),
        FLANNEL_CONFLIST
    );
    assert!(guard().contains("10.42.9.0/24"));

    // Without the foreign file, the same cleanup removes what is ours, and only that.
    std::fs::remove_file(a.cni_config()).unwrap();
    let (ok, err) = cleanup(a, &[]);
    assert!(ok, "{err}");
    assert_eq!(guard(), "", "{err}");
    assert_eq!(foreign_snapshot(a), before);
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn the_agent_never_overwrites_a_cni_file_that_is_not_its_own() {
    let mut mesh = AgentNodes::new("wm-fn");
    std::fs::write(mesh.nodes[0].cni_config(), FLANNEL_CONFLIST).unwrap();
    mesh.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mesh.nodes[0].log().contains("is not wiremesh's") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged after 30 s\n{}",
            mesh.logs()
        );
        assert!(
            mesh.nodes[0].agent_running(),
            "the agent exited\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(mesh.nodes[0].agent_running(), "{}", mesh.logs());
    assert_eq!(
        std::fs::read_to_string(mesh.nodes[0].cni_config()).unwrap(),
        FLANNEL_CONFLIST,
        "{}",
        mesh.logs()
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn an_ipv4_mesh_turns_on_ipv4_forwarding_only_and_cleanup_turns_it_off_again() {
    let mut mesh = AgentNodes::new("wm-ff");
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        assert_eq!(mesh.nodes[0].sysctl(key), "0", "{key} in a fresh namespace");
    }
    mesh.start();
    let (a_src, b_bridge) = (mesh.nodes[0].bridge_ip(), mesh.nodes[1].bridge_ip());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pings(&mesh.nodes[0], &a_src, &b_bridge) {
        assert!(
            Instant::now() < deadline,
            "no ping {a_src} -> {b_bridge} after 30 s\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = &mesh.nodes[0];
    assert_eq!(a.sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(
        a.sysctl("net.ipv6.conf.all.forwarding"),
        "0",
        "IPv6 forwarding in an IPv4-only mesh"
    );
    assert!(a.dir.join("sysctl").exists(), "nothing recorded");
    // The userspace device (a tun) carries wiremesh's mark.
    let link = a.ns.ip(&["-d", "link", "show", "dev", "wiremesh0"]);
    assert!(link.contains("tun"), "{link}");
    assert!(
        link.contains("alias wiremesh WireGuard interface"),
        "{link}"
    );
    mesh.nodes[0].stop();
    let a = &mesh.nodes[0];
    let out = a.cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.sysctl("net.ipv4.ip_forward"), "0", "not restored");
    assert_eq!(a.sysctl("net.ipv6.conf.all.forwarding"), "0");
    assert!(!a.dir.join("sysctl").exists(), "record left");
    // A second cleanup has nothing recorded: it never turns forwarding on.
    assert!(a.cleanup().status.success());
    assert_eq!(a.sysctl("net.ipv4.ip_forward"), "0");
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn the_agent_changes_nothing_on_an_interface_that_is_not_wiremeshs() {
    let mut mesh = AgentNodes::new("wm-fi");
    let state = |n: &AgentNode| {
        format!(
            "{}\n{}",
            n.ns.ip(&["-d", "-o", "link", "show", "dev", "v1"]),
            n.ns.ip(&["-o", "addr", "show", "dev", "v1"])
        )
    };
    {
        let ns = &mesh.nodes[0].ns;
        ns.ip(&["link", "add", "v1", "type", "veth", "peer", "name", "v1p"]);
        ns.ip(&["addr", "add", "10.61.0.1/24", "dev", "v1"]);
        ns.ip(&["link", "set", "v1p", "up"]);
    }
    // Down: bringing it up would be a change too.
    let before = state(&mesh.nodes[0]);
    let file = mesh.nodes_file.clone();
    mesh.nodes[0].start_with(&file, &["--interface", "v1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mesh.nodes[0]
        .log()
        .contains("not wiremesh's WireGuard interface")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged after 30 s\n{}",
            mesh.logs()
        );
        assert!(mesh.nodes[0].agent_running(), "{}", mesh.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(&mesh.nodes[0]), before, "{}", mesh.logs());
    // Nor does it clamp the MSS of what crosses v1.
    let tables = mesh.nodes[0].ns.exec(&["nft", "list", "tables"], None);
    assert!(
        !tables.contains("wiremesh_mss"),
        "{tables}\n{}",
        mesh.logs()
    );
    assert!(
        mesh.nodes[0].pids().len() == 1,
        "a WireGuard daemon was started for v1: {:?}",
        mesh.nodes[0].pids()
    );
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn with_a_read_only_proc_sys_and_forwarding_off_the_agent_keeps_running_unready_and_names_the_host_setting()
 {
    let mut mesh = AgentNodes::new("wm-fr");
    mesh.nodes[0].read_only_proc_sys = true;
    // Node b forwards already: its agent must not even try to write.
    mesh.nodes[1].ns.sysctl("net.ipv4.ip_forward=1");
    mesh.nodes[1].read_only_proc_sys = true;
    mesh.start();
    let wanted = "net.ipv4.ip_forward is 0 and cannot be set";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = mesh.nodes[0].http_get("/readyz");
        if code == 503 && body.contains(wanted) {
            assert!(body.contains("sysctl -w net.ipv4.ip_forward=1"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz: {code} {body}\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for n in &mut mesh.nodes {
        assert!(n.agent_running(), "agent {} exited\n{}", n.name, n.log());
    }
    assert_eq!(mesh.nodes[0].sysctl("net.ipv6.conf.all.forwarding"), "0");
    // The host sets it: the agent's next retry completes the mesh and it becomes ready.
    mesh.nodes[0].ns.sysctl("net.ipv4.ip_forward=1");
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..2 {
        loop {
            let (code, body) = mesh.nodes[n].http_get("/readyz");
            if code == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {n} /readyz: {code} {body}\n{}",
                mesh.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (a_src, b_bridge) = (mesh.nodes[0].bridge_ip(), mesh.nodes[1].bridge_ip());
    assert!(pings(&mesh.nodes[0], &a_src, &b_bridge), "{}", mesh.logs());
    assert!(
        !mesh.nodes[1].log().contains("cannot be set"),
        "b tried to write a sysctl that was on\n{}",
        mesh.nodes[1].log()
    );
}
