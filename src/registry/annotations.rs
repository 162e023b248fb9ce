//! Node annotations: the key names (Kilo's `kilo.squat.ai/` and our `wiremesh.io/`) and the
//! translation of a Kubernetes `Node` into a validated [`MeshNode`].
//!
//! Pure: depends on `k8s-openapi` types, the model, diagnostics and [`Parsed`]; no I/O, no
//! client.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, Granularity, MeshNode, NodeName, WgKey, network_of};
use crate::registry::Parsed;

/// Our own annotation prefix; it wins over Kilo's when both are set, except for the key (see
/// [`parse_parts`]).
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
    /// Comma-separated public keys of the segment leaders this node cannot reach directly
    /// (wiremesh only: read and written under `wiremesh.io/` alone).
    pub const UNREACHABLE: &str = "unreachable";
    /// Comma-separated names of the location's nodes this node found not forwarding while they
    /// led it (wiremesh only: read and written under `wiremesh.io/` alone).
    pub const FORWARDING_FAILED: &str = "forwarding-failed";
    /// The key-rotation request the node's agent handled last (wiremesh only).
    pub const KEY_ROTATED: &str = "key-rotated";
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
    /// `metadata.creationTimestamp` as Unix seconds.
    pub created: Option<i64>,
}

/// Translate a Kubernetes Node into a [`MeshNode`].
///
/// Every malformed value is reported (node, key, problem). Like Kilo, a node is left out
/// (`Err`, with all its diagnostics) only when it lacks what the mesh cannot do without: a
/// valid public key, an endpoint or a pod CIDR. Any other malformed value is replaced by what
/// Kilo uses in its place (a default, the next source, or nothing) and reported as a kept
/// diagnostic in [`Parsed::warnings`]. `docs/kilo-compatibility.md` has the table.
pub fn parse_node(node: &Node, topology_label: &str) -> Result<Parsed<MeshNode>, Vec<Diagnostic>> {
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
        created: node
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
    };
    parse_parts(parts, topology_label)
}

/// The diagnostics of one node, in the order its values are read.
struct Found<'a> {
    name: &'a str,
    diags: Vec<Diagnostic>,
}

impl Found<'_> {
    /// A malformed value that leaves the node out.
    fn fatal(&mut self, key: &str, problem: String) {
        self.diags
            .push(Diagnostic::node(self.name, Some(key), problem));
    }

    /// A malformed value replaced by Kilo's; the node stays.
    fn fallback(&mut self, key: &str, problem: String) {
        self.diags
            .push(Diagnostic::node(self.name, Some(key), problem).kept());
    }
}

