//! The masquerade table, the MSS clamp and the CNI config file against the real tools, in
//! throw-away network namespaces: `nft`, `iptables-restore`, the containernetworking `bridge`,
//! `host-local` and `portmap` plugins, and `ping` and bulk TCP between namespaces the test
//! creates.
//!
//! Needs root, nftables, iptables and the CNI plugins in `/usr/lib/cni`: run with
//! `--features netns-tests`. No traffic leaves the test's namespaces.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use wiremesh::cni::{read_conflist_cidrs, render_conflist, write_conflist};
use wiremesh::desired::{DesiredState, Masquerade, WgInterface};
use wiremesh::model::WgKey;
use wiremesh::reconcile::nft::{Firewall, FirewallMode, IPT_CHAIN, TableState, canonical};
use wiremesh::reconcile::plan::plan;
use wiremesh::reconcile::{Op, OwnedState};

use crate::util::netns::{Netns, veth};

const PREFIX: &str = "wm-nc";
const CNI_BIN: &str = "/usr/lib/cni";

/// Panic with a clear message unless this process can run these tests.
fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        == Some("0");
    assert!(root, "these tests must run as root");
    for tool in [
        "/usr/sbin/nft",
        "/usr/sbin/iptables-restore",
        "/usr/sbin/ip6tables-restore",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/portmap",
        "/usr/bin/ping",
    ] {
        assert!(
            Path::new(tool).exists(),
            "missing {tool}: apt-get install -y nftables iptables containernetworking-plugins iputils-ping"
        );
    }
}

fn nets(s: &[&str]) -> Vec<IpNetwork> {
    s.iter().map(|x| x.parse().expect("test CIDR")).collect()
}

/// A desired state that differs from nothing but its masquerade lists.
fn desired(m: &Masquerade) -> DesiredState {
    DesiredState {
        node: "n1".into(),
        leader: true,
        interface: WgInterface {
            name: "wiremesh0".into(),
            listen_port: 51820,
            address: None,
            mtu: None,
            underlay: None,
            mss_clamp: false,
        },
        peers: vec![],
        routes: vec![],
        rules: vec![],
        bridge: None,
        masquerade: m.clone(),
    }
}

/// The masquerade operations the planner emits for `want` when the firewall reads `have`.
fn nat_ops(want: &Masquerade, have: Option<Masquerade>) -> Vec<Op> {
    let actual = OwnedState {
        masquerade: have,
        ..OwnedState::default()
    };
    plan(&desired(want), &actual, WgKey([1; 32]))
        .into_iter()
        .filter(|o| matches!(o, Op::SetMasquerade(_) | Op::DelMasquerade))
        .collect()
}

/// `nft list ruleset` with the block of `table inet wiremesh` cut out.
fn ruleset_without_ours(ns: &Netns) -> String {
    let text = ns.exec(&["nft", "list", "ruleset"], None);
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with("table inet wiremesh ") {
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

/// `iptables-save` and `ip6tables-save` without comments and without any line naming our chain.
fn iptables_without_ours(ns: &Netns) -> String {
    let mut out = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        for line in ns.exec(&[tool], None).lines() {
            if !line.starts_with('#') && !line.contains(IPT_CHAIN) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Foreign firewall state a host might have: two native nft tables and iptables-nft rules in
/// the nat and filter tables of both families.
fn add_foreign_rules(ns: &Netns) {
    let foreign = "\
table ip foreign {
\tset blocked {
\t\ttype ipv4_addr
\t\telements = { 192.0.2.9 }
\t}
\tchain guard {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr @blocked counter drop
\t}
}
table inet othernat {
\tchain post {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.9.0.0/16 oifname \"eth9\" masquerade
\t}
}
";
    ns.exec(&["nft", "-f", "-"], Some(foreign));
    let x = |args: &[&str]| ns.exec(args, None);
    x(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "10.8.0.0/16",
        "-j",
        "MASQUERADE",
    ]);
    x(&[
        "iptables",
        "-A",
        "FORWARD",
        "-s",
        "10.7.0.0/16",
        "-j",
        "DROP",
    ]);
    x(&[
        "ip6tables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "fd07::/64",
        "-j",
        "MASQUERADE",
    ]);
}

/// Packets counted by the named counter `inet TABLE NAME`.
fn named_counter(ns: &Netns, table: &str, name: &str) -> u64 {
    let out = ns.exec(&["nft", "-j", "list", "counter", "inet", table, name], None);
    let v: Value = serde_json::from_str(&out).expect("nft JSON");
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|i| i.get("counter")))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {out}"))
}

