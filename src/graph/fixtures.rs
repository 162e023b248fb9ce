//! Test inputs for the graph exporter: the example files and generated clusters.
//!
//! Test-only. Depends on the registry (to read the examples), the model and the topology.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::model::{Endpoint, Granularity, MeshNode, MeshPeer, WgKey};
use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use crate::registry::file::{load_nodes, load_peers};
use crate::topology::{MeshOptions, Topology};

/// The nodes of `examples/<file>`, and the peers of `examples/peers.yaml` when `with_peers`.
pub fn example(file: &str, with_peers: bool) -> (Vec<MeshNode>, Vec<MeshPeer>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let nodes = load_nodes(&dir.join(file), DEFAULT_TOPOLOGY_LABEL).expect("example nodes");
    assert!(nodes.diagnostics.is_empty(), "{:?}", nodes.diagnostics);
    let peers = if with_peers {
        load_peers(&dir.join("peers.yaml"))
            .expect("example peers")
            .items
    } else {
        Vec::new()
    };
    (nodes.items, peers)
}

/// The public key of node `name` among `nodes`.
pub fn key_of(nodes: &[MeshNode], name: &str) -> WgKey {
    nodes
        .iter()
        .find(|n| n.name.0 == name)
        .and_then(|n| n.key)
        .unwrap_or_else(|| panic!("no key for {name}"))
}

/// The mesh of `nodes` and `peers` under `granularity`, other options at their defaults.
pub fn build<'a>(
    nodes: &'a [MeshNode],
    peers: &[MeshPeer],
    granularity: Granularity,
) -> Topology<'a> {
    let topo = crate::topology::build(
        nodes.iter(),
        peers,
        &MeshOptions {
            granularity,
            ..Default::default()
        },
    );
    assert!(
        topo.diagnostics.iter().all(|d| !d.skipped),
        "{:?}",
        topo.diagnostics
    );
    topo
}

fn key(seed: u32, kind: u8) -> WgKey {
    let mut k = [0u8; 32];
    k[0] = kind;
    k[28..].copy_from_slice(&seed.to_be_bytes());
    WgKey(k)
}

/// `n` ready nodes named `node-00`…, spread over `locations` locations (`site-0`…), each with
/// an internal IP, a public endpoint and a pod CIDR.
pub fn generated(n: u32, locations: u32) -> Vec<MeshNode> {
    (0..n)
        .map(|i| {
            let mut node = MeshNode::new(format!("node-{i:02}"));
            node.location = format!("site-{}", i % locations.max(1));
            node.key = Some(key(i, 1));
            let [a, b] = u16::try_from(i).expect("few nodes").to_be_bytes();
            let public = Ipv4Addr::new(198, 51, a, b.wrapping_add(1));
            node.endpoint = Some(Endpoint::Addr(SocketAddr::new(IpAddr::V4(public), 51820)));
            node.internal_ip = Some(
                format!("10.0.{a}.{}/16", b.wrapping_add(1))
                    .parse()
                    .expect("ip"),
            );
            node.pod_cidrs = vec![
                format!("10.{}.{}.0/24", 42 + i / 256, i % 256)
                    .parse()
                    .expect("cidr"),
            ];
            node
        })
        .collect()
}

/// `n` external peers named `peer-0`…, each with one allowed IP.
pub fn generated_peers(n: u32) -> Vec<MeshPeer> {
    (0..n)
        .map(|i| MeshPeer {
            name: format!("peer-{i}").as_str().into(),
            key: key(i, 2),
            allowed_ips: vec![format!("10.5.0.{}/32", i + 1).parse().expect("cidr")],
            endpoint: None,
            persistent_keepalive: 0,
            preshared_key: None,
        })
        .collect()
}

/// Two locations and a peer whose names and locations hold every XML and DOT special character.
pub fn nasty() -> (Vec<MeshNode>, Vec<MeshPeer>) {
    let mut nodes = generated(4, 2);
    let names = [
        r#"a&b<c>"d'"#,
        "x\\y\"z",
        "<script>alert(1)</script>",
        "plain",
    ];
    for (n, name) in nodes.iter_mut().zip(names) {
        n.name = name.into();
    }
    nodes[0].location = r#"loc "one" & <two>"#.to_owned();
    nodes[2].location = r#"loc "one" & <two>"#.to_owned();
    nodes[1].location = "back\\slash\nnewline".to_owned();
    nodes[3].location = "back\\slash\nnewline".to_owned();
    let mut peers = generated_peers(1);
    peers[0].name = "peer \"&\" <ü>".into();
    (nodes, peers)
}
