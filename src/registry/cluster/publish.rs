//! Publishing this node: the annotations other nodes need (key, endpoint, internal IP, mesh IP,
//! granularity, last-seen heartbeat, discovered endpoints; and, under `wiremesh.io/` only, the
//! segment leaders it cannot reach directly), under Kilo's key names so Kilo nodes
//! in the same cluster read them, written as one JSON merge patch of exactly those keys on this
//! node's own Node object. Each is written under both prefixes, `kilo.squat.ai/` and
//! `wiremesh.io/` ([`PREFIXES`]): wiremesh reads its own prefix first, so a value someone else
//! wrote under it would otherwise win over this node's own (issue 16, finding 3).
//!
//! **Endpoint order.** The engine prefers a node's `force-endpoint` annotation to everything; what
//! the agent detects and publishes as `endpoint` is, first found: the Node's `ExternalIP`, a
//! global (non-private) address on the interface of the default route, the Node's `InternalIP`,
//! any other address on the default-route interface. The port is the mesh's listen port.
//! **Internal IP**: the Node's `InternalIP` (with the prefix of the interface holding it), else
//! the first private address on the default-route interface.
//!
//! The annotation rendering and endpoint detection are pure; [`patch_node`] is the one request.
//! Depends on `kube`, `k8s-openapi`, serde and the model.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::ClusterError;
use crate::model::{Endpoint, Granularity, NodeName, WgKey};
use crate::registry::annotations::{GoUdpAddr, KILO_PREFIX, WIREMESH_PREFIX, keys};

/// The prefixes every published annotation is written under.
pub const PREFIXES: [&str; 2] = [KILO_PREFIX, WIREMESH_PREFIX];

/// The annotation keys the agent owns on its Node (without prefix; each under both
/// [`PREFIXES`]).
pub const PUBLISHED_KEYS: [&str; 7] = [
    keys::KEY,
    keys::ENDPOINT,
    keys::INTERNAL_IP,
    keys::WIREGUARD_IP,
    keys::GRANULARITY,
    keys::LAST_SEEN,
    keys::DISCOVERED_ENDPOINTS,
];

/// What this node tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publication {
    /// The WireGuard public key (never the private one).
    pub key: Option<WgKey>,
    /// Where the others reach this node.
    pub endpoint: Option<Endpoint>,
    /// The node's address on its private network, with prefix.
    pub internal_ip: Option<IpNetwork>,
    /// The node's mesh address, with the mesh subnet's prefix (leaders only).
    pub wireguard_ip: Option<IpNetwork>,
    /// The mesh granularity this agent runs with.
    pub granularity: Option<Granularity>,
    /// Where peers behind NAT were really seen (keys of nodes or peers with keepalive).
    pub discovered_endpoints: BTreeMap<WgKey, SocketAddr>,
    /// Segment leaders this node tried and failed to reach directly (relays go around them).
    /// Written under `wiremesh.io/` only, always (empty when none): its presence says this
    /// node's agent relays.
    pub unreachable: std::collections::BTreeSet<WgKey>,
    /// Nodes of this location found not forwarding while they led it (held for a while, see
    /// `agent::forward`). Written under `wiremesh.io/` only (empty when none): its presence
    /// says this node's agent probes and fails over.
    /// `None`: failover is off on this node; the annotation is removed.
    pub forwarding_failed: Option<std::collections::BTreeSet<NodeName>>,
    /// The key-rotation request this agent handled last (`wiremesh.io/key-rotated`, ours only);
    /// `None` leaves the annotation as it is.
    pub key_rotated: Option<String>,
}

fn full(key: &str) -> String {
    format!("{KILO_PREFIX}{key}")
}

/// `key` under each of [`PREFIXES`].
fn both(key: &str) -> [String; 2] {
    PREFIXES.map(|p| format!("{p}{key}"))
}

