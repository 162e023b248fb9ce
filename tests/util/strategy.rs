//! Proptest strategies for clusters, one strategy function per type.

use ipnetwork::IpNetwork;
use proptest::prelude::*;
use wiremesh::model::{Endpoint, Granularity, MeshNode, MeshPeer, NodeName, WgKey};
use wiremesh::topology::{Encapsulate, MeshOptions};

/// A key from a small pool, so that collisions happen when `unique` is false.
/// Mesh options of the property tests: full or location granularity, no IPIP.
pub fn opts(full: bool) -> MeshOptions {
    MeshOptions {
        granularity: if full {
            Granularity::Full
        } else {
            Granularity::Location
        },
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    }
}

pub fn key(i: u8) -> WgKey {
    WgKey([i.wrapping_add(1); 32])
}

/// One node. `i` makes its name, key and pod CIDR unique when the caller wants that.
pub fn node(i: u8, unique: bool) -> impl Strategy<Value = MeshNode> {
    (
        0..3u8,        // location
        any::<bool>(), // has internal IP
        any::<bool>(), // public endpoint
        any::<bool>(), // leader volunteer
        prop_oneof![Just(0u16), Just(25u16)],
        0..4u8,                                // collision source for non-unique mode
        prop::option::weighted(0.1, 0..3u8),   // allowed-location-ip
        prop::option::weighted(0.1, Just(())), // not ready (no key)
        (0..4u8, 23..=24u8),                   // pod CIDR source and prefix (non-unique mode)
        // Reports of unreachable segment leaders (by key index), or none (a Kilo agent); rare,
        // since a report takes the incremental engine off its fast path (`reporting_cluster`
        // for more).
        prop::option::weighted(
            0.8,
            prop_oneof![15 => Just(Vec::new()), 1 => prop::collection::vec(0..10u8, 1..3)],
        ),
        // Reports of location leaders not forwarding (by node index), or none (a Kilo agent,
        // or failover off); rare for the same reason.
        prop::option::weighted(
            0.8,
            prop_oneof![15 => Just(Vec::new()), 1 => prop::collection::vec(0..10u8, 1..3)],
        ),
    )
        .prop_map(
            move |(
                loc,
                internal,
                public,
                leader,
                ka,
                c,
                alip,
                unready,
                (pod, prefix),
                unreachable,
                forwarding,
            )| {
                let mut n = MeshNode::new(format!("n{i:02}"));
                n.location = format!("loc{loc}");
                let id = if unique { i } else { c };
                n.key = if unready.is_some() && !unique {
                    None
                } else {
                    Some(key(id))
                };
                let ep = if public {
                    format!("203.0.113.{}:51820", i)
                } else {
                    format!("192.168.{loc}.{}:51820", i + 10)
                };
                n.endpoint = Some(ep.parse::<Endpoint>().expect("endpoint"));
                if internal {
                    n.internal_ip =
                        Some(format!("192.168.{loc}.{}/24", i + 10).parse().expect("ip"));
                }
                // Non-unique: a pod CIDR chosen apart from the key, sometimes a /23 that overlaps
                // two /24s of other nodes.
                n.pod_cidrs = vec![if unique {
                    format!("10.42.{i}.0/24").parse().expect("cidr")
                } else {
                    let net: IpNetwork = format!("10.42.{pod}.0/{prefix}").parse().expect("cidr");
                    IpNetwork::new(net.network(), prefix).expect("cidr")
                }];
                n.leader = leader;
                n.persistent_keepalive = ka;
                n.unreachable = unreachable.map(|u| u.into_iter().map(key).collect());
                n.forwarding_failed = forwarding.map(|f| {
                    f.into_iter()
                        .map(|j| NodeName(format!("n{j:02}")))
                        .collect()
                });
                if let (Some(a), false) = (alip, unique) {
                    n.allowed_location_ips =
                        vec![format!("172.20.{a}.0/24").parse().expect("cidr")];
                }
                n
            },
        )
}

/// A cluster of `2..=max` nodes with unique names (and unique keys and pod CIDRs when `unique`).
pub fn cluster(max: u8, unique: bool) -> impl Strategy<Value = Vec<MeshNode>> {
    (2..=max).prop_flat_map(move |n| (0..n).map(|i| node(i, unique)).collect::<Vec<_>>())
}

