//! Node annotations: the key names (Kilo's `kilo.squat.ai/` and our `wiremesh.io/`) and the
//! translation of a Kubernetes `Node` into a validated [`MeshNode`].
//!
//! Pure: depends on `k8s-openapi` types, the model and diagnostics; no I/O, no client.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, Granularity, MeshNode, NodeName, WgKey, network_of};

/// Our own annotation prefix; it wins over Kilo's when both are set.
pub const WIREMESH_PREFIX: &str = "wiremesh.io/";
/// Kilo's annotation prefix, read so that a Kilo cluster works unchanged.
pub const KILO_PREFIX: &str = "kilo.squat.ai/";

/// Annotation key names (without prefix), the same as Kilo's.
pub mod keys {
    /// The node's published WireGuard endpoint.
    pub const ENDPOINT: &str = "endpoint";
    /// An endpoint set by the operator; wins over the published one.
    pub const FORCE_ENDPOINT: &str = "force-endpoint";
    /// An internal IP set by the operator; `-` or empty means "none".
    pub const FORCE_INTERNAL_IP: &str = "force-internal-ip";
    /// The node's published internal IP.
    pub const INTERNAL_IP: &str = "internal-ip";
    /// The node's WireGuard public key.
    pub const KEY: &str = "key";
    /// Unix time of the node's last heartbeat.
    pub const LAST_SEEN: &str = "last-seen";
    /// Presence means the node volunteers to lead its location.
    pub const LEADER: &str = "leader";
    /// The node's logical location.
    pub const LOCATION: &str = "location";
    /// Persistent keepalive in seconds (the node is behind NAT).
    pub const PERSISTENT_KEEPALIVE: &str = "persistent-keepalive";
    /// The mesh IP the node's agent published.
    pub const WIREGUARD_IP: &str = "wireguard-ip";
    /// JSON map of endpoints the node discovered for NATed peers.
    pub const DISCOVERED_ENDPOINTS: &str = "discovered-endpoints";
    /// Comma-separated CIDRs routable inside the node's location.
    pub const ALLOWED_LOCATION_IPS: &str = "allowed-location-ips";
    /// The granularity the node's agent runs with.
    pub const GRANULARITY: &str = "granularity";
}

/// The well-known label that gives a node's location when no annotation does.
pub const DEFAULT_TOPOLOGY_LABEL: &str = "topology.kubernetes.io/region";

/// The value of annotation `name`: ours first, then Kilo's. Returns the full key that was used.
pub fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    name: &str,
) -> Option<(String, &'a str)> {
    for prefix in [WIREMESH_PREFIX, KILO_PREFIX] {
        let key = format!("{prefix}{name}");
        if let Some(v) = annotations.get(&key) {
            return Some((key, v.as_str()));
        }
    }
    None
}

/// Parse `10.0.0.1/24` or a bare `10.0.0.1` (as a host network) into a network with its address.
pub fn parse_ip_or_cidr(s: &str) -> Result<IpNetwork, String> {
    let s = s.trim();
    if s.contains('/') {
        s.parse::<IpNetwork>()
            .map_err(|e| format!("{s:?} is not a CIDR: {e}"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNetwork::from)
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
    }
}

/// Parse a CIDR and zero its host bits.
pub fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    parse_ip_or_cidr(s).map(network_of)
}

/// Go's `net.UDPAddr` JSON form, as Kilo writes and reads discovered endpoints.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GoUdpAddr {
    #[serde(rename = "IP")]
    pub(crate) ip: IpAddr,
    #[serde(rename = "Port")]
    pub(crate) port: u16,
    /// IPv6 zone; always empty for the addresses the mesh uses.
    #[serde(rename = "Zone", default)]
    pub(crate) zone: String,
}

