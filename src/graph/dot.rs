//! DOT writer: the mesh as a graphviz document, shaped like Kilo's `kgctl graph`.
//!
//! It draws the view the SVG writer chooses (full drawing or overview by size, or one node or
//! location): one `cluster_<n>` subgraph per location drawn in full; one box per node whose
//! label holds its name, mesh IP, pod CIDRs, internal IP and endpoint; the external peers in
//! `cluster_peers`. Edges: `dir=both` WireGuard tunnels between leaders and from each leader to
//! each peer, dashed undirected private links from each leader to its members. Nodes are
//! identified by name, peers by `peer:<name>` (a Node name cannot contain `:`). A location
//! (or the external peers) drawn as words is one box `box:<n>`, and a line standing for several
//! tunnels is labelled with their count (and, live, the worst handshake).
//!
//! A live drawing colours each tunnel by its state (green, amber, red, grey and dashed for
//! unknown), says it in the edge's `tooltip`, and adds a `cluster_legend` of sample edges
//! between `legend:` points (no node can be named so).
//!
//! Pure. Depends on the topology and model (through the parent module), the scene, and the SVG
//! writer's choice of view only.

use std::fmt::Write as _;

use super::scene::{self, Anchor, BoxKind};
use super::svg;
use super::{
    EdgeKind, End, GraphOptions, LIVE_LEGEND, TunnelState, caption, live_caption, local_end,
    node_card, peer_card,
};
use crate::topology::Topology;

const TUNNEL: &str = "#1c7ed6";
const PEER_TUNNEL: &str = "#ae3ec9";
const LINK: &str = "#495057";
const LEADER: &str = "#1864ab";
const LOCAL: &str = "#e8590c";
const LOCAL_FILL: &str = "#fff4e6";

/// The colour of a live tunnel state.
fn live_colour(word: &str) -> &'static str {
    match word {
        "fresh" => "#2f9e44",
        "aging" | "new" => "#f08c00",
        "stale" => "#e03131",
        _ => "#adb5bd",
    }
}

/// `s` as a DOT double-quoted string. Backslashes are doubled so that graphviz reads no escape
/// sequence (`\N`, `\l`, …) out of a name; line breaks become `\n`.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Lines as one DOT label: each line quoted as text, joined by graphviz's `\n` line break.
fn label(lines: &[String]) -> String {
    let joined: Vec<String> = lines
        .iter()
        .map(|l| {
            let q = quote(l);
            q[1..q.len() - 1].to_owned()
        })
        .collect();
    format!("\"{}\"", joined.join("\\n"))
}

/// The DOT ID of one end of an edge.
fn id(topo: &Topology<'_>, end: End) -> String {
    match end {
        End::Node(s, m) => quote(topo.segments[s].nodes[m].name.as_str()),
        End::Peer(p) => quote(&format!("peer:{}", topo.peers[p].name)),
    }
}

/// The DOT ID of a line's end: a card's node or peer, or a box of words (`box:<n>`, which no
/// node can be named).
fn anchor_id(topo: &Topology<'_>, a: Anchor) -> String {
    match a {
        Anchor::Card(end) => id(topo, end),
        Anchor::Box(b) => quote(&format!("box:{b}")),
    }
}

