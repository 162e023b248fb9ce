//! Table-driven tests of the engine's rules, one claim per test.

use super::*;
use crate::desired::{ENCAP_TABLE, MAIN_TABLE, Route, RouteDev};

fn key(b: u8) -> WgKey {
    WgKey([b; 32])
}

fn node(
    name: &str,
    loc: &str,
    k: u8,
    endpoint: &str,
    internal: Option<&str>,
    pod: &str,
) -> MeshNode {
    let mut n = MeshNode::new(name);
    n.location = loc.into();
    n.key = Some(key(k));
    n.endpoint = Some(endpoint.parse().unwrap());
    n.internal_ip = internal.map(|i| i.parse().unwrap());
    n.pod_cidrs = vec![pod.parse().unwrap()];
    n
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn opts(g: Granularity) -> MeshOptions {
    MeshOptions {
        granularity: g,
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    }
}

fn name(s: &str) -> NodeName {
    NodeName(s.into())
}

/// Kilo's test cluster shape: a and d in location 1 (d without internal IP), b and c in 2.
fn kilo_cluster() -> Vec<MeshNode> {
    let mut b = node(
        "b",
        "2",
        2,
        "10.1.0.2:51820",
        Some("192.168.0.1/32"),
        "10.2.2.0/24",
    );
    b.allowed_location_ips = vec![net("192.168.178.3/32")];
    vec![
        node(
            "a",
            "1",
            1,
            "10.1.0.1:51820",
            Some("192.168.0.1/32"),
            "10.2.1.0/24",
        ),
        b,
        node(
            "c",
            "2",
            3,
            "10.1.0.3:51820",
            Some("192.168.0.2/32"),
            "10.2.3.0/24",
        ),
        node("d", "1", 4, "10.1.0.4:51820", None, "10.2.4.0/24"),
    ]
}

#[test]
fn leader_is_first_public_volunteer_then_volunteer_then_public_then_first() {
    let private = |n: &str, lead: bool| {
        let mut m = node(n, "x", 1, "10.0.0.1:1", Some("10.0.0.1/24"), "10.2.0.0/24");
        m.leader = lead;
        m
    };
    let public = |n: &str, lead: bool| {
        let mut m = node(n, "x", 1, "8.8.8.8:1", Some("10.0.0.1/24"), "10.2.0.0/24");
        m.leader = lead;
        m
    };
    let cases: Vec<(Vec<MeshNode>, usize)> = vec![
        (vec![private("a", true), public("b", true)], 1),
        (
            vec![private("a", false), private("b", true), public("c", false)],
            1,
        ),
        (vec![private("a", false), public("b", false)], 1),
        (vec![private("a", false), private("b", false)], 0),
        (vec![public("a", false), public("b", false)], 0),
    ];
    for (nodes, want) in cases {
        let refs: Vec<&MeshNode> = nodes.iter().collect();
        assert_eq!(
            find_leader(&refs),
            want,
            "{:?}",
            nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
        );
    }
}

/// A location of three wiremesh nodes: a (volunteer, public), b (public), c (private).
fn failover_location() -> Vec<MeshNode> {
    let mut a = node(
        "a",
        "x",
        1,
        "8.8.8.1:51820",
        Some("10.0.0.1/24"),
        "10.2.1.0/24",
    );
    a.leader = true;
    let b = node(
        "b",
        "x",
        2,
        "8.8.8.2:51820",
        Some("10.0.0.2/24"),
        "10.2.2.0/24",
    );
    let c = node(
        "c",
        "x",
        3,
        "10.0.0.3:51820",
        Some("10.0.0.3/24"),
        "10.2.3.0/24",
    );
    let d = node(
        "d",
        "y",
        4,
        "8.8.8.4:51820",
        Some("10.9.0.4/24"),
        "10.2.4.0/24",
    );
    let mut nodes = vec![a, b, c, d];
    for n in &mut nodes {
        n.forwarding_failed = Some(Default::default());
    }
    nodes
}

fn report(n: &mut MeshNode, names: &[&str]) {
    n.forwarding_failed = Some(names.iter().map(|s| name(s)).collect());
}

fn leader_of(nodes: &[MeshNode], node: &str) -> String {
    let topo = build(nodes, &[], &opts(Granularity::Location));
    let seg = &topo.segments[topo.segment_of(&name(node)).unwrap()];
    seg.leader_node().name.to_string()
}

#[test]
fn a_leader_most_other_members_report_is_passed_over_for_the_next_by_kilos_order() {
    let mut nodes = failover_location();
    assert_eq!(leader_of(&nodes, "a"), "a", "no report: Kilo's leader");
    report(&mut nodes[1], &["a"]);
    assert_eq!(
        leader_of(&nodes, "a"),
        "a",
        "one of two others is no majority"
    );
    report(&mut nodes[2], &["a"]);
    // b (public endpoint) comes before c (private) in Kilo's order.
    assert_eq!(leader_of(&nodes, "a"), "b");
    let topo = build(&nodes, &[], &opts(Granularity::Location));
    let d = topo
        .diagnostics
        .iter()
        .find(|d| d.name == "a")
        .expect("a diagnostic names the passed-over leader");
    assert!(!d.skipped, "a stays in the mesh");
    assert_eq!(d.key.as_deref(), Some("wiremesh.io/forwarding-failed"));
    assert!(
        d.problem.contains("b, c") && d.problem.contains("b leads location:x"),
        "{}",
        d.problem
    );
    // Every node computes the same leader, members route through it.
    let plan_c = compute(&nodes, &[], &name("c"), &opts(Granularity::Location)).unwrap();
    let to_d: Vec<_> = plan_c
        .desired
        .routes
        .iter()
        .filter(|r| r.dst == net("10.2.4.0/24"))
        .collect();
    assert_eq!(to_d.len(), 1);
    assert_eq!(to_d[0].gateway, Some("10.0.0.2".parse().unwrap()));
    let plan_b = compute(&nodes, &[], &name("b"), &opts(Granularity::Location)).unwrap();
    assert!(plan_b.desired.leader && plan_b.desired.interface.address.is_some());
    let plan_a = compute(&nodes, &[], &name("a"), &opts(Granularity::Location)).unwrap();
    assert!(!plan_a.desired.leader && plan_a.desired.peers.is_empty());
    // The other location peers with b's key now.
    let plan_d = compute(&nodes, &[], &name("d"), &opts(Granularity::Location)).unwrap();
    assert_eq!(plan_d.desired.peers[0].public_key, key(2));
}

#[test]
fn a_location_with_a_node_that_does_not_report_keeps_kilos_leader() {
    let mut nodes = failover_location();
    report(&mut nodes[1], &["a"]);
    report(&mut nodes[2], &["a"]);
    nodes[2].forwarding_failed = None;
    nodes[1].forwarding_failed = None;
    nodes[0].forwarding_failed = None;
    assert_eq!(leader_of(&nodes, "a"), "a");
    let mut nodes = failover_location();
    report(&mut nodes[1], &["a"]);
    report(&mut nodes[2], &["a"]);
    // a runs Kilo's agent (or wiremesh with failover off): it would keep leading.
    nodes[0].forwarding_failed = None;
    assert_eq!(leader_of(&nodes, "a"), "a");
}

#[test]
fn when_every_candidate_is_reported_kilos_leader_stays_and_reports_elsewhere_do_not_count() {
    let mut nodes = failover_location();
    report(&mut nodes[0], &["b", "c"]);
    report(&mut nodes[1], &["a", "c"]);
    report(&mut nodes[2], &["a", "b"]);
    assert_eq!(leader_of(&nodes, "a"), "a");
    // d (another location) reporting a is no vote in location x.
    let mut nodes = failover_location();
    report(&mut nodes[3], &["a"]);
    report(&mut nodes[2], &["a"]);
    assert_eq!(leader_of(&nodes, "a"), "a");
    // In a location of two, the one other member decides.
    let mut two: Vec<MeshNode> = failover_location()
        .into_iter()
        .filter(|n| n.name.as_str() != "c")
        .collect();
    report(&mut two[1], &["a"]);
    assert_eq!(leader_of(&two, "a"), "b");
}

#[test]
fn segments_are_ordered_like_kilo_and_get_mesh_ips_in_that_order() {
    let nodes = kilo_cluster();
    let topo = build(&nodes, &[], &opts(Granularity::Location));
    let keys: Vec<String> = topo.segments.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(keys, vec!["location:1", "location:2", "node:d"]);
    let ips: Vec<String> = topo
        .segments
        .iter()
        .map(|s| s.mesh_ip.to_string())
        .collect();
    assert_eq!(ips, vec!["10.4.0.1", "10.4.0.2", "10.4.0.3"]);
}

#[test]
fn location_allowed_ips_are_pod_cidrs_internal_ips_then_mesh_ip() {
    let nodes = kilo_cluster();
    let topo = build(&nodes, &[], &opts(Granularity::Location));
    let loc2 = &topo.segments[1];
    assert_eq!(
        loc2.allowed_ips,
        vec![
            net("10.2.2.0/24"),
            net("192.168.0.1/32"),
            net("10.2.3.0/24"),
            net("192.168.0.2/32"),
            net("10.4.0.2/32")
        ]
    );
}

#[test]
fn full_mesh_peer_has_pod_cidr_internal_ip_and_mesh_ip_and_local_keepalive() {
    let mut nodes = kilo_cluster();
    nodes[0].persistent_keepalive = 25;
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    assert!(d.leader);
    assert_eq!(d.interface.address, Some(net("10.4.0.1/16")));
    assert_eq!(d.interface.listen_port, 51820);
    assert_eq!(d.peers.len(), 3);
    let b = d.peers.iter().find(|p| p.public_key == key(2)).unwrap();
    assert_eq!(
        b.allowed_ips,
        vec![
            net("10.2.2.0/24"),
            net("192.168.0.1/32"),
            net("10.4.0.2/32"),
            net("192.168.178.3/32")
        ]
    );
    assert!(d.peers.iter().all(|p| p.persistent_keepalive == 25));
    let dd = d.peers.iter().find(|p| p.public_key == key(4)).unwrap();
    assert_eq!(dd.allowed_ips, vec![net("10.2.4.0/24"), net("10.4.0.4/32")]);
}

#[test]
fn location_leader_peers_only_with_other_segments_and_routes_them_over_wireguard() {
    let nodes = kilo_cluster();
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Location))
        .unwrap()
        .desired;
    assert!(d.leader);
    let keys: Vec<WgKey> = d.peers.iter().map(|p| p.public_key).collect();
    assert_eq!(keys, vec![key(2), key(4)]);
    // Pod CIDR of c (location 2) goes into WireGuard, which picks that segment's peer by its
    // allowed IPs. Kilo routes it via the segment's mesh IP (10.4.0.2); without that gateway a
    // renumbered segment changes its peer's allowed IPs and no route.
    let r = d
        .routes
        .iter()
        .find(|r| r.dst == net("10.2.3.0/24"))
        .unwrap();
    assert_eq!(
        r,
        &Route {
            table: MAIN_TABLE,
            dst: net("10.2.3.0/24"),
            gateway: None,
            dev: RouteDev::WireGuard,
            src: Some("192.168.0.1".parse().unwrap()),
            onlink: false,
        }
    );
    assert!(
        d.routes
            .iter()
            .all(|r| r.dev != RouteDev::WireGuard || r.gateway.is_none()),
        "no WireGuard route names a mesh IP: {:?}",
        d.routes
    );
    // Allowed-location-ips of location 2 are routed too.
    assert!(
        d.routes
            .iter()
            .any(|r| r.dst == net("192.168.178.3/32") && r.dev == RouteDev::WireGuard)
    );
}

