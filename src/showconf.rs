//! `showconf`: the WireGuard configuration (wg-quick format) that lets an outside machine join the
//! mesh as a given node or external peer, and the `[Peer]` stanza (or Kilo `Peer` resource) that
//! lets another WireGuard interface add a node's segment or a peer (Kilo's `kgctl showconf`).
//!
//! Pure: renders values and text from a [`Topology`]; no I/O. Depends on the topology engine,
//! the model, the desired state and diagnostics, plus the `Peer` resource type (and its
//! `ObjectMeta`) for the JSON/YAML form; never on netlink, Kubernetes clients or async code. The
//! node form is the agent's own [`DesiredState`](crate::desired::DesiredState) for that node and
//! the peer form goes through the same contributions, so showconf cannot disagree with the agent.
//!
//! ```text
//! node_conf    / peer_conf    → WgQuickConf → to_string()  (wg-quick text)
//! node_as_peer / peer_as_peer → WgPeer      → render_peer(Format::{WireGuard, Json, Yaml})
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::desired::WgPeer;
use crate::diagnostic::Subject;
use crate::model::{Endpoint, MeshNode, MeshPeer, NodeName, WgKey};
use crate::registry::peer::{
    DnsOrIp, PEER_GROUP, PEER_VERSION, PeerEndpoint, PeerResource, PeerSpec,
};
use crate::topology::{Contribution, LocalContext, LocalError, MeshOptions, Topology, assemble};

/// Why a configuration cannot be shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShowconfError {
    /// No node of that name is known.
    #[error("no node named {0} takes part in the mesh")]
    UnknownNode(String),
    /// No peer of that name is known.
    #[error("no peer named {0} takes part in the mesh")]
    UnknownPeer(String),
    /// The node is known but the engine left it out of the mesh.
    #[error("node {node} is left out of the mesh: {reason}")]
    NodeLeftOut {
        /// The node's name.
        node: String,
        /// Why it was left out.
        reason: String,
    },
    /// The peer is known but the engine left it out of the mesh.
    #[error("peer {peer} is left out of the mesh: {reason}")]
    PeerLeftOut {
        /// The peer's name.
        peer: String,
        /// Why it was left out.
        reason: String,
    },
    /// The node takes part but does not lead its segment, so it holds no WireGuard peers.
    #[error("node {node} is not a leader node (its segment is led by {leader})")]
    NotLeader {
        /// The node asked for.
        node: String,
        /// The leader of its segment.
        leader: String,
    },
    /// No node takes part in the mesh: a peer would have nothing to connect to.
    #[error("no node takes part in the mesh")]
    NoNodes,
    /// The JSON or YAML encoder failed.
    #[error("cannot encode the peer as {format}: {problem}")]
    Encode {
        /// The output format.
        format: Format,
        /// What the encoder said.
        problem: String,
    },
}

/// Output format of the `--as-peer` form (kgctl's `--output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// A wg-quick `[Peer]` stanza.
    #[default]
    WireGuard,
    /// A Kilo `Peer` resource as JSON.
    Json,
    /// A Kilo `Peer` resource as YAML.
    Yaml,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wireguard" => Ok(Format::WireGuard),
            "json" => Ok(Format::Json),
            "yaml" => Ok(Format::Yaml),
            o => Err(format!(
                "{o:?} is not an output format (wireguard, json or yaml)"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::WireGuard => "wireguard",
            Format::Json => "json",
            Format::Yaml => "yaml",
        })
    }
}

/// Whose configuration an `[Interface]` section is: says whose private key belongs there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cluster node (a segment leader).
    Node,
    /// An external peer.
    Peer,
}

/// The `[Interface]` section of a wg-quick configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct InterfaceSection {
    /// Whose private key belongs here.
    pub role: Role,
    /// Written as a real `PrivateKey =` line; `None` writes a commented placeholder instead.
    pub private_key: Option<WgKey>,
    /// `ListenPort`, when the machine must listen on a known port.
    pub listen_port: Option<u16>,
    /// `Address` (wg-quick only: `wg-quick strip` removes it).
    pub addresses: Vec<IpNetwork>,
    /// `MTU`, when the mesh fixes one (wg-quick only).
    pub mtu: Option<u32>,
}

impl fmt::Debug for InterfaceSection {
    // Hand-written so that a private key never ends up in logs or test output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterfaceSection")
            .field("role", &self.role)
            .field("private_key", &self.private_key.map(|_| "<redacted>"))
            .field("listen_port", &self.listen_port)
            .field("addresses", &self.addresses)
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// A wg-quick configuration: an `[Interface]` section, then one `[Peer]` per segment and
/// external peer, in Kilo's order (segments in topology order, then peers by name).
///
/// `Display` renders the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConf {
    /// The machine's own settings.
    pub interface: InterfaceSection,
    /// Its peers.
    pub peers: Vec<WgPeer>,
}

impl WgQuickConf {
    /// The same configuration with a real private key instead of the placeholder line.
    pub fn with_private_key(mut self, key: Option<&WgKey>) -> Self {
        if let Some(k) = key {
            self.interface.private_key = Some(*k);
        }
        self
    }
}