/// The whole document: the view the SVG would draw (the same choice of full drawing or
/// overview, the same caps), as clusters of cards and boxes of words.
pub fn render(topo: &Topology<'_>, opts: &GraphOptions) -> String {
    let (mode, caps) = svg::choose(topo, opts);
    let scene = scene::build(topo, mode, caps, local_end(topo, opts), opts.live.as_ref());
    let local = scene.local;
    let mut out = String::with_capacity(1024 + 256 * topo.segments.len() * topo.segments.len());
    let mut title = Vec::with_capacity(2);
    title.extend(opts.title.clone());
    let mut cap = caption(topo);
    if let Some(live) = &opts.live {
        cap.push_str(&live_caption(live));
    }
    title.push(cap);
    out.push_str("digraph \"wiremesh\" {\n");
    let _ = writeln!(
        out,
        "\tgraph [label={}, labelloc=\"t\", outputorder=\"nodesfirst\", overlap=\"false\", \
         fontname=\"monospace\"];",
        label(&title)
    );
    out.push_str(
        "\tnode [shape=\"box\", style=\"rounded\", fontname=\"monospace\", fontsize=\"10\"];\n",
    );
    let _ = writeln!(out, "\tedge [dir=\"both\", color=\"{TUNNEL}\"];");
    for (b, bx) in scene.boxes.iter().enumerate() {
        if bx.cards.is_empty() {
            let mut lines = vec![bx.label.clone()];
            lines.extend(bx.rows.iter().cloned());
            let style = if bx.kind == BoxKind::Peers {
                "rounded,dashed"
            } else {
                "rounded,filled"
            };
            let _ = writeln!(
                out,
                "\t{} [label={}, style=\"{style}\", fillcolor=\"#e7f5ff\"];",
                anchor_id(topo, Anchor::Box(b)),
                label(&lines)
            );
            continue;
        }
        let _ = writeln!(out, "\tsubgraph \"cluster_{b}\" {{");
        let mut cluster_label = bx.label.clone();
        if let Some(row) = bx.rows.first() {
            cluster_label.push('\n');
            cluster_label.push_str(row);
        }
        let _ = writeln!(
            out,
            "\t\tgraph [label={}, style=\"dashed,rounded\"];",
            quote(&cluster_label)
        );
        for &end in &bx.cards {
            let End::Node(s, m) = end else { continue };
            let seg = &topo.segments[s];
            let lines = node_card(topo, s, m, None).lines();
            let mut attrs = format!("label={}", label(&lines));
            let leader = m == seg.leader && seg.nodes.len() > 1;
            node_style(&mut attrs, leader, local == Some(end), false);
            let _ = writeln!(out, "\t\t{} [{attrs}];", id(topo, end));
        }
        out.push_str("\t}\n");
    }
    if !scene.peer_cards.is_empty() {
        out.push_str("\tsubgraph \"cluster_peers\" {\n");
        out.push_str("\t\tgraph [label=\"peers\", style=\"dashed,rounded\"];\n");
        for &p in &scene.peer_cards {
            let peer = &topo.peers[p];
            let mut attrs = format!("label={}", label(&peer_card(peer, None).lines()));
            node_style(&mut attrs, false, local == Some(End::Peer(p)), true);
            let _ = writeln!(out, "\t\t{} [{attrs}];", id(topo, End::Peer(p)));
        }
        out.push_str("\t}\n");
    }
    for e in &scene.edges {
        let on = e.local;
        let state = e.state;
        let colour = match e.kind {
            _ if state.is_some() => state.map_or(TUNNEL, |s| live_colour(s.word())),
            _ if on => LOCAL,
            EdgeKind::Private => LINK,
            EdgeKind::Tunnel => TUNNEL,
            EdgeKind::PeerTunnel => PEER_TUNNEL,
        };
        let mut attrs = Vec::with_capacity(4);
        if e.kind == EdgeKind::Private {
            attrs.push("dir=\"none\", style=\"dashed\"".to_owned());
        }
        if let Some(words) = e.label() {
            attrs.push(format!("label={}", quote(&words)));
        }
        if let Some(via) = &e.relayed_via {
            attrs.push(format!(
                "label={}, style=\"dotted\"",
                quote(&format!("relayed via {via}"))
            ));
        }
        if let Some(s) = state {
            if s == TunnelState::Unknown {
                attrs.push("style=\"dashed\"".to_owned());
            }
            if e.edge.is_some() {
                attrs.push(format!("tooltip={}", quote(&s.describe())));
            }
        }
        if colour != TUNNEL {
            attrs.push(format!("color=\"{colour}\""));
        }
        if on {
            attrs.push("penwidth=\"2.5\"".to_owned());
        }
        let (a, b) = match e.edge {
            Some(edge) => (id(topo, edge.a), id(topo, edge.b)),
            None => (anchor_id(topo, e.a), anchor_id(topo, e.b)),
        };
        let _ = write!(out, "\t{a} -> {b}");
        if !attrs.is_empty() {
            let _ = write!(out, " [{}]", attrs.join(", "));
        }
        out.push_str(";\n");
    }
    if opts.live.is_some() {
        write_legend(&mut out);
    }
    out.push_str("}\n");
    out
}