/// The parts of a Node the mesh reads, borrowed from a `k8s_openapi` Node or from the file
/// registry's lean decoding.
#[derive(Debug, Clone, Copy)]
pub struct NodeParts<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.annotations`.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// `metadata.labels`.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// `spec.podCIDR`.
    pub pod_cidr: Option<&'a str>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: &'a [String],
    /// The first `InternalIP` of `status.addresses`.
    pub status_internal_ip: Option<&'a str>,
}

/// Translate a Kubernetes Node into a [`MeshNode`].
///
/// Every malformed value is reported (node, key, problem); a node with any malformed value is
/// returned as `Err` with all of them, so the caller leaves exactly that node out.
pub fn parse_node(node: &Node, topology_label: &str) -> Result<MeshNode, Vec<Diagnostic>> {
    let spec = node.spec.as_ref();
    let parts = NodeParts {
        name: node.metadata.name.as_deref().unwrap_or_default(),
        annotations: node.metadata.annotations.as_ref(),
        labels: node.metadata.labels.as_ref(),
        pod_cidr: spec.and_then(|s| s.pod_cidr.as_deref()),
        pod_cidrs: spec
            .and_then(|s| s.pod_cidrs.as_deref())
            .unwrap_or_default(),
        status_internal_ip: node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.as_str()),
    };
    parse_parts(parts, topology_label)
}

/// Translate the mesh-relevant parts of a Node into a [`MeshNode`] (see [`parse_node`]).
pub fn parse_parts(node: NodeParts<'_>, topology_label: &str) -> Result<MeshNode, Vec<Diagnostic>> {
    let name = node.name.to_owned();
    let empty = BTreeMap::new();
    let ann = node.annotations.unwrap_or(&empty);
    let mut errs: Vec<Diagnostic> = Vec::new();
    let mut bad =
        |key: &str, problem: String| errs.push(Diagnostic::node(&name, Some(key), problem));
    let mut out = MeshNode::new(name.clone());
    if name.is_empty() {
        return Err(vec![Diagnostic::node(
            "<unnamed>",
            Some("metadata.name"),
            "the Node has no name",
        )]);
    }

    // Location: the annotation, even empty, beats the topology label.
    out.location = match lookup(ann, keys::LOCATION) {
        Some((_, v)) => v.to_owned(),
        None => node
            .labels
            .and_then(|l| l.get(topology_label))
            .cloned()
            .unwrap_or_default(),
    };

    if let Some((k, v)) = lookup(ann, keys::KEY).filter(|(_, v)| !v.is_empty()) {
        match v.parse::<WgKey>() {
            Ok(key) => out.key = Some(key),
            Err(e) => bad(&k, format!("{v:?} is not a WireGuard public key: {e}")),
        }
    }

    // Endpoint: force-endpoint wins over the published one.
    let forced = lookup(ann, keys::FORCE_ENDPOINT).filter(|(_, v)| !v.is_empty());
    let published = lookup(ann, keys::ENDPOINT).filter(|(_, v)| !v.is_empty());
    if let Some((k, v)) = forced.or(published) {
        match v.parse::<Endpoint>() {
            Ok(e) => out.endpoint = Some(e),
            Err(e) => bad(&k, format!("{v:?} is not an endpoint: {e}")),
        }
    }

    // Internal IP: force-internal-ip ("-" or "" = none) > published > status InternalIP.
    match lookup(ann, keys::FORCE_INTERNAL_IP) {
        Some((_, v)) if v.trim().is_empty() || v.trim() == "-" => out.no_internal_ip = true,
        Some((k, v)) => match parse_ip_or_cidr(v) {
            Ok(ip) => out.internal_ip = Some(ip),
            Err(e) => bad(&k, e),
        },
        None => {
            if let Some((k, v)) = lookup(ann, keys::INTERNAL_IP).filter(|(_, v)| !v.is_empty()) {
                match parse_ip_or_cidr(v) {
                    Ok(ip) => out.internal_ip = Some(ip),
                    Err(e) => bad(&k, e),
                }
            } else {
                out.internal_ip = node
                    .status_internal_ip
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .map(IpNetwork::from);
            }
        }
    }

    // Pod CIDRs: spec.podCIDRs, else spec.podCIDR.
    let (field, list): (&str, Vec<&str>) = if !node.pod_cidrs.is_empty() {
        (
            "spec.podCIDRs",
            node.pod_cidrs.iter().map(String::as_str).collect(),
        )
    } else {
        (
            "spec.podCIDR",
            node.pod_cidr
                .filter(|c| !c.is_empty())
                .into_iter()
                .collect(),
        )
    };
    for c in list {
        match parse_cidr(c) {
            Ok(n) => out.pod_cidrs.push(n),
            Err(e) => bad(field, e),
        }
    }

    if let Some((k, v)) = lookup(ann, keys::WIREGUARD_IP).filter(|(_, v)| !v.is_empty()) {
        match parse_ip_or_cidr(v) {
            Ok(ip) => out.wireguard_ip = Some(ip),
            Err(e) => bad(&k, e),
        }
    }

    if let Some((k, v)) = lookup(ann, keys::PERSISTENT_KEEPALIVE).filter(|(_, v)| !v.is_empty()) {
        match v.trim().parse::<u16>() {
            Ok(p) => out.persistent_keepalive = p,
            Err(_) => bad(
                &k,
                format!("{v:?} is not a number of seconds from 0 to 65535"),
            ),
        }
    }

    out.leader = lookup(ann, keys::LEADER).is_some();

    if let Some((k, v)) = lookup(ann, keys::ALLOWED_LOCATION_IPS) {
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_cidr(item) {
                Ok(n) => out.allowed_location_ips.push(n),
                Err(e) => bad(&k, e),
            }
        }
    }

    if let Some((k, v)) = lookup(ann, keys::LAST_SEEN).filter(|(_, v)| !v.is_empty()) {
        match v.trim().parse::<i64>() {
            Ok(t) => out.last_seen = Some(t),
            Err(_) => bad(&k, format!("{v:?} is not a Unix time in seconds")),
        }
    }

    if let Some((k, v)) = lookup(ann, keys::DISCOVERED_ENDPOINTS)
        .filter(|(_, v)| !v.trim().is_empty() && v.trim() != "null")
    {
        match serde_json::from_str::<BTreeMap<String, Option<GoUdpAddr>>>(v) {
            Ok(map) => {
                for (key, addr) in map {
                    let Some(addr) = addr else { continue };
                    match key.parse::<WgKey>() {
                        Ok(wk) => {
                            out.discovered_endpoints
                                .insert(wk, SocketAddr::new(addr.ip, addr.port));
                        }
                        Err(e) => bad(&k, format!("map key {key:?} is not a public key: {e}")),
                    }
                }
            }
            Err(e) => bad(&k, format!("not a JSON map of key to {{IP, Port}}: {e}")),
        }
    }

    if let Some((k, v)) = lookup(ann, keys::GRANULARITY).filter(|(_, v)| !v.is_empty()) {
        match v.parse::<Granularity>() {
            Ok(g) => out.granularity = Some(g),
            Err(e) => bad(&k, e),
        }
    }

    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

/// The node name as a [`NodeName`].
pub fn node_name(node: &Node) -> NodeName {
    NodeName(node.metadata.name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const KEY: &str = "HR8Kn0ISt4PBJ0jOYkiS3cc4Q6vKv9Ob2Kb3Ua0cWT4=";

    fn node(name: &str, ann: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                labels: Some(
                    [(DEFAULT_TOPOLOGY_LABEL.to_owned(), "eu".to_owned())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some("10.42.1.0/24".into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "192.168.1.5".into(),
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn empty_node_is_valid_but_has_no_key_or_endpoint() {
        let n = parse_node(&node("a", &[]), DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(n.key, None);
        assert_eq!(n.endpoint, None);
        assert_eq!(n.location, "eu");
        assert_eq!(n.internal_ip, Some("192.168.1.5/32".parse().unwrap()));
        assert_eq!(n.pod_cidrs, vec!["10.42.1.0/24".parse().unwrap()]);
    }

    #[test]
    fn kilo_annotations_are_read() {
        let n = parse_node(
            &node(
                "a",
                &[
                    ("kilo.squat.ai/key", KEY),
                    ("kilo.squat.ai/endpoint", "1.2.3.4:51820"),
                    ("kilo.squat.ai/internal-ip", "10.0.0.5/24"),
                    ("kilo.squat.ai/persistent-keepalive", "25"),
                    ("kilo.squat.ai/leader", ""),
                    (
                        "kilo.squat.ai/allowed-location-ips",
                        "10.9.0.0/16, 10.8.0.1/32",
                    ),
                    ("kilo.squat.ai/last-seen", "1700000000"),
                    ("kilo.squat.ai/granularity", "full"),
                ],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(n.key.unwrap().to_string(), KEY);
        assert_eq!(n.endpoint.unwrap().to_string(), "1.2.3.4:51820");
        assert_eq!(n.internal_ip, Some("10.0.0.5/24".parse().unwrap()));
        assert_eq!(n.persistent_keepalive, 25);
        assert!(n.leader);
        assert_eq!(n.allowed_location_ips.len(), 2);
        assert_eq!(n.last_seen, Some(1_700_000_000));
        assert_eq!(n.granularity, Some(Granularity::Full));
    }

    #[test]
    fn wiremesh_prefix_wins_over_kilo() {
        let n = parse_node(
            &node(
                "a",
                &[
                    ("kilo.squat.ai/location", "kilo-loc"),
                    ("wiremesh.io/location", "our-loc"),
                ],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(n.location, "our-loc");
    }

    #[test]
    fn force_endpoint_wins_over_published() {
        let n = parse_node(
            &node(
                "a",
                &[
                    ("kilo.squat.ai/endpoint", "1.2.3.4:51820"),
                    ("kilo.squat.ai/force-endpoint", "example.com:51821"),
                ],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(n.endpoint.unwrap().to_string(), "example.com:51821");
    }

    #[test]
    fn empty_location_annotation_beats_topology_label() {
        let n = parse_node(
            &node("a", &[("kilo.squat.ai/location", "")]),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(n.location, "");
    }

    #[test]
    fn force_internal_ip_dash_means_none() {
        let n = parse_node(
            &node(
                "a",
                &[
                    ("kilo.squat.ai/force-internal-ip", "-"),
                    ("kilo.squat.ai/internal-ip", "10.0.0.5/24"),
                ],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(n.internal_ip, None);
        assert!(n.no_internal_ip);
    }

    #[test]
    fn every_malformed_value_is_reported_with_node_and_key() {
        let errs = parse_node(
            &node(
                "bad",
                &[
                    ("kilo.squat.ai/key", "short"),
                    ("wiremesh.io/endpoint", "1.2.3.4"),
                    ("kilo.squat.ai/persistent-keepalive", "-3"),
                    ("kilo.squat.ai/allowed-location-ips", "10.0.0.0/33"),
                ],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap_err();
        let keys: Vec<_> = errs.iter().map(|d| d.key.clone().unwrap()).collect();
        assert_eq!(
            keys,
            vec![
                "kilo.squat.ai/key",
                "wiremesh.io/endpoint",
                "kilo.squat.ai/persistent-keepalive",
                "kilo.squat.ai/allowed-location-ips"
            ]
        );
        assert!(errs.iter().all(|d| d.name == "bad" && d.skipped));
    }

    #[test]
    fn discovered_endpoints_use_go_udpaddr_json() {
        let json = format!(r#"{{"{KEY}":{{"IP":"5.6.7.8","Port":4000,"Zone":""}}}}"#);
        let n = parse_node(
            &node("a", &[("kilo.squat.ai/discovered-endpoints", &json)]),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        let (k, v) = n.discovered_endpoints.iter().next().unwrap();
        assert_eq!(k.to_string(), KEY);
        assert_eq!(v.to_string(), "5.6.7.8:4000");
    }

    #[test]
    fn pod_cidrs_list_wins_and_host_bits_are_cleared() {
        let mut n = node("a", &[]);
        n.spec = Some(NodeSpec {
            pod_cidr: Some("10.42.1.0/24".into()),
            pod_cidrs: Some(vec!["10.42.9.7/24".into(), "fd42::/64".into()]),
            ..Default::default()
        });
        let m = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(
            m.pod_cidrs,
            vec![
                "10.42.9.0/24".parse().unwrap(),
                "fd42::/64".parse().unwrap()
            ]
        );
    }
}