impl fmt::Display for WgQuickConf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.interface;
        writeln!(f, "[Interface]")?;
        match &i.private_key {
            Some(k) => writeln!(f, "PrivateKey = {k}")?,
            None => {
                let whose = match i.role {
                    Role::Node => "node",
                    Role::Peer => "peer",
                };
                writeln!(f, "# PrivateKey = <contents of the {whose}'s private key>")?;
            }
        }
        if let Some(port) = i.listen_port {
            writeln!(f, "ListenPort = {port}")?;
        }
        if !i.addresses.is_empty() {
            writeln!(f, "Address = {}", join(&i.addresses))?;
        }
        if let Some(mtu) = i.mtu {
            writeln!(f, "MTU = {mtu}")?;
        }
        for p in &self.peers {
            writeln!(f)?;
            write_peer(f, p)?;
        }
        Ok(())
    }
}

fn join(nets: &[IpNetwork]) -> String {
    let mut s = String::new();
    for (i, n) in nets.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&n.to_string());
    }
    s
}

/// One `[Peer]` stanza. The name goes into a comment; control characters are replaced so that a
/// strange name (the file registry does not validate names) cannot inject configuration lines.
fn write_peer(f: &mut impl fmt::Write, p: &WgPeer) -> fmt::Result {
    writeln!(f, "[Peer]")?;
    if !p.name.is_empty() {
        let name: String = p
            .name
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        writeln!(f, "# {name}")?;
    }
    writeln!(f, "PublicKey = {}", p.public_key)?;
    if let Some(psk) = &p.preshared_key {
        writeln!(f, "PresharedKey = {psk}")?;
    }
    if !p.allowed_ips.is_empty() {
        writeln!(f, "AllowedIPs = {}", join(&p.allowed_ips))?;
    }
    // `Endpoint`'s Display writes `[v6]:port` for IPv6 and `name:port` for DNS (wg resolves it).
    if let Some(ep) = &p.endpoint {
        writeln!(f, "Endpoint = {ep}")?;
    }
    if p.persistent_keepalive > 0 {
        writeln!(f, "PersistentKeepalive = {}", p.persistent_keepalive)?;
    }
    Ok(())
}

/// The configuration node `node` runs: its interface and the agent's own WireGuard peers.
///
/// Only a segment leader holds WireGuard peers; any other node is [`ShowconfError::NotLeader`].
pub fn node_conf(
    topo: &Topology<'_>,
    node: &NodeName,
    opts: &MeshOptions,
) -> Result<WgQuickConf, ShowconfError> {
    let idx = locate_node(topo, node)?;
    let (desired, _conflicts) = topo.local_state(node, opts).map_err(|e| match e {
        LocalError::Unknown(n) => ShowconfError::UnknownNode(n),
        LocalError::LeftOut(node, reason) => ShowconfError::NodeLeftOut { node, reason },
    })?;
    if !desired.leader {
        return Err(ShowconfError::NotLeader {
            node: node.to_string(),
            leader: topo.segments[idx].leader_node().name.to_string(),
        });
    }
    let mut peers = desired.peers;
    sort_in_kilo_order(topo, &mut peers);
    Ok(WgQuickConf {
        interface: InterfaceSection {
            role: Role::Node,
            private_key: None,
            listen_port: Some(desired.interface.listen_port),
            addresses: desired.interface.address.into_iter().collect(),
            mtu: desired.interface.mtu,
        },
        peers,
    })
}

/// wg-quick text for node `node`; `private_key`, when given, replaces the placeholder line.
pub fn node_config(
    topo: &Topology<'_>,
    node: &NodeName,
    opts: &MeshOptions,
    private_key: Option<&WgKey>,
) -> Result<String, ShowconfError> {
    Ok(node_conf(topo, node, opts)?
        .with_private_key(private_key)
        .to_string())
}

/// The configuration external peer `peer` runs (Kilo's `PeerConf`): one `[Peer]` per segment,
/// with the peer's keepalive and preshared key, and one per other external peer.
///
/// `Address` is the peer's allowed IPs; `ListenPort` is its endpoint's port when it has one.
pub fn peer_conf(
    topo: &Topology<'_>,
    peer: &NodeName,
    opts: &MeshOptions,
) -> Result<WgQuickConf, ShowconfError> {
    let me = find_peer(topo, peer)?;
    let ctx = external_peer_context(topo, me, opts)?;
    let mut contributions: Vec<Contribution> =
        Vec::with_capacity(topo.segments.len() + topo.peers.len());
    for s in &topo.segments {
        let mut c = ctx.segment(s, false);
        if let Some(p) = c.peers.first_mut() {
            p.preshared_key = me.preshared_key;
        }
        contributions.push(c);
    }
    for other in topo.peers.iter().filter(|p| p.name != me.name) {
        let mut c = ctx.peer(other);
        if let Some(p) = c.peers.first_mut() {
            // Another peer's preshared key is shared with the nodes only, not with this peer.
            p.preshared_key = None;
        }
        contributions.push(c);
    }
    let mut acc = Contribution::with_capacity(contributions.len());
    for c in &contributions {
        acc.absorb(c);
    }
    let (desired, _conflicts) = assemble(&ctx, acc);
    let mut peers = desired.peers;
    sort_in_kilo_order(topo, &mut peers);
    Ok(WgQuickConf {
        interface: InterfaceSection {
            role: Role::Peer,
            private_key: None,
            listen_port: me.endpoint.as_ref().map(Endpoint::port),
            addresses: me.allowed_ips.clone(),
            mtu: None,
        },
        peers,
    })
}

/// wg-quick text for external peer `peer`; `private_key`, when given, replaces the placeholder.
pub fn peer_config(
    topo: &Topology<'_>,
    peer: &NodeName,
    opts: &MeshOptions,
    private_key: Option<&WgKey>,
) -> Result<String, ShowconfError> {
    Ok(peer_conf(topo, peer, opts)?
        .with_private_key(private_key)
        .to_string())
}