impl Publication {
    /// The annotations under both prefixes, without last-seen: a value of `None` means "remove
    /// the key".
    pub fn annotations(&self) -> BTreeMap<String, Option<String>> {
        let discovered = (!self.discovered_endpoints.is_empty()).then(|| {
            let m: BTreeMap<String, GoUdpAddr> = self
                .discovered_endpoints
                .iter()
                .map(|(k, a)| {
                    (
                        k.to_string(),
                        GoUdpAddr {
                            ip: a.ip(),
                            port: a.port(),
                            zone: String::new(),
                        },
                    )
                })
                .collect();
            serde_json::to_string(&m).unwrap_or_default()
        });
        let values = [
            (keys::KEY, self.key.map(|k| k.to_string())),
            (
                keys::ENDPOINT,
                self.endpoint.as_ref().map(ToString::to_string),
            ),
            (keys::INTERNAL_IP, self.internal_ip.map(|n| n.to_string())),
            (keys::WIREGUARD_IP, self.wireguard_ip.map(|n| n.to_string())),
            (keys::GRANULARITY, self.granularity.map(|g| g.to_string())),
            (keys::DISCOVERED_ENDPOINTS, discovered),
        ];
        let mut out: BTreeMap<String, Option<String>> = values
            .into_iter()
            .flat_map(|(k, v)| both(k).map(|k| (k, v.clone())))
            .collect();
        let unreachable: Vec<String> = self.unreachable.iter().map(ToString::to_string).collect();
        out.insert(
            format!("{WIREMESH_PREFIX}{}", keys::UNREACHABLE),
            Some(unreachable.join(",")),
        );
        let failed = self
            .forwarding_failed
            .as_ref()
            .map(|f| f.iter().map(NodeName::as_str).collect::<Vec<_>>().join(","));
        out.insert(
            format!("{WIREMESH_PREFIX}{}", keys::FORWARDING_FAILED),
            failed,
        );
        if let Some(t) = &self.key_rotated {
            out.insert(
                format!("{WIREMESH_PREFIX}{}", keys::KEY_ROTATED),
                Some(t.clone()),
            );
        }
        out
    }

    /// Whether `node` already carries exactly these annotations (last-seen aside).
    pub fn is_on(&self, node: &Node) -> bool {
        let have = node.metadata.annotations.as_ref();
        self.annotations()
            .iter()
            .all(|(k, v)| have.and_then(|h| h.get(k)) == v.as_ref())
    }
}

/// The last-seen value on `node`, if any.
pub fn last_seen(node: &Node) -> Option<i64> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&full(keys::LAST_SEEN)))
        .and_then(|v| v.parse().ok())
}

/// The merge patch that writes `annotations` and `last-seen` (under both prefixes), and
/// nothing else.
pub fn merge_patch(
    annotations: &BTreeMap<String, Option<String>>,
    last_seen: i64,
) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (k, v) in annotations {
        map.insert(
            k.clone(),
            v.clone()
                .map_or(serde_json::Value::Null, serde_json::Value::String),
        );
    }
    for k in both(keys::LAST_SEEN) {
        map.insert(k, serde_json::Value::String(last_seen.to_string()));
    }
    serde_json::json!({ "metadata": { "annotations": map } })
}

/// Write `patch` on the Node named `node` (a merge patch: other annotations and fields stay).
pub async fn patch_node(
    client: &Client,
    node: &str,
    patch: &serde_json::Value,
) -> Result<Node, ClusterError> {
    let api = Api::<Node>::all(client.clone());
    Ok(api
        .patch(node, &PatchParams::apply("wiremesh"), &Patch::Merge(patch))
        .await?)
}

fn node_address(node: &Node, kind: &str) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == kind)
        .find_map(|a| a.address.parse().ok())
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(a) => a.is_loopback() || a.is_unique_local() || a.is_unicast_link_local(),
    }
}

/// The endpoint to publish (see the module docs for the order), with `port`.
pub fn detect_endpoint(node: &Node, default_route: &[IpNetwork], port: u16) -> Option<Endpoint> {
    let public_local = default_route
        .iter()
        .map(|n| n.ip())
        .find(|ip| !is_private(*ip));
    let ip = node_address(node, "ExternalIP")
        .or(public_local)
        .or_else(|| node_address(node, "InternalIP"))
        .or_else(|| default_route.first().map(|n| n.ip()))?;
    Some(Endpoint::Addr(SocketAddr::new(ip, port)))
}

