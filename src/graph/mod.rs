//! Graph exporter: draws a [`Topology`] as DOT or as a self-contained SVG (no graphviz needed).
//!
//! What a drawing shows ([`View`]): nodes of one location share one box in either
//! granularity. The full view draws each node as a card with its name, mesh IP, pod CIDRs,
//! internal IP and endpoint, the leader starred; each external peer as a card with its allowed
//! IPs; a WireGuard tunnel between the leaders of every two segments and between every leader
//! and every peer; and a private-network link from each leader to the other members of its
//! segment. Past [`FULL_CANVAS`] the default is the overview: locations as boxes with their node
//! count, leader and (live) worst handshake, one line per pair of locations labelled with the
//! tunnels it stands for; `View::Location` and `View::Focus` draw one location or one node's
//! tunnels in full and the rest as in the overview. No drawing exceeds [`MAX_CANVAS`]: past it,
//! fewer cards and boxes are drawn and the rest is counted. The SVG also lists the nodes and
//! peers left out of the mesh. `GraphOptions::local` highlights a node (or peer) and the tunnels
//! and link its traffic uses. `GraphOptions::live` (`meshctl graph --live`) colours each tunnel
//! by the age of its latest handshake as the agents at its ends reported it ([`Live`]): green
//! under 2 min, amber up to 5 min or none yet, red stale, grey where no agent said anything.
//!
//! Pure: `fn(&Topology) -> String`, the same input gives the same bytes. Depends on the topology
//! (with the diagnostics it carries), the model and the status document's health rules only.
//! This module decides *what* is drawn (cards, edges, tunnel states); `scene` picks the view's
//! boxes and lines, `layout` places the boxes, `svg` and `dot` write the documents.

mod dot;
mod layout;
mod scene;
mod svg;

pub use svg::{FULL_CANVAS, MAX_CANVAS};

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod geometry;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{MeshPeer, NodeName, WgKey};
use crate::status::{AgentStatus, Health, health, human_age};
use crate::topology::{Segment, SegmentKey, Topology};

/// What to highlight or label in a drawing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphOptions {
    /// The node the drawing is made from, drawn highlighted.
    pub local: Option<NodeName>,
    /// A title for the drawing.
    pub title: Option<String>,
    /// Handshakes as agents saw them: tunnels are coloured by their state (a live drawing).
    pub live: Option<Live>,
    /// What to draw: the whole mesh or an overview (chosen by size), or one node or location.
    pub view: View,
}

/// Which drawing of the mesh to make.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum View {
    /// Every node as a card and every tunnel as a line when that drawing fits
    /// [`FULL_CANVAS`]; otherwise the overview.
    #[default]
    Auto,
    /// Locations as boxes with their node count, leader and (live) worst handshake; one line
    /// per pair of locations, labelled with the number of tunnels it stands for.
    Overview,
    /// One node's tunnels and private link: its location's nodes as cards, the other
    /// locations as in the overview.
    Focus(NodeName),
    /// One location in full: its nodes as cards, the other locations as in the overview, only
    /// the lines that touch it.
    Location(String),
}

/// The location labels a drawing knows, in drawing order ("no location" for nodes without).
pub fn locations(topo: &Topology<'_>) -> Vec<String> {
    scene::places(topo).into_iter().map(|p| p.label).collect()
}

/// One agent's reading of one of its WireGuard peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Seconds since the latest handshake; `None`: never.
    pub age: Option<u64>,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// What agents saw of their tunnels: by reporting node, by the peer's public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// The readings.
    pub seen: BTreeMap<NodeName, BTreeMap<WgKey, Seen>>,
}

impl Live {
    /// The readings of agents' status documents (ages against each agent's own clock).
    pub fn from_status<'a>(docs: impl IntoIterator<Item = &'a AgentStatus>) -> Live {
        let mut live = Live::default();
        for d in docs {
            let by_key = live.seen.entry(NodeName(d.node.clone())).or_default();
            for p in &d.peers {
                by_key.insert(
                    p.public_key,
                    Seen {
                        age: p.age(d.time),
                        tx_bytes: p.tx_bytes,
                    },
                );
            }
        }
        live
    }
}