/// Translate the mesh-relevant parts of a Node into a [`MeshNode`] (see [`parse_node`]).
pub fn parse_parts(
    node: NodeParts<'_>,
    topology_label: &str,
) -> Result<Parsed<MeshNode>, Vec<Diagnostic>> {
    let name = node.name;
    if name.is_empty() {
        return Err(vec![Diagnostic::node(
            "<unnamed>",
            Some("metadata.name"),
            "the Node has no name",
        )]);
    }
    let empty = BTreeMap::new();
    let ann = node.annotations.unwrap_or(&empty);
    let mut found = Found {
        name,
        diags: Vec::new(),
    };
    let mut out = MeshNode::new(name);
    out.created = node.created;

    // Location: the annotation, even empty, beats the topology label.
    out.location = match lookup(ann, keys::LOCATION) {
        Some((_, v)) => v.to_owned(),
        None => node
            .labels
            .and_then(|l| l.get(topology_label))
            .cloned()
            .unwrap_or_default(),
    };

    // Key: Kilo reads a malformed key as the zero key, which makes the node not ready. Every
    // agent (Kilo's and ours) publishes its key under Kilo's prefix, so where the two disagree
    // Kilo's wins: a `wiremesh.io/key` written onto another node's object cannot replace the
    // key that node's agent publishes.
    if let Some((k, v)) = key_annotation(ann, &mut found) {
        match v.parse::<WgKey>() {
            Ok(key) => out.key = Some(key),
            Err(e) => found.fatal(&k, format!("{v:?} is not a WireGuard public key: {e}")),
        }
    }

    parse_endpoint(ann, &mut out, &mut found);
    parse_internal_ip(ann, node.status_internal_ip, &mut out, &mut found);
    parse_pod_cidrs(&node, &mut out, &mut found);

    if let Some((k, v)) = lookup(ann, keys::WIREGUARD_IP).filter(|(_, v)| !v.is_empty()) {
        match parse_ip_or_cidr(v) {
            Ok(ip) => out.wireguard_ip = Some(ip),
            Err(e) => found.fallback(&k, format!("{e}; ignored")),
        }
    }

    if let Some((k, v)) = lookup(ann, keys::PERSISTENT_KEEPALIVE).filter(|(_, v)| !v.is_empty()) {
        match v.trim().parse::<u16>() {
            Ok(p) => out.persistent_keepalive = p,
            Err(_) => found.fallback(
                &k,
                format!("{v:?} is not a number of seconds from 0 to 65535; no keepalive is used"),
            ),
        }
    }

    out.leader = lookup(ann, keys::LEADER).is_some();

    // Allowed location IPs: Kilo drops each entry that does not parse and keeps the others.
    if let Some((k, v)) = lookup(ann, keys::ALLOWED_LOCATION_IPS) {
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match parse_cidr(item) {
                Ok(n) => out.allowed_location_ips.push(n),
                Err(e) => found.fallback(&k, format!("{e}; the entry is ignored")),
            }
        }
    }

    // Last seen: Kilo reads a malformed heartbeat as 0 (never), so the node counts as stale.
    if let Some((k, v)) = lookup(ann, keys::LAST_SEEN).filter(|(_, v)| !v.is_empty()) {
        match v.trim().parse::<i64>() {
            Ok(t) => out.last_seen = Some(t),
            Err(_) => {
                out.last_seen = Some(0);
                found.fallback(
                    &k,
                    format!(
                        "{v:?} is not a Unix time in seconds; read as 0 (never seen), so the node counts as stale"
                    ),
                );
            }
        }
    }

    parse_discovered_endpoints(ann, &mut out, &mut found);
    parse_unreachable(ann, &mut out, &mut found);
    parse_forwarding_failed(ann, &mut out, &mut found);

    if let Some((k, v)) = lookup(ann, keys::GRANULARITY).filter(|(_, v)| !v.is_empty()) {
        match v.parse::<Granularity>() {
            Ok(g) => out.granularity = Some(g),
            Err(e) => found.fallback(&k, format!("{e}; ignored")),
        }
    }

    if found.diags.iter().any(|d| d.skipped) {
        Err(found.diags)
    } else {
        Ok(Parsed {
            value: out,
            warnings: found.diags,
        })
    }
}

/// The key annotation to read: `kilo.squat.ai/key` when both prefixes carry a (non-empty) key
/// and they differ, with a warning on `wiremesh.io/key`; otherwise as [`lookup`].
fn key_annotation<'a>(
    ann: &'a BTreeMap<String, String>,
    found: &mut Found<'_>,
) -> Option<(String, &'a str)> {
    let ours_key = format!("{WIREMESH_PREFIX}{}", keys::KEY);
    let kilo_key = format!("{KILO_PREFIX}{}", keys::KEY);
    let ours = ann
        .get(&ours_key)
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    let kilo = ann
        .get(&kilo_key)
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    match (ours, kilo) {
        (Some(o), Some(k)) if o.trim() != k.trim() => {
            found.fallback(
                &ours_key,
                format!(
                    "{o:?} differs from {kilo_key}={k:?}, the key the node's agent publishes; {kilo_key} is used"
                ),
            );
            Some((kilo_key, k))
        }
        (Some(o), _) => Some((ours_key, o)),
        (None, Some(k)) => Some((kilo_key, k)),
        (None, None) => None,
    }
}