/// The internal IP to publish: the Node's `InternalIP` with the prefix of the local address that
/// holds it (of `local`, all addresses of this machine), else the first private address on the
/// default-route interface.
pub fn detect_internal_ip(
    node: &Node,
    local: &[IpNetwork],
    default_route: &[IpNetwork],
) -> Option<IpNetwork> {
    if let Some(ip) = node_address(node, "InternalIP") {
        return Some(
            local
                .iter()
                .copied()
                .find(|n| n.ip() == ip)
                .unwrap_or_else(|| crate::model::host_net(ip)),
        );
    }
    default_route.iter().copied().find(|n| is_private(n.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addrs: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn endpoint_prefers_external_ip_then_public_local_then_internal_ip() {
        let dr = [net("192.168.1.5/24"), net("203.0.113.7/24")];
        let n = node(&[("InternalIP", "10.0.0.5"), ("ExternalIP", "198.51.100.1")]);
        assert_eq!(
            detect_endpoint(&n, &dr, 51820).map(|e| e.to_string()),
            Some("198.51.100.1:51820".into())
        );
        let n = node(&[("InternalIP", "10.0.0.5")]);
        assert_eq!(
            detect_endpoint(&n, &dr, 51820).map(|e| e.to_string()),
            Some("203.0.113.7:51820".into())
        );
        assert_eq!(
            detect_endpoint(&n, &dr[..1], 51821).map(|e| e.to_string()),
            Some("10.0.0.5:51821".into())
        );
        assert_eq!(
            detect_endpoint(&node(&[]), &dr[..1], 1).map(|e| e.to_string()),
            Some("192.168.1.5:1".into())
        );
        assert_eq!(detect_endpoint(&node(&[]), &[], 1), None);
    }

    #[test]
    fn internal_ip_takes_the_prefix_of_the_local_address() {
        let n = node(&[("InternalIP", "10.0.0.5")]);
        assert_eq!(
            detect_internal_ip(&n, &[net("10.0.0.5/16")], &[]),
            Some(net("10.0.0.5/16"))
        );
        assert_eq!(detect_internal_ip(&n, &[], &[]), Some(net("10.0.0.5/32")));
        assert_eq!(
            detect_internal_ip(
                &node(&[]),
                &[],
                &[net("203.0.113.7/24"), net("172.16.0.2/12")]
            ),
            Some(net("172.16.0.2/12"))
        );
    }

    #[test]
    fn patch_touches_only_our_keys_and_removes_unset_ones() {
        let key: WgKey = "Z0zZ8i7kJBD4pSZnHo2I5D3DrV7HD7oYKK2SYJ/Lj3Y="
            .parse()
            .unwrap();
        let mut p = Publication {
            key: Some(key),
            endpoint: Some(Endpoint::Addr("203.0.113.7:51820".parse().unwrap())),
            granularity: Some(Granularity::Location),
            ..Default::default()
        };
        p.discovered_endpoints
            .insert(key, "198.51.100.9:40000".parse().unwrap());
        let v = merge_patch(&p.annotations(), 1_700_000_000);
        let ann = v["metadata"]["annotations"].as_object().unwrap();
        // Both prefixes of each published key, unreachable and forwarding-failed (ours only).
        assert_eq!(ann.len(), 2 * PUBLISHED_KEYS.len() + 2);
        for k in PUBLISHED_KEYS {
            for key in both(k) {
                assert!(ann.contains_key(&key), "{key}");
            }
        }
        assert_eq!(ann["wiremesh.io/key"], key.to_string());
        assert_eq!(ann["wiremesh.io/last-seen"], "1700000000");
        assert_eq!(ann["kilo.squat.ai/key"], key.to_string());
        assert_eq!(ann["kilo.squat.ai/endpoint"], "203.0.113.7:51820");
        assert_eq!(ann["kilo.squat.ai/wireguard-ip"], serde_json::Value::Null);
        assert_eq!(ann["kilo.squat.ai/last-seen"], "1700000000");
        assert_eq!(
            ann["wiremesh.io/unreachable"], "",
            "reported, nothing unreachable"
        );
        assert!(!ann.contains_key("kilo.squat.ai/unreachable"), "not Kilo's");
        assert_eq!(
            ann["wiremesh.io/forwarding-failed"],
            serde_json::Value::Null,
            "failover off: the report is removed"
        );
        let mut q = p.clone();
        q.forwarding_failed = Some(["b".into(), "c".into()].map(NodeName).into());
        let v = merge_patch(&q.annotations(), 1_700_000_000);
        assert_eq!(
            v["metadata"]["annotations"]["wiremesh.io/forwarding-failed"],
            "b,c"
        );
        assert_eq!(ann["kilo.squat.ai/granularity"], "location");
        // What we write, our own parser (and Kilo's format) reads back.
        let mut n = Node::default();
        n.metadata.name = Some("a".into());
        n.metadata.annotations = Some(
            ann.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect(),
        );
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.42.0.0/24".into()),
            ..Default::default()
        });
        let m = crate::registry::annotations::parse_node(&n, "x")
            .unwrap()
            .value;
        assert_eq!(m.key, Some(key));
        assert_eq!(m.last_seen, Some(1_700_000_000));
        assert_eq!(
            m.discovered_endpoints.get(&key),
            Some(&"198.51.100.9:40000".parse().unwrap())
        );
        assert!(p.is_on(&n));
        p.internal_ip = Some(net("10.0.0.1/24"));
        assert!(!p.is_on(&n));
    }
}