/// The peer that lets another WireGuard interface reach node `node`'s segment (Kilo's `AsPeer`):
/// the leader's key and endpoint, the segment's allowed IPs, then `extra_allowed_ips`
/// (deduplicated, first occurrence kept).
///
/// As in Kilo, the segment's allowed-location-ips are not included (add them as extra IPs), and
/// only a leader can be shown.
pub fn node_as_peer(
    topo: &Topology<'_>,
    node: &NodeName,
    extra_allowed_ips: &[IpNetwork],
) -> Result<WgPeer, ShowconfError> {
    let seg = &topo.segments[locate_node(topo, node)?];
    let leader = seg.leader_node();
    if &leader.name != node {
        return Err(ShowconfError::NotLeader {
            node: node.to_string(),
            leader: leader.name.to_string(),
        });
    }
    let Some(public_key) = leader.key else {
        return Err(ShowconfError::NodeLeftOut {
            node: node.to_string(),
            reason: "no WireGuard public key published yet".into(),
        });
    };
    Ok(WgPeer {
        public_key,
        endpoint: leader.endpoint.clone(),
        allowed_ips: with_extra(&seg.allowed_ips, extra_allowed_ips),
        persistent_keepalive: 0,
        preshared_key: None,
        name: node.to_string(),
    })
}

/// The peer that lets another WireGuard interface reach external peer `peer`: its own key,
/// endpoint, keepalive, preshared key and allowed IPs, then `extra_allowed_ips` (deduplicated).
pub fn peer_as_peer(
    topo: &Topology<'_>,
    peer: &NodeName,
    extra_allowed_ips: &[IpNetwork],
) -> Result<WgPeer, ShowconfError> {
    let p = find_peer(topo, peer)?;
    Ok(WgPeer {
        public_key: p.key,
        endpoint: p.endpoint.clone(),
        allowed_ips: with_extra(&p.allowed_ips, extra_allowed_ips),
        persistent_keepalive: p.persistent_keepalive,
        preshared_key: p.preshared_key,
        name: p.name.to_string(),
    })
}

/// Render an `--as-peer` result: a `[Peer]` stanza, or a Kilo `Peer` resource as JSON or YAML.
pub fn render_peer(peer: &WgPeer, format: Format) -> Result<String, ShowconfError> {
    let encode = |problem: String| ShowconfError::Encode { format, problem };
    match format {
        Format::WireGuard => {
            let mut s = String::new();
            write_peer(&mut s, peer).map_err(|e| encode(e.to_string()))?;
            Ok(s)
        }
        Format::Json => serde_json::to_string_pretty(&peer_resource(peer))
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| encode(e.to_string())),
        Format::Yaml => {
            crate::yaml::to_string(&peer_resource(peer)).map_err(|e| encode(e.to_string()))
        }
    }
}

/// The Kilo `Peer` resource (`kilo.squat.ai/v1alpha1`) for `peer`, named after `peer.name`.
pub fn peer_resource(peer: &WgPeer) -> PeerResource {
    PeerResource {
        api_version: format!("{PEER_GROUP}/{PEER_VERSION}"),
        kind: "Peer".to_owned(),
        metadata: ObjectMeta {
            name: Some(peer.name.clone()),
            ..ObjectMeta::default()
        },
        spec: PeerSpec {
            allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
            endpoint: peer.endpoint.as_ref().map(|ep| PeerEndpoint {
                dns_or_ip: match ep {
                    Endpoint::Addr(a) => DnsOrIp {
                        dns: String::new(),
                        ip: a.ip().to_string(),
                    },
                    Endpoint::Dns { host, .. } => DnsOrIp {
                        dns: host.clone(),
                        ip: String::new(),
                    },
                },
                port: u32::from(ep.port()),
            }),
            persistent_keepalive: i64::from(peer.persistent_keepalive),
            preshared_key: peer
                .preshared_key
                .map(|k| k.to_string())
                .unwrap_or_default(),
            public_key: peer.public_key.to_string(),
        },
    }
}

/// The segment index of node `node`, or why it has none.
fn locate_node(topo: &Topology<'_>, node: &NodeName) -> Result<usize, ShowconfError> {
    topo.segment_of(node).ok_or_else(|| {
        match LocalError::left_out(node.as_str(), &topo.diagnostics) {
            Some(LocalError::LeftOut(node, reason)) => ShowconfError::NodeLeftOut { node, reason },
            _ => ShowconfError::UnknownNode(node.to_string()),
        }
    })
}

/// The external peer `peer` as the mesh uses it (allowed IPs deduplicated), or why it is absent.
fn find_peer<'t>(topo: &'t Topology<'_>, peer: &NodeName) -> Result<&'t MeshPeer, ShowconfError> {
    topo.peers.iter().find(|p| &p.name == peer).ok_or_else(|| {
        match topo
            .diagnostics
            .iter()
            .find(|d| d.subject == Subject::Peer && d.skipped && d.name == peer.as_str())
        {
            Some(d) => ShowconfError::PeerLeftOut {
                peer: peer.to_string(),
                reason: d.problem.clone(),
            },
            None => ShowconfError::UnknownPeer(peer.to_string()),
        }
    })
}