/// A tunnel's state in a live drawing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TunnelState {
    /// Some agent at one of its ends reported it.
    Known {
        health: Health,
        /// The freshest handshake either end saw.
        age: Option<u64>,
    },
    /// No agent at either end reported it.
    Unknown,
}

impl TunnelState {
    /// The word used in classes, `data-health` and tooltips.
    fn word(self) -> &'static str {
        match self {
            TunnelState::Known { health, .. } => health.as_str(),
            TunnelState::Unknown => "unknown",
        }
    }

    /// The tooltip's words: `handshake 12s ago (fresh)`.
    fn describe(self) -> String {
        match self {
            TunnelState::Known {
                age: Some(a),
                health,
            } => {
                format!("handshake {} ago ({health})", human_age(Some(a)))
            }
            TunnelState::Known { age: None, health } => format!("no handshake yet ({health})"),
            TunnelState::Unknown => "no data from the agents at either end".to_owned(),
        }
    }
}

/// The legend of a live drawing: (state word, colour, words), in the order shown.
const LIVE_LEGEND: [(&str, &str); 4] = [
    ("fresh", "handshake < 2 min"),
    ("aging", "2–5 min, or none yet"),
    ("stale", "stale (> 5 min, or never answered)"),
    ("unknown", "no data"),
];

/// The public key behind one end of a tunnel: its segment's (the leader's) or the peer's.
fn end_key(topo: &Topology<'_>, end: End) -> Option<WgKey> {
    match end {
        End::Node(s, _) => topo.segments[s].public_key(),
        End::Peer(p) => Some(topo.peers[p].key),
    }
}

/// The state of tunnel `e` from what the agents at its ends saw of each other: the freshest
/// handshake either saw; without one, stale when either sent something, else new. `None` for a
/// private link (no WireGuard).
fn tunnel_state(topo: &Topology<'_>, e: &Edge, live: &Live) -> Option<TunnelState> {
    if e.kind == EdgeKind::Private {
        return None;
    }
    let mut readings = Vec::with_capacity(2);
    for (me, other) in [(e.a, e.b), (e.b, e.a)] {
        // Only nodes run agents; a segment's tunnels are its leader's.
        let End::Node(s, m) = me else { continue };
        if m != topo.segments[s].leader {
            continue;
        }
        let Some(key) = end_key(topo, other) else {
            continue;
        };
        if let Some(seen) = live
            .seen
            .get(&topo.segments[s].nodes[m].name)
            .and_then(|by_key| by_key.get(&key))
        {
            readings.push(*seen);
        }
    }
    if readings.is_empty() {
        return Some(TunnelState::Unknown);
    }
    let age = readings.iter().filter_map(|r| r.age).min();
    let tx = readings.iter().map(|r| r.tx_bytes).max().unwrap_or(0);
    Some(TunnelState::Known {
        health: health(age, tx),
        age,
    })
}

/// The caption's addition in a live drawing: how many agents reported.
fn live_caption(live: &Live) -> String {
    let n = live.seen.len();
    format!(
        " · handshakes from {n} agent{}",
        if n == 1 { "" } else { "s" }
    )
}

/// The mesh as a graphviz DOT document.
pub fn render_dot(topo: &Topology<'_>, opts: &GraphOptions) -> String {
    dot::render(topo, opts)
}

/// The mesh as a self-contained SVG document.
pub fn render_svg(topo: &Topology<'_>, opts: &GraphOptions) -> String {
    svg::render(topo, opts)
}

/// One end of an edge: a member node (segment index, index in the segment) or a peer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Node(usize, usize),
    Peer(usize),
}

/// What an edge stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeKind {
    /// WireGuard tunnel between the leaders of two segments.
    Tunnel,
    /// WireGuard tunnel between a segment's leader and an external peer.
    PeerTunnel,
    /// Private-network link between a leader and another member of its segment.
    Private,
}

/// A line in the drawing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edge {
    kind: EdgeKind,
    a: End,
    b: End,
}

