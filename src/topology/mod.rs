//! The topology engine: from nodes, peers and options to the mesh's segments, and from the mesh
//! and one local node to that node's [`DesiredState`]. Kilo's semantics (`pkg/mesh/topology.go`,
//! `routes.go`); differences are listed in `docs/kilo-compatibility.md`.
//!
//! Pure: no I/O, no async, no clock (time comes in as [`MeshOptions::now`]), deterministic.
//! May depend on the model, diagnostics and desired state only; never on netlink, Kubernetes or
//! tokio (a test in `tests/` checks this).

pub mod claims;
mod contribute;
pub mod incremental;

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use crate::desired::DesiredState;
use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, Granularity, MeshNode, MeshPeer, NodeName, WgKey, host_net};

pub(crate) use contribute::assemble;
pub(crate) use contribute::{Contribution, LocalContext};

/// Default mesh subnet, as in Kilo.
pub const DEFAULT_SUBNET: &str = "10.4.0.0/16";
/// Default WireGuard port, as in Kilo.
pub const DEFAULT_PORT: u16 = 51820;
/// Default WireGuard interface name.
pub const DEFAULT_INTERFACE: &str = "wiremesh0";
/// Default CNI bridge name.
pub const DEFAULT_BRIDGE: &str = "wmbr0";
/// Seconds between heartbeats; a node is fresh while its last-seen is under twice this old.
pub const CHECK_IN_PERIOD_SECS: i64 = 30;

/// When traffic between nodes of one location is put in an IPIP tunnel (Kilo's `--encapsulate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulate {
    /// Never: nodes of a location reach each other directly.
    Never,
    /// Only towards nodes outside the local node's internal subnet.
    CrossSubnet,
    /// Always (Kilo's default).
    Always,
}

impl std::str::FromStr for Encapsulate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Encapsulate::Never),
            "crosssubnet" => Ok(Encapsulate::CrossSubnet),
            "always" => Ok(Encapsulate::Always),
            o => Err(format!("{o:?} is not never, crosssubnet or always")),
        }
    }
}

/// Everything besides nodes and peers that the engine's result depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshOptions {
    /// Segment granularity.
    pub granularity: Granularity,
    /// Subnet the segments' mesh IPs are allocated from.
    pub subnet: IpNetwork,
    /// Listen port when the local node has no endpoint yet.
    pub port: u16,
    /// WireGuard interface name.
    pub interface: String,
    /// CNI bridge name.
    pub bridge: String,
    /// IPIP encapsulation inside a location.
    pub encapsulate: Encapsulate,
    /// Whether to route between nodes of the local location (Kilo's `--local`).
    pub local_routes: bool,
    /// Whether wiremesh manages the CNI bridge and pod masquerading (Kilo's `--cni`).
    pub cni: bool,
    /// Current Unix time for the last-seen check; `None` skips the check.
    pub now: Option<i64>,
    /// Fixed WireGuard MTU; `None` = automatic.
    pub mtu: Option<u32>,
    /// Clamp the MSS of TCP SYNs forwarded through the WireGuard interface to the route's MTU.
    pub mss_clamp: bool,
    /// Service CIDRs: never masqueraded, and no node may claim an address in them.
    pub service_cidrs: Vec<IpNetwork>,
    /// The ranges a node's allowed-location-ips must lie in (`--allowed-location-ips-within`);
    /// by default [`claims::DEFAULT_ALLOWED_LOCATION_IPS_WITHIN`].
    pub allowed_location_ips_within: Vec<IpNetwork>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            granularity: Granularity::Location,
            subnet: DEFAULT_SUBNET.parse().expect("valid default subnet"),
            port: DEFAULT_PORT,
            interface: DEFAULT_INTERFACE.to_owned(),
            bridge: DEFAULT_BRIDGE.to_owned(),
            encapsulate: Encapsulate::Always,
            local_routes: true,
            cni: true,
            now: None,
            mtu: None,
            mss_clamp: true,
            service_cidrs: Vec::new(),
            allowed_location_ips_within: claims::default_allowed_location_ips_within(),
        }
    }
}

/// A segment's identity and sort key: Kilo's `location:<name>` or `node:<name>`.
///
/// The derived order equals Kilo's string order (`location:…` sorts before `node:…`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegmentKey {
    /// A logical location shared by several nodes.
    Location(String),
    /// A node in a segment of its own.
    Node(String),
}

impl std::fmt::Display for SegmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegmentKey::Location(l) => write!(f, "location:{l}"),
            SegmentKey::Node(n) => write!(f, "node:{n}"),
        }
    }
}

