//! Property-based fuzzing of every parser that takes outside input: endpoints, keys, CIDRs,
//! node annotations, Peer resources and whole NodeList files. Each property: no panic, and a bad
//! value is reported precisely (which node, which key) while the rest is kept.
//!
//! The normal suite runs 256 cases per property. A long run, e.g. 10^6 cases per property:
//! `PROPTEST_CASES=1000000 cargo test --release --test main fuzz_` (see docs/testing.md).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;
use wiremesh::model::{Endpoint, Granularity, WgKey};
use wiremesh::registry::annotations::{
    DEFAULT_TOPOLOGY_LABEL, KILO_PREFIX, WIREMESH_PREFIX, keys, parse_ip_or_cidr, parse_node,
};
use wiremesh::registry::file::{decode_nodes, decode_peers};
use wiremesh::registry::peer::{DnsOrIp, PeerEndpoint, PeerResource, PeerSpec, parse_peer};

const KEYS: &[&str] = &[
    keys::ENDPOINT,
    keys::FORCE_ENDPOINT,
    keys::FORCE_INTERNAL_IP,
    keys::INTERNAL_IP,
    keys::KEY,
    keys::LAST_SEEN,
    keys::LEADER,
    keys::LOCATION,
    keys::PERSISTENT_KEEPALIVE,
    keys::WIREGUARD_IP,
    keys::DISCOVERED_ENDPOINTS,
    keys::ALLOWED_LOCATION_IPS,
    keys::GRANULARITY,
];

/// Values that are sometimes valid, often nearly valid, sometimes garbage.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,2})?(:[0-9]{1,6})?",
        "\\[[0-9a-f:]{2,20}\\](:[0-9]{1,6})?",
        "[a-z0-9.-]{1,20}:[0-9]{1,6}",
        "[A-Za-z0-9+/]{40,46}={0,2}",
        "-?[0-9]{1,12}",
        Just(String::new()),
        Just("-".to_owned()),
        Just("{\"k\":{\"IP\":\"1.2.3.4\",\"Port\":5}}".to_owned()),
    ]
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        (prop::sample::select(KEYS), any::<bool>()).prop_map(|(k, ours)| {
            format!("{}{k}", if ours { WIREMESH_PREFIX } else { KILO_PREFIX })
        }),
        value(),
        0..8,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// Property: endpoint, key, CIDR and granularity parsers never panic on any text, and what
    /// they accept prints back to something they accept again.
    #[test]
    fn fuzz_scalar_parsers_never_panic_and_round_trip(s in value()) {
        if let Ok(e) = s.parse::<Endpoint>() {
            prop_assert_eq!(e.to_string().parse::<Endpoint>().ok(), Some(e));
        }
        if let Ok(k) = s.parse::<WgKey>() {
            prop_assert_eq!(k.to_string().parse::<WgKey>().ok(), Some(k));
        }
        if let Ok(n) = parse_ip_or_cidr(&s) {
            prop_assert_eq!(parse_ip_or_cidr(&n.to_string()).ok(), Some(n));
        }
        let _ = s.parse::<Granularity>();
    }

    /// Property: any annotations on a node give either a node or diagnostics that all name this
    /// node and one of the annotation keys (or the spec field) that was set.
    #[test]
    fn fuzz_node_annotations_are_reported_precisely(
        ann in annotations(),
        pod in prop::option::of(value()),
    ) {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("fuzz-node".into()),
                annotations: Some(ann.clone()),
                ..Default::default()
            },
            spec: Some(NodeSpec { pod_cidr: pod, ..Default::default() }),
            status: None,
        };
        match parse_node(&node, DEFAULT_TOPOLOGY_LABEL) {
            Ok(n) => prop_assert_eq!(n.name.as_str(), "fuzz-node"),
            Err(diags) => {
                prop_assert!(!diags.is_empty());
                for d in diags {
                    prop_assert_eq!(&d.name, "fuzz-node");
                    let key = d.key.clone().unwrap_or_default();
                    prop_assert!(ann.contains_key(&key) || key == "spec.podCIDR", "{}", d);
                    prop_assert!(d.skipped);
                }
            }
        }
    }

    /// Property: any Peer spec gives either a peer or diagnostics naming this peer and a field.
    #[test]
    fn fuzz_peer_resources_are_reported_precisely(
        key in value(),
        ips in prop::collection::vec(value(), 0..4),
        dns in value(),
        ip in value(),
        port in any::<u32>(),
        ka in any::<i64>(),
        psk in value(),
    ) {
        let p = PeerResource {
            metadata: ObjectMeta { name: Some("fuzz-peer".into()), ..Default::default() },
            spec: PeerSpec {
                allowed_ips: ips,
                endpoint: Some(PeerEndpoint { dns_or_ip: DnsOrIp { dns, ip }, port }),
                persistent_keepalive: ka,
                preshared_key: psk,
                public_key: key,
            },
            ..Default::default()
        };
        match parse_peer(&p) {
            Ok(peer) => prop_assert!(!peer.allowed_ips.is_empty()),
            Err(diags) => {
                prop_assert!(!diags.is_empty());
                for d in diags {
                    prop_assert_eq!(&d.name, "fuzz-peer");
                    prop_assert!(d.key.as_deref().is_some_and(|k| k.starts_with("spec.")), "{}", d);
                }
            }
        }
    }

    /// Property: any text as a nodes or peers file is either refused as a whole with an error
    /// or decoded; never a panic.
    #[test]
    fn fuzz_registry_files_never_panic(text in any::<String>()) {
        let _ = decode_nodes(&text, DEFAULT_TOPOLOGY_LABEL);
        let _ = decode_peers(&text);
    }

    /// Property: one corrupted node in a valid NodeList is left out with a diagnostic naming
    /// it, and the other nodes are decoded unchanged.
    #[test]
    fn fuzz_one_bad_node_never_affects_the_others(bad in annotations()) {
        let good = r#"{"kind":"Node","metadata":{"name":"good","annotations":{"kilo.squat.ai/location":"x"}},"spec":{"podCIDR":"10.42.0.0/24"}}"#;
        let bad_json = serde_json::json!({
            "kind": "Node",
            "metadata": {"name": "bad", "annotations": bad},
        });
        let text = format!(r#"{{"kind":"NodeList","items":[{good},{bad_json},{good}]}}"#)
            .replacen("\"good\"", "\"good2\"", 1);
        let loaded = decode_nodes(&text, DEFAULT_TOPOLOGY_LABEL).expect("valid JSON");
        let names: Vec<&str> = loaded.items.iter().map(|n| n.name.as_str()).filter(|n| *n != "bad").collect();
        prop_assert_eq!(names, vec!["good2", "good"]);
        prop_assert!(loaded.diagnostics.iter().all(|d| d.name == "bad"));
    }
}
