//! Proptest strategies for clusters, one strategy function per type.

use ipnetwork::IpNetwork;
use proptest::prelude::*;
use wiremesh::model::{Endpoint, MeshNode, MeshPeer, NodeName, WgKey};

/// A key from a small pool, so that collisions happen when `unique` is false.
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
    )
        .prop_map(
            move |(loc, internal, public, leader, ka, c, alip, unready, (pod, prefix))| {
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