/// Every edge, in drawing order: private links by segment, then tunnels between segments in
/// segment order, then tunnels from each leader to each peer.
fn edges(topo: &Topology<'_>) -> Vec<Edge> {
    let n = topo.segments.len();
    let mut out = Vec::with_capacity(n * (n + topo.peers.len()));
    for (s, seg) in topo.segments.iter().enumerate() {
        for m in (0..seg.nodes.len()).filter(|&m| m != seg.leader) {
            out.push(Edge {
                kind: EdgeKind::Private,
                a: End::Node(s, seg.leader),
                b: End::Node(s, m),
            });
        }
    }
    for (i, si) in topo.segments.iter().enumerate() {
        for (j, sj) in topo.segments.iter().enumerate().skip(i + 1) {
            out.push(Edge {
                kind: EdgeKind::Tunnel,
                a: End::Node(i, si.leader),
                b: End::Node(j, sj.leader),
            });
        }
    }
    for (s, seg) in topo.segments.iter().enumerate() {
        for p in 0..topo.peers.len() {
            out.push(Edge {
                kind: EdgeKind::PeerTunnel,
                a: End::Node(s, seg.leader),
                b: End::Peer(p),
            });
        }
    }
    out
}

/// The leader that relays tunnel `e`'s traffic, when its two segments reach each other only
/// through a third ([`Topology::relays`]).
fn relay_of<'t>(topo: &'t Topology<'_>, e: &Edge) -> Option<&'t str> {
    let (EdgeKind::Tunnel, End::Node(i, _), End::Node(j, _)) = (e.kind, e.a, e.b) else {
        return None;
    };
    let (a, b) = (i.min(j), i.max(j));
    topo.relays
        .iter()
        .find(|r| r.a == a && r.b == b)
        .map(|r| topo.segments[r.via].leader_node().name.as_str())
}

/// The name of a node or peer at one end of an edge.
fn end_name<'t>(topo: &'t Topology<'_>, end: End) -> &'t str {
    match end {
        End::Node(s, m) => topo.segments[s].nodes[m].name.as_str(),
        End::Peer(p) => topo.peers[p].name.as_str(),
    }
}

/// An edge's stable identity: the two end names, sorted, joined by `--`.
fn edge_key(topo: &Topology<'_>, e: &Edge) -> String {
    let (a, b) = (end_name(topo, e.a), end_name(topo, e.b));
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("{first}--{second}")
}

/// The node or peer `opts.local` names: a node first, else a peer of that name.
fn local_end(topo: &Topology<'_>, opts: &GraphOptions) -> Option<End> {
    let local = opts.local.as_ref()?;
    if let Some(s) = topo.segment_of(local) {
        let m = topo.segments[s]
            .nodes
            .iter()
            .position(|n| &n.name == local)?;
        return Some(End::Node(s, m));
    }
    topo.peers
        .iter()
        .position(|p| &p.name == local)
        .map(End::Peer)
}

/// Whether an edge is one the local node's traffic crosses: a tunnel of its segment's leader,
/// a peer tunnel of the local peer, or the local node's own private link.
fn touches_local(topo: &Topology<'_>, e: &Edge, local: Option<End>) -> bool {
    let Some(local) = local else { return false };
    let hub = match local {
        End::Node(s, m) if e.kind == EdgeKind::Private => return e.b == End::Node(s, m),
        End::Node(s, _) => End::Node(s, topo.segments[s].leader),
        peer => peer,
    };
    e.kind != EdgeKind::Private && (e.a == hub || e.b == hub)
}

/// The group label of a segment: its location, or "no location".
fn segment_label(seg: &Segment<'_>) -> String {
    let location = match &seg.key {
        SegmentKey::Location(l) => l.as_str(),
        SegmentKey::Node(_) => seg.leader_node().location.as_str(),
    };
    if location.is_empty() {
        "no location".to_owned()
    } else {
        location.to_owned()
    }
}

/// One labelled line of a card. An empty key continues the list of the row above.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    key: &'static str,
    value: String,
}

/// The text of one box: a heading and labelled rows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Card {
    heading: String,
    rows: Vec<Row>,
}

