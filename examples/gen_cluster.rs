//! Print a synthetic cluster as `kubectl get nodes -o json` would: N nodes, 10 per location
//! (or the second argument), public endpoints, internal IPs, one /24 pod CIDR each. For
//! benchmarks, load tests and the graph screenshots.
//!
//! `cargo run --release --example gen_cluster -- 5000 > nodes.json`
//! `cargo run --example gen_cluster -- 40 10 > nodes.json` (4 locations of 10)

use base64::Engine as _;
use serde_json::json;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let per_location: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .filter(|&p| p > 0)
        .unwrap_or(10);
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            key[31] = 0x5a;
            let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": format!("node-{i:05}"),
                    "labels": {"topology.kubernetes.io/region": format!("loc-{:04}", i / per_location)},
                    "annotations": {
                        "kilo.squat.ai/key": base64::engine::general_purpose::STANDARD.encode(key),
                        "kilo.squat.ai/endpoint": format!("100.{}.{hi}.{lo}:51820", 64 + (i >> 16)),
                        "kilo.squat.ai/internal-ip": format!("172.16.{hi}.{lo}/16"),
                    }
                },
                "spec": {"podCIDR": format!("10.{}.{lo}.0/24", 64 + hi)},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("172.16.{hi}.{lo}")}]}
            })
        })
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "NodeList", "items": items});
    println!("{list}");
}