/// The segment a node belongs to under `granularity`.
pub fn segment_key(node: &MeshNode, granularity: Granularity) -> SegmentKey {
    match granularity {
        Granularity::Location if node.internal_ip.is_some() => {
            SegmentKey::Location(node.location.clone())
        }
        _ => SegmentKey::Node(node.name.0.clone()),
    }
}

/// One segment: nodes that share one WireGuard identity (their leader's) and one mesh IP.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment<'a> {
    /// The segment's key.
    pub key: SegmentKey,
    /// Member nodes, sorted by name.
    pub nodes: Vec<&'a MeshNode>,
    /// Index of the leader in `nodes`.
    pub leader: usize,
    /// Index in `nodes` of the leader Kilo's rule prefers ([`find_leader`]); differs from
    /// `leader` while the location has failed over (see [`elect_leader`]).
    pub preferred: usize,
    /// The segment's mesh IP (on its leader's WireGuard interface).
    pub mesh_ip: IpAddr,
    /// Allowed IPs: each node's pod CIDRs and internal IP, then the mesh IP.
    pub allowed_ips: Vec<IpNetwork>,
    /// Allowed-location-ips of the members, deduplicated, sorted, overlap-filtered.
    pub allowed_location_ips: Vec<IpNetwork>,
}

impl<'a> Segment<'a> {
    /// The leader node.
    pub fn leader_node(&self) -> &'a MeshNode {
        self.nodes[self.leader]
    }

    /// The leader's public key (the segment's WireGuard identity). Ready nodes always have one.
    pub fn public_key(&self) -> Option<WgKey> {
        self.leader_node().key
    }

    /// Display label: the member names joined by commas.
    pub fn label(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(n.name.as_str());
        }
        s
    }
}

/// Build a segment from members sorted by name, with its allocated mesh IP. Allowed-location-ips
/// are deduplicated and sorted but not yet overlap-filtered.
pub fn make_segment<'a>(key: SegmentKey, nodes: Vec<&'a MeshNode>, mesh_ip: IpAddr) -> Segment<'a> {
    let preferred = find_leader(&nodes);
    let leader = elect_leader(&nodes);
    let mut allowed_ips = Vec::with_capacity(nodes.len() * 2 + 1);
    let mut alips = BTreeSet::new();
    for n in &nodes {
        allowed_ips.extend(n.pod_cidrs.iter().copied());
        if let Some(ip) = n.internal_ip {
            allowed_ips.push(host_net(ip.ip()));
        }
        alips.extend(n.allowed_location_ips.iter().copied());
    }
    allowed_ips.push(host_net(mesh_ip));
    Segment {
        key,
        nodes,
        leader,
        preferred,
        mesh_ip,
        allowed_ips,
        allowed_location_ips: alips.into_iter().collect(),
    }
}

/// Kilo's leader choice among nodes sorted by name: the first volunteer with a public
/// endpoint, else the first volunteer, else the first node with a public endpoint, else the first.
pub fn find_leader(nodes: &[&MeshNode]) -> usize {
    let public = |n: &MeshNode| n.endpoint.as_ref().is_some_and(Endpoint::is_public);
    nodes
        .iter()
        .position(|n| n.leader && public(n))
        .or_else(|| nodes.iter().position(|n| n.leader))
        .or_else(|| nodes.iter().position(|n| public(n)))
        .unwrap_or(0)
}

/// What a member of a location probes: its leader, and addresses reached through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderProbe {
    /// The location's current leader.
    pub leader: NodeName,
    /// Mesh IPs of other segments (on their leaders' WireGuard interfaces).
    pub targets: Vec<IpAddr>,
    /// The leaders of those segments, in the same order: when one changes (that location fails
    /// over, or a node joins), its mesh IP moves and answers again only after a handshake, which
    /// is no fault of this location's leader; the prober starts over.
    pub behind: Vec<NodeName>,
}

/// How many other segments a member probes through its leader: one that is down itself must
/// not make the leader look broken.
pub const PROBE_TARGETS: usize = 3;

/// Kilo's order of leader candidates (ranked as [`find_leader`] picks the first) with
/// failover: a candidate is passed over while more than half of the location's other nodes
/// report it not forwarding (`MeshNode::forwarding_failed`). Only in a location where every
/// node's agent reports (wiremesh): a Kilo agent would keep Kilo's leader, and two leaders
/// would split the location. When every candidate is reported, Kilo's leader stays.
pub fn elect_leader(nodes: &[&MeshNode]) -> usize {
    let preferred = find_leader(nodes);
    if nodes.len() < 2 || !nodes.iter().all(|n| n.forwarding_failed.is_some()) {
        return preferred;
    }
    let public = |n: &MeshNode| n.endpoint.as_ref().is_some_and(Endpoint::is_public);
    let rank = |n: &MeshNode| match (n.leader, public(n)) {
        (true, true) => 0,
        (true, false) => 1,
        (false, true) => 2,
        (false, false) => 3,
    };
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| (rank(nodes[i]), i));
    order
        .into_iter()
        .find(|&i| !forwarding_failed(nodes, i))
        .unwrap_or(preferred)
}