impl Card {
    /// The card as plain lines, `key value`, for tooltips and DOT labels.
    fn lines(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        out.push(self.heading.clone());
        for r in &self.rows {
            let mut line = String::new();
            if r.key.is_empty() {
                line.push_str("  ");
            } else {
                line.push_str(r.key);
                if !r.value.is_empty() {
                    line.push(' ');
                }
            }
            line.push_str(&r.value);
            out.push(line);
        }
        out
    }
}

/// Push `values` as rows under `key`; past `cap` values, one row says how many were left out.
fn push_list(rows: &mut Vec<Row>, key: &'static str, values: &[String], cap: Option<usize>) {
    if values.is_empty() {
        rows.push(Row {
            key,
            value: "none".to_owned(),
        });
        return;
    }
    let shown = match cap {
        Some(c) if values.len() > c => c.saturating_sub(1).max(1),
        _ => values.len(),
    };
    for (i, v) in values.iter().take(shown).enumerate() {
        rows.push(Row {
            key: if i == 0 { key } else { "" },
            value: v.clone(),
        });
    }
    if shown < values.len() {
        rows.push(Row {
            key: "",
            value: format!("… {} more", values.len() - shown),
        });
    }
}

/// The star that marks a leader; only drawn where there is a choice (two members or more).
const LEADER_MARK: &str = "★ ";

/// The card of member `m` of segment `s`; lists longer than `cap` are shortened.
fn node_card(topo: &Topology<'_>, s: usize, m: usize, cap: Option<usize>) -> Card {
    let seg = &topo.segments[s];
    let node = seg.nodes[m];
    let mut heading = String::new();
    if m == seg.leader && seg.nodes.len() > 1 {
        heading.push_str(LEADER_MARK);
    }
    heading.push_str(node.name.as_str());
    let mut rows = Vec::with_capacity(node.pod_cidrs.len() + 3);
    let mesh = if m == seg.leader {
        seg.mesh_ip.to_string()
    } else {
        format!("via {}", seg.leader_node().name)
    };
    rows.push(Row {
        key: "mesh",
        value: mesh,
    });
    let pods: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
    push_list(&mut rows, "pods", &pods, cap);
    rows.push(Row {
        key: "internal",
        value: node
            .internal_ip
            .map_or_else(|| "none".to_owned(), |ip| ip.to_string()),
    });
    rows.push(endpoint_row(node.endpoint.as_ref()));
    if let Some(row) = leader_health(seg, m) {
        rows.push(row);
    }
    Card { heading, rows }
}

/// The leader's health on member `m`'s card while its location has failed over: the acting
/// leader says whom it replaces, the passed-over leader that it does not forward.
fn leader_health(seg: &Segment<'_>, m: usize) -> Option<Row> {
    if seg.leader == seg.preferred {
        return None;
    }
    if m == seg.leader {
        return Some(Row {
            key: "leader",
            value: format!("failover from {}", seg.nodes[seg.preferred].name),
        });
    }
    (m == seg.preferred).then(|| {
        let name = &seg.nodes[m].name;
        let reports = seg
            .nodes
            .iter()
            .filter(|n| {
                n.forwarding_failed
                    .as_ref()
                    .is_some_and(|f| f.contains(name))
            })
            .count();
        Row {
            key: "forwarding",
            value: format!(
                "failed ({})",
                if reports == 1 {
                    "1 report".to_owned()
                } else {
                    format!("{reports} reports")
                }
            ),
        }
    })
}

/// The card of an external peer; lists longer than `cap` are shortened.
fn peer_card(peer: &MeshPeer, cap: Option<usize>) -> Card {
    let mut rows = Vec::with_capacity(peer.allowed_ips.len() + 3);
    rows.push(Row {
        key: "peer",
        value: "external".to_owned(),
    });
    let allowed: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
    push_list(&mut rows, "allowed", &allowed, cap);
    rows.push(endpoint_row(peer.endpoint.as_ref()));
    if peer.persistent_keepalive > 0 {
        let mut v = String::new();
        let _ = write!(v, "{}s", peer.persistent_keepalive);
        rows.push(Row {
            key: "keepalive",
            value: v,
        });
    }
    Card {
        heading: peer.name.to_string(),
        rows,
    }
}