/// Endpoint: a valid force-endpoint wins over the published one; a malformed one falls back to
/// the published endpoint (Kilo's order). Without any valid endpoint the node is left out.
fn parse_endpoint(ann: &BTreeMap<String, String>, out: &mut MeshNode, found: &mut Found<'_>) {
    let parse = |kv: Option<(String, &str)>| {
        kv.filter(|(_, v)| !v.is_empty()).map(|(k, v)| {
            (
                v.parse::<Endpoint>()
                    .map_err(|e| format!("{v:?} is not an endpoint: {e}")),
                k,
            )
        })
    };
    let forced = parse(lookup(ann, keys::FORCE_ENDPOINT));
    let published = parse(lookup(ann, keys::ENDPOINT));
    match (forced, published) {
        (Some((Ok(e), _)), published) => {
            out.endpoint = Some(e);
            if let Some((Err(p), k)) = published {
                found.fallback(&k, format!("{p}; ignored (force-endpoint is used)"));
            }
        }
        (Some((Err(p), fk)), Some((Ok(e), _))) => {
            out.endpoint = Some(e);
            found.fallback(&fk, format!("{p}; the published endpoint is used"));
        }
        (None, Some((Ok(e), _))) => out.endpoint = Some(e),
        (forced, published) => {
            // No valid endpoint: every malformed one is why the node is left out.
            for (r, k) in [forced, published].into_iter().flatten() {
                if let Err(p) = r {
                    found.fatal(&k, p);
                }
            }
        }
    }
}

/// Internal IP: force-internal-ip (`-` or empty = none) > published > the status InternalIP.
/// A malformed force-internal-ip is skipped (the next source is used), as in Kilo; a malformed
/// internal-ip means no internal IP, as in Kilo (the status address is used only when the
/// annotation is absent). A malformed value is reported even when a forced one makes it moot.
fn parse_internal_ip(
    ann: &BTreeMap<String, String>,
    status_internal_ip: Option<&str>,
    out: &mut MeshNode,
    found: &mut Found<'_>,
) {
    let mut forced = false;
    match lookup(ann, keys::FORCE_INTERNAL_IP) {
        Some((_, v)) if v.trim().is_empty() || v.trim() == "-" => {
            out.no_internal_ip = true;
            forced = true;
        }
        Some((k, v)) => match parse_ip_or_cidr(v) {
            Ok(ip) => {
                out.internal_ip = Some(ip);
                forced = true;
            }
            Err(e) => found.fallback(&k, format!("{e}; ignored (internal-ip is used)")),
        },
        None => {}
    }
    match lookup(ann, keys::INTERNAL_IP).filter(|(_, v)| !v.is_empty()) {
        Some((k, v)) => match parse_ip_or_cidr(v) {
            Ok(ip) if !forced => out.internal_ip = Some(ip),
            Ok(_) => {}
            Err(e) if forced => {
                found.fallback(&k, format!("{e}; ignored (force-internal-ip is used)"))
            }
            Err(e) => found.fallback(&k, format!("{e}; the node has no internal IP")),
        },
        None if !forced => {
            out.internal_ip = status_internal_ip
                .and_then(|a| a.parse::<IpAddr>().ok())
                .map(IpNetwork::from);
        }
        None => {}
    }
}

/// Pod CIDRs: spec.podCIDRs, else spec.podCIDR. A malformed entry beside a valid one is
/// dropped; without any valid pod CIDR the node is left out (Kilo needs its pod CIDR).
fn parse_pod_cidrs(node: &NodeParts<'_>, out: &mut MeshNode, found: &mut Found<'_>) {
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
    let mut bad = Vec::new();
    for c in list {
        match parse_cidr(c) {
            Ok(n) => out.pod_cidrs.push(n),
            Err(e) => bad.push(e),
        }
    }
    for e in bad {
        if out.pod_cidrs.is_empty() {
            found.fatal(field, e);
        } else {
            found.fallback(field, format!("{e}; the entry is ignored"));
        }
    }
}