/// Whether more than half of the other nodes of `nodes` report node `i` not forwarding.
pub fn forwarding_failed(nodes: &[&MeshNode], i: usize) -> bool {
    let name = &nodes[i].name;
    let votes = nodes
        .iter()
        .enumerate()
        .filter(|&(j, n)| {
            j != i
                && n.forwarding_failed
                    .as_ref()
                    .is_some_and(|f| f.contains(name))
        })
        .count();
    2 * votes > nodes.len() - 1
}

/// The `index`-th mesh IP of `subnet` (index 0 is the first address after the network address).
pub fn allocate(subnet: IpNetwork, index: usize) -> Option<IpAddr> {
    let offset = u128::try_from(index).ok()?.checked_add(1)?;
    match subnet {
        IpNetwork::V4(n) => {
            let base = u32::from(n.network()) as u128;
            let ip = u32::try_from(base.checked_add(offset)?).ok()?;
            let ip = std::net::Ipv4Addr::from(ip);
            n.contains(ip).then_some(IpAddr::V4(ip))
        }
        IpNetwork::V6(n) => {
            let ip = std::net::Ipv6Addr::from(u128::from(n.network()).checked_add(offset)?);
            n.contains(ip).then_some(IpAddr::V6(ip))
        }
    }
}

/// Why a node cannot take part (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NotReady {
    /// It has no WireGuard public key.
    NoKey,
    /// It has no endpoint.
    NoEndpoint,
    /// It has no pod CIDR.
    NoPodCidr,
    /// Its last-seen heartbeat is older than two check-in periods.
    StaleHeartbeat,
}

impl NotReady {
    /// Every reason, in the order they are checked.
    pub const ALL: [NotReady; 4] = [
        NotReady::NoKey,
        NotReady::NoEndpoint,
        NotReady::NoPodCidr,
        NotReady::StaleHeartbeat,
    ];

    /// The reason in words, as diagnostics carry it.
    pub fn text(self) -> &'static str {
        match self {
            NotReady::NoKey => "no WireGuard public key published yet",
            NotReady::NoEndpoint => "no endpoint published yet",
            NotReady::NoPodCidr => "no pod CIDR assigned yet",
            NotReady::StaleHeartbeat => "last-seen heartbeat is stale (agent not running?)",
        }
    }

    /// The reason whose words are `text`, if any (to classify a diagnostic).
    pub fn from_text(text: &str) -> Option<NotReady> {
        NotReady::ALL.into_iter().find(|r| r.text() == text)
    }
}

/// Why a node is not ready to take part, or `None` when it is.
pub fn not_ready(node: &MeshNode, now: Option<i64>) -> Option<NotReady> {
    if node.key.is_none() {
        return Some(NotReady::NoKey);
    }
    if node.endpoint.is_none() {
        return Some(NotReady::NoEndpoint);
    }
    if node.pod_cidrs.is_empty() {
        return Some(NotReady::NoPodCidr);
    }
    if let (Some(now), Some(seen)) = (now, node.last_seen)
        && now - seen >= 2 * CHECK_IN_PERIOD_SECS
    {
        return Some(NotReady::StaleHeartbeat);
    }
    None
}

/// Why a node is not ready to take part, in words, or `None` when it is.
pub fn not_ready_reason(node: &MeshNode, now: Option<i64>) -> Option<&'static str> {
    not_ready(node, now).map(NotReady::text)
}

/// The whole mesh, independent of which node looks at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology<'a> {
    /// Granularity used.
    pub granularity: Granularity,
    /// Mesh subnet.
    pub subnet: IpNetwork,
    /// Segments in Kilo's order; the i-th has the i-th mesh IP.
    pub segments: Vec<Segment<'a>>,
    /// External peers that take part, sorted by name, allowed IPs deduplicated among them.
    pub peers: Vec<MeshPeer>,
    /// Pairs of segments that reach each other through a third, sorted; empty unless some
    /// agent reported a segment it cannot reach (see [`relays`]).
    pub relays: Vec<Relay>,
    /// Every node or peer left out or warned about, and why.
    pub diagnostics: Vec<Diagnostic>,
}

/// Two segments (indices, `a < b`) whose leaders cannot reach each other directly, and the
/// segment `via` whose leader forwards between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Relay {
    /// The first segment of the pair.
    pub a: usize,
    /// The second segment of the pair.
    pub b: usize,
    /// The relaying segment.
    pub via: usize,
}

