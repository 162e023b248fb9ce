//! What one drawing shows, by view: which locations are boxes of cards and which are boxes of
//! words, and which lines join them.
//!
//! Nodes of one location always share one box (in either granularity). The full view draws
//! every node as a card and every tunnel and private link as its own line. The overview draws
//! each location as a box saying how many nodes it holds, its leader and (live) its worst
//! handshake, and one line per pair of locations that says how many tunnels it stands for. The
//! location view draws one location's nodes as cards, the others as in the overview, and only
//! the lines that touch the location; the focus view does the same for one node's location,
//! with only that node's tunnels and private link. Caps (cards per box, boxes in all) keep a
//! drawing bounded: what is left out is counted in its box.
//!
//! Pure and deterministic: depends on the parent module's edges, tunnel states and segment
//! labels, and on the topology. Knows nothing of geometry or XML.

use std::collections::BTreeMap;

use std::fmt::Write as _;

use super::{
    Edge, EdgeKind, End, Live, TunnelState, edge_key, edges, relay_of, segment_label,
    touches_local, tunnel_state,
};
use crate::status::{Health, human_age};
use crate::topology::Topology;

/// Which drawing: the view asked for, resolved to one node or location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every node a card, every tunnel a line.
    Full,
    /// Locations as boxes of words, one line per pair of locations.
    Overview,
    /// One location's cards and lines (index into [`places`]).
    Location(usize),
    /// One node's location, tunnels and private link.
    Focus(End),
}

/// How much a drawing may show before it counts instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Caps {
    /// Most cards in the expanded location's box (location and focus views).
    pub cards: usize,
    /// Most boxes of locations; the smallest of the rest share one box.
    pub boxes: usize,
}

/// What a box stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BoxKind {
    /// One location (its label: the location, or "no location").
    Location,
    /// The locations that did not get a box of their own.
    Others(Vec<String>),
    /// The external peers, counted.
    Peers,
}

/// One box of the drawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SceneBox {
    /// The label above its contents.
    pub label: String,
    /// What it stands for.
    pub kind: BoxKind,
    /// The nodes drawn as cards in it, in order.
    pub cards: Vec<End>,
    /// The card whose private links reach cards `0..linked`.
    pub leader: Option<usize>,
    /// Cards `0..linked` are the leader's segment.
    pub linked: usize,
    /// Every node (or peer) it stands for, drawn or not.
    pub count: usize,
    /// Lines of words under its cards (or in place of them).
    pub rows: Vec<String>,
    /// The worst state of the tunnels that touch it, in a live drawing.
    pub state: Option<TunnelState>,
}

/// Where a line ends: a card, or a box of words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Anchor {
    /// A node's or peer's card.
    Card(End),
    /// A box (index into [`Scene::boxes`]).
    Box(usize),
}

/// One line of the drawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SceneEdge {
    /// Tunnel(s), peer tunnel(s) or a private link.
    pub kind: EdgeKind,
    /// One end.
    pub a: Anchor,
    /// The other end.
    pub b: Anchor,
    /// The one edge it is, when both ends are cards.
    pub edge: Option<Edge>,
    /// How many tunnels it stands for.
    pub tunnels: usize,
    /// The worst state among them, in a live drawing.
    pub state: Option<TunnelState>,
    /// Whether the local (or focused) node's traffic uses it.
    pub local: bool,
    /// Its identity: `a--b` of node names for one edge, of box labels for a bundle.
    pub key: String,
    /// How many of its tunnels carry no traffic because the pair is relayed through a third
    /// segment; for one edge, the relay's leader is `relayed_via`.
    pub relayed: usize,
    /// The leader that relays this one tunnel's traffic.
    pub relayed_via: Option<String>,
}

impl SceneEdge {
    /// The words written on a bundle's line: `3 tunnels`, live: `· worst 5m (stale)`.
    pub fn label(&self) -> Option<String> {
        if self.edge.is_some() {
            return None;
        }
        let mut s = format!(
            "{} tunnel{}",
            self.tunnels,
            if self.tunnels == 1 { "" } else { "s" }
        );
        if self.relayed > 0 {
            let _ = write!(s, " · {} relayed", self.relayed);
        }
        if let Some(state) = self.state {
            s.push_str(" · ");
            s.push_str(&worst_words(state));
        }
        Some(s)
    }
}

