//! Property-based fuzzing of every parser that takes outside input: endpoints, keys, CIDRs,
//! node annotations, Peer resources and whole NodeList files. Each property: no panic, and a bad
//! value is reported precisely (which node, which key) while the rest is kept. As in Kilo, only
//! a node without a valid key, endpoint, pod CIDR or fresh heartbeat is left out of the mesh; a
//! malformed optional value falls back to Kilo's and changes nothing for the other nodes.
//!
//! The normal suite runs 256 cases per property. A long run, e.g. 10^6 cases per property:
//! `PROPTEST_CASES=1000000 cargo test --release --test main fuzz_` (see docs/testing.md).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;
use wiremesh::model::{Endpoint, Granularity, MeshNode, WgKey};
use wiremesh::registry::annotations::{
    DEFAULT_TOPOLOGY_LABEL, KILO_PREFIX, WIREMESH_PREFIX, keys, lookup, parse_cidr,
    parse_ip_or_cidr, parse_node,
};
use wiremesh::registry::file::{decode_nodes, decode_peers};
use wiremesh::registry::peer::{DnsOrIp, PeerEndpoint, PeerResource, PeerSpec, parse_peer};
use wiremesh::topology::{CHECK_IN_PERIOD_SECS, MeshOptions, build};

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
        let (left_out, diags) = match parse_node(&node, DEFAULT_TOPOLOGY_LABEL) {
            Ok(p) => {
                prop_assert_eq!(p.value.name.as_str(), "fuzz-node");
                prop_assert!(p.warnings.iter().all(|d| !d.skipped));
                (false, p.warnings)
            }
            Err(diags) => {
                prop_assert!(diags.iter().any(|d| d.skipped));
                (true, diags)
            }
        };
        for d in &diags {
            prop_assert_eq!(&d.name, "fuzz-node");
            let key = d.key.clone().unwrap_or_default();
            prop_assert!(ann.contains_key(&key) || key == "spec.podCIDR", "{}", d);
        }
        // Left out exactly for a malformed key, no valid endpoint though one is malformed, or a
        // malformed pod CIDR.
        let set = |k: &str| lookup(&ann, k).map(|(_, v)| v).filter(|v| !v.is_empty());
        // The key: kilo.squat.ai/key wins when both prefixes carry different keys (a forged
        // wiremesh.io/key must not replace what the node's agent publishes); an empty one is unset.
        let nonempty = |k: &str| ann.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let key = match (nonempty("wiremesh.io/key"), nonempty("kilo.squat.ai/key")) {
            (Some(o), Some(k)) if o.trim() != k.trim() => Some(k),
            (Some(o), _) => Some(o),
            (None, k) => k,
        };
        let bad_key = key.is_some_and(|v| v.parse::<WgKey>().is_err());
        let endpoints = [set(keys::FORCE_ENDPOINT), set(keys::ENDPOINT)];
        let bad_endpoint = endpoints.iter().flatten().any(|v| v.parse::<Endpoint>().is_err())
            && !endpoints.iter().flatten().any(|v| v.parse::<Endpoint>().is_ok());
        let bad_pod = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .is_some_and(|c| !c.is_empty() && parse_cidr(c).is_err());
        prop_assert_eq!(left_out, bad_key || bad_endpoint || bad_pod, "{:?}", diags);
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

/// The annotation keys of optional values: a malformed one never leaves a node out.
const OPTIONAL: &[&str] = &[
    keys::FORCE_ENDPOINT,
    keys::FORCE_INTERNAL_IP,
    keys::INTERNAL_IP,
    keys::WIREGUARD_IP,
    keys::PERSISTENT_KEEPALIVE,
    keys::ALLOWED_LOCATION_IPS,
    keys::DISCOVERED_ENDPOINTS,
    keys::GRANULARITY,
];

/// The clock of the mesh properties.
const NOW: i64 = 1_800_000_000;

/// A value no parser accepts for any optional key (not an IP, CIDR, endpoint, number, JSON map
/// or granularity, and not `-`, which means "no internal IP").
fn malformed() -> impl Strategy<Value = String> {
    "x[^,:]{0,12}"
}

/// One node of a generated cluster: what each of its required values is, and its optional
/// annotations (possibly malformed).
#[derive(Debug, Clone)]
struct GenNode {
    key: Option<String>,
    endpoint: Option<String>,
    pod_cidr: Option<String>,
    last_seen: Option<String>,
    optional: BTreeMap<String, String>,
}

/// A required value: valid (`good`), anything `valid` refuses, empty, or absent. (Arbitrary
/// valid pod CIDRs could overlap another node's, which is a conflict, not a parse problem.)
fn required(good: String, valid: fn(&str) -> bool) -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => Just(Some(good)),
        1 => value().prop_filter("malformed", move |v| !valid(v)).prop_map(Some),
        1 => Just(Some(String::new())),
        1 => Just(None),
    ]
}

fn gen_node(i: u8) -> impl Strategy<Value = GenNode> {
    let key = WgKey([i + 1; 32]).to_string();
    let last_seen = prop_oneof![
        3 => (0..2 * CHECK_IN_PERIOD_SECS).prop_map(|a| Some((NOW - a).to_string())),
        1 => (2 * CHECK_IN_PERIOD_SECS..100_000).prop_map(|a| Some((NOW - a).to_string())),
        1 => value().prop_map(Some),
        1 => Just(None),
    ];
    let optional = prop::collection::btree_map(
        prop::sample::select(OPTIONAL).prop_map(|k| format!("{KILO_PREFIX}{k}")),
        prop_oneof![value(), malformed()],
        0..4,
    );
    (
        required(key, |v| v.parse::<WgKey>().is_ok()),
        required(format!("10.0.{i}.1:51820"), |v| {
            v.parse::<Endpoint>().is_ok()
        }),
        required(format!("10.42.{i}.0/24"), |v| parse_cidr(v).is_ok()),
        last_seen,
        optional,
    )
        .prop_map(|(key, endpoint, pod_cidr, last_seen, optional)| GenNode {
            key,
            endpoint,
            pod_cidr,
            last_seen,
            optional,
        })
}

