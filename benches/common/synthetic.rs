//! The synthetic cluster of the engine benchmarks and `examples/engine_memory.rs`: node i in
//! location i/10, with a key, a public endpoint, an internal IP and a /24 pod CIDR. Included by
//! path (`#[path]`), so it is not a benchmark target of its own.

use wiremesh::model::{MeshNode, WgKey};

/// Node i; `version` moves its endpoint's port (a changed node).
pub fn node(i: usize, version: u32) -> MeshNode {
    let mut node = MeshNode::new(format!("node-{i:05}"));
    node.location = format!("loc-{:04}", i / 10);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    node.key = Some(WgKey(key));
    let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
    let port = 51820 + (version % 1000) as u16;
    node.endpoint = Some(
        format!("100.{}.{hi}.{lo}:{port}", 64 + (i >> 16))
            .parse()
            .expect("endpoint"),
    );
    node.internal_ip = Some(format!("172.16.{hi}.{lo}/16").parse().expect("ip"));
    node.pod_cidrs = vec![format!("10.{}.{lo}.0/24", 64 + hi).parse().expect("cidr")];
    node
}

/// Nodes 0..n, unchanged.
#[allow(dead_code)]
pub fn cluster(n: usize) -> Vec<MeshNode> {
    (0..n).map(|i| node(i, 0)).collect()
}