/// The whole drawing's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Scene {
    /// The view drawn.
    pub mode: Mode,
    /// Boxes, in ring order.
    pub boxes: Vec<SceneBox>,
    /// Peers drawn as cards on the ring after the boxes (full view only).
    pub peer_cards: Vec<usize>,
    /// Lines, in drawing order.
    pub edges: Vec<SceneEdge>,
    /// The node or peer drawn highlighted.
    pub local: Option<End>,
}

/// A location of the topology: its label, the nodes in it, the leader with private links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Place {
    /// Its label.
    pub label: String,
    /// Its nodes: the segment with several members first (leader first), then the others in
    /// segment order.
    pub nodes: Vec<End>,
    /// Index of the leader in `nodes` when the place holds a segment of several members.
    pub leader: Option<usize>,
    /// `nodes[0..linked]` are that segment.
    pub linked: usize,
}

/// The places of the topology, in the order their first segment comes.
pub(super) fn places(topo: &Topology<'_>) -> Vec<Place> {
    let mut out: Vec<Place> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (s, seg) in topo.segments.iter().enumerate() {
        let label = segment_label(seg);
        let p = *index.entry(label.clone()).or_insert_with(|| {
            out.push(Place {
                label,
                nodes: Vec::new(),
                leader: None,
                linked: 0,
            });
            out.len() - 1
        });
        let place = &mut out[p];
        let members = (0..seg.nodes.len()).map(|m| End::Node(s, m));
        if seg.nodes.len() > 1 && place.leader.is_none() {
            let mut group: Vec<End> = vec![End::Node(s, seg.leader)];
            group.extend(members.filter(|e| *e != End::Node(s, seg.leader)));
            place.linked = group.len();
            place.leader = Some(0);
            group.append(&mut place.nodes);
            place.nodes = group;
        } else {
            place.nodes.extend(members);
        }
    }
    out
}

/// The place of each segment (a segment's nodes share one place), by segment index.
fn segment_places(topo: &Topology<'_>, places: &[Place]) -> Vec<usize> {
    let mut out = vec![0; topo.segments.len()];
    for (p, place) in places.iter().enumerate() {
        for end in &place.nodes {
            if let End::Node(s, _) = end {
                out[*s] = p;
            }
        }
    }
    out
}

/// How bad a tunnel state is, for "the worst" of several: stale, unknown, aging, new, fresh.
fn badness(s: TunnelState) -> (u8, u64) {
    match s {
        TunnelState::Known {
            health: Health::Stale,
            age,
        } => (4, age.unwrap_or(u64::MAX)),
        TunnelState::Unknown => (3, 0),
        TunnelState::Known {
            health: Health::Aging,
            age,
        } => (2, age.unwrap_or(u64::MAX)),
        TunnelState::Known {
            health: Health::New,
            ..
        } => (1, 0),
        TunnelState::Known {
            health: Health::Fresh,
            age,
        } => (0, age.unwrap_or(0)),
    }
}