#[test]
fn non_leader_has_no_peers_no_address_and_routes_everything_via_leader_internal_ip() {
    let nodes = kilo_cluster();
    let d = compute(&nodes, &[], &name("c"), &opts(Granularity::Location))
        .unwrap()
        .desired;
    assert!(!d.leader);
    assert!(d.peers.is_empty());
    assert_eq!(d.interface.address, None);
    let gw: std::net::IpAddr = "192.168.0.1".parse().unwrap();
    // The mesh IPs by one route for the whole mesh subnet (Kilo: one /32 per segment), so
    // renumbering moves no route here either.
    assert!(
        !d.routes
            .iter()
            .any(|r| r.dst.prefix() == 32 && net("10.4.0.0/16").contains(r.dst.ip())),
        "{:?}",
        d.routes
    );
    for dst in ["10.4.0.0/16", "10.2.1.0/24", "10.2.4.0/24"] {
        let r = d
            .routes
            .iter()
            .find(|r| r.dst == net(dst))
            .unwrap_or_else(|| panic!("no route to {dst}"));
        assert_eq!(
            (r.gateway, r.dev, r.onlink),
            (Some(gw), RouteDev::Private, true),
            "{dst}"
        );
    }
    // Its own location's other node (b, the leader) is reached directly, not through itself.
    let r = d
        .routes
        .iter()
        .find(|r| r.dst == net("10.2.2.0/24"))
        .unwrap();
    assert_eq!(r.gateway, Some(gw));
}