/// The engine's local view for an external peer: a leader of a segment with no nodes, using its
/// own keepalive, so that segment and peer contributions come out exactly as for a node.
fn external_peer_context(
    topo: &Topology<'_>,
    me: &MeshPeer,
    opts: &MeshOptions,
) -> Result<LocalContext, ShowconfError> {
    let seg = topo.segments.first().ok_or(ShowconfError::NoNodes)?;
    // The peer discovers nothing itself: every node's discoveries, in segment order.
    let discovered = topo.discovered_endpoints(&MeshNode::new(me.name.as_str()));
    // Mesh-wide settings (encapsulation, interface name, …) come from the options through
    // `from_parts`; everything that describes the local machine is overridden here.
    let base = LocalContext::from_parts(seg, seg.leader_node(), discovered, opts, topo.subnet);
    Ok(LocalContext {
        name: me.name.clone(),
        leader: true,
        private_ip: None,
        pod_cidrs: Vec::new(),
        keepalive: me.persistent_keepalive,
        listen_port: me.endpoint.as_ref().map_or(opts.port, Endpoint::port),
        gateway: None,
        address: None,
        ..base
    })
}

/// Sort peers as Kilo writes them: segments in topology order, then external peers by name.
fn sort_in_kilo_order(topo: &Topology<'_>, peers: &mut [WgPeer]) {
    let rank: HashMap<WgKey, usize> = topo
        .segments
        .iter()
        .filter_map(|s| s.public_key())
        .chain(topo.peers.iter().map(|p| p.key))
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    peers.sort_by_key(|p| {
        (
            rank.get(&p.public_key).copied().unwrap_or(usize::MAX),
            p.public_key,
        )
    });
}