/// The live drawing's legend: one sample edge per state, between two `legend:` points.
fn write_legend(out: &mut String) {
    out.push_str("\tsubgraph \"cluster_legend\" {\n");
    out.push_str("\t\tgraph [label=\"tunnels by latest handshake\", style=\"rounded\"];\n");
    for (word, words) in LIVE_LEGEND {
        let _ = writeln!(
            out,
            "\t\t\"legend:{word}\" [shape=\"point\", width=\"0.05\"];\n\t\t\"legend:{word}:text\" [shape=\"plaintext\", label={}];",
            quote(words)
        );
        let dashed = if word == "unknown" {
            ", style=\"dashed\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "\t\t\"legend:{word}\" -> \"legend:{word}:text\" [dir=\"none\", color=\"{}\", penwidth=\"2\"{dashed}];",
            live_colour(word)
        );
    }
    out.push_str("\t}\n");
}

/// Append a node's style attributes: leaders bold, the local node filled, peers dashed.
fn node_style(attrs: &mut String, leader: bool, local: bool, peer: bool) {
    let mut style = vec!["rounded"];
    if leader {
        style.push("bold");
    }
    if peer {
        style.push("dashed");
    }
    if local {
        style.push("filled");
    }
    if style.len() > 1 {
        let _ = write!(attrs, ", style=\"{}\"", style.join(","));
    }
    if local {
        let _ = write!(
            attrs,
            ", color=\"{LOCAL}\", fillcolor=\"{LOCAL_FILL}\", penwidth=\"3\""
        );
    } else if leader {
        let _ = write!(attrs, ", color=\"{LEADER}\", penwidth=\"2\"");
    } else if peer {
        let _ = write!(attrs, ", color=\"{PEER_TUNNEL}\"");
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    use super::super::fixtures::*;
    use super::*;
    use crate::graph::View;
    use crate::model::Granularity;

    fn edge_lines(dot: &str) -> Vec<&str> {
        dot.lines().filter(|l| l.contains(" -> ")).collect()
    }

    #[test]
    fn dot_of_a_large_mesh_is_the_overview_with_labelled_lines_and_one_location_in_full() {
        let nodes = generated(40, 4);
        let topo = build(&nodes, &[], Granularity::Full);
        let dot = render(&topo, &GraphOptions::default());
        assert!(!dot.contains("subgraph \"cluster_"), "no cards: {dot}");
        for b in 0..4 {
            assert!(
                dot.contains(&format!("\t\"box:{b}\" [label=\"site-{b}\\n10 nodes")),
                "{dot}"
            );
        }
        let edges = edge_lines(&dot);
        assert_eq!(edges.len(), 6, "one line per pair of locations");
        assert!(
            edges.iter().all(|l| l.contains("label=\"100 tunnels\"")),
            "{edges:?}"
        );
        let one = render(
            &topo,
            &GraphOptions {
                view: View::Location("site-1".into()),
                ..GraphOptions::default()
            },
        );
        assert_eq!(one.matches("subgraph \"cluster_").count(), 1);
        assert!(
            one.contains("graph [label=\"site-1\", style=\"dashed,rounded\"];"),
            "{one}"
        );
    }

    #[test]
    fn dot_has_a_cluster_per_segment_and_every_tunnel() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let dot = render(&topo, &GraphOptions::default());
        assert!(dot.starts_with("digraph \"wiremesh\" {\n") && dot.ends_with("}\n"));
        for s in 0..3 {
            assert!(
                dot.contains(&format!("subgraph \"cluster_{s}\" {{")),
                "{dot}"
            );
        }
        assert!(dot.contains("subgraph \"cluster_peers\""));
        assert!(dot.contains("graph [label=\"home\", style=\"dashed,rounded\"];"));
        for n in &nodes {
            assert!(
                dot.contains(&format!("\t\t\"{}\" [label=\"", n.name)),
                "{}",
                n.name
            );
        }
        let edges = edge_lines(&dot);
        let tunnels = edges.iter().filter(|l| !l.contains("dir=\"none\"")).count();
        let links = edges
            .iter()
            .filter(|l| l.contains("style=\"dashed\""))
            .count();
        assert_eq!(tunnels, 3 + 3, "3 between leaders, 3 to the laptop");
        assert_eq!(links, 4);
        assert!(dot.contains("\t\"home-b\" -> \"peer:laptop\""));
        assert!(dot.contains("\t\"home-b\" -> \"home-a\" [dir=\"none\""));
    }

    #[test]
    fn dot_labels_show_mesh_ip_pod_cidrs_and_endpoint() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let dot = render(&topo, &GraphOptions::default());
        let mesh_ip = topo.segments[0].mesh_ip;
        assert!(dot.contains(&format!(
            "\"fra-1\" [label=\"fra-1\\nmesh {mesh_ip}\\npods 10.42.0.0/24\\ninternal 203.0.113.10/32\\nendpoint 203.0.113.10:51820\"];"
        )), "{dot}");
        assert_eq!(edge_lines(&dot).len(), 3);
    }

    #[test]
    fn dot_quotes_and_escapes_every_id_and_label() {
        let (nodes, peers) = nasty();
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: None,
            title: Some("say \"hi\"\\".into()),
            live: None,
            view: View::Auto,
        };
        let dot = render(&topo, &opts);
        assert!(dot.contains(r#""x\\y\"z" [label="x\\y\"z\n"#), "{dot}");
        assert!(dot.contains(r#"label="loc \"one\" & <two>""#), "{dot}");
        assert!(dot.contains(r#"label="back\\slash\nnewline""#), "{dot}");
        assert!(dot.contains(r#"label="say \"hi\"\\\nmesh "#), "{dot}");
        // Every `"` that is not escaped opens or closes a string: an even count per line.
        for line in dot.lines() {
            let unescaped = line
                .replace("\\\\", "")
                .replace("\\\"", "")
                .matches('"')
                .count();
            assert_eq!(unescaped % 2, 0, "{line}");
        }
    }

    #[test]
    fn dot_marks_local_node_and_leaders() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some("laptop".into()),
            title: None,
            live: None,
            view: View::Auto,
        };
        let dot = render(&topo, &opts);
        assert!(dot.contains("\"peer:laptop\" [label=\"laptop\\n"));
        assert!(dot.contains("style=\"rounded,dashed,filled\""));
        assert_eq!(
            dot.matches(&format!("color=\"{LOCAL}\", penwidth=\"2.5\""))
                .count(),
            3
        );
        assert!(dot.contains("label=\"★ home-b\\n"));
        assert_eq!(dot.matches("style=\"rounded,bold\"").count(), 3);
    }

    #[test]
    fn live_dot_colours_tunnels_by_state_with_a_legend() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let key = |n: &str| key_of(&nodes, n);
        let mut live = super::super::Live::default();
        live.seen.insert(
            "fra-1".into(),
            [(
                key("hel-1"),
                super::super::Seen {
                    age: Some(200),
                    tx_bytes: 1,
                },
            )]
            .into(),
        );
        let opts = GraphOptions {
            live: Some(live),
            ..GraphOptions::default()
        };
        let dot = render(&topo, &opts);
        let edge = |a: &str, b: &str| {
            edge_lines(&dot)
                .into_iter()
                .find(|l| l.trim_start().starts_with(&format!("\"{a}\" -> \"{b}\"")))
                .unwrap_or_else(|| panic!("{a} -> {b}: {dot}"))
        };
        let aging = edge("fra-1", "hel-1");
        assert!(aging.contains("color=\"#f08c00\""), "{aging}");
        assert!(
            aging.contains("tooltip=\"handshake 3m ago (aging)\""),
            "{aging}"
        );
        let unknown = edge("hel-1", "par-1");
        assert!(unknown.contains("color=\"#adb5bd\""), "{unknown}");
        assert!(unknown.contains("style=\"dashed\""), "{unknown}");
        assert!(dot.contains("subgraph \"cluster_legend\""));
        for words in [
            "handshake < 2 min",
            "no data",
            "stale (> 5 min, or never answered)",
        ] {
            assert!(
                dot.contains(&format!("label=\"{words}\"")),
                "{words}: {dot}"
            );
        }
        assert!(dot.contains("handshakes from 1 agent"));
        // Not live: no legend, no tooltips.
        let plain = render(&topo, &GraphOptions::default());
        assert!(!plain.contains("legend:") && !plain.contains("tooltip="));
    }

    #[test]
    fn dot_is_deterministic() {
        let nodes = generated(12, 3);
        let a = build(&nodes, &[], Granularity::Location);
        let b = build(&nodes, &[], Granularity::Location);
        assert_eq!(
            render(&a, &GraphOptions::default()),
            render(&b, &GraphOptions::default())
        );
    }

    /// Run graphviz `dot -Tsvg` on `input`; return its SVG.
    fn graphviz(input: &str) -> String {
        let mut child = Command::new("dot")
            .arg("-Tsvg")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("graphviz `dot` on PATH");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write DOT");
        let out = child.wait_with_output().expect("dot runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dot failed: {stderr}\n{input}");
        assert!(!stderr.contains("syntax error"), "{stderr}");
        assert!(!out.stdout.is_empty(), "dot wrote nothing");
        String::from_utf8(out.stdout).expect("utf-8 SVG")
    }

    #[test]
    #[cfg_attr(
        not(feature = "netns-tests"),
        ignore = "needs graphviz (run with --features netns-tests)"
    )]
    fn graphviz_accepts_a_live_dot_with_its_legend() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some(nodes[0].name.clone()),
            live: Some(super::super::Live::default()),
            ..GraphOptions::default()
        };
        let svg = graphviz(&render(&topo, &opts));
        assert!(svg.contains("tunnels by latest handshake"), "{svg}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "netns-tests"),
        ignore = "needs graphviz (run with --features netns-tests)"
    )]
    fn graphviz_accepts_the_dot_of_both_examples() {
        for (file, granularity, peers) in [
            ("three-clouds.yaml", Granularity::Full, false),
            ("locations.yaml", Granularity::Location, true),
        ] {
            let (nodes, peers) = example(file, peers);
            let topo = build(&nodes, &peers, granularity);
            let opts = GraphOptions {
                local: Some(nodes[0].name.clone()),
                title: Some(file.to_owned()),
                live: None,
                view: View::Auto,
            };
            // Graphviz writes `-` in titles as a character reference.
            let svg = graphviz(&render(&topo, &opts)).replace("&#45;", "-");
            for n in &nodes {
                assert!(
                    svg.contains(&format!("<title>{}</title>", n.name)),
                    "{file}: {}",
                    n.name
                );
            }
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "netns-tests"),
        ignore = "needs graphviz (run with --features netns-tests)"
    )]
    fn graphviz_accepts_the_dot_of_names_with_quotes_and_backslashes() {
        let (nodes, peers) = nasty();
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some(nodes[1].name.clone()),
            title: Some("say \"hi\"\\".into()),
            live: None,
            view: View::Auto,
        };
        graphviz(&render(&topo, &opts));
    }
}