#[test]
fn node_without_internal_ip_forms_its_own_segment_in_location_mode() {
    let nodes = kilo_cluster();
    let topo = build(&nodes, &[], &opts(Granularity::Location));
    let idx = topo.segment_of(&name("d")).unwrap();
    assert_eq!(topo.segments[idx].key, SegmentKey::Node("d".into()));
    assert_eq!(topo.segments[idx].nodes.len(), 1);
}

#[test]
fn private_ip_route_is_skipped_when_it_equals_the_endpoint_ip() {
    let nodes = vec![
        node(
            "a",
            "x",
            1,
            "203.0.113.1:51820",
            Some("203.0.113.1/32"),
            "10.42.0.0/24",
        ),
        node(
            "b",
            "y",
            2,
            "203.0.113.2:51820",
            Some("203.0.113.2/32"),
            "10.42.1.0/24",
        ),
    ];
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    assert!(!d.routes.iter().any(|r| r.dst == net("203.0.113.2/32")));
    assert!(d.routes.iter().any(|r| r.dst == net("10.42.1.0/24")));
}

#[test]
fn a_nated_nodes_internal_ip_that_is_its_published_endpoint_is_never_routed_into_the_tunnel() {
    // b is behind NAT and publishes its internal address as endpoint; a discovered the NAT's.
    let mut nodes = vec![
        node(
            "a",
            "x",
            1,
            "203.0.113.1:51820",
            Some("203.0.113.1/32"),
            "10.42.0.0/24",
        ),
        node(
            "b",
            "y",
            2,
            "10.210.3.11:51820",
            Some("10.210.3.11/24"),
            "10.42.1.0/24",
        ),
    ];
    nodes[1].persistent_keepalive = 25;
    nodes[0]
        .discovered_endpoints
        .insert(key(2), "198.51.100.7:40000".parse().unwrap());
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    let b = d.peers.iter().find(|p| p.public_key == key(2)).unwrap();
    assert_eq!(
        b.endpoint.as_ref().unwrap().to_string(),
        "198.51.100.7:40000"
    );
    // Still b's allowed IP (mixed clusters agree), but no route: WireGuard may still send to
    // the published endpoint, which a route through wiremesh0 would loop into the tunnel.
    assert!(b.allowed_ips.contains(&net("10.210.3.11/32")));
    assert!(
        !d.routes.iter().any(|r| r.dst == net("10.210.3.11/32")),
        "{:?}",
        d.routes
    );
    assert!(d.routes.iter().any(|r| r.dst == net("10.42.1.0/24")));
}