/// Keepalive (seconds) on a relayed pair's direct peer when the local node sets none: the
/// direct path keeps being tried, so it replaces the relay once it works.
pub const RELAY_PROBE_KEEPALIVE: u16 = 25;

/// The relays of the mesh: a pair of segments is relayed when the leader of either reports the
/// other's leader unreachable (`MeshNode::unreachable`) and both leaders report at all (a
/// leader whose agent does not, Kilo's, would not accept the relayed packets). The relay is the
/// first segment, those without keepalive (not behind NAT) before the others and then in
/// segment order, whose leader reports and that neither end reports nor reports either end.
/// Every pair has one path: direct, or through one relay that reaches both ends directly (no
/// chain, no loop). A pair without such a segment stays direct, with a diagnostic.
pub fn relays(segments: &[Segment<'_>], diagnostics: &mut Vec<Diagnostic>) -> Vec<Relay> {
    let leaders: Vec<&MeshNode> = segments.iter().map(Segment::leader_node).collect();
    let reported = |i: usize| leaders[i].unreachable.as_ref().filter(|u| !u.is_empty());
    if !(0..leaders.len()).any(|i| reported(i).is_some()) {
        return Vec::new();
    }
    let by_key: FxHashMap<WgKey, usize> = leaders
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.key.map(|k| (k, i)))
        .collect();
    let reports = |i: usize, j: usize| {
        leaders[i]
            .unreachable
            .as_ref()
            .zip(leaders[j].key)
            .is_some_and(|(u, k)| u.contains(&k))
    };
    let blocked = |i: usize, j: usize| reports(i, j) || reports(j, i);
    let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in 0..leaders.len() {
        for k in reported(i).into_iter().flatten() {
            let Some(&j) = by_key.get(k).filter(|&&j| j != i) else {
                continue;
            };
            if leaders[j].unreachable.is_none() {
                diagnostics.push(
                    Diagnostic::node(
                        leaders[i].name.as_str(),
                        Some(UNREACHABLE_KEY),
                        format!(
                            "{} is unreachable from here, but its agent does not relay (not \
                             wiremesh); the direct path is kept",
                            leaders[j].name
                        ),
                    )
                    .kept(),
                );
                continue;
            }
            pairs.insert((i.min(j), i.max(j)));
        }
    }
    let mut candidates: Vec<usize> = (0..leaders.len())
        .filter(|&r| leaders[r].unreachable.is_some())
        .collect();
    candidates.sort_by_key(|&r| (leaders[r].persistent_keepalive != 0, r));
    let mut out = Vec::with_capacity(pairs.len());
    for (a, b) in pairs {
        match candidates
            .iter()
            .find(|&&r| r != a && r != b && !blocked(a, r) && !blocked(b, r))
        {
            Some(&via) => out.push(Relay { a, b, via }),
            None => diagnostics.push(
                Diagnostic::node(
                    leaders[a].name.as_str(),
                    Some(UNREACHABLE_KEY),
                    format!(
                        "{} and this node cannot reach each other directly and no segment \
                         reaches both; the direct path is kept",
                        leaders[b].name
                    ),
                )
                .kept(),
            ),
        }
    }
    out
}

/// A warning for each location led by another node than Kilo's choice, naming who reported
/// the preferred leader not forwarding.
fn failovers(segments: &[Segment<'_>], diagnostics: &mut Vec<Diagnostic>) {
    for s in segments.iter().filter(|s| s.leader != s.preferred) {
        let preferred = s.nodes[s.preferred];
        let reporters: Vec<&str> = s
            .nodes
            .iter()
            .filter(|n| {
                n.forwarding_failed
                    .as_ref()
                    .is_some_and(|f| f.contains(&preferred.name))
            })
            .map(|n| n.name.as_str())
            .collect();
        diagnostics.push(
            Diagnostic::node(
                preferred.name.as_str(),
                Some(FORWARDING_FAILED_KEY),
                format!(
                    "does not forward for its location by the reports of {}; {} leads {} instead",
                    reporters.join(", "),
                    s.leader_node().name,
                    s.key
                ),
            )
            .kept(),
        );
    }
}

/// The annotation that carries forwarding reports, named in diagnostics.
const FORWARDING_FAILED_KEY: &str = "wiremesh.io/forwarding-failed";

/// The annotation that carries unreachable reports, named in diagnostics.
const UNREACHABLE_KEY: &str = "wiremesh.io/unreachable";

/// The pod CIDRs of nodes in the mesh, disjoint, for overlap checks in O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrIndex {
    /// (IPv6?, first address) → (last address, the CIDR, its node).
    spans: BTreeMap<(bool, u128), (u128, IpNetwork, NodeName)>,
}