/// An external peer with an allowed IP outside every node range.
pub fn peer(i: u8) -> impl Strategy<Value = MeshPeer> {
    (0..3u8, any::<bool>()).prop_map(move |(ip, psk)| MeshPeer {
        name: NodeName(format!("p{i}")),
        key: key(200 + i),
        allowed_ips: vec![
            format!("10.5.{ip}.0/24")
                .parse::<IpNetwork>()
                .expect("cidr"),
        ],
        endpoint: None,
        persistent_keepalive: 0,
        preshared_key: psk.then(|| key(100 + i)),
    })
}

/// A node whose claims are drawn from a small pool of addresses that collide on purpose: pod
/// CIDRs that nest (/16, /23, /24), internal IPs and endpoints that are other nodes' addresses
/// or reserved ones, allowed-location-ips that are wide, public, reserved or of the other
/// family, keys shared with others, creation times that tie.
pub fn hostile_node(i: u8) -> impl Strategy<Value = MeshNode> {
    let pods = prop_oneof![
        4 => (0..6u8).prop_map(|p| format!("10.42.{p}.0/24")),
        1 => Just("10.42.0.0/23".to_owned()),
        1 => Just("10.42.0.0/16".to_owned()),
        1 => Just("169.254.0.0/24".to_owned()),
        1 => Just("10.4.0.0/24".to_owned()),
    ];
    let hosts = prop_oneof![
        4 => (0..6u8).prop_map(|h| format!("192.168.0.{h}")),
        1 => (0..6u8).prop_map(|p| format!("10.42.{p}.7")),
        1 => Just("169.254.169.254".to_owned()),
        1 => Just("127.0.0.1".to_owned()),
        1 => Just("fd00::1".to_owned()),
    ];
    let alips = prop_oneof![
        Just("172.20.0.0/24"),
        Just("172.20.0.0/16"),
        Just("10.0.0.0/8"),
        Just("0.0.0.0/1"),
        Just("192.168.0.0/24"),
        Just("8.8.8.0/24"),
        Just("fd00:1::/64"),
        Just("10.96.0.0/12"),
    ];
    (
        0..3u8,
        0..4u8,
        prop::collection::vec(pods, 1..=2),
        hosts.clone(),
        prop::option::of(hosts),
        prop::collection::vec(alips, 0..=2),
        prop::option::of(0..3i64),
        any::<bool>(),
    )
        .prop_map(
            move |(loc, k, pods, endpoint, internal, alips, created, leader)| {
                let mut n = MeshNode::new(format!("n{i:02}"));
                n.location = format!("loc{loc}");
                n.key = Some(key(k));
                n.endpoint = Some(Endpoint::Addr(std::net::SocketAddr::new(
                    endpoint.parse().expect("ip"),
                    51820,
                )));
                n.internal_ip = internal.map(|h| h.parse::<std::net::IpAddr>().expect("ip").into());
                n.pod_cidrs = pods.iter().map(|p| p.parse().expect("cidr")).collect();
                n.pod_cidrs.dedup();
                n.allowed_location_ips = alips.iter().map(|a| a.parse().expect("cidr")).collect();
                n.allowed_location_ips.dedup();
                n.created = created.map(|c| 1_700_000_000 + c);
                n.leader = leader;
                n
            },
        )
}

/// A cluster of `2..=max` hostile nodes with unique names.
pub fn hostile_cluster(max: u8) -> impl Strategy<Value = Vec<MeshNode>> {
    (2..=max).prop_flat_map(|n| (0..n).map(hostile_node).collect::<Vec<_>>())
}

/// A ready node without randomness: name `n{i:02}`, key [`key`]`(i)`, location `loc{i}`, a
/// public endpoint and pod CIDR `10.42.{i}.0/24`.
pub fn fixed_node(i: u8) -> MeshNode {
    let mut n = MeshNode::new(format!("n{i:02}"));
    n.location = format!("loc{i}");
    n.key = Some(key(i));
    n.endpoint = Some(format!("203.0.113.{i}:51820").parse().expect("endpoint"));
    n.pod_cidrs = vec![format!("10.42.{i}.0/24").parse().expect("cidr")];
    n
}

/// A cluster of `2..=max` unique nodes, a third of them reporting one or two unreachable
/// segment leaders, a fifth not reporting at all (Kilo's agents).
pub fn reporting_cluster(max: u8) -> impl Strategy<Value = Vec<MeshNode>> {
    let report = prop::option::weighted(
        0.8,
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(0..max, 1..3)],
    );
    (
        cluster(max, true),
        prop::collection::vec(report, max as usize),
    )
        .prop_map(|(mut nodes, reports)| {
            for (n, r) in nodes.iter_mut().zip(reports) {
                n.unreachable = r.map(|r| r.into_iter().map(key).collect());
            }
            nodes
        })
}