#[test]
fn listen_port_follows_local_endpoint_port() {
    let nodes = vec![
        node("a", "x", 1, "203.0.113.1:51999", None, "10.42.0.0/24"),
        node("b", "y", 2, "203.0.113.2:51820", None, "10.42.1.0/24"),
    ];
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    assert_eq!(d.interface.listen_port, 51999);
}

#[test]
fn nat_peer_uses_discovered_endpoint_and_others_keep_theirs() {
    let mut nodes = vec![
        node("a", "x", 1, "203.0.113.1:51820", None, "10.42.0.0/24"),
        node("b", "y", 2, "192.168.1.2:51820", None, "10.42.1.0/24"),
        node("c", "z", 3, "203.0.113.3:51820", None, "10.42.2.0/24"),
    ];
    nodes[1].persistent_keepalive = 25; // b is behind NAT
    let seen: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    nodes[0].discovered_endpoints.insert(key(2), seen);
    nodes[0]
        .discovered_endpoints
        .insert(key(3), "198.51.100.8:1".parse().unwrap());
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    let ep = |k| {
        d.peers
            .iter()
            .find(|p| p.public_key == key(k))
            .unwrap()
            .endpoint
            .clone()
    };
    assert_eq!(ep(2), Some(Endpoint::Addr(seen)));
    assert_eq!(ep(3).unwrap().to_string(), "203.0.113.3:51820");
}