fn span(net: &IpNetwork) -> (bool, u128, u128) {
    match net {
        IpNetwork::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNetwork::V6(n) => {
            let first = u128::from(n.network());
            let host_bits = 128 - u32::from(n.prefix());
            let last = first | u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
            (true, first, last)
        }
    }
}

impl CidrIndex {
    /// A CIDR in the index that overlaps `net` and belongs to a node other than `node`.
    pub fn conflict(&self, net: &IpNetwork, node: &NodeName) -> Option<(&IpNetwork, &NodeName)> {
        let (v6, first, last) = span(net);
        // Disjoint spans sorted by start are sorted by end too: only the last one starting at
        // or before `last` can reach `first`. A node's own CIDRs may sit in between.
        self.spans
            .range((v6, 0)..=(v6, last))
            .rev()
            .take_while(|(_, (end, _, _))| *end >= first)
            .map(|(_, (_, c, o))| (c, o))
            .find(|(_, o)| *o != node)
    }

    /// Every CIDR in the index that overlaps `net`, with its node.
    pub fn overlapping(&self, net: &IpNetwork) -> impl Iterator<Item = (&IpNetwork, &NodeName)> {
        let (v6, first, last) = span(net);
        self.spans
            .range((v6, 0)..=(v6, last))
            .rev()
            .take_while(move |(_, (end, _, _))| *end >= first)
            .map(|(_, (_, c, o))| (c, o))
    }

    /// Record `net` as `node`'s (it must not overlap another node's). The index keeps only the
    /// widest of a node's nested CIDRs, so that its spans stay disjoint.
    pub fn insert(&mut self, net: &IpNetwork, node: &NodeName) {
        let (v6, first, last) = span(net);
        let mut inner = Vec::new();
        for (c, o) in self.overlapping(net) {
            if o == node {
                let (_, f, l) = span(c);
                if f <= first && last <= l {
                    return;
                }
                inner.push(f);
            }
        }
        for f in inner {
            self.spans.remove(&(v6, f));
        }
        self.spans.insert((v6, first), (last, *net, node.clone()));
    }

    /// Forget `net` if `node` holds it.
    pub fn remove(&mut self, net: &IpNetwork, node: &NodeName) {
        let (v6, first, _) = span(net);
        if self
            .spans
            .get(&(v6, first))
            .is_some_and(|(_, _, o)| o == node)
        {
            self.spans.remove(&(v6, first));
        }
    }
}

/// The ready nodes, sorted by name and unique by name, key and pod CIDRs (a node whose pod CIDR
/// overlaps one of a node earlier by name is left out), plus diagnostics for the rest.
pub fn ready_nodes<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    now: Option<i64>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<&'a MeshNode> {
    let mut ready = ready_unique(nodes, now, diagnostics);
    ready_nodes_backstop(&mut ready, diagnostics);
    ready
}

/// The ready nodes, sorted by name and unique by name (the first of a name is used), plus
/// diagnostics for the rest.
pub(crate) fn ready_unique<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    now: Option<i64>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<&'a MeshNode> {
    let nodes = nodes.into_iter();
    let mut ready: Vec<&MeshNode> = Vec::with_capacity(nodes.size_hint().0);
    for n in nodes {
        match not_ready_reason(n, now) {
            None => ready.push(n),
            Some(why) => diagnostics.push(Diagnostic::node(n.name.as_str(), None, why)),
        }
    }
    ready.sort_by(|a, b| a.name.cmp(&b.name));
    ready.dedup_by(|b, a| {
        let dup = a.name == b.name;
        if dup {
            diagnostics.push(Diagnostic::node(
                b.name.as_str(),
                None,
                "the same node name appears twice; the first one is used",
            ));
        }
        dup
    });
    ready
}

/// Leave out a node whose key or pod CIDR another node earlier by name holds. After
/// [`claims::check`] nothing is left out here; the engine's builder keeps it so that no input
/// can give WireGuard one key twice or route one pod CIDR two ways.
fn ready_nodes_backstop(ready: &mut Vec<&MeshNode>, diagnostics: &mut Vec<Diagnostic>) {
    let mut owners: FxHashMap<WgKey, &NodeName> = FxHashMap::default();
    owners.reserve(ready.len());
    ready.retain(|n| {
        let Some(key) = n.key else { return false };
        match owners.get(&key) {
            Some(first) => {
                diagnostics.push(
                    Diagnostic::node(
                        n.name.as_str(),
                        Some("key"),
                        format!("public key {key} is already used by node {first}"),
                    )
                    .with_other(first.as_str()),
                );
                false
            }
            None => {
                owners.insert(key, &n.name);
                true
            }
        }
    });
    let mut cidrs = CidrIndex::default();
    ready.retain(|n| {
        let clash = n
            .pod_cidrs
            .iter()
            .find_map(|c| cidrs.conflict(c, &n.name).map(|(o, owner)| (c, o, owner)));
        if let Some((c, o, owner)) = clash {
            diagnostics.push(
                Diagnostic::node(
                    n.name.as_str(),
                    Some("podCIDR"),
                    format!("pod CIDR {c} overlaps pod CIDR {o} of node {owner}"),
                )
                .with_other(owner.as_str()),
            );
            return false;
        }
        for c in &n.pod_cidrs {
            cidrs.insert(c, &n.name);
        }
        true
    });
}