/// Discovered endpoints (Go `net.UDPAddr` JSON by public key): a map that does not decode is
/// ignored whole, as in Kilo; an entry whose key is no public key is dropped (Kilo keeps it, but
/// it can never match a peer).
fn parse_discovered_endpoints(
    ann: &BTreeMap<String, String>,
    out: &mut MeshNode,
    found: &mut Found<'_>,
) {
    let Some((k, v)) = lookup(ann, keys::DISCOVERED_ENDPOINTS)
        .filter(|(_, v)| !v.trim().is_empty() && v.trim() != "null")
    else {
        return;
    };
    match serde_json::from_str::<BTreeMap<String, Option<GoUdpAddr>>>(v) {
        Ok(map) => {
            for (key, addr) in map {
                let Some(addr) = addr else { continue };
                match key.parse::<WgKey>() {
                    Ok(wk) => {
                        out.discovered_endpoints
                            .insert(wk, SocketAddr::new(addr.ip, addr.port));
                    }
                    Err(e) => found.fallback(
                        &k,
                        format!("map key {key:?} is not a public key: {e}; the entry is ignored"),
                    ),
                }
            }
        }
        Err(e) => found.fallback(
            &k,
            format!("not a JSON map of key to {{IP, Port}}: {e}; no discovered endpoint is used"),
        ),
    }
}

/// `wiremesh.io/unreachable`: present (even empty) when the node's agent reports reachability;
/// an entry that is no public key is dropped with a warning, the others are kept.
fn parse_unreachable(ann: &BTreeMap<String, String>, out: &mut MeshNode, found: &mut Found<'_>) {
    let k = format!("{WIREMESH_PREFIX}{}", keys::UNREACHABLE);
    let Some(v) = ann.get(&k) else { return };
    let mut keys = std::collections::BTreeSet::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<WgKey>() {
            Ok(key) => {
                keys.insert(key);
            }
            Err(e) => found.fallback(
                &k,
                format!("entry {item:?} is not a public key: {e}; the entry is ignored"),
            ),
        }
    }
    out.unreachable = Some(keys);
}