fn worse(a: Option<TunnelState>, b: Option<TunnelState>) -> Option<TunnelState> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if badness(y) > badness(x) { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// `worst 5m (stale)`, `worst: no data`.
pub(super) fn worst_words(s: TunnelState) -> String {
    match s {
        TunnelState::Known {
            age: Some(a),
            health,
        } => format!("worst {} ago ({health})", human_age(Some(a))),
        TunnelState::Known { age: None, health } => format!("worst: no handshake ({health})"),
        TunnelState::Unknown => "worst: no data".to_owned(),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Build the scene of `mode` under `caps`.
pub(super) fn build(
    topo: &Topology<'_>,
    mode: Mode,
    caps: Caps,
    local: Option<End>,
    live: Option<&Live>,
) -> Scene {
    let places = places(topo);
    let seg_place = segment_places(topo, &places);
    // The index of the place holding `end`, a node.
    let place_of = |end: End| match end {
        End::Node(s, _) => seg_place.get(s).copied(),
        End::Peer(_) => None,
    };
    let all = edges(topo);
    if mode == Mode::Full {
        return full(topo, &places, all, local, live);
    }
    // The place drawn in full, if any.
    let open = match mode {
        Mode::Location(p) => Some(p),
        Mode::Focus(end) => place_of(end),
        _ => None,
    };
    // Which places get a box: the open one, then the largest, up to the cap.
    let boxes_cap = caps.boxes.max(2);
    let mut order: Vec<usize> = (0..places.len()).collect();
    order.sort_by_key(|&p| (Some(p) != open, std::cmp::Reverse(places[p].nodes.len()), p));
    let (kept, rest) = if places.len() > boxes_cap {
        order.split_at(boxes_cap - 1)
    } else {
        (&order[..], &[][..])
    };
    let mut kept = kept.to_vec();
    kept.sort_unstable();
    // Box of each place; the rest share the box after the kept ones.
    let others_box = kept.len();
    let mut box_of = vec![others_box; places.len()];
    for (b, &p) in kept.iter().enumerate() {
        box_of[p] = b;
    }
    let mut boxes: Vec<SceneBox> = kept
        .iter()
        .map(|&p| {
            let place = &places[p];
            let mut b = SceneBox {
                label: place.label.clone(),
                kind: BoxKind::Location,
                cards: Vec::new(),
                leader: None,
                linked: 0,
                count: place.nodes.len(),
                rows: Vec::new(),
                state: None,
            };
            if Some(p) == open {
                let mut cards = place.nodes.clone();
                if let Mode::Focus(end) = mode
                    && let Some(i) = cards.iter().position(|e| *e == end)
                    && i >= caps.cards.max(2) - 1
                {
                    // The focused node is always drawn: it takes the last place under the cap.
                    let e = cards.remove(i);
                    cards.insert(caps.cards.max(2) - 1, e);
                }
                cards.truncate(caps.cards.max(2));
                b.leader = place.leader;
                b.linked = place.linked.min(cards.len());
                let hidden = place.nodes.len() - cards.len();
                if hidden > 0 {
                    b.rows.push(format!(
                        "… and {} not drawn",
                        plural(hidden, "more node", "more nodes")
                    ));
                }
                b.cards = cards;
            }
            b
        })
        .collect();
    if !rest.is_empty() {
        let mut labels: Vec<String> = rest.iter().map(|&p| places[p].label.clone()).collect();
        labels.sort();
        boxes.push(SceneBox {
            label: plural(rest.len(), "other location", "other locations"),
            kind: BoxKind::Others(labels),
            cards: Vec::new(),
            leader: None,
            linked: 0,
            count: rest.iter().map(|&p| places[p].nodes.len()).sum(),
            rows: Vec::new(),
            state: None,
        });
    }
    let peers_box = (!topo.peers.is_empty()).then(|| {
        boxes.push(SceneBox {
            label: "external peers".to_owned(),
            kind: BoxKind::Peers,
            cards: Vec::new(),
            leader: None,
            linked: 0,
            count: topo.peers.len(),
            rows: Vec::new(),
            state: None,
        });
        boxes.len() - 1
    });
    let anchor = |end: End, boxes: &[SceneBox]| -> Anchor {
        match end {
            End::Peer(_) => Anchor::Box(peers_box.unwrap_or(0)),
            End::Node(..) => {
                let b = place_of(end).map_or(others_box, |p| box_of[p]);
                if boxes[b].cards.contains(&end) {
                    Anchor::Card(end)
                } else {
                    Anchor::Box(b)
                }
            }
        }
    };
    let focus = match mode {
        Mode::Focus(end) => Some(end),
        _ => None,
    };
    let local = focus.or(local);
    let mut inside = vec![0usize; boxes.len()];
    let mut bundles: BTreeMap<(Anchor, Anchor), SceneEdge> = BTreeMap::new();
    let mut singles: Vec<SceneEdge> = Vec::new();
    for e in &all {
        let keep = match mode {
            Mode::Overview | Mode::Full => true,
            Mode::Location(p) => [e.a, e.b].iter().any(|x| place_of(*x) == Some(p)),
            Mode::Focus(end) => touches_local(topo, e, Some(end)),
        };
        if !keep {
            continue;
        }
        let (a, b) = (anchor(e.a, &boxes), anchor(e.b, &boxes));
        let state = live.and_then(|lv| tunnel_state(topo, e, lv));
        for x in [a, b] {
            if let Anchor::Box(i) = x {
                boxes[i].state = worse(boxes[i].state, state);
            }
        }
        if a == b {
            if let Anchor::Box(i) = a
                && e.kind != EdgeKind::Private
            {
                inside[i] += 1;
            }
            continue;
        }
        let on = touches_local(topo, e, local);
        if let (Anchor::Card(_), Anchor::Card(_)) = (a, b) {
            singles.push(SceneEdge {
                kind: e.kind,
                a,
                b,
                edge: Some(*e),
                tunnels: usize::from(e.kind != EdgeKind::Private),
                state,
                local: on,
                key: edge_key(topo, e),
                relayed: usize::from(relay_of(topo, e).is_some()),
                relayed_via: relay_of(topo, e).map(str::to_owned),
            });
            continue;
        }
        if e.kind == EdgeKind::Private {
            // A private link to a node that is only counted: its box says so.
            continue;
        }
        let pair = if a <= b { (a, b) } else { (b, a) };
        let entry = bundles.entry(pair).or_insert_with(|| SceneEdge {
            kind: EdgeKind::Tunnel,
            a: pair.0,
            b: pair.1,
            edge: None,
            tunnels: 0,
            state: None,
            local: false,
            key: String::new(),
            relayed: 0,
            relayed_via: None,
        });
        entry.tunnels += 1;
        entry.relayed += usize::from(relay_of(topo, e).is_some());
        entry.state = worse(entry.state, state);
        entry.local |= on;
        if e.kind == EdgeKind::PeerTunnel {
            entry.kind = EdgeKind::PeerTunnel;
        }
    }
    let name = |x: Anchor, boxes: &[SceneBox]| match x {
        Anchor::Card(end) => super::end_name(topo, end).to_owned(),
        Anchor::Box(i) => boxes[i].label.clone(),
    };
    let mut out_edges = singles;
    for (_, mut e) in bundles {
        let (x, y) = (name(e.a, &boxes), name(e.b, &boxes));
        e.key = if x <= y {
            format!("{x}--{y}")
        } else {
            format!("{y}--{x}")
        };
        out_edges.push(e);
    }
    // The words of each box of words.
    let is_full_granularity = topo.granularity == crate::model::Granularity::Full;
    for (i, b) in boxes.iter_mut().enumerate() {
        if !b.cards.is_empty() {
            continue;
        }
        match &b.kind {
            BoxKind::Peers => {
                b.rows.push(plural(b.count, "peer", "peers"));
                for p in topo.peers.iter().take(3) {
                    b.rows.push(p.name.to_string());
                }
                if topo.peers.len() > 3 {
                    b.rows.push(format!("… {} more", topo.peers.len() - 3));
                }
            }
            BoxKind::Others(labels) => {
                b.rows.push(plural(b.count, "node", "nodes"));
                b.rows.push(format!(
                    "{} …",
                    labels
                        .iter()
                        .take(2)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            BoxKind::Location => {
                b.rows.push(plural(b.count, "node", "nodes"));
                let p = kept[i];
                match places[p].leader {
                    Some(l) => {
                        let end = places[p].nodes[l];
                        b.rows
                            .push(format!("leader {}", super::end_name(topo, end)));
                        if let End::Node(s, _) = end
                            && let seg = &topo.segments[s]
                            && seg.leader != seg.preferred
                        {
                            b.rows
                                .push(format!("failover from {}", seg.nodes[seg.preferred].name));
                        }
                    }
                    None if is_full_granularity && b.count > 1 => {
                        b.rows.push("each node its own tunnels".to_owned());
                    }
                    None => {
                        let only = super::end_name(topo, places[p].nodes[0]);
                        if b.count == 1 {
                            b.rows.push(format!("node {only}"));
                        }
                    }
                }
                if inside[i] > 0 {
                    b.rows
                        .push(plural(inside[i], "tunnel inside", "tunnels inside"));
                }
            }
        }
        if live.is_some() {
            b.rows.push(match b.state {
                Some(s) => worst_words(s),
                None => "no tunnels".to_owned(),
            });
        }
    }
    Scene {
        mode,
        boxes,
        peer_cards: Vec::new(),
        edges: out_edges,
        local,
    }
}

/// The full view: every place a box of cards, every edge a line.
fn full(
    topo: &Topology<'_>,
    places: &[Place],
    all: Vec<Edge>,
    local: Option<End>,
    live: Option<&Live>,
) -> Scene {
    let boxes = places
        .iter()
        .map(|p| SceneBox {
            label: p.label.clone(),
            kind: BoxKind::Location,
            cards: p.nodes.clone(),
            leader: p.leader,
            linked: p.linked,
            count: p.nodes.len(),
            rows: Vec::new(),
            state: None,
        })
        .collect();
    let edges = all
        .iter()
        .map(|e| SceneEdge {
            kind: e.kind,
            a: Anchor::Card(e.a),
            b: Anchor::Card(e.b),
            edge: Some(*e),
            tunnels: usize::from(e.kind != EdgeKind::Private),
            state: live.and_then(|lv| tunnel_state(topo, e, lv)),
            local: touches_local(topo, e, local),
            key: edge_key(topo, e),
            relayed: usize::from(relay_of(topo, e).is_some()),
            relayed_via: relay_of(topo, e).map(str::to_owned),
        })
        .collect();
    Scene {
        mode: Mode::Full,
        boxes,
        peer_cards: (0..topo.peers.len()).collect(),
        edges,
        local,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::generated;
    use super::*;
    use crate::model::Granularity;

    const CAPS: Caps = Caps {
        cards: 16,
        boxes: 24,
    };

    #[test]
    fn nodes_of_one_location_share_one_place_in_full_granularity() {
        let nodes = generated(40, 4);
        let topo = build_topo(&nodes);
        let ps = places(&topo);
        assert_eq!(ps.len(), 4);
        assert!(ps.iter().all(|p| p.nodes.len() == 10 && p.leader.is_none()));
    }

    fn build_topo(nodes: &[crate::model::MeshNode]) -> Topology<'_> {
        super::super::fixtures::build(nodes, &[], Granularity::Full)
    }

    #[test]
    fn overview_bundles_tunnels_per_pair_of_locations_and_counts_the_rest_inside() {
        let nodes = generated(40, 4);
        let topo = build_topo(&nodes);
        let scene = build(&topo, Mode::Overview, CAPS, None, None);
        assert_eq!(scene.boxes.len(), 4);
        assert_eq!(scene.edges.len(), 6, "one line per pair of locations");
        assert!(scene.edges.iter().all(|e| e.tunnels == 100));
        assert_eq!(scene.boxes[0].rows[0], "10 nodes");
        assert!(
            scene.boxes[0]
                .rows
                .contains(&"45 tunnels inside".to_owned())
        );
        assert_eq!(scene.edges[0].label().as_deref(), Some("100 tunnels"));
    }

    #[test]
    fn overview_past_the_box_cap_counts_the_smallest_locations_in_one_box() {
        let nodes = generated(100, 30);
        let topo = super::super::fixtures::build(&nodes, &[], Granularity::Location);
        let scene = build(&topo, Mode::Overview, CAPS, None, None);
        assert_eq!(scene.boxes.len(), 24);
        let total: usize = scene.boxes.iter().map(|b| b.count).sum();
        assert_eq!(total, 100);
        assert!(matches!(&scene.boxes[23].kind, BoxKind::Others(l) if l.len() == 7));
    }

    #[test]
    fn focus_draws_only_the_nodes_tunnels_and_link() {
        let nodes = generated(40, 4);
        let topo = super::super::fixtures::build(&nodes, &[], Granularity::Location);
        let end = End::Node(0, 3);
        let scene = build(&topo, Mode::Focus(end), CAPS, None, None);
        let open = &scene.boxes[0];
        assert!(open.cards.contains(&end));
        // Its private link to the leader and its leader's three tunnels to the other places.
        let links = scene.edges.iter().filter(|e| e.kind == EdgeKind::Private);
        assert_eq!(
            links.count(),
            usize::from(end != End::Node(0, topo.segments[0].leader))
        );
        let bundles: Vec<_> = scene.edges.iter().filter(|e| e.edge.is_none()).collect();
        assert_eq!(bundles.len(), 3);
        assert!(bundles.iter().all(|e| e.tunnels == 1 && e.local));
    }

    #[test]
    fn location_view_caps_its_cards_and_counts_the_rest() {
        let nodes = generated(500, 5);
        let topo = super::super::fixtures::build(&nodes, &[], Granularity::Location);
        let scene = build(&topo, Mode::Location(2), CAPS, None, None);
        let open = &scene.boxes[2];
        assert_eq!(open.cards.len(), 16);
        assert_eq!(open.count, 100);
        assert_eq!(open.rows, ["… and 84 more nodes not drawn"]);
    }
}