/// External peers that take part: sorted by name, keys not used by nodes, allowed IPs
/// deduplicated among peers (Kilo's `deduplicatePeerIPs`).
pub fn ready_peers(
    peers: &[MeshPeer],
    node_keys: &dyn Fn(&WgKey) -> Option<String>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<MeshPeer> {
    let mut sorted: Vec<&MeshPeer> = peers.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut seen_ips = BTreeSet::new();
    let mut seen_keys = BTreeMap::new();
    let mut out = Vec::with_capacity(sorted.len());
    for p in sorted {
        if let Some(node) = node_keys(&p.key) {
            diagnostics.push(Diagnostic::peer(
                p.name.as_str(),
                Some("spec.publicKey"),
                format!("public key {} is already used by node {node}", p.key),
            ));
            continue;
        }
        if let Some(first) = seen_keys.insert(p.key, p.name.clone()) {
            seen_keys.insert(p.key, first.clone());
            diagnostics.push(Diagnostic::peer(
                p.name.as_str(),
                Some("spec.publicKey"),
                format!("public key {} is already used by peer {first}", p.key),
            ));
            continue;
        }
        let mut q = p.clone();
        q.allowed_ips.retain(|ip| seen_ips.insert(*ip));
        out.push(q);
    }
    out
}

/// Build the mesh from nodes whose claims [`claims::check`] checked; its diagnostics come first.
pub fn build_checked<'a>(
    checked: &'a claims::Checked<'_>,
    peers: &[MeshPeer],
    opts: &MeshOptions,
) -> Topology<'a> {
    let mut topo = build(checked.iter(), peers, opts);
    let mut diagnostics = checked.diagnostics.clone();
    diagnostics.append(&mut topo.diagnostics);
    topo.diagnostics = diagnostics;
    topo
}

/// Build the mesh from all nodes and peers, taking their claims as they are: callers that
/// take nodes from outside call [`claims::check`] first and [`build_checked`].
pub fn build<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    peers: &[MeshPeer],
    opts: &MeshOptions,
) -> Topology<'a> {
    let mut diagnostics = Vec::new();
    let ready = ready_nodes(nodes, opts.now, &mut diagnostics);
    let mut groups: BTreeMap<SegmentKey, Vec<&MeshNode>> = BTreeMap::new();
    if opts.granularity == Granularity::Full {
        // Each node is its own segment; names are sorted and unique, so is the key order.
        let mut segments = Vec::with_capacity(ready.len());
        for (i, n) in ready.iter().enumerate() {
            let Some(ip) = allocate(opts.subnet, i) else {
                diagnostics.push(out_of_ips(n, opts.subnet));
                continue;
            };
            segments.push(make_segment(
                SegmentKey::Node(n.name.0.clone()),
                vec![*n],
                ip,
            ));
        }
        return finish(segments, peers, opts, diagnostics);
    }
    for n in ready {
        groups
            .entry(segment_key(n, opts.granularity))
            .or_default()
            .push(n);
    }
    let mut segments = Vec::with_capacity(groups.len());
    for (i, (key, members)) in groups.into_iter().enumerate() {
        let Some(ip) = allocate(opts.subnet, i) else {
            for n in members {
                diagnostics.push(out_of_ips(n, opts.subnet));
            }
            continue;
        };
        segments.push(make_segment(key, members, ip));
    }
    finish(segments, peers, opts, diagnostics)
}

fn out_of_ips(n: &MeshNode, subnet: IpNetwork) -> Diagnostic {
    Diagnostic::node(
        n.name.as_str(),
        None,
        format!("the mesh subnet {subnet} has no address left for this node's segment"),
    )
}