fn cluster() -> impl Strategy<Value = Vec<GenNode>> {
    (1..6u8).prop_flat_map(|n| (0..n).map(gen_node).collect::<Vec<_>>())
}

fn k8s_node(i: usize, g: &GenNode) -> Node {
    let mut ann = g.optional.clone();
    for (k, v) in [
        (keys::KEY, &g.key),
        (keys::ENDPOINT, &g.endpoint),
        (keys::LAST_SEEN, &g.last_seen),
    ] {
        if let Some(v) = v {
            ann.insert(format!("{KILO_PREFIX}{k}"), v.clone());
        }
    }
    Node {
        metadata: ObjectMeta {
            name: Some(format!("n{i}")),
            annotations: Some(ann),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: g.pod_cidr.clone(),
            ..Default::default()
        }),
        status: None,
    }
}

/// The nodes the registry keeps.
fn parsed(nodes: &[Node]) -> Vec<MeshNode> {
    nodes
        .iter()
        .filter_map(|n| parse_node(n, DEFAULT_TOPOLOGY_LABEL).ok())
        .map(|p| p.value)
        .collect()
}

fn mesh_opts(full: bool) -> MeshOptions {
    MeshOptions {
        granularity: if full {
            Granularity::Full
        } else {
            Granularity::Location
        },
        now: Some(NOW),
        ..MeshOptions::default()
    }
}

/// Each node's segment as the other nodes see it: mesh IP and allowed IPs, by node name.
fn segments_by_node(nodes: &[MeshNode], full: bool) -> BTreeMap<String, (String, Vec<String>)> {
    let topo = build(nodes.iter(), &[], &mesh_opts(full));
    let mut out = BTreeMap::new();
    for s in &topo.segments {
        let ips: Vec<String> = s.allowed_ips.iter().map(ToString::to_string).collect();
        for n in &s.nodes {
            out.insert(n.name.to_string(), (s.mesh_ip.to_string(), ips.clone()));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// Property: whatever the optional annotations hold, the nodes in the mesh are exactly those
    /// with a valid key, a valid endpoint, a valid pod CIDR and a fresh heartbeat (an absent
    /// `last-seen` counts as fresh; a malformed one as never seen, as in Kilo).
    #[test]
    fn fuzz_only_key_endpoint_pod_cidr_and_heartbeat_decide_membership(
        spec in cluster(),
        full in any::<bool>(),
    ) {
        let nodes: Vec<Node> = spec.iter().enumerate().map(|(i, g)| k8s_node(i, g)).collect();
        let want: BTreeSet<String> = spec
            .iter()
            .enumerate()
            .filter(|(_, g)| {
                let ok = |v: &Option<String>, f: &dyn Fn(&str) -> bool| v.as_deref().is_some_and(f);
                let forced = g.optional.get(&format!("{KILO_PREFIX}{}", keys::FORCE_ENDPOINT));
                ok(&g.key, &|v| v.parse::<WgKey>().is_ok())
                    && (ok(&g.endpoint, &|v| v.parse::<Endpoint>().is_ok())
                        || forced.is_some_and(|v| v.parse::<Endpoint>().is_ok()))
                    && ok(&g.pod_cidr, &|v| parse_cidr(v).is_ok())
                    && match g.last_seen.as_deref().filter(|v| !v.is_empty()) {
                        None => true,
                        Some(v) => v.trim().parse::<i64>().is_ok_and(|t| NOW - t < 2 * CHECK_IN_PERIOD_SECS),
                    }
            })
            .map(|(i, _)| format!("n{i}"))
            .collect();
        let got: BTreeSet<String> = segments_by_node(&parsed(&nodes), full).into_keys().collect();
        prop_assert_eq!(got, want);
    }

    /// Property: a malformed optional value on one node is reported as a kept diagnostic naming
    /// that node and key, and every node's segment (mesh IP, allowed IPs) is what it is without
    /// that annotation.
    #[test]
    fn fuzz_a_malformed_optional_value_changes_no_segment(
        spec in cluster(),
        pick in any::<prop::sample::Index>(),
        key in prop::sample::select(OPTIONAL),
        bad in malformed(),
        full in any::<bool>(),
    ) {
        let mut spec = spec;
        let j = pick.index(spec.len());
        let full_key = format!("{KILO_PREFIX}{key}");
        spec[j].optional.remove(&full_key);
        let without: Vec<Node> = spec.iter().enumerate().map(|(i, g)| k8s_node(i, g)).collect();
        spec[j].optional.insert(full_key.clone(), bad);
        let with: Vec<Node> = spec.iter().enumerate().map(|(i, g)| k8s_node(i, g)).collect();
        match parse_node(&with[j], DEFAULT_TOPOLOGY_LABEL) {
            Ok(p) => prop_assert!(
                p.warnings.iter().any(|d| d.key.as_deref() == Some(full_key.as_str()) && !d.skipped && d.name == format!("n{j}")),
                "{:?}", p.warnings
            ),
            Err(d) => prop_assert!(
                d.iter().any(|d| d.key.as_deref() == Some(full_key.as_str()) && d.name == format!("n{j}")),
                "{:?}", d
            ),
        }
        prop_assert_eq!(
            segments_by_node(&parsed(&with), full),
            segments_by_node(&parsed(&without), full)
        );
    }
}