#[test]
fn dns_endpoint_is_kept_as_a_name() {
    let nodes = vec![
        node("a", "x", 1, "203.0.113.1:51820", None, "10.42.0.0/24"),
        node("b", "y", 2, "b.example.com:51820", None, "10.42.1.0/24"),
    ];
    let d = compute(&nodes, &[], &name("a"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    assert_eq!(
        d.peers[0].endpoint.as_ref().unwrap().to_string(),
        "b.example.com:51820"
    );
}

#[test]
fn unready_and_stale_nodes_are_left_out_with_a_reason() {
    let mut nodes = kilo_cluster();
    nodes[1].key = None;
    nodes[2].last_seen = Some(1000);
    nodes[3].last_seen = Some(1990);
    let mut o = opts(Granularity::Full);
    o.now = Some(2000);
    let plan = compute(&nodes, &[], &name("a"), &o).unwrap();
    assert_eq!(plan.desired.peers.len(), 1, "only d is ready and fresh");
    let names: Vec<&str> = plan.diagnostics.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, vec!["b", "c"]);
    assert!(plan.diagnostics[0].problem.contains("key"));
    assert!(plan.diagnostics[1].problem.contains("stale"));
}

#[test]
fn node_without_last_seen_counts_as_fresh() {
    let nodes = kilo_cluster();
    let mut o = opts(Granularity::Full);
    o.now = Some(i64::MAX / 2);
    assert_eq!(
        compute(&nodes, &[], &name("a"), &o)
            .unwrap()
            .desired
            .peers
            .len(),
        3
    );
}

#[test]
fn local_node_that_is_not_ready_is_an_error_that_says_why() {
    let mut nodes = kilo_cluster();
    nodes[0].pod_cidrs.clear();
    let e = compute(&nodes, &[], &name("a"), &opts(Granularity::Full)).unwrap_err();
    assert!(
        matches!(e, LocalError::LeftOut(ref n, ref why) if n == "a" && why.contains("pod CIDR"))
    );
    assert_eq!(
        e.to_string(),
        "node a is left out: no pod CIDR assigned yet"
    );
    let e = compute(&nodes, &[], &name("zz"), &opts(Granularity::Full)).unwrap_err();
    assert_eq!(e, LocalError::Unknown("zz".into()));
}

#[test]
fn a_node_the_registry_left_out_is_left_out_with_all_its_diagnostics_not_unknown() {
    let nodes = kilo_cluster();
    let registry = vec![
        Diagnostic::node(
            "zz",
            Some("kilo.squat.ai/granularity"),
            "\"x\" is bad; ignored",
        )
        .kept(),
        Diagnostic::node("zz", Some("kilo.squat.ai/key"), "\"short\" is not a key"),
        Diagnostic::node("other", Some("kilo.squat.ai/key"), "not a key"),
    ];
    let e = compute(&nodes, &[], &name("zz"), &opts(Granularity::Full)).unwrap_err();
    assert_eq!(
        e.explained_by(&registry).to_string(),
        "node zz is left out: kilo.squat.ai/key: \"short\" is not a key; \
         kilo.squat.ai/granularity: \"x\" is bad; ignored"
    );
    // Only warnings about a node that is absent: still not in the cluster.
    let e = compute(&nodes, &[], &name("zz"), &opts(Granularity::Full)).unwrap_err();
    assert_eq!(
        e.explained_by(&registry[..1]),
        LocalError::Unknown("zz".into())
    );
    // The engine left it out (stale); the registry says why the heartbeat reads as stale.
    let mut stale = kilo_cluster();
    stale[0].last_seen = Some(0);
    let mut o = opts(Granularity::Full);
    o.now = Some(1_000_000);
    let e = compute(&stale, &[], &name("a"), &o).unwrap_err();
    let warning = Diagnostic::node("a", Some("kilo.squat.ai/last-seen"), "read as 0").kept();
    assert_eq!(
        e.explained_by(&[warning]).to_string(),
        format!(
            "node a is left out: {}; kilo.squat.ai/last-seen: read as 0",
            NotReady::StaleHeartbeat.text()
        )
    );
}

#[test]
fn a_duplicate_key_goes_to_the_node_created_first_whatever_the_names() {
    let mut nodes = kilo_cluster();
    // c copies b's key; b sorts first by name but c's Node object is older.
    nodes[2].key = nodes[1].key;
    nodes[1].created = Some(2_000);
    nodes[2].created = Some(1_000);
    let plan = compute(&nodes, &[], &name("a"), &opts(Granularity::Full)).unwrap();
    assert_eq!(plan.desired.peers.len(), 2);
    let d = plan.diagnostics.iter().find(|d| d.name == "b").unwrap();
    assert!(d.skipped && d.key.as_deref() == Some("key"), "{d}");
    assert!(d.problem.contains("also published by node c"), "{d}");
    assert_eq!(d.other.as_deref(), Some("c"));
    assert!(plan.diagnostics.iter().all(|d| d.name != "c"));
}

#[test]
fn a_duplicate_key_without_an_older_node_goes_to_neither() {
    let mut nodes = kilo_cluster();
    nodes[2].key = nodes[1].key;
    let plan = compute(&nodes, &[], &name("a"), &opts(Granularity::Full)).unwrap();
    assert_eq!(plan.desired.peers.len(), 1, "only d is left besides a");
    for n in ["b", "c"] {
        let d = plan.diagnostics.iter().find(|d| d.name == n).unwrap();
        assert!(d.skipped && d.problem.contains("neither takes part"), "{d}");
    }
}

#[test]
fn external_peer_is_a_wireguard_peer_with_its_psk_and_a_route() {
    let nodes = kilo_cluster();
    let peer = MeshPeer {
        name: name("laptop"),
        key: key(9),
        allowed_ips: vec![net("10.5.0.1/32")],
        endpoint: None,
        persistent_keepalive: 10,
        preshared_key: Some(key(8)),
    };
    let d = compute(&nodes, &[peer], &name("a"), &opts(Granularity::Location))
        .unwrap()
        .desired;
    let p = d.peers.iter().find(|p| p.public_key == key(9)).unwrap();
    assert_eq!(p.preshared_key, Some(key(8)));
    assert_eq!(p.allowed_ips, vec![net("10.5.0.1/32")]);
    let r = d
        .routes
        .iter()
        .find(|r| r.dst == net("10.5.0.1/32"))
        .unwrap();
    assert_eq!((r.dev, r.gateway), (RouteDev::WireGuard, None));
    assert!(d.masquerade.sources.contains(&net("10.5.0.1/32")));
}

#[test]
fn peer_allowed_ips_are_deduplicated_in_name_order() {
    let mk = |n: &str, k: u8| MeshPeer {
        name: name(n),
        key: key(k),
        allowed_ips: vec![net("10.5.0.0/24")],
        endpoint: None,
        persistent_keepalive: 0,
        preshared_key: None,
    };
    let nodes = kilo_cluster();
    let topo = build(&nodes, &[mk("z", 9), mk("a", 8)], &opts(Granularity::Full));
    assert_eq!(topo.peers[0].allowed_ips.len(), 1);
    assert!(topo.peers[1].allowed_ips.is_empty());
}

#[test]
fn always_encapsulation_sends_location_traffic_through_the_tunnel_with_rules() {
    let nodes = kilo_cluster();
    let mut o = opts(Granularity::Location);
    o.encapsulate = Encapsulate::Always;
    let d = compute(&nodes, &[], &name("b"), &o).unwrap().desired;
    // b leads location 2; c is reached through the IPIP tunnel.
    let r = d
        .routes
        .iter()
        .find(|r| r.dst == net("10.2.3.0/24"))
        .unwrap();
    assert_eq!(r.dev, RouteDev::Tunnel);
    assert!(
        d.routes
            .iter()
            .any(|r| r.table == ENCAP_TABLE && r.dst == net("192.168.0.2/32"))
    );
    assert!(
        d.rules
            .iter()
            .any(|r| r.src == Some(net("10.2.2.0/24")) && r.dst == Some(net("192.168.0.2/32")))
    );
    assert!(
        d.rules
            .iter()
            .any(|r| r.iif.as_deref() == Some("wiremesh0"))
    );
}

#[test]
fn overlapping_allowed_location_ips_of_two_locations_are_dropped_and_reported() {
    let mut nodes = kilo_cluster();
    nodes[0].allowed_location_ips = vec![net("192.168.178.0/24")];
    let topo = build(&nodes, &[], &opts(Granularity::Location));
    assert!(topo.segments[0].allowed_location_ips.is_empty());
    assert!(
        topo.diagnostics
            .iter()
            .any(|d| d.name == "a" && d.key.as_deref() == Some("allowed-location-ips"))
    );
}

#[test]
fn mesh_ips_run_out_gracefully() {
    let nodes: Vec<MeshNode> = (0..5u8)
        .map(|i| {
            node(
                &format!("n{i}"),
                "x",
                i + 1,
                "203.0.113.1:1",
                None,
                &format!("10.42.{i}.0/24"),
            )
        })
        .collect();
    let mut o = opts(Granularity::Full);
    o.subnet = net("10.4.0.0/30"); // room for 3 addresses after the network address
    let topo = build(&nodes, &[], &o);
    assert_eq!(topo.segments.len(), 3);
    assert_eq!(topo.diagnostics.len(), 2);
}

#[test]
fn masquerade_exempts_every_mesh_destination_and_service_cidrs() {
    let mut o = opts(Granularity::Full);
    o.service_cidrs = vec![net("10.43.0.0/16")];
    let d = compute(&kilo_cluster(), &[], &name("a"), &o)
        .unwrap()
        .desired;
    for n in [
        "10.2.1.0/24",
        "10.2.2.0/24",
        "10.4.0.0/16",
        "10.43.0.0/16",
        "192.168.0.2/32",
    ] {
        assert!(d.masquerade.exempt.contains(&net(n)), "{n}");
    }
    assert_eq!(d.masquerade.sources, vec![net("10.2.1.0/24")]);
    assert_eq!(d.bridge.unwrap().addresses, vec![net("10.2.1.1/24")]);
}

#[test]
fn ipv6_subnet_allocates_ipv6_mesh_ips() {
    assert_eq!(
        allocate(net("fd10::/64"), 0),
        Some("fd10::1".parse().unwrap())
    );
    assert_eq!(
        allocate(net("10.4.0.0/16"), 65533),
        Some("10.4.255.254".parse().unwrap())
    );
    assert_eq!(allocate(net("10.4.0.0/16"), 65535), None);
}

#[test]
fn net_key_orders_like_ipnetwork() {
    let mut a: Vec<IpNetwork> = [
        "10.4.0.0/16",
        "10.4.0.0/24",
        "9.255.0.0/16",
        "fd00::/8",
        "::1/128",
        "10.42.0.0/24",
        "0.0.0.0/0",
    ]
    .iter()
    .map(|s| net(s))
    .collect();
    let mut b = a.clone();
    a.sort();
    b.sort_by_key(super::contribute::net_key);
    assert_eq!(a, b);
}

#[test]
fn a_node_whose_pod_cidr_overlaps_an_older_nodes_is_left_out_and_named() {
    let mut nodes = kilo_cluster();
    // c's /23 covers b's /24 (and more); d keeps its own.
    let b = nodes[1].pod_cidrs[0];
    nodes[2].pod_cidrs = vec![IpNetwork::new(b.network(), 23).unwrap()];
    // Each overlaps one claim: the older Node keeps its pod CIDR.
    nodes[1].created = Some(1_000);
    nodes[2].created = Some(2_000);
    let o = opts(Granularity::Full);
    let plan = compute(&nodes, &[], &name("a"), &o).unwrap();
    let peer_names: Vec<&str> = plan.desired.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(peer_names.len(), 2, "{peer_names:?}");
    assert!(!peer_names.contains(&"c"), "{peer_names:?}");
    let d = plan
        .diagnostics
        .iter()
        .find(|d| d.name == "c")
        .expect("c is named");
    assert_eq!(d.key.as_deref(), Some("podCIDR"));
    assert!(
        d.problem
            .contains(&format!("overlaps pod CIDR {b} of node b")),
        "{d}"
    );
    assert!(d.skipped);
    // Every other node still reaches b's pods through b.
    assert!(
        plan.desired
            .peers
            .iter()
            .any(|p| p.allowed_ips.contains(&b))
    );
}

#[test]
fn cidr_index_finds_overlaps_of_both_families_but_not_neighbours_or_its_own() {
    let mut idx = CidrIndex::default();
    let (a, b) = (name("a"), name("b"));
    let net = |s: &str| s.parse::<IpNetwork>().unwrap();
    idx.insert(&net("10.42.1.0/24"), &a);
    idx.insert(&net("10.42.3.0/24"), &a);
    idx.insert(&net("fd00:1::/64"), &a);
    assert!(
        idx.conflict(&net("10.42.2.0/24"), &b).is_none(),
        "a neighbour"
    );
    assert!(idx.conflict(&net("10.42.0.0/24"), &b).is_none());
    assert_eq!(
        idx.conflict(&net("10.42.0.0/22"), &b)
            .map(|(c, o)| (c.to_string(), o.clone())),
        Some(("10.42.3.0/24".to_owned(), a.clone())),
        "a supernet of both"
    );
    assert!(
        idx.conflict(&net("10.42.1.128/25"), &b).is_some(),
        "a subnet"
    );
    assert!(idx.conflict(&net("10.42.1.0/24"), &a).is_none(), "its own");
    assert!(idx.conflict(&net("fd00:1::8000/113"), &b).is_some());
    assert!(idx.conflict(&net("fd00:2::/64"), &b).is_none());
    assert!(idx.conflict(&net("::/0"), &b).is_some());
    idx.remove(&net("10.42.1.0/24"), &b);
    assert!(
        idx.conflict(&net("10.42.1.0/24"), &b).is_some(),
        "only the owner removes"
    );
    idx.remove(&net("10.42.1.0/24"), &a);
    assert!(idx.conflict(&net("10.42.1.0/24"), &b).is_none());
}

#[test]
fn every_not_ready_reason_is_recognised_from_its_words() {
    for r in NotReady::ALL {
        assert_eq!(NotReady::from_text(r.text()), Some(r));
    }
    assert_eq!(
        NotReady::from_text("the same node name appears twice"),
        None
    );
    let mut n = MeshNode::new("a");
    assert_eq!(not_ready(&n, None), Some(NotReady::NoKey));
    n.key = Some(WgKey([1; 32]));
    assert_eq!(
        not_ready_reason(&n, None),
        Some(NotReady::NoEndpoint.text())
    );
}

/// Every destination node `local` routes or gives a peer, in the full mesh.
fn destinations(nodes: &[MeshNode], local: &str, o: &MeshOptions) -> (Vec<IpNetwork>, Plan) {
    let plan = compute(nodes, &[], &name(local), o).unwrap();
    let mut d: Vec<IpNetwork> = plan.desired.routes.iter().map(|r| r.dst).collect();
    for p in &plan.desired.peers {
        d.extend(p.allowed_ips.iter().copied());
    }
    (d, plan)
}

fn refusal<'p>(plan: &'p Plan, node: &str, key: &str) -> &'p Diagnostic {
    plan.diagnostics
        .iter()
        .find(|d| d.name == node && d.key.as_deref() == Some(key))
        .unwrap_or_else(|| panic!("no {key} diagnostic for {node}: {:?}", plan.diagnostics))
}