/// `base` then `extra`, without repeats, first occurrence kept (Kilo's `DeduplicateIPs`).
fn with_extra(base: &[IpNetwork], extra: &[IpNetwork]) -> Vec<IpNetwork> {
    let mut seen = BTreeSet::new();
    base.iter()
        .chain(extra)
        .copied()
        .filter(|n| seen.insert(*n))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::Granularity;
    use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
    use crate::registry::file::{decode_peers, load_nodes, load_peers};
    use crate::topology::build;

    const FRA: &str = "6fcT3bwmiNulRE+RHfLJs4FfNX6IunjB0pJpmI6w5DA=";
    const HEL: &str = "cpmjjEo1wKcecLnNDXzPhTFGyG68rKbZxhzDpiN/bAI=";
    const PAR: &str = "f9r1NdEbmqO6dMerKkaahx+Im2GIJndztRrbqS9X3iU=";
    const LAPTOP: &str = "uN6GxGhVSEBwdGc3biyYBmAKCFyywS0JuWcOHUm9RHk=";
    const ORACLE_1: &str = "RZtYN4eilRAagqVr175R9PcR8xRb/JLfyQxdzlqg8Vw=";
    const HETZNER_1: &str = "CyGoo/Y64y/Tg8osKLZFN25jji8Q+yRh2kJ+aBEZlwc=";
    const HOME_B: &str = "0UHno+lxky2QJBklRgi1B3PLoZTn07vdJ1FhoO19AGo=";
    const OFFICE: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    const PSK: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn example(file: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(file)
    }

    fn nodes(file: &str) -> Vec<MeshNode> {
        let loaded = load_nodes(&example(file), DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
        loaded.items
    }

    fn laptop() -> Vec<MeshPeer> {
        load_peers(&example("peers.yaml")).unwrap().items
    }

    /// `laptop` plus an office router with a preshared key and a fixed IPv6 endpoint.
    fn laptop_and_office() -> Vec<MeshPeer> {
        let mut peers = laptop();
        peers.push(MeshPeer {
            name: "office".into(),
            key: OFFICE.parse().unwrap(),
            allowed_ips: nets(&["10.5.1.0/24"]),
            endpoint: Some("[2001:db8::7]:51821".parse().unwrap()),
            persistent_keepalive: 0,
            preshared_key: Some(PSK.parse().unwrap()),
        });
        peers
    }

    fn full() -> MeshOptions {
        MeshOptions {
            granularity: Granularity::Full,
            ..MeshOptions::default()
        }
    }

    fn location() -> MeshOptions {
        MeshOptions {
            granularity: Granularity::Location,
            ..MeshOptions::default()
        }
    }

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn key(s: &str) -> WgKey {
        s.parse().unwrap()
    }

    fn name(s: &str) -> NodeName {
        NodeName::from(s)
    }

    #[test]
    fn three_clouds_every_node_config_has_the_two_others_as_peers() {
        let nodes = nodes("three-clouds.yaml");
        let topo = build(nodes.iter(), &[], &full());
        let all = [
            ("fra-1", FRA, "10.42.0.0/24", "203.0.113.10", "10.4.0.1"),
            ("hel-1", HEL, "10.42.1.0/24", "198.51.100.20", "10.4.0.2"),
            ("par-1", PAR, "10.42.2.0/24", "192.0.2.30", "10.4.0.3"),
        ];
        for (me, _, _, _, mesh_ip) in all {
            let conf = node_conf(&topo, &name(me), &full()).unwrap();
            assert_eq!(conf.interface.listen_port, Some(51820), "{me}");
            assert_eq!(
                conf.interface.addresses,
                nets(&[&format!("{mesh_ip}/16")]),
                "{me}"
            );
            let expected: Vec<WgPeer> = all
                .iter()
                .filter(|o| o.0 != me)
                .map(|(n, k, pods, public, mesh)| WgPeer {
                    public_key: key(k),
                    endpoint: Some(format!("{public}:51820").parse().unwrap()),
                    allowed_ips: nets(&[pods, &format!("{public}/32"), &format!("{mesh}/32")]),
                    persistent_keepalive: 20,
                    preshared_key: None,
                    name: (*n).to_owned(),
                })
                .collect();
            assert_eq!(conf.peers, expected, "{me}");
        }
    }

    #[test]
    fn three_clouds_node_config_text_is_wg_quick() {
        let nodes = nodes("three-clouds.yaml");
        let topo = build(nodes.iter(), &[], &full());
        let text = node_config(&topo, &name("fra-1"), &full(), None).unwrap();
        assert_eq!(
            text,
            format!(
                "[Interface]
# PrivateKey = <contents of the node's private key>
ListenPort = 51820
Address = 10.4.0.1/16

[Peer]
# hel-1
PublicKey = {HEL}
AllowedIPs = 10.42.1.0/24, 198.51.100.20/32, 10.4.0.2/32
Endpoint = 198.51.100.20:51820
PersistentKeepalive = 20

[Peer]
# par-1
PublicKey = {PAR}
AllowedIPs = 10.42.2.0/24, 192.0.2.30/32, 10.4.0.3/32
Endpoint = 192.0.2.30:51820
PersistentKeepalive = 20
"
            )
        );
    }

    #[test]
    fn given_private_key_replaces_the_placeholder() {
        let nodes = nodes("three-clouds.yaml");
        let topo = build(nodes.iter(), &[], &full());
        let secret = key(PSK);
        let text = node_config(&topo, &name("hel-1"), &full(), Some(&secret)).unwrap();
        assert!(text.starts_with(&format!("[Interface]\nPrivateKey = {PSK}\nListenPort")));
        assert!(!text.contains("# PrivateKey"));
        let text = peer_config(&topo, &name("laptop"), &full(), Some(&secret));
        assert!(matches!(text, Err(ShowconfError::UnknownPeer(_))));
        let peers = laptop();
        let topo = build(nodes.iter(), &peers, &full());
        let text = peer_config(&topo, &name("laptop"), &full(), Some(&secret)).unwrap();
        assert!(text.starts_with(&format!("[Interface]\nPrivateKey = {PSK}\nAddress")));
    }

    #[test]
    fn node_config_peers_are_the_agents_desired_peers() {
        let nodes = nodes("locations.yaml");
        let peers = laptop_and_office();
        for opts in [full(), location()] {
            let topo = build(nodes.iter(), &peers, &opts);
            for s in &topo.segments {
                let leader = &s.leader_node().name;
                let mut shown = node_conf(&topo, leader, &opts).unwrap().peers;
                shown.sort();
                let mut agent = topo.desired_for(leader, &opts).unwrap().peers;
                agent.sort();
                assert_eq!(shown, agent, "{leader}");
            }
        }
    }

    #[test]
    fn location_leader_has_one_peer_per_other_location() {
        let nodes = nodes("locations.yaml");
        let topo = build(nodes.iter(), &[], &location());
        let conf = node_conf(&topo, &name("home-b"), &location()).unwrap();
        assert_eq!(conf.interface.addresses, nets(&["10.4.0.3/16"]));
        assert_eq!(conf.interface.listen_port, Some(51820));
        assert_eq!(
            conf.peers,
            vec![
                WgPeer {
                    public_key: key(ORACLE_1),
                    endpoint: Some("203.0.113.51:51820".parse().unwrap()),
                    allowed_ips: nets(&[
                        "10.42.30.0/24",
                        "10.1.0.5/32",
                        "10.42.31.0/24",
                        "10.1.0.6/32",
                        "10.4.0.1/32",
                        "10.1.9.0/24",
                    ]),
                    persistent_keepalive: 25,
                    preshared_key: None,
                    name: "oracle-1,oracle-2".into(),
                },
                WgPeer {
                    public_key: key(HETZNER_1),
                    endpoint: Some("198.51.100.41:51820".parse().unwrap()),
                    allowed_ips: nets(&[
                        "10.42.20.0/24",
                        "10.0.0.2/32",
                        "10.42.21.0/24",
                        "10.0.0.3/32",
                        "10.4.0.2/32",
                    ]),
                    persistent_keepalive: 25,
                    preshared_key: None,
                    name: "hetzner-1,hetzner-2".into(),
                },
            ]
        );
    }

    #[test]
    fn non_leader_node_is_an_error_as_in_kilo() {
        let nodes = nodes("locations.yaml");
        let topo = build(nodes.iter(), &[], &location());
        let err = node_config(&topo, &name("home-a"), &location(), None).unwrap_err();
        assert_eq!(
            err,
            ShowconfError::NotLeader {
                node: "home-a".into(),
                leader: "home-b".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "node home-a is not a leader node (its segment is led by home-b)"
        );
        assert_eq!(
            node_as_peer(&topo, &name("hetzner-2"), &[]).unwrap_err(),
            ShowconfError::NotLeader {
                node: "hetzner-2".into(),
                leader: "hetzner-1".into()
            }
        );
    }

    #[test]
    fn dns_endpoint_is_written_as_name_and_port() {
        let nodes = nodes("locations.yaml");
        let topo = build(nodes.iter(), &[], &location());
        let text = node_config(&topo, &name("hetzner-1"), &location(), None).unwrap();
        assert!(
            text.contains(&format!(
                "PublicKey = {HOME_B}\nAllowedIPs = 10.42.10.0/24, 192.168.1.11/32, \
                 10.42.11.0/24, 192.168.1.12/32, 10.42.12.0/24, 192.168.1.13/32, 10.4.0.3/32\n\
                 Endpoint = home.example.net:51820\n"
            )),
            "{text}"
        );
    }

    #[test]
    fn ipv6_endpoint_is_bracketed() {
        let mut nodes = nodes("three-clouds.yaml");
        nodes[2].endpoint = Some("[2001:db8::30]:51830".parse().unwrap());
        let topo = build(nodes.iter(), &[], &full());
        let text = node_config(&topo, &name("fra-1"), &full(), None).unwrap();
        assert!(
            text.contains("\nEndpoint = [2001:db8::30]:51830\n"),
            "{text}"
        );
        let text = node_config(&topo, &name("par-1"), &full(), None).unwrap();
        assert!(text.contains("\nListenPort = 51830\n"), "{text}");
    }

    /// The three clouds renumbered into IPv6 (endpoints, internal IPs, pod CIDRs, mesh subnet),
    /// one of them with a dual-stack pod CIDR, and an outside peer with IPv6 allowed IPs.
    fn three_clouds_in_ipv6() -> (Vec<MeshNode>, Vec<MeshPeer>, MeshOptions) {
        let mut nodes = nodes("three-clouds.yaml");
        for (i, n) in nodes.iter_mut().enumerate() {
            n.endpoint = Some(format!("[2001:db8::{}]:51820", i + 1).parse().unwrap());
            n.pod_cidrs = nets(&[&format!("fd42:0:{}::/64", i + 1)]);
            n.internal_ip = Some(format!("fd00:210:0:{}::b/64", i + 1).parse().unwrap());
        }
        nodes[1]
            .pod_cidrs
            .insert(0, "10.42.1.0/24".parse().unwrap());
        let peers = vec![MeshPeer {
            name: "laptop".into(),
            key: OFFICE.parse().unwrap(),
            allowed_ips: nets(&["fd10::99/128"]),
            endpoint: Some("[2001:db8::7]:51821".parse().unwrap()),
            persistent_keepalive: 25,
            preshared_key: None,
        }];
        let opts = MeshOptions {
            subnet: "fd10::/64".parse().unwrap(),
            ..full()
        };
        (nodes, peers, opts)
    }

    #[test]
    fn an_ipv6_mesh_node_config_has_ipv6_address_endpoints_and_allowed_ips() {
        let (nodes, peers, opts) = three_clouds_in_ipv6();
        let topo = build(nodes.iter(), &peers, &opts);
        let text = node_config(&topo, &name("fra-1"), &opts, None).unwrap();
        assert_eq!(
            text,
            format!(
                "[Interface]
# PrivateKey = <contents of the node's private key>
ListenPort = 51820
Address = fd10::1/64

[Peer]
# hel-1
PublicKey = {HEL}
AllowedIPs = 10.42.1.0/24, fd42:0:2::/64, fd00:210:0:2::b/128, fd10::2/128
Endpoint = [2001:db8::2]:51820
PersistentKeepalive = 20

[Peer]
# par-1
PublicKey = {PAR}
AllowedIPs = fd42:0:3::/64, fd00:210:0:3::b/128, fd10::3/128
Endpoint = [2001:db8::3]:51820
PersistentKeepalive = 20

[Peer]
# laptop
PublicKey = {OFFICE}
AllowedIPs = fd10::99/128
Endpoint = [2001:db8::7]:51821
PersistentKeepalive = 20
"
            )
        );
    }

    #[test]
    fn an_ipv6_mesh_peer_config_routes_every_ipv6_pod_cidr_and_the_mesh_subnet() {
        let (nodes, peers, opts) = three_clouds_in_ipv6();
        let topo = build(nodes.iter(), &peers, &opts);
        let text = peer_config(&topo, &name("laptop"), &opts, None).unwrap();
        assert!(text.contains("\nAddress = fd10::99/128\n"), "{text}");
        assert!(
            text.contains(
                "\nAllowedIPs = fd42:0:1::/64, fd00:210:0:1::b/128, fd10::1/128\n\
                 Endpoint = [2001:db8::1]:51820\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nAllowedIPs = 10.42.1.0/24, fd42:0:2::/64, fd00:210:0:2::b/128, fd10::2/128\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn natted_segment_is_reached_at_its_discovered_endpoint() {
        let mut nodes = nodes("locations.yaml");
        let seen: std::net::SocketAddr = "192.0.2.99:40000".parse().unwrap();
        let hetzner_1 = nodes.iter_mut().find(|n| n.name.as_str() == "hetzner-1");
        hetzner_1
            .unwrap()
            .discovered_endpoints
            .insert(key(HOME_B), seen);
        let peers = laptop();
        let topo = build(nodes.iter(), &peers, &location());
        let node = node_conf(&topo, &name("oracle-1"), &location()).unwrap();
        let peer = peer_conf(&topo, &name("laptop"), &location()).unwrap();
        for conf in [node, peer] {
            let home = conf.peers.iter().find(|p| p.public_key == key(HOME_B));
            assert_eq!(home.unwrap().endpoint, Some(Endpoint::Addr(seen)));
        }
    }

    #[test]
    fn peer_config_has_every_segment_with_the_peers_keepalive() {
        let nodes = nodes("locations.yaml");
        let peers = laptop();
        let topo = build(nodes.iter(), &peers, &location());
        let text = peer_config(&topo, &name("laptop"), &location(), None).unwrap();
        assert_eq!(
            text,
            format!(
                "[Interface]
# PrivateKey = <contents of the peer's private key>
Address = 10.5.0.1/32

[Peer]
# oracle-1,oracle-2
PublicKey = {ORACLE_1}
AllowedIPs = 10.42.30.0/24, 10.1.0.5/32, 10.42.31.0/24, 10.1.0.6/32, 10.4.0.1/32, 10.1.9.0/24
Endpoint = 203.0.113.51:51820
PersistentKeepalive = 10

[Peer]
# hetzner-1,hetzner-2
PublicKey = {HETZNER_1}
AllowedIPs = 10.42.20.0/24, 10.0.0.2/32, 10.42.21.0/24, 10.0.0.3/32, 10.4.0.2/32
Endpoint = 198.51.100.41:51820
PersistentKeepalive = 10

[Peer]
# home-a,home-b,home-c
PublicKey = {HOME_B}
AllowedIPs = 10.42.10.0/24, 192.168.1.11/32, 10.42.11.0/24, 192.168.1.12/32, 10.42.12.0/24, 192.168.1.13/32, 10.4.0.3/32
Endpoint = home.example.net:51820
PersistentKeepalive = 10
"
            )
        );
    }

    #[test]
    fn leader_config_lists_external_peers_after_segments() {
        let nodes = nodes("three-clouds.yaml");
        let peers = laptop_and_office();
        let topo = build(nodes.iter(), &peers, &full());
        let conf = node_conf(&topo, &name("par-1"), &full()).unwrap();
        let order: Vec<&str> = conf.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(order, ["fra-1", "hel-1", "laptop", "office"]);
        assert_eq!(
            conf.peers[2],
            WgPeer {
                public_key: key(LAPTOP),
                endpoint: None,
                allowed_ips: nets(&["10.5.0.1/32"]),
                persistent_keepalive: 20,
                preshared_key: None,
                name: "laptop".into(),
            }
        );
    }

    #[test]
    fn psk_goes_to_the_peer_and_its_segments_only() {
        let nodes = nodes("three-clouds.yaml");
        let peers = laptop_and_office();
        let topo = build(nodes.iter(), &peers, &full());
        // The node side: only the office stanza carries the office's key.
        let text = node_config(&topo, &name("fra-1"), &full(), None).unwrap();
        assert_eq!(text.matches("PresharedKey = ").count(), 1, "{text}");
        assert!(text.contains(&format!(
            "PublicKey = {OFFICE}\nPresharedKey = {PSK}\nAllowedIPs = 10.5.1.0/24\n\
             Endpoint = [2001:db8::7]:51821\nPersistentKeepalive = 20\n"
        )));
        // The office side: every segment, not the laptop.
        let conf = peer_conf(&topo, &name("office"), &full()).unwrap();
        assert_eq!(conf.interface.listen_port, Some(51821));
        let psks: Vec<_> = conf.peers.iter().map(|p| p.preshared_key).collect();
        assert_eq!(psks, [Some(key(PSK)), Some(key(PSK)), Some(key(PSK)), None]);
        assert_eq!(conf.peers[3].public_key, key(LAPTOP));
        assert!(conf.peers.iter().all(|p| p.persistent_keepalive == 0));
        // The laptop side: no preshared key anywhere, the office listed as a peer.
        let conf = peer_conf(&topo, &name("laptop"), &full()).unwrap();
        assert!(conf.peers.iter().all(|p| p.preshared_key.is_none()));
        assert_eq!(conf.peers[3].name, "office");
        assert_eq!(
            conf.peers[3].endpoint,
            Some("[2001:db8::7]:51821".parse().unwrap())
        );
        assert_eq!(conf.peers[3].persistent_keepalive, 10);
    }

    #[test]
    fn node_as_peer_is_the_segment_plus_extra_ips_once() {
        let nodes = nodes("three-clouds.yaml");
        let topo = build(nodes.iter(), &[], &full());
        let extra = nets(&["10.42.0.0/24", "10.9.0.0/16", "10.9.0.0/16"]);
        let p = node_as_peer(&topo, &name("fra-1"), &extra).unwrap();
        assert_eq!(
            render_peer(&p, Format::WireGuard).unwrap(),
            format!(
                "[Peer]\n# fra-1\nPublicKey = {FRA}\n\
                 AllowedIPs = 10.42.0.0/24, 203.0.113.10/32, 10.4.0.1/32, 10.9.0.0/16\n\
                 Endpoint = 203.0.113.10:51820\n"
            )
        );
    }

    #[test]
    fn location_as_peer_leaves_out_allowed_location_ips_as_kilo_does() {
        let nodes = nodes("locations.yaml");
        let topo = build(nodes.iter(), &[], &location());
        let p = node_as_peer(&topo, &name("oracle-1"), &[]).unwrap();
        assert_eq!(
            p.allowed_ips,
            nets(&[
                "10.42.30.0/24",
                "10.1.0.5/32",
                "10.42.31.0/24",
                "10.1.0.6/32",
                "10.4.0.1/32"
            ])
        );
        let p = node_as_peer(&topo, &name("home-b"), &[]).unwrap();
        assert_eq!(p.endpoint.unwrap().to_string(), "home.example.net:51820");
    }

    #[test]
    fn as_peer_json_and_yaml_are_kilo_peers_that_read_back() {
        let nodes = nodes("locations.yaml");
        let peers = laptop_and_office();
        let topo = build(nodes.iter(), &peers, &location());
        let shown = [
            node_as_peer(&topo, &name("home-b"), &nets(&["10.8.0.0/16"])).unwrap(),
            node_as_peer(&topo, &name("hetzner-1"), &[]).unwrap(),
            peer_as_peer(&topo, &name("office"), &[]).unwrap(),
            peer_as_peer(&topo, &name("laptop"), &nets(&["10.5.0.1/32"])).unwrap(),
        ];
        for p in &shown {
            for format in [Format::Json, Format::Yaml] {
                let text = render_peer(p, format).unwrap();
                let back = decode_peers(&text).unwrap();
                assert!(back.diagnostics.is_empty(), "{:?}", back.diagnostics);
                assert_eq!(
                    back.items,
                    vec![MeshPeer {
                        name: NodeName(p.name.clone()),
                        key: p.public_key,
                        allowed_ips: p.allowed_ips.clone(),
                        endpoint: p.endpoint.clone(),
                        persistent_keepalive: p.persistent_keepalive,
                        preshared_key: p.preshared_key,
                    }],
                    "{text}"
                );
            }
        }
        let json = render_peer(&shown[2], Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["apiVersion"], "kilo.squat.ai/v1alpha1");
        assert_eq!(v["kind"], "Peer");
        assert_eq!(v["metadata"], serde_json::json!({"name": "office"}));
        assert_eq!(
            v["spec"]["endpoint"],
            serde_json::json!({"dnsOrIP": {"ip": "2001:db8::7"}, "port": 51821})
        );
        let yaml = render_peer(&shown[0], Format::Yaml).unwrap();
        assert!(
            yaml.contains("dnsOrIP:\n      dns: home.example.net\n"),
            "{yaml}"
        );
    }

    #[test]
    fn peer_as_peer_keeps_its_own_keepalive_and_psk() {
        let nodes = nodes("three-clouds.yaml");
        let peers = laptop_and_office();
        let topo = build(nodes.iter(), &peers, &full());
        let text = render_peer(
            &peer_as_peer(&topo, &name("office"), &[]).unwrap(),
            Format::WireGuard,
        )
        .unwrap();
        assert_eq!(
            text,
            format!(
                "[Peer]\n# office\nPublicKey = {OFFICE}\nPresharedKey = {PSK}\n\
                 AllowedIPs = 10.5.1.0/24\nEndpoint = [2001:db8::7]:51821\n"
            )
        );
        let p = peer_as_peer(&topo, &name("laptop"), &[]).unwrap();
        assert_eq!(p.persistent_keepalive, 10);
        assert_eq!(p.endpoint, None);
    }

    #[test]
    fn unknown_or_left_out_names_are_errors() {
        let mut nodes = nodes("three-clouds.yaml");
        nodes[1].pod_cidrs.clear();
        let peers = laptop();
        let topo = build(nodes.iter(), &peers, &full());
        assert_eq!(
            node_config(&topo, &name("nope"), &full(), None),
            Err(ShowconfError::UnknownNode("nope".into()))
        );
        assert_eq!(
            node_as_peer(&topo, &name("nope"), &[]),
            Err(ShowconfError::UnknownNode("nope".into()))
        );
        assert_eq!(
            node_config(&topo, &name("hel-1"), &full(), None),
            Err(ShowconfError::NodeLeftOut {
                node: "hel-1".into(),
                reason: "no pod CIDR assigned yet".into()
            })
        );
        assert_eq!(
            peer_config(&topo, &name("nope"), &full(), None),
            Err(ShowconfError::UnknownPeer("nope".into()))
        );
        assert_eq!(
            peer_as_peer(&topo, &name("nope"), &[]),
            Err(ShowconfError::UnknownPeer("nope".into()))
        );
        // A peer whose key a node already uses is left out, and says why.
        let mut clash = laptop();
        clash[0].key = key(FRA);
        let topo = build(nodes.iter(), &clash, &full());
        assert!(matches!(
            peer_config(&topo, &name("laptop"), &full(), None),
            Err(ShowconfError::PeerLeftOut { .. })
        ));
        let empty: Vec<MeshNode> = Vec::new();
        let topo = build(empty.iter(), &peers, &full());
        assert_eq!(
            peer_config(&topo, &name("laptop"), &full(), None),
            Err(ShowconfError::NoNodes)
        );
    }

    #[test]
    fn strange_peer_name_cannot_inject_config_lines() {
        let nodes = nodes("three-clouds.yaml");
        let mut peers = laptop();
        peers[0].name = NodeName("evil\nAllowedIPs = 0.0.0.0/0".into());
        let topo = build(nodes.iter(), &peers, &full());
        let text = node_config(&topo, &name("fra-1"), &full(), None).unwrap();
        assert!(text.contains("# evil?AllowedIPs = 0.0.0.0/0\n"), "{text}");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("AllowedIPs = 0.0.0.0/0"))
        );
    }

    #[test]
    fn fixed_mtu_is_written() {
        let nodes = nodes("three-clouds.yaml");
        let opts = MeshOptions {
            mtu: Some(1380),
            ..full()
        };
        let topo = build(nodes.iter(), &[], &opts);
        let text = node_config(&topo, &name("fra-1"), &opts, None).unwrap();
        assert!(
            text.contains("Address = 10.4.0.1/16\nMTU = 1380\n"),
            "{text}"
        );
    }

    #[test]
    fn format_parses_kgctl_names() {
        for f in [Format::WireGuard, Format::Json, Format::Yaml] {
            assert_eq!(f.to_string().parse::<Format>(), Ok(f));
        }
        assert!("toml".parse::<Format>().is_err());
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let nodes = nodes("three-clouds.yaml");
        let topo = build(nodes.iter(), &[], &full());
        let conf = node_conf(&topo, &name("fra-1"), &full())
            .unwrap()
            .with_private_key(Some(&key(PSK)));
        assert!(!format!("{conf:?}").contains(PSK));
    }
}