/// Packets counted by the rule of our chain that matches set `@SET`.
fn our_rule_counter(ns: &Netns, set: &str) -> u64 {
    let out = ns.exec(&["nft", "-j", "list", "table", "inet", "wiremesh"], None);
    let v: Value = serde_json::from_str(&out).expect("nft JSON");
    let want = format!("@{set}");
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .find(|r| r["expr"][0]["match"]["right"] == want.as_str())
        .and_then(|r| r["expr"][1]["counter"]["packets"].as_u64())
        .unwrap_or_else(|| panic!("no rule for {set} in {out}"))
}

/// An echo-request counter per family in `ns`: packets whose source is `node` (v4 / v6) and
/// packets from any other source. Lets a test see which source address a host received.
fn add_observer(ns: &Netns, node4: &str, node6: &str) {
    let table = format!(
        "\
table inet seen {{
\tcounter node4 {{ }}
\tcounter other4 {{ }}
\tcounter node6 {{ }}
\tcounter other6 {{ }}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tip saddr {node4} icmp type echo-request counter name \"node4\"
\t\tip saddr != {node4} icmp type echo-request counter name \"other4\"
\t\tip6 saddr {node6} icmpv6 type echo-request counter name \"node6\"
\t\tip6 saddr != {node6} icmpv6 type echo-request counter name \"other6\"
\t}}
}}
"
    );
    ns.exec(&["nft", "-f", "-"], Some(&table));
}

/// `[node4, other4, node6, other6]` of an observer.
fn seen(ns: &Netns) -> [u64; 4] {
    ["node4", "other4", "node6", "other6"].map(|c| named_counter(ns, "seen", c))
}

/// pod ─ node ─ outside, and node ─ peer. The outside host has no route back to the pod network
/// or the peer; the peer routes everything through the node (so it is reachable unmasqueraded).
struct Lab {
    pod: Netns,
    node: Netns,
    outside: Netns,
    peer: Netns,
}

fn lab() -> Lab {
    let lab = Lab {
        pod: Netns::new(PREFIX),
        node: Netns::new(PREFIX),
        outside: Netns::new(PREFIX),
        peer: Netns::new(PREFIX),
    };
    veth(
        &lab.pod,
        "eth0",
        &["10.200.11.2/24", "fd00:11::2/64"],
        &lab.node,
        "pod0",
        &["10.200.11.1/24", "fd00:11::1/64"],
    );
    veth(
        &lab.node,
        "eth0",
        &["10.200.0.1/24", "fd00:200::1/64"],
        &lab.outside,
        "eth0",
        &["10.200.0.3/24", "fd00:200::3/64"],
    );
    veth(
        &lab.node,
        "peer0",
        &["10.200.5.1/24", "fd00:5::1/64"],
        &lab.peer,
        "eth0",
        &["10.200.5.2/24", "fd00:5::2/64"],
    );
    for (ns, gw4, gw6) in [
        (&lab.pod, "10.200.11.1", "fd00:11::1"),
        (&lab.peer, "10.200.5.1", "fd00:5::1"),
    ] {
        ns.ip(&["route", "add", "default", "via", gw4]);
        ns.ip(&["-6", "route", "add", "default", "via", gw6]);
    }
    lab.node.sysctl("net.ipv4.ip_forward=1");
    lab.node.sysctl("net.ipv6.conf.all.forwarding=1");
    add_observer(&lab.outside, "10.200.0.1", "fd00:200::1");
    add_observer(&lab.peer, "10.200.5.1", "fd00:5::1");
    lab
}

/// Masquerade pod traffic and traffic to the outside host; never traffic to the peer.
fn lab_masquerade() -> Masquerade {
    Masquerade {
        sources: nets(&["10.200.11.0/24", "fd00:11::/64"]),
        destinations: nets(&["10.200.0.3/32", "fd00:200::3/128"]),
        exempt: nets(&["10.200.5.0/24", "fd00:5::/64"]),
    }
}