#[test]
fn an_internal_ip_on_the_cloud_metadata_address_is_refused_and_routed_nowhere() {
    let mut nodes = kilo_cluster();
    nodes[2].internal_ip = Some(net("169.254.169.254/32"));
    let (dst, plan) = destinations(&nodes, "a", &opts(Granularity::Full));
    assert!(!dst.contains(&net("169.254.169.254/32")), "{dst:?}");
    let d = refusal(&plan, "c", "internal-ip");
    assert!(!d.skipped, "c stays: {d}");
    assert!(
        d.problem.contains("169.254.169.254/32") && d.problem.contains("link-local"),
        "{d}"
    );
    assert!(plan.desired.peers.iter().any(|p| p.name == "c"));
}

#[test]
fn an_internal_ip_inside_another_nodes_pod_cidr_is_refused_and_the_owner_named() {
    let mut nodes = kilo_cluster();
    // c claims a pod IP of b.
    nodes[2].internal_ip = Some(net("10.2.2.7/32"));
    let (dst, plan) = destinations(&nodes, "a", &opts(Granularity::Full));
    assert!(!dst.contains(&net("10.2.2.7/32")), "{dst:?}");
    let d = refusal(&plan, "c", "internal-ip");
    assert!(d.problem.contains("pod CIDR 10.2.2.0/24 of node b"), "{d}");
    assert_eq!(d.other.as_deref(), Some("b"));
}