fn endpoint_row(endpoint: Option<&crate::model::Endpoint>) -> Row {
    match endpoint {
        Some(e) => Row {
            key: "endpoint",
            value: e.to_string(),
        },
        None => Row {
            key: "no endpoint",
            value: String::new(),
        },
    }
}

/// The drawing's caption: subnet, granularity and counts.
fn caption(topo: &Topology<'_>) -> String {
    let nodes: usize = topo.segments.iter().map(|s| s.nodes.len()).sum();
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "mesh {} · {} granularity · {}, {}, {}",
        topo.subnet,
        topo.granularity,
        plural(topo.segments.len(), "segment", "segments"),
        plural(nodes, "node", "nodes"),
        plural(topo.peers.len(), "peer", "peers"),
    )
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::model::Granularity;

    #[test]
    fn edges_are_full_mesh_between_leaders_plus_peers_plus_private_links() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let all = edges(&topo);
        let count = |k| all.iter().filter(|e| e.kind == k).count();
        let n = topo.segments.len();
        let members: usize = topo.segments.iter().map(|s| s.nodes.len()).sum();
        assert_eq!(n, 3);
        assert_eq!(count(EdgeKind::Tunnel), n * (n - 1) / 2);
        assert_eq!(count(EdgeKind::PeerTunnel), n * topo.peers.len());
        assert_eq!(count(EdgeKind::Private), members - n);
    }

    #[test]
    fn edge_key_sorts_end_names() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let keys: Vec<String> = edges(&topo).iter().map(|e| edge_key(&topo, e)).collect();
        assert_eq!(keys, ["fra-1--hel-1", "fra-1--par-1", "hel-1--par-1"]);
    }

    #[test]
    fn local_node_marks_its_leaders_tunnels_and_its_own_link() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some("home-a".into()),
            ..GraphOptions::default()
        };
        let local = local_end(&topo, &opts);
        let marked: Vec<String> = edges(&topo)
            .iter()
            .filter(|e| touches_local(&topo, e, local))
            .map(|e| edge_key(&topo, e))
            .collect();
        assert_eq!(
            marked,
            [
                "home-a--home-b",
                "home-b--oracle-1",
                "hetzner-1--home-b",
                "home-b--laptop"
            ]
        );
    }

    #[test]
    fn leader_card_has_mesh_ip_and_member_card_points_to_leader() {
        let (nodes, peers) = example("locations.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Location);
        let s = topo
            .segments
            .iter()
            .position(|s| s.key == SegmentKey::Location("home".into()))
            .expect("home segment");
        let seg = &topo.segments[s];
        let leader = node_card(&topo, s, seg.leader, None);
        assert_eq!(leader.heading, "★ home-b");
        assert_eq!(
            leader.lines(),
            [
                "★ home-b".to_owned(),
                format!("mesh {}", seg.mesh_ip),
                "pods 10.42.11.0/24".to_owned(),
                "internal 192.168.1.12/24".to_owned(),
                "endpoint home.example.net:51820".to_owned(),
            ]
        );
        let member = node_card(&topo, s, 0, None);
        assert_eq!(member.heading, "home-a");
        assert_eq!(member.rows[0].value, "via home-b");
    }

    #[test]
    fn long_lists_are_capped_with_a_count() {
        let values: Vec<String> = (0..10).map(|i| format!("10.0.{i}.0/24")).collect();
        let mut rows = Vec::new();
        push_list(&mut rows, "pods", &values, Some(4));
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[3].value, "… 7 more");
        let mut all = Vec::new();
        push_list(&mut all, "pods", &values, None);
        assert_eq!(all.len(), 10);
    }

    fn seen(age: Option<u64>, tx_bytes: u64) -> Seen {
        Seen { age, tx_bytes }
    }

    #[test]
    fn tunnel_state_takes_the_freshest_handshake_of_either_end_and_unknown_without_data() {
        let (nodes, peers) = example("three-clouds.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Full);
        let key = |n: &str| key_of(&nodes, n);
        let mut live = Live::default();
        live.seen.insert(
            "fra-1".into(),
            [
                (key("hel-1"), seen(Some(400), 10)),
                (key("par-1"), seen(None, 0)),
            ]
            .into(),
        );
        live.seen
            .insert("hel-1".into(), [(key("fra-1"), seen(Some(30), 10))].into());
        live.seen
            .insert("par-1".into(), [(key("fra-1"), seen(None, 148))].into());
        let states: BTreeMap<String, &str> = edges(&topo)
            .iter()
            .filter_map(|e| Some((edge_key(&topo, e), tunnel_state(&topo, e, &live)?.word())))
            .collect();
        let want: BTreeMap<String, &str> = [
            // fra-1 saw 400 s, hel-1 30 s: the tunnel is fresh.
            ("fra-1--hel-1".to_owned(), "fresh"),
            // par-1 sent to fra-1 and never got an answer: stale, though fra-1 sent nothing.
            ("fra-1--par-1".to_owned(), "stale"),
            ("hel-1--par-1".to_owned(), "unknown"),
            ("fra-1--laptop".to_owned(), "unknown"),
            ("hel-1--laptop".to_owned(), "unknown"),
            ("laptop--par-1".to_owned(), "unknown"),
        ]
        .into();
        assert_eq!(states, want);
        // Only what one side saw: that.
        live.seen.remove(&NodeName::from("hel-1"));
        let e = edges(&topo)
            .into_iter()
            .find(|e| edge_key(&topo, e) == "fra-1--hel-1")
            .unwrap();
        assert_eq!(
            tunnel_state(&topo, &e, &live),
            Some(TunnelState::Known {
                health: Health::Stale,
                age: Some(400)
            })
        );
    }

    #[test]
    fn a_member_that_is_not_its_locations_leader_reports_no_tunnel() {
        let (nodes, peers) = example("locations.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Location);
        let all = edges(&topo);
        let tunnel = all.iter().find(|e| e.kind == EdgeKind::Tunnel).unwrap();
        let (End::Node(s, _), other) = (tunnel.a, tunnel.b) else {
            panic!("tunnel between nodes")
        };
        let member = (0..topo.segments[s].nodes.len()).find(|&m| m != topo.segments[s].leader);
        if let Some(m) = member {
            let mut live = Live::default();
            live.seen.insert(
                topo.segments[s].nodes[m].name.clone(),
                [(end_key(&topo, other).unwrap(), seen(Some(1), 1))].into(),
            );
            assert_eq!(
                tunnel_state(&topo, tunnel, &live),
                Some(TunnelState::Unknown)
            );
        }
    }

    #[test]
    fn live_readings_come_from_status_documents_against_their_own_clock() {
        use crate::status::{PeerKind, PeerStatus, STATUS_VERSION};
        let doc = AgentStatus {
            version: STATUS_VERSION,
            node: "fra-1".into(),
            public_key: None,
            time: 1000,
            ready: true,
            leader: Some(true),
            wireguard_error: None,
            listen_port_conflict: None,
            unreachable: Vec::new(),
            peers: vec![PeerStatus {
                name: "hel-1".into(),
                kind: PeerKind::Node,
                public_key: WgKey([1; 32]),
                endpoint: None,
                configured_endpoint: None,
                allowed_ips: vec![],
                latest_handshake: Some(990),
                rx_bytes: 1,
                tx_bytes: 2,
            }],
        };
        let live = Live::from_status([&doc]);
        assert_eq!(
            live.seen[&NodeName::from("fra-1")][&WgKey([1; 32])],
            seen(Some(10), 2)
        );
    }

    #[test]
    fn peer_without_endpoint_says_so() {
        let (_, peers) = example("locations.yaml", true);
        let card = peer_card(&peers[0], None);
        assert_eq!(
            card.lines(),
            [
                "laptop",
                "peer external",
                "allowed 10.5.0.1/32",
                "no endpoint",
                "keepalive 10s"
            ]
        );
    }
}