fn finish<'a>(
    mut segments: Vec<Segment<'a>>,
    peers: &[MeshPeer],
    opts: &MeshOptions,
    mut diagnostics: Vec<Diagnostic>,
) -> Topology<'a> {
    // Only external peers need the key owners (a peer may not reuse a node's key).
    let key_owner: FxHashMap<WgKey, &NodeName> = if peers.is_empty() {
        FxHashMap::default()
    } else {
        segments
            .iter()
            .flat_map(|s| s.nodes.iter())
            .filter_map(|n| n.key.map(|k| (k, &n.name)))
            .collect()
    };
    let peers = ready_peers(
        peers,
        &|k| key_owner.get(k).map(|n| n.to_string()),
        &mut diagnostics,
    );
    if segments.iter().any(|s| !s.allowed_location_ips.is_empty()) {
        filter_allowed_location_ips(&mut segments, &peers, &mut diagnostics);
    }
    let relays = relays(&segments, &mut diagnostics);
    failovers(&segments, &mut diagnostics);
    Topology {
        granularity: opts.granularity,
        subnet: opts.subnet,
        segments,
        peers,
        relays,
        diagnostics,
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Kilo's `filterAllowedLocationIPs`: drop an allowed-location-ip that another location also
/// claims, that lies inside a segment's allowed IP, or that overlaps an external peer's.
fn filter_allowed_location_ips(
    segments: &mut [Segment<'_>],
    peers: &[MeshPeer],
    diagnostics: &mut Vec<Diagnostic>,
) {
    // Kilo filters segment by segment, each against the already-filtered earlier ones.
    for i in 0..segments.len() {
        let candidates = std::mem::take(&mut segments[i].allowed_location_ips);
        let mut kept = Vec::with_capacity(candidates.len());
        'ips: for ip in candidates {
            for (j, s) in segments.iter().enumerate() {
                let other_alips: &[IpNetwork] = if j == i { &[] } else { &s.allowed_location_ips };
                if let Some(o) = other_alips.iter().find(|o| overlaps(&ip, o)) {
                    diagnostics.push(alip_diag(
                        &segments[i],
                        ip,
                        format!("overlaps {o} of {}", s.key),
                    ));
                    continue 'ips;
                }
                if let Some(o) = s.allowed_ips.iter().find(|o| o.contains(ip.network())) {
                    diagnostics.push(alip_diag(
                        &segments[i],
                        ip,
                        format!("lies inside allowed IP {o} of {}", s.key),
                    ));
                    continue 'ips;
                }
            }
            for p in peers {
                if let Some(o) = p.allowed_ips.iter().find(|o| overlaps(&ip, o)) {
                    diagnostics.push(alip_diag(
                        &segments[i],
                        ip,
                        format!("overlaps {o} of peer {}", p.name),
                    ));
                    continue 'ips;
                }
            }
            kept.push(ip);
        }
        segments[i].allowed_location_ips = kept;
    }
}

fn alip_diag(seg: &Segment<'_>, ip: IpNetwork, why: String) -> Diagnostic {
    let owner = seg
        .nodes
        .iter()
        .find(|n| n.allowed_location_ips.contains(&ip))
        .map(|n| n.name.to_string())
        .unwrap_or_else(|| seg.key.to_string());
    Diagnostic::node(
        &owner,
        Some("allowed-location-ips"),
        format!("{ip} is ignored: it {why}"),
    )
    .kept()
}

/// Why a desired state cannot be computed for the local node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    /// The local node is not among the nodes, and no diagnostic says it was left out.
    #[error("node {0} is not in the cluster")]
    Unknown(String),
    /// The local node exists but was left out: its diagnostics as `KEY: PROBLEM`, `; `-joined,
    /// those that left it out first.
    #[error("node {0} is left out: {1}")]
    LeftOut(String, String),
}

impl LocalError {
    /// Why node `name` is left out, from `diagnostics` (all of its own, those that left it out
    /// first), or `None` when none of them left it out.
    pub fn left_out<'d>(
        name: &str,
        diagnostics: impl IntoIterator<Item = &'d Diagnostic>,
    ) -> Option<LocalError> {
        let mut mine: Vec<&Diagnostic> = diagnostics
            .into_iter()
            .filter(|d| d.subject == crate::diagnostic::Subject::Node && d.name == name)
            .collect();
        if !mine.iter().any(|d| d.skipped) {
            return None;
        }
        // Stable: within each group the order of the input stays.
        mine.sort_by_key(|d| !d.skipped);
        let mut why: Vec<String> = Vec::with_capacity(mine.len());
        for d in mine {
            let text = match &d.key {
                Some(k) => format!("{k}: {}", d.problem),
                None => d.problem.clone(),
            };
            if !why.contains(&text) {
                why.push(text);
            }
        }
        Some(LocalError::LeftOut(name.to_owned(), why.join("; ")))
    }

    /// This error told with the diagnostics found before the engine (the registry's parse
    /// problems): a node the registry left out is [`LocalError::LeftOut`], not unknown, and a
    /// node the engine left out also names the registry's warnings about it (a malformed
    /// `last-seen` read as "never" explains a stale heartbeat).
    pub fn explained_by(self, registry: &[Diagnostic]) -> LocalError {
        match self {
            LocalError::Unknown(name) => {
                LocalError::left_out(&name, registry).unwrap_or(LocalError::Unknown(name))
            }
            LocalError::LeftOut(name, why) => {
                let extra: Vec<String> = registry
                    .iter()
                    .filter(|d| d.subject == crate::diagnostic::Subject::Node && d.name == name)
                    .map(|d| match &d.key {
                        Some(k) => format!("{k}: {}", d.problem),
                        None => d.problem.clone(),
                    })
                    .collect();
                if extra.is_empty() {
                    LocalError::LeftOut(name, why)
                } else {
                    LocalError::LeftOut(name, format!("{why}; {}", extra.join("; ")))
                }
            }
        }
    }
}