#[test]
fn an_internal_ip_on_another_nodes_endpoint_is_refused() {
    let mut nodes = kilo_cluster();
    nodes[2].internal_ip = Some(net("10.1.0.4/32"));
    let (dst, plan) = destinations(&nodes, "a", &opts(Granularity::Full));
    assert!(!dst.contains(&net("10.1.0.4/32")), "{dst:?}");
    let d = refusal(&plan, "c", "internal-ip");
    assert!(d.problem.contains("endpoint address of node d"), "{d}");
}

#[test]
fn allowed_location_ips_that_cover_the_internet_or_other_owners_are_refused_one_by_one() {
    let mut nodes = kilo_cluster();
    let mut o = opts(Granularity::Full);
    o.service_cidrs = vec![net("10.96.0.0/12")];
    nodes[2].allowed_location_ips = vec![
        net("0.0.0.0/1"),
        net("128.0.0.0/1"),
        net("10.0.0.0/8"),
        net("10.2.0.0/16"),
        net("10.96.0.0/16"),
        net("172.20.0.0/24"),
    ];
    let (dst, plan) = destinations(&nodes, "a", &o);
    for refused in [
        "0.0.0.0/1",
        "128.0.0.0/1",
        "10.0.0.0/8",
        "10.2.0.0/16",
        "10.96.0.0/16",
    ] {
        assert!(!dst.contains(&net(refused)), "{refused} in {dst:?}");
        assert!(
            plan.diagnostics.iter().any(|d| d.name == "c"
                && d.key.as_deref() == Some("allowed-location-ips")
                && d.problem.starts_with(&format!("{refused} is refused"))),
            "{refused}: {:?}",
            plan.diagnostics
        );
    }
    // The claim of its own network stays, and so does c.
    assert!(dst.contains(&net("172.20.0.0/24")), "{dst:?}");
    let why = |c: &str| {
        plan.diagnostics
            .iter()
            .find(|d| d.problem.starts_with(&format!("{c} is refused")))
            .unwrap()
            .problem
            .clone()
    };
    assert!(why("0.0.0.0/1").contains("--allowed-location-ips-within"));
    assert!(why("10.0.0.0/8").contains("mesh subnet"));
    assert!(
        why("10.2.0.0/16").contains("of node"),
        "{}",
        why("10.2.0.0/16")
    );
    assert!(why("10.96.0.0/16").contains("service range"));
}

