//! Graph exporter: draws a [`Topology`] as DOT or as a self-contained SVG (no graphviz needed).
//!
//! What a drawing shows: each segment as a group labelled with its location; each member node
//! as a card with its name, mesh IP, pod CIDRs, internal IP and endpoint, the leader starred;
//! each external peer as a card with its allowed IPs; a WireGuard tunnel between the leaders of
//! every two segments and between every leader and every peer; and a private-network link from
//! each leader to the other members of its segment. The SVG also lists the nodes and peers left
//! out of the mesh. `GraphOptions::local` highlights a node (or peer) and the tunnels and link
//! its traffic uses.
//!
//! Pure: `fn(&Topology) -> String`, the same input gives the same bytes. Depends on the topology
//! (with the diagnostics it carries) and model only. This module decides *what* is drawn (cards, edges); `layout` places the boxes,
//! `svg` and `dot` write the documents.

mod dot;
mod layout;
mod svg;

#[cfg(test)]
mod fixtures;

use std::fmt::Write as _;

use crate::model::{MeshPeer, NodeName};
use crate::topology::{Segment, SegmentKey, Topology};

/// What to highlight or label in a drawing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphOptions {
    /// The node the drawing is made from, drawn highlighted.
    pub local: Option<NodeName>,
    /// A title for the drawing.
    pub title: Option<String>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    Card { heading, rows }
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
            title: None,
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