/// Sources reach a host without a return route only once masqueraded, and that host sees the
/// node's address; destinations are masqueraded whatever the source; exempt destinations see
/// the pod's own address although the pod is a source.
async fn masquerade_really_works(mode: FirewallMode) {
    require_root_and_tools();
    let lab = lab();
    // The lab is sound: the peer answers the pod directly.
    assert!(lab.pod.ping("10.200.5.2", 3), "pod cannot reach the peer");
    assert!(
        lab.pod.ping("fd00:5::2", 3),
        "pod cannot reach the peer (v6)"
    );
    for (from, to) in [
        (&lab.pod, "10.200.0.3"),
        (&lab.pod, "fd00:200::3"),
        (&lab.peer, "10.200.0.3"),
        (&lab.peer, "fd00:200::3"),
    ] {
        assert!(
            !from.ping_once(to, 1),
            "{to} answered {} before masquerading",
            from.name
        );
    }
    let outside_before = seen(&lab.outside);
    assert_eq!(outside_before[0] + outside_before[2], 0);
    assert!(outside_before[1] > 0 && outside_before[3] > 0);

    let mut fw = Firewall::in_netns(mode, &lab.node.name).await;
    assert_eq!(fw.mode(), mode);
    fw.apply(&lab_masquerade()).await.expect("apply");

    for (from, to) in [
        (&lab.pod, "10.200.0.3"),
        (&lab.pod, "fd00:200::3"),
        (&lab.peer, "10.200.0.3"),
        (&lab.peer, "fd00:200::3"),
    ] {
        assert!(from.ping(to, 3), "{to} does not answer {}", from.name);
    }
    let outside_after = seen(&lab.outside);
    assert!(
        outside_after[0] > 0 && outside_after[2] > 0,
        "{outside_after:?}"
    );
    assert_eq!(
        [outside_after[1], outside_after[3]],
        [outside_before[1], outside_before[3]],
        "after masquerading, every request reached outside from the node's address"
    );

    let peer_before = seen(&lab.peer);
    assert!(lab.pod.ping("10.200.5.2", 3));
    assert!(lab.pod.ping("fd00:5::2", 3));
    let peer_after = seen(&lab.peer);
    assert_eq!(
        [peer_after[0], peer_after[2]],
        [0, 0],
        "the exempt peer saw the node's address"
    );
    assert!(peer_after[1] > peer_before[1] && peer_after[3] > peer_before[3]);

    if mode == FirewallMode::Nftables {
        for set in [
            "exempt4",
            "exempt6",
            "sources4",
            "sources6",
            "destinations4",
        ] {
            assert!(
                our_rule_counter(&lab.node, set) > 0,
                "rule @{set} counted nothing"
            );
        }
    }
    fw.delete().await.expect("delete");
    assert_eq!(fw.read().await.expect("read"), None);
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn nft_masquerade_lets_pods_out_and_leaves_exempt_traffic_alone() {
    masquerade_really_works(FirewallMode::Nftables).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn iptables_masquerade_lets_pods_out_and_leaves_exempt_traffic_alone() {
    masquerade_really_works(FirewallMode::Iptables).await;
}

/// podA ─ nodeA ═ "wiremesh0" (a veth of MTU 1280: the tunnel, smaller than the pods think) ═
/// nodeB ─ podB, pods at MTU 1500, and both nodes dropping the ICMP "fragmentation needed" /
/// "packet too big" they would send back: the path MTU can never be learnt, as behind a
/// firewall that drops ICMP.
struct SmallPath {
    pod_a: Netns,
    node_a: Netns,
    node_b: Netns,
    pod_b: Netns,
}

/// The MTU of the stand-in tunnel between the two nodes.
const TUNNEL_MTU: &str = "1280";

fn small_path() -> SmallPath {
    let p = SmallPath {
        pod_a: Netns::new(PREFIX),
        node_a: Netns::new(PREFIX),
        node_b: Netns::new(PREFIX),
        pod_b: Netns::new(PREFIX),
    };
    veth(
        &p.pod_a,
        "eth0",
        &["10.210.1.2/24", "fd00:211::2/64"],
        &p.node_a,
        "pod0",
        &["10.210.1.1/24", "fd00:211::1/64"],
    );
    veth(
        &p.node_a,
        "wiremesh0",
        &["10.210.9.1/30", "fd00:219::1/64"],
        &p.node_b,
        "wiremesh0",
        &["10.210.9.2/30", "fd00:219::2/64"],
    );
    veth(
        &p.node_b,
        "pod0",
        &["10.210.2.1/24", "fd00:212::1/64"],
        &p.pod_b,
        "eth0",
        &["10.210.2.2/24", "fd00:212::2/64"],
    );
    for n in [&p.node_a, &p.node_b] {
        n.ip(&["link", "set", "wiremesh0", "mtu", TUNNEL_MTU]);
        n.sysctl("net.ipv4.ip_forward=1");
        n.sysctl("net.ipv6.conf.all.forwarding=1");
        n.exec(
            &["nft", "-f", "-"],
            Some(
                "table inet icmpblock {\n\
                 \tchain out {\n\
                 \t\ttype filter hook output priority filter; policy accept;\n\
                 \t\ticmp type destination-unreachable icmp code frag-needed counter drop\n\
                 \t\ticmpv6 type packet-too-big counter drop\n\
                 \t}\n\
                 }\n",
            ),
        );
    }
    for (pod, gw4, gw6) in [
        (&p.pod_a, "10.210.1.1", "fd00:211::1"),
        (&p.pod_b, "10.210.2.1", "fd00:212::1"),
    ] {
        pod.ip(&["route", "add", "default", "via", gw4]);
        pod.ip(&["-6", "route", "add", "default", "via", gw6]);
    }
    for (node, dst4, via4, dst6, via6) in [
        (
            &p.node_a,
            "10.210.2.0/24",
            "10.210.9.2",
            "fd00:212::/64",
            "fd00:219::2",
        ),
        (
            &p.node_b,
            "10.210.1.0/24",
            "10.210.9.1",
            "fd00:211::/64",
            "fd00:219::1",
        ),
    ] {
        node.ip(&["route", "add", dst4, "via", via4]);
        node.ip(&["-6", "route", "add", dst6, "via", via6]);
    }
    // What podB receives: SYNs with the MSS clamped to the tunnel (1280 - 40 - TCP 20 over
    // IPv4, 1280 - 60 over IPv6), or as the pods' MTU of 1500 makes them.
    p.pod_b.exec(
        &["nft", "-f", "-"],
        Some(
            "table inet seen {\n\
             \tcounter clamped4 { }\n\
             \tcounter clamped6 { }\n\
             \tcounter unclamped { }\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\ttcp flags syn / syn,ack meta nfproto ipv4 tcp option maxseg size 1240 counter name \"clamped4\"\n\
             \t\ttcp flags syn / syn,ack meta nfproto ipv6 tcp option maxseg size 1220 counter name \"clamped6\"\n\
             \t\ttcp flags syn / syn,ack tcp option maxseg size 1440-1460 counter name \"unclamped\"\n\
             \t}\n\
             }\n",
        ),
    );
    p
}

/// One bulk transfer from podA to podB's `addr`.
fn bulk_a_to_b(p: &SmallPath, addr: &str) -> wiremesh::lab::bulk::Transfer {
    let pair = (
        p.pod_a.name.clone(),
        p.pod_b.name.clone(),
        addr.parse().unwrap(),
    );
    wiremesh::lab::bulk::transfer_all(&[pair]).remove(0)
}

/// `[clamped4, clamped6, unclamped]` SYNs seen by podB.
fn syns_seen(p: &SmallPath) -> [u64; 3] {
    ["clamped4", "clamped6", "unclamped"].map(|c| named_counter(&p.pod_b, "seen", c))
}

/// Over a path smaller than the pods' MTU whose ICMP is dropped, bulk TCP stalls; with
/// wiremesh's clamp on both nodes (the planner's `SetMssClamp`) the SYNs reach the other pod
/// with the MSS of the tunnel, the same transfer completes over IPv4 and IPv6, the clamp reads
/// back (the planner then does nothing), and deleting it leaves the other tables alone.
async fn mss_clamp_keeps_tcp_alive_on_a_small_path(mode: FirewallMode) {
    require_root_and_tools();
    let p = small_path();
    assert!(p.pod_a.ping("10.210.2.2", 3), "small packets pass");
    assert!(p.pod_a.ping("fd00:212::2", 3), "small packets pass (v6)");

    let stalled = bulk_a_to_b(&p, "10.210.2.2");
    assert!(
        !stalled.ok(),
        "without the clamp, full-size segments must be lost here: {}",
        stalled.line()
    );
    println!("without the clamp: {}", stalled.line());
    let [c4, c6, unclamped] = syns_seen(&p);
    assert_eq!((c4, c6), (0, 0));
    assert!(unclamped >= 1, "podB saw the unclamped SYN");

    let nodes = [&p.node_a, &p.node_b];
    let mut fws = Vec::new();
    for n in nodes {
        let fw = Firewall::in_netns(mode, &n.name).await;
        assert_eq!(fw.read_clamp().await.expect("read"), None);
        fw.apply_clamp("wiremesh0").await.expect("apply clamp");
        let read = fw.read_clamp().await.expect("read");
        assert_eq!(read.as_deref(), Some("wiremesh0"));
        // Read back, the planner leaves it alone.
        let mut d = desired(&Masquerade::default());
        d.interface.mss_clamp = true;
        let actual = OwnedState {
            mss_clamp: read,
            ..OwnedState::default()
        };
        let ops = plan(&d, &actual, WgKey([1; 32]));
        assert!(!ops.iter().any(|o| o.kind() == "mss-clamp"), "{ops:?}");
        fws.push(fw);
    }
    for addr in ["10.210.2.2", "fd00:212::2"] {
        let t = bulk_a_to_b(&p, addr);
        assert!(t.ok(), "with the clamp: {}", t.line());
        println!("with the clamp: {}", t.line());
    }
    let [c4, c6, _] = syns_seen(&p);
    assert!(
        c4 >= 1 && c6 >= 1,
        "SYNs reached podB clamped: {c4} v4, {c6} v6"
    );

    let foreign_before = p
        .node_a
        .exec(&["nft", "list", "table", "inet", "icmpblock"], None);
    for fw in &fws {
        fw.delete_clamp().await.expect("delete clamp");
        fw.delete_clamp()
            .await
            .expect("delete again: nothing to do");
        assert_eq!(fw.read_clamp().await.expect("read"), None);
    }
    let ruleset = p.node_a.exec(&["nft", "list", "ruleset"], None);
    assert!(!ruleset.contains("wiremesh_mss"), "{ruleset}");
    for tool in ["iptables-save", "ip6tables-save"] {
        let saved = p.node_a.exec(&[tool], None);
        assert!(!saved.contains("WIREMESH-MSS"), "{saved}");
    }
    let foreign_after = p
        .node_a
        .exec(&["nft", "list", "table", "inet", "icmpblock"], None);
    let strip = |t: &str| -> String {
        t.lines()
            .map(|l| l.split(" counter").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&foreign_before), strip(&foreign_after));
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn nft_mss_clamp_keeps_tcp_alive_on_a_small_path_without_icmp() {
    mss_clamp_keeps_tcp_alive_on_a_small_path(FirewallMode::Nftables).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn iptables_mss_clamp_keeps_tcp_alive_on_a_small_path_without_icmp() {
    mss_clamp_keeps_tcp_alive_on_a_small_path(FirewallMode::Iptables).await;
}

/// The handle of wiremesh's table: a new one whenever the table is replaced.
fn our_table_handle(node: &Netns) -> String {
    let listing = node.exec(&["nft", "-a", "list", "table", "inet", "wiremesh"], None);
    let first = listing.lines().next().unwrap_or_default();
    first
        .split("# handle ")
        .nth(1)
        .unwrap_or_else(|| panic!("no handle in {first:?}"))
        .trim()
        .to_owned()
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn nft_joins_add_elements_in_place_and_a_leave_replaces_the_table() {
    require_root_and_tools();
    let node = Netns::new(PREFIX);
    let mut fw = Firewall::in_netns(FirewallMode::Nftables, &node.name).await;
    let first = lab_masquerade();
    fw.apply(&first).await.expect("apply");
    let handle = our_table_handle(&node);
    let fresh = || Firewall::in_netns(FirewallMode::Nftables, &node.name);

    // A join: an exemption and a source more. Added in place.
    let mut second = first.clone();
    second.exempt.push("10.200.6.0/24".parse().expect("CIDR"));
    second.sources.push("10.200.12.0/24".parse().expect("CIDR"));
    fw.apply(&second).await.expect("change");
    assert_eq!(
        fresh().await.read().await.expect("read"),
        Some(canonical(&second)),
        "the kernel holds exactly the new lists"
    );
    assert_eq!(
        our_table_handle(&node),
        handle,
        "the table was changed in place, not replaced"
    );

    // Someone deletes an element by hand; a read tells, and the next join adds its element and
    // puts the missing one back, still in place.
    node.exec(
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "wiremesh",
            "exempt4",
            "{",
            "10.200.6.0/24",
            "}",
        ],
        None,
    );
    let mut by_hand = second.clone();
    by_hand.exempt.retain(|n| n.to_string() != "10.200.6.0/24");
    assert_eq!(fw.read().await.expect("read"), Some(canonical(&by_hand)));
    let mut third = second.clone();
    third.exempt.push("10.200.8.0/24".parse().expect("CIDR"));
    fw.apply(&third)
        .await
        .expect("change after a change by hand");
    assert_eq!(
        fresh().await.read().await.expect("read"),
        Some(canonical(&third))
    );
    assert_eq!(our_table_handle(&node), handle, "still in place");

    // A leave deletes an exemption: the table is replaced whole, and ends as wanted.
    fw.apply(&second).await.expect("a leave");
    assert_eq!(
        fresh().await.read().await.expect("read"),
        Some(canonical(&second))
    );
    assert_ne!(our_table_handle(&node), handle, "the table was replaced");

    // A read makes the lists known again, so the next change is in place as well.
    let mut reader = fresh().await;
    assert_eq!(reader.read().await.expect("read"), Some(canonical(&second)));
    let handle = our_table_handle(&node);
    reader.apply(&third).await.expect("change after a read");
    assert_eq!(
        fresh().await.read().await.expect("read"),
        Some(canonical(&third))
    );
    assert_eq!(our_table_handle(&node), handle);
    reader.delete().await.expect("delete");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn nft_apply_and_delete_leave_foreign_tables_and_iptables_rules_byte_for_byte() {
    require_root_and_tools();
    let node = Netns::new(PREFIX);
    add_foreign_rules(&node);
    let full_before = node.exec(&["nft", "list", "ruleset"], None);
    let ipt_before = iptables_without_ours(&node);
    assert!(full_before.contains("table ip foreign") && full_before.contains("10.8.0.0/16"));

    let mut fw = Firewall::in_netns(FirewallMode::Nftables, &node.name).await;
    let m = lab_masquerade();
    let mut other = m.clone();
    other.sources.push("10.201.0.0/16".parse().expect("CIDR"));
    for (step, value) in [("apply", &m), ("re-apply", &m), ("change", &other)] {
        fw.apply(value).await.expect(step);
        let now = node.exec(&["nft", "list", "ruleset"], None);
        assert!(now.contains("table inet wiremesh {"), "{step}: no table");
        assert_eq!(ruleset_without_ours(&node), full_before, "after {step}");
        assert_eq!(iptables_without_ours(&node), ipt_before, "after {step}");
    }
    fw.delete().await.expect("delete");
    assert_eq!(node.exec(&["nft", "list", "ruleset"], None), full_before);
    fw.delete()
        .await
        .expect("deleting an absent table succeeds");
    assert_eq!(node.exec(&["nft", "list", "ruleset"], None), full_before);
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn nft_read_back_equals_applied_and_the_planner_then_does_nothing() {
    require_root_and_tools();
    let node = Netns::new(PREFIX);
    let mut fw = Firewall::in_netns(FirewallMode::Auto, &node.name).await;
    assert_eq!(fw.mode(), FirewallMode::Nftables, "auto picks nft here");
    assert_eq!(fw.read().await.expect("read"), None);
    assert_eq!(fw.read_state().await.expect("read"), TableState::Absent);

    // Canonical lists (sorted, disjoint, v4 first) read back exactly, even by a new handle.
    let m = Masquerade {
        sources: nets(&["10.42.1.0/24", "10.200.11.7/32", "fd42:1::/64"]),
        destinations: nets(&["192.168.7.0/24"]),
        exempt: nets(&["10.4.0.0/16", "10.42.0.0/15", "0.0.0.0/32", "fd42::/48"]),
    };
    let m = Masquerade {
        exempt: canonical(&m).exempt,
        ..m
    };
    assert_eq!(canonical(&m), m);
    fw.apply(&m).await.expect("apply");
    let fresh = Firewall::in_netns(FirewallMode::Nftables, &node.name).await;
    assert_eq!(fresh.read().await.expect("read"), Some(m.clone()));
    assert_eq!(nat_ops(&m, fresh.read().await.expect("read")), vec![]);
    fw.apply(&m).await.expect("re-apply");
    assert_eq!(nat_ops(&m, fw.read().await.expect("read")), vec![]);

    // Unsorted, overlapping, host bits set: the kernel holds the canonical form, and the planner
    // compares the canonical form of the desired value with it, so there is no churn.
    let messy = Masquerade {
        sources: nets(&["fd42:1::9/64", "10.42.1.0/24", "10.42.1.128/25"]),
        destinations: vec![],
        exempt: nets(&["10.43.0.0/16", "10.42.0.0/16", "10.42.3.1/24"]),
    };
    fw.apply(&messy).await.expect("apply messy");
    let fresh = Firewall::in_netns(FirewallMode::Nftables, &node.name).await;
    assert_eq!(fresh.read().await.expect("read"), Some(canonical(&messy)));
    assert_eq!(nat_ops(&messy, fresh.read().await.expect("read")), vec![]);
    assert_eq!(fw.read().await.expect("read"), Some(canonical(&messy)));
    assert_eq!(nat_ops(&messy, fw.read().await.expect("read")), vec![]);

    // Someone removes an element: the read differs and the planner rewrites the table.
    node.exec(
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "wiremesh",
            "sources4",
            "{ 10.42.1.0/24 }",
        ],
        None,
    );
    let have = fw.read().await.expect("read");
    assert_eq!(
        have.as_ref().map(|h| h.sources.clone()),
        Some(nets(&["fd42:1::/64"]))
    );
    assert_eq!(
        nat_ops(&messy, have),
        vec![Op::SetMasquerade(Box::new(canonical(&messy)))]
    );
    fw.apply(&messy).await.expect("repair");
    assert_eq!(nat_ops(&messy, fw.read().await.expect("read")), vec![]);

    // Someone adds a rule: the table is not ours any more, and is replaced.
    node.exec(
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "wiremesh",
            "postrouting",
            "counter",
            "accept",
        ],
        None,
    );
    assert!(matches!(
        fw.read_state().await.expect("read"),
        TableState::Unexpected(_)
    ));
    assert_eq!(
        nat_ops(&messy, fw.read().await.expect("read")),
        vec![Op::SetMasquerade(Box::new(canonical(&messy)))]
    );
    fw.apply(&messy).await.expect("repair");
    assert_eq!(nat_ops(&messy, fw.read().await.expect("read")), vec![]);

    // Nothing to masquerade any more: the planner deletes the table, then is quiet.
    let none = Masquerade::default();
    assert_eq!(
        nat_ops(&none, fw.read().await.expect("read")),
        vec![Op::DelMasquerade]
    );
    fw.delete().await.expect("delete");
    assert_eq!(fw.read().await.expect("read"), None);
    assert_eq!(nat_ops(&none, None), vec![]);
}

#[tokio::test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
async fn iptables_round_trip_leaves_foreign_rules_alone() {
    require_root_and_tools();
    let node = Netns::new(PREFIX);
    add_foreign_rules(&node);
    let full_before = node.exec(&["nft", "list", "ruleset"], None);
    let ipt_before = iptables_without_ours(&node);

    let mut fw = Firewall::in_netns(FirewallMode::Iptables, &node.name).await;
    assert_eq!(fw.read().await.expect("read"), None);
    let m = lab_masquerade();
    for step in ["apply", "re-apply"] {
        fw.apply(&m).await.expect(step);
        assert_eq!(iptables_without_ours(&node), ipt_before, "after {step}");
        let fresh = Firewall::in_netns(FirewallMode::Iptables, &node.name).await;
        assert_eq!(fresh.read().await.expect("read"), Some(canonical(&m)));
        assert_eq!(fw.read().await.expect("read"), Some(m.clone()));
        assert_eq!(nat_ops(&m, fw.read().await.expect("read")), vec![]);
        for tool in ["iptables-save", "ip6tables-save"] {
            let jumps = node
                .exec(&[tool, "-t", "nat"], None)
                .lines()
                .filter(|l| l.starts_with("-A POSTROUTING") && l.ends_with("-j WIREMESH-NAT"))
                .count();
            assert_eq!(jumps, 1, "{tool} after {step}");
        }
    }
    // The foreign nft tables are untouched too.
    let now = node.exec(&["nft", "list", "ruleset"], None);
    for table in ["table ip foreign {", "table inet othernat {"] {
        let block = |t: &str| {
            t.split(table)
                .nth(1)
                .and_then(|b| b.split("\n}").next())
                .map(str::to_owned)
        };
        assert_eq!(block(&now), block(&full_before), "{table}");
    }

    // A family without networks loses its chain.
    let v4_only = Masquerade {
        sources: nets(&["10.200.11.0/24"]),
        destinations: vec![],
        exempt: nets(&["10.200.5.0/24"]),
    };
    fw.apply(&v4_only).await.expect("apply v4 only");
    assert!(
        !node
            .exec(&["ip6tables-save", "-t", "nat"], None)
            .contains(IPT_CHAIN)
    );
    let fresh = Firewall::in_netns(FirewallMode::Iptables, &node.name).await;
    assert_eq!(fresh.read().await.expect("read"), Some(v4_only.clone()));
    assert_eq!(iptables_without_ours(&node), ipt_before);

    // Someone removes our jump: the chain no longer works, and is rewritten.
    node.exec(
        &[
            "iptables",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "wiremesh: masquerade",
            "-j",
            IPT_CHAIN,
        ],
        None,
    );
    assert!(matches!(
        fw.read_state().await.expect("read"),
        TableState::Unexpected(_)
    ));
    assert_eq!(
        nat_ops(&v4_only, fw.read().await.expect("read")),
        vec![Op::SetMasquerade(Box::new(v4_only.clone()))]
    );
    fw.apply(&v4_only).await.expect("repair");
    assert_eq!(nat_ops(&v4_only, fw.read().await.expect("read")), vec![]);

    fw.delete().await.expect("delete");
    assert_eq!(fw.read().await.expect("read"), None);
    assert_eq!(node.exec(&["nft", "list", "ruleset"], None), full_before);
    assert_eq!(iptables_without_ours(&node), ipt_before);
    fw.delete().await.expect("deleting absent chains succeeds");
}

/// Run one CNI plugin inside `node` as a container runtime would; returns its result.
fn cni_plugin(node: &Netns, command: &str, pod: &Netns, id: &str, conf: &Value) -> Value {
    let plugin = conf["type"].as_str().expect("plugin type");
    let out = node.exec(
        &[
            "env",
            &format!("CNI_COMMAND={command}"),
            &format!("CNI_CONTAINERID={id}"),
            &format!("CNI_NETNS={}", pod.path()),
            "CNI_IFNAME=eth0",
            &format!("CNI_PATH={CNI_BIN}"),
            &format!("{CNI_BIN}/{plugin}"),
        ],
        Some(&conf.to_string()),
    );
    if out.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{plugin} {command}: {e}: {out}"))
    }
}

/// The conflist's plugins as the runtime hands them out: `name` and `cniVersion` copied in,
/// IPAM state under `data_dir`, port mappings for plugins that declare the capability.
fn plugin_confs(list: &Value, data_dir: &Path) -> Vec<Value> {
    let plugins = list["plugins"].as_array().expect("plugins");
    plugins
        .iter()
        .map(|p| {
            let mut conf = p.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            if conf.get("ipam").is_some() {
                conf["ipam"]["dataDir"] = json!(data_dir.display().to_string());
            }
            if conf["capabilities"]["portMappings"] == true {
                conf["runtimeConfig"] = json!({"portMappings": [
                    {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}
                ]});
            }
            conf
        })
        .collect()
}

/// Addresses `host-local` holds as reserved: one file per address in its network's directory.
fn reserved(dir: &Path) -> BTreeSet<IpAddr> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root, nftables, CNI plugins"
)]
fn cni_conflist_attaches_a_pod_through_the_real_plugins() {
    require_root_and_tools();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let path = tmp.path().join("net.d/10-wiremesh.conflist");
    let cidrs = nets(&["10.200.21.0/24", "fd00:21::/64"]);
    let net_name = format!("wm-nc-{}", std::process::id());
    let text = render_conflist("wmcni0", &cidrs, 1420, &net_name);
    assert!(write_conflist(&path, &text).expect("write"));
    assert!(!write_conflist(&path, &text).expect("rewrite"), "unchanged");
    assert_eq!(
        read_conflist_cidrs(&path).expect("read"),
        Some(cidrs.clone())
    );

    let node = Netns::new(PREFIX);
    let pod = Netns::new(PREFIX);
    let id = format!("{}-pod", pod.name);
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read file")).expect("JSON");
    let data_dir = tmp.path().join("ipam");
    let confs = plugin_confs(&list, &data_dir);
    assert_eq!(
        confs.iter().map(|c| c["type"].as_str()).collect::<Vec<_>>(),
        [Some("bridge"), Some("portmap")]
    );

    // ADD along the chain, each plugin getting the previous result.
    let mut prev = Value::Null;
    for conf in &confs {
        let mut conf = conf.clone();
        if !prev.is_null() {
            conf["prevResult"] = prev.clone();
        }
        prev = cni_plugin(&node, "ADD", &pod, &id, &conf);
    }
    let result = prev;
    let got: Vec<IpNetwork> = result["ips"]
        .as_array()
        .expect("ips in result")
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .expect("address")
                .parse()
                .expect("CIDR")
        })
        .collect();
    assert_eq!(got.len(), 2, "{result}");
    for (addr, cidr) in got.iter().zip(&cidrs) {
        assert!(
            cidr.contains(addr.ip()) && addr.prefix() == cidr.prefix(),
            "{addr}"
        );
    }
    let pod_addrs = pod.ip(&["addr", "show", "dev", "eth0"]);
    for addr in &got {
        assert!(
            pod_addrs.contains(&addr.to_string()),
            "{addr} not on eth0: {pod_addrs}"
        );
    }
    assert!(pod_addrs.contains("mtu 1420"), "{pod_addrs}");
    let routes = pod.ip(&["route", "show", "default"]);
    assert!(routes.contains("via 10.200.21.1"), "{routes}");
    let routes6 = pod.ip(&["-6", "route", "show", "default"]);
    assert!(routes6.contains("via fd00:21::1"), "{routes6}");
    let bridge = node.ip(&["addr", "show", "dev", "wmcni0"]);
    assert!(bridge.contains("10.200.21.1/24"), "{bridge}");
    assert!(pod.ping("10.200.21.1", 3), "pod cannot ping its gateway");
    assert!(pod.ping("fd00:21::1", 5), "pod cannot ping its v6 gateway");
    let held = reserved(&data_dir.join(&net_name));
    assert_eq!(held, got.iter().map(|a| a.ip()).collect());
    let nat = node.exec(&["iptables-save", "-t", "nat"], None);
    let pod4 = got[0].ip().to_string();
    assert!(
        nat.contains("--dport 18080") && nat.contains(&format!("{pod4}:80")),
        "portmap did not map the port: {nat}"
    );

    // DEL in reverse order, each plugin getting the final result.
    for conf in confs.iter().rev() {
        let mut conf = conf.clone();
        conf["prevResult"] = result.clone();
        cni_plugin(&node, "DEL", &pod, &id, &conf);
    }
    assert!(
        !pod.try_exec(&["ip", "link", "show", "eth0"])
            .status
            .success(),
        "eth0 is still in the pod"
    );
    assert_eq!(reserved(&data_dir.join(&net_name)), BTreeSet::new());
    let nat = node.exec(&["iptables-save", "-t", "nat"], None);
    assert!(!nat.contains("--dport 18080"), "port mapping left: {nat}");
}