#[test]
fn a_node_whose_pod_cidr_covers_every_other_loses_it_and_the_real_nodes_stay() {
    let mut nodes = kilo_cluster();
    // Named to sort first, older than everyone, its /16 over every node's /24.
    let mut evil = node("0-evil", "9", 9, "10.1.0.9:51820", None, "10.2.0.0/16");
    evil.created = Some(1);
    nodes.push(evil);
    let (_, plan) = destinations(&nodes, "a", &opts(Granularity::Full));
    let mut peers: Vec<&str> = plan.desired.peers.iter().map(|p| p.name.as_str()).collect();
    peers.sort();
    assert_eq!(peers, ["b", "c", "d"]);
    let d = refusal(&plan, "0-evil", "podCIDR");
    assert!(d.skipped, "its only pod CIDR is gone, so is it: {d}");
    for n in ["b", "c", "d"] {
        assert!(compute(&nodes, &[], &name(n), &opts(Granularity::Full)).is_ok());
    }
}

#[test]
fn two_pod_cidrs_of_equal_standing_go_to_neither() {
    let mut nodes = kilo_cluster();
    nodes[2].pod_cidrs = nodes[1].pod_cidrs.clone();
    let (_, plan) = destinations(&nodes, "a", &opts(Granularity::Full));
    for n in ["b", "c"] {
        let d = refusal(&plan, n, "podCIDR");
        assert!(d.skipped && d.problem.contains("neither"), "{d}");
    }
}

#[test]
fn a_range_of_a_family_the_mesh_does_not_use_is_a_diagnostic_not_a_route() {
    let mut nodes = kilo_cluster();
    nodes[2].allowed_location_ips = vec![net("fd00:1::/64")];
    nodes[1].internal_ip = Some(net("fd00::2/128"));
    for g in [Granularity::Full, Granularity::Location] {
        let (dst, plan) = destinations(&nodes, "a", &opts(g));
        assert!(dst.iter().all(IpNetwork::is_ipv4), "{dst:?}");
        let d = refusal(&plan, "c", "allowed-location-ips");
        assert!(
            d.problem.contains("IPv6, a family the mesh does not use"),
            "{d}"
        );
        refusal(&plan, "b", "internal-ip");
    }
    // With an IPv6 pod CIDR in the mesh the family is in use.
    nodes[3].pod_cidrs.push(net("fd42::/64"));
    let (dst, _) = destinations(&nodes, "a", &opts(Granularity::Full));
    assert!(dst.contains(&net("fd00:1::/64")), "{dst:?}");
}

#[test]
fn the_incremental_engine_refuses_a_claim_made_by_an_event_as_the_full_computation_does() {
    let nodes = kilo_cluster();
    let o = opts(Granularity::Full);
    let mut e = incremental::Engine::new(nodes.clone(), Vec::new(), name("a"), o.clone());
    let mut c = nodes[2].clone();
    c.internal_ip = Some(net("10.1.0.4/32"));
    e.apply(incremental::Event::node(c.clone()));
    let mut all = nodes.clone();
    all[2] = c;
    assert_eq!(
        e.desired(),
        compute(&all, &[], &name("a"), &o).map(|p| p.desired)
    );
    assert!(
        e.diagnostics()
            .iter()
            .any(|d| d.name == "c" && d.key.as_deref() == Some("internal-ip"))
    );
}

#[test]
fn a_dual_stack_pod_cidr_routes_its_ipv6_half_without_the_ipv4_internal_ip_as_source() {
    let mut nodes = kilo_cluster();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.pod_cidrs.push(net(&format!("fd42:0:{}::/64", i + 1)));
    }
    let d = compute(&nodes, &[], &name("b"), &opts(Granularity::Full))
        .unwrap()
        .desired;
    let to = |dst: &str| {
        d.routes
            .iter()
            .find(|r| r.dst == net(dst) && r.dev == RouteDev::WireGuard)
            .unwrap_or_else(|| panic!("no WireGuard route to {dst}: {:?}", d.routes))
    };
    // a's pod CIDRs: the IPv4 one keeps b's internal IP as source, the IPv6 one has none.
    assert_eq!(to("10.2.1.0/24").src, Some("192.168.0.1".parse().unwrap()));
    assert_eq!(to("fd42:0:1::/64").src, None);
    assert!(
        d.routes
            .iter()
            .all(|r| r.src.is_none_or(|s| s.is_ipv4() == r.dst.is_ipv4())),
        "{:?}",
        d.routes
    );
}