/// `wiremesh.io/forwarding-failed`: present (even empty) when the node's agent probes its
/// leader's forwarding; an entry that is no valid node name is dropped with a warning.
fn parse_forwarding_failed(
    ann: &BTreeMap<String, String>,
    out: &mut MeshNode,
    found: &mut Found<'_>,
) {
    let k = format!("{WIREMESH_PREFIX}{}", keys::FORWARDING_FAILED);
    let Some(v) = ann.get(&k) else { return };
    let mut names = std::collections::BTreeSet::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if crate::model::is_dns1123_subdomain(item) {
            names.insert(NodeName(item.to_owned()));
        } else {
            found.fallback(
                &k,
                format!("entry {item:?} is not a node name; the entry is ignored"),
            );
        }
    }
    out.forwarding_failed = Some(names);
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
    fn forwarding_reports_are_ours_only_and_a_bad_entry_is_dropped_alone() {
        let n = node(
            "a",
            &[
                ("kilo.squat.ai/key", KEY),
                ("wiremesh.io/forwarding-failed", "b, Not_A_Name ,c.example"),
            ],
        );
        let p = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap();
        let want: std::collections::BTreeSet<NodeName> =
            ["b", "c.example"].map(|s| NodeName(s.into())).into();
        assert_eq!(p.value.forwarding_failed, Some(want));
        let d = &p.warnings[0];
        assert!(!d.skipped, "{d:?}");
        assert_eq!(d.key.as_deref(), Some("wiremesh.io/forwarding-failed"));
        assert!(d.problem.contains("Not_A_Name"), "{}", d.problem);
        // Present and empty: the agent fails over, no report. Absent: it does not (Kilo).
        let empty = node("a", &[("wiremesh.io/forwarding-failed", "")]);
        let p = parse_node(&empty, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(p.value.forwarding_failed, Some(Default::default()));
        let kilo = node("a", &[("kilo.squat.ai/forwarding-failed", "b")]);
        let p = parse_node(&kilo, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(p.value.forwarding_failed, None);
    }

    #[test]
    fn empty_node_is_valid_but_has_no_key_or_endpoint() {
        let n = parse_node(&node("a", &[]), DEFAULT_TOPOLOGY_LABEL)
            .unwrap()
            .value;
        assert_eq!(n.key, None);
        assert_eq!(n.endpoint, None);
        assert_eq!(n.location, "eu");
        assert_eq!(n.internal_ip, Some("192.168.1.5/32".parse().unwrap()));
        assert_eq!(n.pod_cidrs, vec!["10.42.1.0/24".parse().unwrap()]);
    }

    #[test]
    fn a_wiremesh_key_that_differs_from_the_published_kilo_key_does_not_win() {
        let forged = "GKPmdSLdoYrLqjd+qPxYoBN2+YTZaH4zYgJ3Cjgx+VA=";
        assert_ne!(forged, KEY);
        let p = parse_node(
            &node(
                "victim",
                &[("wiremesh.io/key", forged), ("kilo.squat.ai/key", KEY)],
            ),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert_eq!(p.value.key, Some(KEY.parse().unwrap()));
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        let w = &p.warnings[0];
        assert_eq!(w.key.as_deref(), Some("wiremesh.io/key"));
        assert!(
            !w.skipped && w.problem.contains("kilo.squat.ai/key is used"),
            "{w}"
        );
        // The same key under both prefixes is no disagreement.
        let p = parse_node(
            &node("n", &[("wiremesh.io/key", KEY), ("kilo.squat.ai/key", KEY)]),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn the_creation_timestamp_is_read_as_unix_seconds() {
        let mut n = node("a", &[]);
        n.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2024-01-01T00:00:00Z".parse().unwrap(),
        ));
        let m = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap().value;
        assert_eq!(m.created, Some(1_704_067_200));
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
        .unwrap()
        .value;
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
        .unwrap()
        .value;
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
        .unwrap()
        .value;
        assert_eq!(n.endpoint.unwrap().to_string(), "example.com:51821");
    }

    #[test]
    fn empty_location_annotation_beats_topology_label() {
        let n = parse_node(
            &node("a", &[("kilo.squat.ai/location", "")]),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap()
        .value;
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
        .unwrap()
        .value;
        assert_eq!(n.internal_ip, None);
        assert!(n.no_internal_ip);
    }

    #[test]
    fn only_a_bad_key_or_endpoint_leaves_the_node_out_with_every_problem_named() {
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
        let keys: Vec<_> = errs
            .iter()
            .map(|d| (d.key.clone().unwrap(), d.skipped))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("kilo.squat.ai/key".to_owned(), true),
                ("wiremesh.io/endpoint".to_owned(), true),
                ("kilo.squat.ai/persistent-keepalive".to_owned(), false),
                ("kilo.squat.ai/allowed-location-ips".to_owned(), false),
            ]
        );
        assert!(errs.iter().all(|d| d.name == "bad"));
    }

    /// What parsing one node must give.
    enum Want {
        /// In the mesh, the check holds, and a kept diagnostic names this key (or none).
        Kept(Option<&'static str>, fn(&MeshNode) -> bool),
        /// Left out, with a skipped diagnostic on this key.
        LeftOut(&'static str),
    }

    /// One case: what it is, the annotations added to a ready node, what must come out.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Want);

    /// Kilo's `TestTranslateNode` in our terms: per key, an empty, an invalid and a valid value
    /// on top of a node that is otherwise ready (key, endpoint, pod CIDR, status InternalIP).
    #[test]
    fn each_key_empty_invalid_and_valid_keeps_or_leaves_out_the_node_as_kilo_does() {
        use Want::{Kept, LeftOut};
        let json = format!(
            r#"{{"{KEY}":{{"IP":"5.6.7.8","Port":4000}},"nokey":{{"IP":"5.6.7.9","Port":1}}}}"#
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "key empty",
                vec![("kilo.squat.ai/key", "")],
                Kept(None, |n| n.key.is_none()),
            ),
            (
                "key invalid",
                vec![("kilo.squat.ai/key", "short")],
                LeftOut("kilo.squat.ai/key"),
            ),
            (
                "key valid",
                vec![],
                Kept(None, |n| n.key.is_some_and(|k| k.to_string() == KEY)),
            ),
            (
                "endpoint empty",
                vec![("kilo.squat.ai/endpoint", "")],
                Kept(None, |n| n.endpoint.is_none()),
            ),
            (
                "endpoint invalid",
                vec![("kilo.squat.ai/endpoint", "1.2.3.4")],
                LeftOut("kilo.squat.ai/endpoint"),
            ),
            (
                "endpoint valid",
                vec![],
                Kept(None, |n| {
                    n.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string() == "1.2.3.4:51820")
                }),
            ),
            (
                "endpoint invalid, force-endpoint valid",
                vec![
                    ("kilo.squat.ai/endpoint", "1.2.3.4:0"),
                    ("kilo.squat.ai/force-endpoint", "5.6.7.8:1"),
                ],
                Kept(Some("kilo.squat.ai/endpoint"), |n| {
                    n.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string() == "5.6.7.8:1")
                }),
            ),
            (
                "force-endpoint empty",
                vec![("kilo.squat.ai/force-endpoint", "")],
                Kept(None, |n| {
                    n.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string() == "1.2.3.4:51820")
                }),
            ),
            (
                "force-endpoint invalid: the published endpoint",
                vec![("kilo.squat.ai/force-endpoint", "no port")],
                Kept(Some("kilo.squat.ai/force-endpoint"), |n| {
                    n.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string() == "1.2.3.4:51820")
                }),
            ),
            (
                "force-endpoint invalid, no endpoint",
                vec![
                    ("kilo.squat.ai/force-endpoint", "no port"),
                    ("kilo.squat.ai/endpoint", ""),
                ],
                LeftOut("kilo.squat.ai/force-endpoint"),
            ),
            (
                "force-endpoint valid",
                vec![("kilo.squat.ai/force-endpoint", "example.com:7")],
                Kept(None, |n| {
                    n.endpoint
                        .as_ref()
                        .is_some_and(|e| e.to_string() == "example.com:7")
                }),
            ),
            (
                "internal-ip empty: the status address",
                vec![("kilo.squat.ai/internal-ip", "")],
                Kept(None, |n| {
                    n.internal_ip == Some("192.168.1.5/32".parse().unwrap())
                }),
            ),
            (
                "internal-ip invalid: none",
                vec![("kilo.squat.ai/internal-ip", "10.0.0.300/24")],
                Kept(Some("kilo.squat.ai/internal-ip"), |n| {
                    n.internal_ip.is_none() && !n.no_internal_ip
                }),
            ),
            (
                "internal-ip valid",
                vec![("kilo.squat.ai/internal-ip", "10.0.0.5/24")],
                Kept(None, |n| {
                    n.internal_ip == Some("10.0.0.5/24".parse().unwrap())
                }),
            ),
            (
                "force-internal-ip empty: none",
                vec![("kilo.squat.ai/force-internal-ip", "")],
                Kept(None, |n| n.internal_ip.is_none() && n.no_internal_ip),
            ),
            (
                "force-internal-ip invalid: internal-ip",
                vec![
                    ("kilo.squat.ai/force-internal-ip", "nope"),
                    ("kilo.squat.ai/internal-ip", "10.0.0.5/24"),
                ],
                Kept(Some("kilo.squat.ai/force-internal-ip"), |n| {
                    n.internal_ip == Some("10.0.0.5/24".parse().unwrap()) && !n.no_internal_ip
                }),
            ),
            (
                "force-internal-ip valid",
                vec![
                    ("kilo.squat.ai/force-internal-ip", "10.1.0.1/16"),
                    ("kilo.squat.ai/internal-ip", "10.0.0.5/24"),
                ],
                Kept(None, |n| {
                    n.internal_ip == Some("10.1.0.1/16".parse().unwrap())
                }),
            ),
            (
                "wireguard-ip empty",
                vec![("kilo.squat.ai/wireguard-ip", "")],
                Kept(None, |n| n.wireguard_ip.is_none()),
            ),
            (
                "wireguard-ip invalid",
                vec![("kilo.squat.ai/wireguard-ip", "10.4.0")],
                Kept(Some("kilo.squat.ai/wireguard-ip"), |n| {
                    n.wireguard_ip.is_none()
                }),
            ),
            (
                "wireguard-ip valid",
                vec![("kilo.squat.ai/wireguard-ip", "10.4.0.1/16")],
                Kept(None, |n| {
                    n.wireguard_ip == Some("10.4.0.1/16".parse().unwrap())
                }),
            ),
            (
                "persistent-keepalive empty",
                vec![("kilo.squat.ai/persistent-keepalive", "")],
                Kept(None, |n| n.persistent_keepalive == 0),
            ),
            (
                "persistent-keepalive invalid",
                vec![("kilo.squat.ai/persistent-keepalive", "abc")],
                Kept(Some("kilo.squat.ai/persistent-keepalive"), |n| {
                    n.persistent_keepalive == 0
                }),
            ),
            (
                "persistent-keepalive negative",
                vec![("kilo.squat.ai/persistent-keepalive", "-3")],
                Kept(Some("kilo.squat.ai/persistent-keepalive"), |n| {
                    n.persistent_keepalive == 0
                }),
            ),
            (
                "persistent-keepalive too big",
                vec![("wiremesh.io/persistent-keepalive", "70000")],
                Kept(Some("wiremesh.io/persistent-keepalive"), |n| {
                    n.persistent_keepalive == 0
                }),
            ),
            (
                "persistent-keepalive valid",
                vec![("kilo.squat.ai/persistent-keepalive", "25")],
                Kept(None, |n| n.persistent_keepalive == 25),
            ),
            (
                "allowed-location-ips empty",
                vec![("kilo.squat.ai/allowed-location-ips", "")],
                Kept(None, |n| n.allowed_location_ips.is_empty()),
            ),
            (
                "allowed-location-ips one invalid entry",
                vec![(
                    "kilo.squat.ai/allowed-location-ips",
                    "10.9.0.0/16,bogus,10.8.0.0/24",
                )],
                Kept(Some("kilo.squat.ai/allowed-location-ips"), |n| {
                    n.allowed_location_ips
                        == vec![
                            "10.9.0.0/16".parse().unwrap(),
                            "10.8.0.0/24".parse().unwrap(),
                        ]
                }),
            ),
            (
                "allowed-location-ips valid",
                vec![("kilo.squat.ai/allowed-location-ips", "10.9.0.0/16")],
                Kept(None, |n| n.allowed_location_ips.len() == 1),
            ),
            (
                "leader empty",
                vec![("kilo.squat.ai/leader", "")],
                Kept(None, |n| n.leader),
            ),
            (
                "leader any value",
                vec![("kilo.squat.ai/leader", "false")],
                Kept(None, |n| n.leader),
            ),
            (
                "location empty",
                vec![("kilo.squat.ai/location", "")],
                Kept(None, |n| n.location.is_empty()),
            ),
            (
                "location valid",
                vec![("kilo.squat.ai/location", "x y")],
                Kept(None, |n| n.location == "x y"),
            ),
            (
                "last-seen empty",
                vec![("kilo.squat.ai/last-seen", "")],
                Kept(None, |n| n.last_seen.is_none()),
            ),
            (
                "last-seen invalid: never",
                vec![("kilo.squat.ai/last-seen", "yesterday")],
                Kept(Some("kilo.squat.ai/last-seen"), |n| n.last_seen == Some(0)),
            ),
            (
                "last-seen valid",
                vec![("kilo.squat.ai/last-seen", "1700000000")],
                Kept(None, |n| n.last_seen == Some(1_700_000_000)),
            ),
            (
                "discovered-endpoints empty",
                vec![("kilo.squat.ai/discovered-endpoints", "")],
                Kept(None, |n| n.discovered_endpoints.is_empty()),
            ),
            (
                "discovered-endpoints invalid",
                vec![("kilo.squat.ai/discovered-endpoints", "{not json")],
                Kept(Some("kilo.squat.ai/discovered-endpoints"), |n| {
                    n.discovered_endpoints.is_empty()
                }),
            ),
            (
                "discovered-endpoints one entry without a key",
                vec![("kilo.squat.ai/discovered-endpoints", json.as_str())],
                Kept(Some("kilo.squat.ai/discovered-endpoints"), |n| {
                    n.discovered_endpoints
                        .values()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        == ["5.6.7.8:4000"]
                }),
            ),
            (
                "granularity empty",
                vec![("kilo.squat.ai/granularity", "")],
                Kept(None, |n| n.granularity.is_none()),
            ),
            (
                "granularity invalid",
                vec![("kilo.squat.ai/granularity", "mesh")],
                Kept(Some("kilo.squat.ai/granularity"), |n| {
                    n.granularity.is_none()
                }),
            ),
            (
                "granularity valid",
                vec![("kilo.squat.ai/granularity", "full")],
                Kept(None, |n| n.granularity == Some(Granularity::Full)),
            ),
        ];
        for (what, extra, want) in cases {
            let mut ann = vec![
                ("kilo.squat.ai/key", KEY),
                ("kilo.squat.ai/endpoint", "1.2.3.4:51820"),
            ];
            ann.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            ann.extend(extra);
            let got = parse_node(&node("n", &ann), DEFAULT_TOPOLOGY_LABEL);
            match (want, got) {
                (Kept(warned, check), Ok(p)) => {
                    assert!(check(&p.value), "{what}: {:?}", p.value);
                    let keys: Vec<_> = p.warnings.iter().map(|d| d.key.as_deref()).collect();
                    assert_eq!(
                        keys,
                        warned.map(Some).into_iter().collect::<Vec<_>>(),
                        "{what}"
                    );
                    assert!(
                        p.warnings.iter().all(|d| d.name == "n" && !d.skipped),
                        "{what}"
                    );
                }
                (LeftOut(key), Err(d)) => {
                    assert!(
                        d.iter()
                            .any(|d| d.key.as_deref() == Some(key) && d.skipped && d.name == "n"),
                        "{what}: {d:?}"
                    );
                }
                (_, got) => panic!("{what}: got {got:?}"),
            }
        }
    }

    #[test]
    fn a_bad_pod_cidr_leaves_the_node_out_unless_a_good_one_remains() {
        let mut n = node("a", &[]);
        n.spec = Some(NodeSpec {
            pod_cidr: Some("10.42.1.0/33".into()),
            ..Default::default()
        });
        let d = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap_err();
        assert_eq!(d.len(), 1);
        assert!(d[0].skipped && d[0].key.as_deref() == Some("spec.podCIDR"));
        n.spec = Some(NodeSpec {
            pod_cidrs: Some(vec!["10.42.1.0/24".into(), "fd42::/129".into()]),
            ..Default::default()
        });
        let p = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert_eq!(p.value.pod_cidrs, vec!["10.42.1.0/24".parse().unwrap()]);
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].key.as_deref(), Some("spec.podCIDRs"));
        assert!(!p.warnings[0].skipped);
    }

    #[test]
    fn discovered_endpoints_use_go_udpaddr_json() {
        let json = format!(r#"{{"{KEY}":{{"IP":"5.6.7.8","Port":4000,"Zone":""}}}}"#);
        let n = parse_node(
            &node("a", &[("kilo.squat.ai/discovered-endpoints", &json)]),
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap()
        .value;
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
        let m = parse_node(&n, DEFAULT_TOPOLOGY_LABEL).unwrap().value;
        assert_eq!(
            m.pod_cidrs,
            vec![
                "10.42.9.0/24".parse().unwrap(),
                "fd42::/64".parse().unwrap()
            ]
        );
    }
}