/// The result of a full computation for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What the node should program.
    pub desired: DesiredState,
    /// Problems found in the input.
    pub diagnostics: Vec<Diagnostic>,
    /// Peers (by label) this node reaches through a relay, with the relay's label.
    pub relayed: BTreeMap<String, String>,
}

impl<'a> Topology<'a> {
    /// Index of the segment that holds node `name`, if it takes part.
    pub fn segment_of(&self, name: &NodeName) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.nodes.iter().any(|n| &n.name == name))
    }

    /// For segment `idx`: the public key of each segment it reaches through a relay, mapped to
    /// the relaying segment's key.
    pub fn relayed_from(&self, idx: usize) -> BTreeMap<WgKey, WgKey> {
        let key = |i: usize| self.segments[i].public_key();
        self.relays
            .iter()
            .filter_map(|r| {
                let other = if r.a == idx {
                    r.b
                } else if r.b == idx {
                    r.a
                } else {
                    return None;
                };
                Some((key(other)?, key(r.via)?))
            })
            .collect()
    }

    /// The endpoints the local node should use for NATed peers: its own discoveries first, then
    /// those of every node in segment order (Kilo's `discoveredEndpoints`).
    pub fn discovered_endpoints(&self, local: &MeshNode) -> BTreeMap<WgKey, SocketAddr> {
        let mut out = local.discovered_endpoints.clone();
        for s in &self.segments {
            for n in &s.nodes {
                for (k, v) in &n.discovered_endpoints {
                    out.entry(*k).or_insert(*v);
                }
            }
        }
        out
    }

    /// What node `local` should program.
    pub fn desired_for(
        &self,
        local: &NodeName,
        opts: &MeshOptions,
    ) -> Result<DesiredState, LocalError> {
        self.local_state(local, opts).map(|(d, _)| d)
    }

    /// What node `local` should program, and the conflicts found while merging (two peers or
    /// routes claiming the same destination).
    pub fn local_state(
        &self,
        local: &NodeName,
        opts: &MeshOptions,
    ) -> Result<(DesiredState, Vec<Diagnostic>), LocalError> {
        let idx = self.segment_of(local).ok_or_else(|| {
            LocalError::left_out(local.as_str(), &self.diagnostics)
                .unwrap_or_else(|| LocalError::Unknown(local.to_string()))
        })?;
        let ctx = LocalContext::new(self, idx, local, opts);
        let mut acc = Contribution::with_capacity(self.segments.len() + self.peers.len());
        ctx.own_into(&mut acc);
        for (i, s) in self.segments.iter().enumerate() {
            ctx.segment_into(s, i == idx, &mut acc);
        }
        for p in &self.peers {
            ctx.peer_into(p, &mut acc);
        }
        Ok(assemble(&ctx, acc))
    }
}

/// The full computation: check the claims, build the mesh, then node `local`'s desired state.
pub fn compute(
    nodes: &[MeshNode],
    peers: &[MeshPeer],
    local: &NodeName,
    opts: &MeshOptions,
) -> Result<Plan, LocalError> {
    let checked = claims::check(nodes, opts);
    let topo = build_checked(&checked, peers, opts);
    let (desired, conflicts) = topo.local_state(local, opts)?;
    let relayed = match topo.segment_of(local) {
        Some(i) if desired.leader => {
            let name = |k: &WgKey| {
                topo.segments
                    .iter()
                    .find(|s| s.public_key() == Some(*k))
                    .map_or_else(|| k.to_string(), Segment::label)
            };
            topo.relayed_from(i)
                .iter()
                .map(|(peer, via)| (name(peer), name(via)))
                .collect()
        }
        _ => BTreeMap::new(),
    };
    let mut diagnostics = topo.diagnostics;
    diagnostics.extend(conflicts);
    Ok(Plan {
        desired,
        diagnostics,
        relayed,
    })
}

#[cfg(test)]
mod tests;
