//! SVG writer: the mesh as one self-contained SVG document, written by hand.
//!
//! Self-contained: an inline `<style>`, no scripts, fonts, images or links. Every node, peer,
//! segment and edge is an element with an `id`, a `class` and `data-*` attributes naming it
//! (`data-node`, `data-peer`, `data-segment`, `data-tunnel="a--b"`, `data-link`), so tools and
//! tests can find them; hovering shows a `<title>` tooltip. Text is measured as monospace. In a
//! live drawing each tunnel also has the class `live-<state>` and `data-health="<state>"`
//! (`fresh`, `aging`, `new`, `stale`, `unknown`), and `data-handshake-age` (seconds) when known.
//! The root carries `data-view` (`full`, `overview`, `location`, `focus`); each location's box
//! `data-location` and `data-node-count` (the box of the other locations `data-locations`, one
//! per line); a line standing for several tunnels `data-bundle="a--b"` and `data-tunnel-count`.
//! The view and its caps are chosen here, by canvas size ([`FULL_CANVAS`], [`MAX_CANVAS`]).
//!
//! Pure. Depends on the topology (with its diagnostics) and model, through the parent module,
//! on [`super::scene`] for what a view holds and on [`super::layout`] for positions.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::layout::{self, FRAME_PAD, Group, Layout, Rect, Size, Spec};
use super::scene::{self, Anchor, BoxKind, Caps, Mode, Scene, places};
use super::{
    Card, EdgeKind, End, GraphOptions, LIVE_LEGEND, TunnelState, View, caption, end_name,
    live_caption, local_end, node_card, peer_card,
};
use crate::topology::Topology;

/// Width of one character of 12 px monospace text (0.6 em, rounded up).
pub(super) const CHAR_W: f64 = 7.3;
/// Width of one character of a 13 px bold heading.
pub(super) const HEAD_CHAR_W: f64 = 8.0;
/// Width of one character of the 18 px title.
pub(super) const TITLE_CHAR_W: f64 = 11.0;
/// Distance between two rows of a card.
const LINE_H: f64 = 16.0;
/// Height of a card's heading line.
const HEAD_H: f64 = 20.0;
/// Padding inside a card.
const CARD_PAD: f64 = 10.0;
/// Characters reserved for a row's key, so values line up.
const KEY_COLS: usize = 10;
/// Longest list (pod CIDRs, allowed IPs) shown in full on a card; the tooltip has them all.
const LIST_CAP: usize = 4;
/// Most left-out nodes and peers listed under the drawing.
const FOOTER_CAP: usize = 20;
/// Frame fills, one per location (cycled).
const PALETTE: [&str; 8] = [
    "#e7f5ff", "#ebfbee", "#fff9db", "#f3f0ff", "#fff0f6", "#e6fcf5", "#fff4e6", "#f8f9fa",
];

const STYLE: &str = "\
text{font-family:'DejaVu Sans Mono',Menlo,Consolas,'Liberation Mono',monospace;font-size:12px;fill:#212529}\
.background{fill:#fff}\
.title{font-size:18px;font-weight:bold}\
.caption{fill:#495057}\
.frame{stroke:#868e96;stroke-width:1;stroke-dasharray:6 4}\
.location{font-weight:bold;fill:#495057;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}\
.card{fill:#fff;stroke:#495057;stroke-width:1.2}\
.leader .card{stroke:#1864ab;stroke-width:2.5}\
.peer .card{fill:#f8f0fc;stroke:#862e9c;stroke-dasharray:5 3}\
.local .card{fill:#fff4e6;stroke:#e8590c;stroke-width:3}\
.heading{font-size:13px;font-weight:bold}\
.leader .heading{fill:#1864ab}\
.key{fill:#868e96}\
.tunnel{stroke:#1c7ed6;fill:none}\
.peer-tunnel{stroke:#ae3ec9}\
.tunnel.local{stroke:#e8590c;stroke-width:2.5;stroke-opacity:1}\
.link{stroke:#495057;stroke-width:1.5;stroke-dasharray:4 3;fill:none}\
.link.local{stroke:#e8590c;stroke-width:2.5}\
.tunnel.live-fresh{stroke:#2f9e44}\
.tunnel.live-aging,.tunnel.live-new{stroke:#f08c00}\
.tunnel.live-stale{stroke:#e03131}\
.tunnel.live-unknown{stroke:#adb5bd;stroke-dasharray:4 4}\
.tunnel.relayed{stroke-dasharray:1 5;stroke-linecap:round}\
.legend-local{fill:#fff4e6;stroke:#e8590c;stroke-width:2}\
.legend-peer{fill:#f8f0fc;stroke:#862e9c;stroke-dasharray:5 3}\
.legend-box{fill:#e7f5ff;stroke:#495057}\
.box .frame{stroke:#495057;stroke-width:1.2}\
.box.peers .frame{stroke:#862e9c;stroke-dasharray:5 3}\
.box.live-stale .frame{stroke:#e03131;stroke-width:2.5}\
.edge-label-bg{fill:#fff;stroke:#adb5bd;stroke-width:0.8}\
.footer text{fill:#c92a2a}";

/// Legend samples keep their own look however many tunnels thin the real ones.
const LEGEND_STYLE: &str = ".legend line{stroke-width:2;stroke-opacity:1}";

/// `s` made safe for XML text and attribute values: markup characters become references, line
/// breaks and tabs become character references (attributes would fold them into spaces), and
/// the characters XML 1.0 forbids become U+FFFD.
pub(crate) fn esc(s: &str) -> Cow<'_, str> {
    let plain =
        |c: char| !matches!(c, '&' | '<' | '>' | '"' | '\'' | '\u{FFFE}' | '\u{FFFF}') && c >= ' ';
    if s.chars().all(plain) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A coordinate with at most one decimal, without a trailing `.0`.
fn num(v: f64) -> String {
    let tenths = (v * 10.0).round();
    let s = if tenths % 10.0 == 0.0 {
        format!("{:.0}", tenths / 10.0)
    } else {
        format!("{:.1}", tenths / 10.0)
    };
    if s == "-0" { "0".to_owned() } else { s }
}

pub(super) fn text_width(s: &str, char_w: f64) -> f64 {
    s.chars().count() as f64 * char_w
}

/// The size every card gets: wide enough for the longest line, tall enough for the most rows.
fn card_size<'c>(cards: impl IntoIterator<Item = &'c Card>) -> Size {
    let mut width: f64 = 0.0;
    let mut rows = 0;
    for c in cards {
        width = width.max(text_width(&c.heading, HEAD_CHAR_W));
        for r in &c.rows {
            let w = if r.value.is_empty() {
                text_width(r.key, CHAR_W)
            } else {
                (KEY_COLS + r.value.chars().count()) as f64 * CHAR_W
            };
            width = width.max(w);
        }
        rows = rows.max(c.rows.len());
    }
    Size {
        w: (width + 2.0 * CARD_PAD).ceil(),
        h: 2.0 * CARD_PAD + HEAD_H + rows as f64 * LINE_H,
    }
}

/// One legend entry: a sample and its words.
enum Sample {
    Line(&'static str),
    Mark,
    Box(&'static str),
}

/// The header's lines: title (if any), caption, legend.
struct Header {
    title: Option<String>,
    caption: String,
    legend: Vec<(Sample, Cow<'static, str>)>,
}

const LEGEND_SAMPLE_W: f64 = 26.0;
const LEGEND_SPACING: f64 = 22.0;
const TITLE_H: f64 = 28.0;
const CAPTION_H: f64 = 20.0;
const LEGEND_H: f64 = 22.0;

impl Header {
    fn new(topo: &Topology<'_>, opts: &GraphOptions, has_local: bool, mode: Mode) -> Header {
        let mut legend = Vec::new();
        let mut caption = caption(topo);
        match &opts.live {
            Some(live) => {
                for (word, words) in LIVE_LEGEND {
                    legend.push((Sample::Line(live_line_class(word)), words.into()));
                }
                caption.push_str(&live_caption(live));
            }
            None => {
                legend.push((Sample::Line("tunnel"), "WireGuard tunnel".into()));
                if !topo.peers.is_empty() {
                    legend.push((
                        Sample::Line("tunnel peer-tunnel"),
                        "tunnel to a peer".into(),
                    ));
                }
            }
        }
        if mode != Mode::Full {
            legend.push((Sample::Box("legend-box"), "location: nodes counted".into()));
        }
        if mode != Mode::Overview && topo.segments.iter().any(|s| s.nodes.len() > 1) {
            legend.push((Sample::Line("link"), "private network to leader".into()));
            legend.push((Sample::Mark, "leader".into()));
        }
        if has_local {
            legend.push((Sample::Box("legend-local"), "local node".into()));
        }
        if !topo.peers.is_empty() {
            legend.push((Sample::Box("legend-peer"), "external peer".into()));
        }
        Header {
            title: opts.title.clone(),
            caption,
            legend,
        }
    }

    fn legend_width(&self) -> f64 {
        self.legend
            .iter()
            .map(|(_, words)| LEGEND_SAMPLE_W + 6.0 + text_width(words, CHAR_W) + LEGEND_SPACING)
            .sum::<f64>()
            - LEGEND_SPACING
    }

    fn size(&self) -> Size {
        let title = self
            .title
            .as_deref()
            .map_or(0.0, |t| text_width(t, TITLE_CHAR_W));
        Size {
            w: title
                .max(text_width(&self.caption, CHAR_W))
                .max(self.legend_width()),
            h: if self.title.is_some() { TITLE_H } else { 0.0 } + CAPTION_H + LEGEND_H,
        }
    }

    fn write(&self, out: &mut String, at: &Rect) {
        out.push_str("<g class=\"header\">\n");
        let mut y = at.y;
        if let Some(t) = &self.title {
            let _ = writeln!(
                out,
                "<text class=\"title\" x=\"{}\" y=\"{}\">{}</text>",
                num(at.x),
                num(y + 19.0),
                esc(t)
            );
            y += TITLE_H;
        }
        let _ = writeln!(
            out,
            "<text class=\"caption\" x=\"{}\" y=\"{}\">{}</text>",
            num(at.x),
            num(y + 13.0),
            esc(&self.caption)
        );
        y += CAPTION_H;
        let mid = y + 11.0;
        let mut x = at.x;
        out.push_str("<g class=\"legend\">\n");
        for (sample, words) in &self.legend {
            match sample {
                Sample::Line(class) => {
                    let _ = writeln!(
                        out,
                        "<line class=\"{class}\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/>",
                        num(x),
                        num(mid),
                        num(x + LEGEND_SAMPLE_W),
                        num(mid)
                    );
                }
                Sample::Mark => {
                    let _ = writeln!(
                        out,
                        "<text class=\"heading\" fill=\"#1864ab\" x=\"{}\" y=\"{}\">★</text>",
                        num(x + 6.0),
                        num(mid + 5.0)
                    );
                }
                Sample::Box(class) => {
                    let _ = writeln!(
                        out,
                        "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"14\" rx=\"3\"/>",
                        num(x + 3.0),
                        num(mid - 7.0),
                        num(LEGEND_SAMPLE_W - 6.0)
                    );
                }
            }
            x += LEGEND_SAMPLE_W + 6.0;
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\">{}</text>",
                num(x),
                num(mid + 4.0),
                esc(words)
            );
            x += text_width(words, CHAR_W) + LEGEND_SPACING;
        }
        out.push_str("</g>\n</g>\n");
    }
}

/// The legend sample's classes for a live tunnel state.
fn live_line_class(word: &str) -> &'static str {
    match word {
        "fresh" => "tunnel live-fresh",
        "aging" => "tunnel live-aging",
        "new" => "tunnel live-new",
        "stale" => "tunnel live-stale",
        _ => "tunnel live-unknown",
    }
}

/// Lines listing the nodes and peers left out of the mesh, and why.
fn footer_lines(topo: &Topology<'_>) -> Vec<String> {
    let skipped: Vec<_> = topo.diagnostics.iter().filter(|d| d.skipped).collect();
    if skipped.is_empty() {
        return Vec::new();
    }
    let mut lines = vec!["left out of the mesh:".to_owned()];
    for d in skipped.iter().take(FOOTER_CAP) {
        let kind = match d.subject {
            crate::diagnostic::Subject::Node => "node",
            crate::diagnostic::Subject::Peer => "peer",
            crate::diagnostic::Subject::Input => "input",
        };
        lines.push(format!("{kind} {}: {}", d.name, d.problem));
    }
    if skipped.len() > FOOTER_CAP {
        lines.push(format!("… and {} more", skipped.len() - FOOTER_CAP));
    }
    lines
}

/// Stroke width and opacity of tunnels: thinner and lighter as they multiply.
/// Stroke width and opacity of tunnels: thinner and lighter as they multiply.
fn tunnel_stroke(count: usize) -> (f64, f64) {
    match count {
        0..=30 => (2.0, 0.9),
        31..=300 => (1.2, 0.55),
        _ => (0.7, 0.3),
    }
}

/// The largest canvas any drawing gets, in px: twice a 1200-px-high screen, so that at 100 %
/// zoom (12 px text) a drawing is at most two screens in either direction.
pub const MAX_CANVAS: Size = Size {
    w: 2400.0,
    h: 2400.0,
};

/// The largest canvas the full view may take when the view is chosen automatically: one Full
/// HD screen's width at 100 % zoom, and at most one and a half of its heights. A mesh whose
/// full drawing is larger is drawn as an overview.
pub const FULL_CANVAS: Size = Size {
    w: 1920.0,
    h: 1620.0,
};

/// The caps tried in turn for a view of words until its canvas fits [`MAX_CANVAS`].
const CAP_STEPS: [Caps; 7] = [
    Caps {
        cards: 16,
        boxes: 24,
    },
    Caps {
        cards: 12,
        boxes: 16,
    },
    Caps {
        cards: 9,
        boxes: 12,
    },
    Caps { cards: 6, boxes: 8 },
    Caps { cards: 4, boxes: 6 },
    Caps { cards: 2, boxes: 4 },
    Caps { cards: 2, boxes: 2 },
];

/// Longest text (in characters) in a card, box or label; longer text is cut with `…` (the
/// tooltip has it whole).
const TEXT_CAP: usize = 40;

/// `s` cut to `TEXT_CAP` characters.
fn cut(s: &str) -> String {
    if s.chars().count() <= TEXT_CAP {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(TEXT_CAP - 1).collect();
    out.push('…');
    out
}

/// The card with every line cut to `TEXT_CAP`.
fn cut_card(mut c: Card) -> Card {
    c.heading = cut(&c.heading);
    for r in &mut c.rows {
        r.value = cut(&r.value);
    }
    c
}

/// A rendered document.
struct Drawing {
    text: String,
}

/// What `opts.view` asks for, resolved against the topology; `None`: automatic.
pub(super) fn requested(topo: &Topology<'_>, opts: &GraphOptions) -> Option<Mode> {
    match &opts.view {
        View::Auto => None,
        View::Overview => Some(Mode::Overview),
        View::Location(l) => {
            let label = if l.is_empty() { "no location" } else { l };
            places(topo)
                .iter()
                .position(|p| p.label == label)
                .map(Mode::Location)
                .or(Some(Mode::Overview))
        }
        View::Focus(n) => {
            let s = topo.segment_of(n)?;
            let m = topo.segments[s].nodes.iter().position(|x| &x.name == n)?;
            Some(Mode::Focus(End::Node(s, m)))
        }
    }
}

/// The mode and caps a drawing of `topo` under `opts` uses: the full view when it fits
/// [`FULL_CANVAS`] (automatic view), otherwise the first caps at which the view fits
/// [`MAX_CANVAS`].
pub(super) fn choose(topo: &Topology<'_>, opts: &GraphOptions) -> (Mode, Caps) {
    draw_chosen(topo, opts).1
}

fn draw_chosen(topo: &Topology<'_>, opts: &GraphOptions) -> (Drawing, (Mode, Caps)) {
    let mode = match requested(topo, opts) {
        Some(m) => m,
        None => {
            if let Some(d) = draw(topo, opts, Mode::Full, CAP_STEPS[0], Some(FULL_CANVAS)) {
                return (d, (Mode::Full, CAP_STEPS[0]));
            }
            Mode::Overview
        }
    };
    for caps in CAP_STEPS {
        if let Some(d) = draw(topo, opts, mode, caps, Some(MAX_CANVAS)) {
            return (d, (mode, caps));
        }
    }
    // Nothing fits (names of hundreds of characters cannot, as they are cut): the smallest.
    let caps = CAP_STEPS[CAP_STEPS.len() - 1];
    let d = draw(topo, opts, mode, caps, None).unwrap_or_else(|| Drawing {
        text: String::new(),
    });
    (d, (mode, caps))
}

/// The whole document.
pub fn render(topo: &Topology<'_>, opts: &GraphOptions) -> String {
    draw_chosen(topo, opts).0.text
}

/// Where each drawn card is: box and place in it, or peer card index.
fn card_positions(scene: &Scene) -> BTreeMap<End, (usize, usize)> {
    let mut at = BTreeMap::new();
    for (b, bx) in scene.boxes.iter().enumerate() {
        for (c, end) in bx.cards.iter().enumerate() {
            at.insert(*end, (b, c));
        }
    }
    at
}

/// Words for the caption naming the view.
fn view_words(topo: &Topology<'_>, scene: &Scene) -> String {
    match scene.mode {
        Mode::Full => String::new(),
        Mode::Overview => " · overview (--location L or --focus NODE draw one in full)".to_owned(),
        Mode::Location(_) => {
            let label = scene
                .boxes
                .iter()
                .find(|b| !b.cards.is_empty())
                .map_or("", |b| b.label.as_str());
            format!(" · location {}", cut(label))
        }
        Mode::Focus(end) => format!(" · focus on {}", cut(end_name(topo, end))),
    }
}

/// The drawing of `mode` under `caps`; `None` when its canvas would exceed `limit` (then no
/// text is written).
fn draw(
    topo: &Topology<'_>,
    opts: &GraphOptions,
    mode: Mode,
    caps: Caps,
    limit: Option<Size>,
) -> Option<Drawing> {
    let local = local_end(topo, opts);
    let scene = scene::build(topo, mode, caps, local, opts.live.as_ref());
    let local = scene.local;
    let node_cards: BTreeMap<End, Card> = scene
        .boxes
        .iter()
        .flat_map(|b| b.cards.iter())
        .map(|&end| {
            let card = match end {
                End::Node(s, m) => node_card(topo, s, m, Some(LIST_CAP)),
                End::Peer(p) => peer_card(&topo.peers[p], Some(LIST_CAP)),
            };
            (end, cut_card(card))
        })
        .collect();
    let peer_cards: Vec<Card> = scene
        .peer_cards
        .iter()
        .map(|&p| cut_card(peer_card(&topo.peers[p], Some(LIST_CAP))))
        .collect();
    let card = card_size(node_cards.values().chain(&peer_cards));
    let labels: Vec<String> = scene.boxes.iter().map(|b| cut(&b.label)).collect();
    let rows: Vec<Vec<String>> = scene
        .boxes
        .iter()
        .map(|b| b.rows.iter().map(|r| cut(r)).collect())
        .collect();
    let mut header = Header::new(topo, opts, local.is_some(), scene.mode);
    header.caption.push_str(&view_words(topo, &scene));
    let common = common_label(&scene);
    if let Some(words) = &common {
        header.legend.push((
            Sample::Line("tunnel"),
            format!("line without words: {}", cut(words)).into(),
        ));
    }
    let footer = footer_lines(topo);
    let groups: Vec<Group> = scene
        .boxes
        .iter()
        .zip(&labels)
        .zip(&rows)
        .map(|((b, label), rows)| Group {
            members: b.cards.len(),
            leader: b.leader,
            linked: b.linked,
            label_width: text_width(label, CHAR_W),
            extra: Size {
                w: rows
                    .iter()
                    .map(|r| text_width(r, CHAR_W))
                    .fold(0.0, f64::max),
                h: rows.len() as f64 * LINE_H,
            },
        })
        .collect();
    let l = layout::layout(&Spec {
        groups: &groups,
        peers: scene.peer_cards.len(),
        card,
        header: header.size(),
        footer: Size {
            w: footer
                .iter()
                .map(|f| text_width(f, CHAR_W))
                .fold(0.0, f64::max),
            h: footer.len() as f64 * LINE_H,
        },
    });

    if let Some(limit) = limit
        && (l.width.ceil() > limit.w || l.height.ceil() > limit.h)
    {
        return None;
    }
    let tunnels = scene
        .edges
        .iter()
        .filter(|e| e.kind != EdgeKind::Private)
        .count();
    let (stroke, opacity) = tunnel_stroke(tunnels);
    let title = opts
        .title
        .clone()
        .unwrap_or_else(|| format!("wiremesh topology: {}", topo.subnet));

    let mut out = String::with_capacity(4096 + 600 * scene.edges.len() + 1500 * groups.len());
    let size = Size {
        w: l.width.ceil(),
        h: l.height.ceil(),
    };
    let (w, h) = (num(size.w), num(size.h));
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let view = match scene.mode {
        Mode::Full => "full",
        Mode::Overview => "overview",
        Mode::Location(_) => "location",
        Mode::Focus(_) => "focus",
    };
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" class=\"wiremesh-graph\" data-subnet=\"{}\" data-granularity=\"{}\" \
         data-view=\"{view}\">",
        topo.subnet, topo.granularity
    );
    let _ = writeln!(out, "<title>{}</title>", esc(&title));
    let _ = writeln!(out, "<desc>{}</desc>", esc(&header.caption));
    let _ = writeln!(
        out,
        "<style>{STYLE}.tunnel{{stroke-width:{};stroke-opacity:{}}}{LEGEND_STYLE}</style>",
        num(stroke),
        opacity
    );
    let _ = writeln!(
        out,
        "<rect class=\"background\" x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\"/>"
    );
    header.write(&mut out, &l.header);
    let at = card_positions(&scene);
    let peer_at: BTreeMap<usize, usize> = scene
        .peer_cards
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, i))
        .collect();
    let anchor_rect = |a: Anchor| -> Rect {
        match a {
            Anchor::Box(b) => l.groups[b].frame,
            Anchor::Card(End::Peer(p)) => {
                peer_at.get(&p).map_or_else(Rect::default, |&i| l.peers[i])
            }
            Anchor::Card(end) => at
                .get(&end)
                .map_or_else(Rect::default, |&(b, c)| l.groups[b].members[c]),
        }
    };
    write_frames(&mut out, &scene, &l, &labels);
    write_edges(&mut out, topo, &scene, &l, &at, &anchor_rect);
    write_boxes(&mut out, &scene, &l, &labels, &rows);
    write_nodes(&mut out, topo, &scene, &l, &node_cards, local);
    write_peers(&mut out, topo, &scene, &l, &peer_cards, local);
    write_edge_labels(&mut out, &scene, &l, &anchor_rect, common.as_deref());
    if !footer.is_empty() {
        out.push_str("<g class=\"footer\">\n");
        for (i, line) in footer.iter().enumerate() {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\">{}</text>",
                num(l.footer.x),
                num(l.footer.y + 12.0 + i as f64 * LINE_H),
                esc(line)
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    Some(Drawing { text: out })
}

/// The palette colour of a box's label.
fn colour_of(labels: &[String], label: &str) -> &'static str {
    let locations: BTreeSet<&str> = labels.iter().map(String::as_str).collect();
    locations
        .iter()
        .position(|l| *l == label)
        .map_or(PALETTE[0], |i| PALETTE[i % PALETTE.len()])
}

/// The frames of the boxes that hold cards (drawn under the lines).
fn write_frames(out: &mut String, scene: &Scene, l: &Layout, labels: &[String]) {
    out.push_str("<g class=\"segments\">\n");
    for (b, (bx, gb)) in scene.boxes.iter().zip(&l.groups).enumerate() {
        if bx.cards.is_empty() {
            continue;
        }
        let f = &gb.frame;
        let _ = writeln!(
            out,
            "<g id=\"box-{b}\" class=\"segment\" data-location=\"{}\" data-node-count=\"{}\">\n\
             <rect class=\"frame\" fill=\"{}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"10\"/>\n</g>",
            esc(&bx.label),
            bx.count,
            colour_of(labels, &labels[b]),
            num(f.x),
            num(f.y),
            num(f.w),
            num(f.h),
        );
    }
    out.push_str("</g>\n");
}

/// The label and words of every box, and the boxes of words themselves (drawn over the lines).
fn write_boxes(
    out: &mut String,
    scene: &Scene,
    l: &Layout,
    labels: &[String],
    rows: &[Vec<String>],
) {
    out.push_str("<g class=\"labels\">\n");
    for (b, (bx, gb)) in scene.boxes.iter().zip(&l.groups).enumerate() {
        let f = &gb.frame;
        let words = bx.cards.is_empty();
        if words {
            let (class, attr) = match &bx.kind {
                BoxKind::Location => ("box", format!("data-location=\"{}\"", esc(&bx.label))),
                BoxKind::Others(locs) => (
                    "box others",
                    format!("data-locations=\"{}\"", esc(&locs.join("\n"))),
                ),
                BoxKind::Peers => ("box peers", "data-peers=\"true\"".to_owned()),
            };
            let state = bx
                .state
                .map_or(String::new(), |s| format!(" data-health=\"{}\"", s.word()));
            let mut tooltip = format!("{}\n{}", bx.label, bx.rows.join("\n"));
            if let BoxKind::Others(locs) = &bx.kind {
                tooltip.push('\n');
                tooltip.push_str(&locs.join(", "));
            }
            let _ = writeln!(
                out,
                "<g id=\"box-{b}\" class=\"{class}\" {attr} data-node-count=\"{}\"{state}>\n\
                 <title>{}</title>\n\
                 <rect class=\"frame\" fill=\"{}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"10\"/>",
                bx.count,
                esc(&tooltip),
                colour_of(labels, &labels[b]),
                num(f.x),
                num(f.y),
                num(f.w),
                num(f.h),
            );
        } else {
            let _ = writeln!(out, "<g class=\"box-words\" data-box=\"box-{b}\">");
        }
        let _ = writeln!(
            out,
            "<text class=\"location\" x=\"{}\" y=\"{}\">{}</text>",
            num(f.x + FRAME_PAD),
            num(f.y + FRAME_PAD + 10.0),
            esc(&labels[b])
        );
        for (i, row) in rows[b].iter().enumerate() {
            let _ = writeln!(
                out,
                "<text class=\"row\" x=\"{}\" y=\"{}\">{}</text>",
                num(gb.extra.x),
                num(gb.extra.y + 12.0 + i as f64 * LINE_H),
                esc(row)
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</g>\n");
}

fn write_edges(
    out: &mut String,
    topo: &Topology<'_>,
    scene: &Scene,
    l: &Layout,
    at: &BTreeMap<End, (usize, usize)>,
    anchor_rect: &dyn Fn(Anchor) -> Rect,
) {
    out.push_str("<g class=\"links\">\n");
    write_edge_set(out, topo, scene, l, at, anchor_rect, |k, _| {
        k == EdgeKind::Private
    });
    out.push_str("</g>\n<g class=\"tunnels\">\n");
    // Tunnels the local node uses go last, on top of the others.
    write_edge_set(out, topo, scene, l, at, anchor_rect, |k, on| {
        k != EdgeKind::Private && !on
    });
    write_edge_set(out, topo, scene, l, at, anchor_rect, |k, on| {
        k != EdgeKind::Private && on
    });
    out.push_str("</g>\n");
}

fn write_edge_set(
    out: &mut String,
    topo: &Topology<'_>,
    scene: &Scene,
    l: &Layout,
    at: &BTreeMap<End, (usize, usize)>,
    anchor_rect: &dyn Fn(Anchor) -> Rect,
    pick: impl Fn(EdgeKind, bool) -> bool,
) {
    for (i, e) in scene.edges.iter().enumerate() {
        if !pick(e.kind, e.local) {
            continue;
        }
        let (class, attr, what) = match (e.kind, e.edge.is_some()) {
            (EdgeKind::Private, _) => ("link", "data-link", "private network"),
            (EdgeKind::Tunnel, true) => ("tunnel", "data-tunnel", "WireGuard tunnel"),
            (EdgeKind::PeerTunnel, true) => {
                ("tunnel peer-tunnel", "data-tunnel", "WireGuard tunnel")
            }
            (EdgeKind::Tunnel, false) => ("tunnel bundle", "data-bundle", "WireGuard tunnels"),
            (EdgeKind::PeerTunnel, false) => (
                "tunnel peer-tunnel bundle",
                "data-bundle",
                "WireGuard tunnels",
            ),
        };
        let local_class = match (e.local, e.relayed_via.is_some()) {
            (true, true) => " local relayed",
            (true, false) => " local",
            (false, true) => " relayed",
            (false, false) => "",
        };
        let shape = if e.kind == EdgeKind::Private {
            "polyline"
        } else {
            "line"
        };
        let live_class = e
            .state
            .map_or(String::new(), |s| format!(" live-{}", s.word()));
        let _ = write!(
            out,
            "<{shape} id=\"edge-{i}\" class=\"{class}{local_class}{live_class}\" {attr}=\"{}\" ",
            esc(&e.key),
        );
        if e.edge.is_none() {
            let _ = write!(out, "data-tunnel-count=\"{}\" ", e.tunnels);
        }
        if let Some(via) = &e.relayed_via {
            let _ = write!(out, "data-relayed-via=\"{}\" ", esc(via));
        }
        if let Some(s) = e.state {
            let _ = write!(out, "data-health=\"{}\" ", s.word());
            if let TunnelState::Known { age: Some(a), .. } = s {
                let _ = write!(out, "data-handshake-age=\"{a}\" ");
            }
        }
        match (e.kind, e.edge) {
            (EdgeKind::Private, Some(edge)) => {
                out.push_str("points=\"");
                if let Some(&(b, c)) = at.get(&edge.b) {
                    for (k, (x, y)) in l.groups[b].links[c].iter().enumerate() {
                        if k > 0 {
                            out.push(' ');
                        }
                        let _ = write!(out, "{},{}", num(*x), num(*y));
                    }
                }
                out.push('"');
            }
            _ => {
                let (x1, y1) = anchor_rect(e.a).centre();
                let (x2, y2) = anchor_rect(e.b).centre();
                let _ = write!(
                    out,
                    "x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"",
                    num(x1),
                    num(y1),
                    num(x2),
                    num(y2)
                );
            }
        }
        let ends = match e.edge {
            Some(edge) => format!("{} ↔ {}", end_name(topo, edge.a), end_name(topo, edge.b)),
            None => e.key.replacen("--", " ↔ ", 1),
        };
        let mut detail = match (e.edge, e.state) {
            (Some(_), Some(s)) => format!(", {}", s.describe()),
            (None, _) => format!(", {}", e.label().unwrap_or_default()),
            _ => String::new(),
        };
        if let Some(via) = &e.relayed_via {
            let _ = write!(detail, ", no direct handshake: relayed through {via}");
        }
        let _ = writeln!(
            out,
            "><title>{what}: {}{}</title></{shape}>",
            esc(&ends),
            esc(&detail),
        );
    }
}

/// Past this many lines with words, the words most of them share are said once in the legend
/// instead of on each line (on many lines they only hide one another).
const SAY_ONCE_PAST: usize = 12;

/// The words most lines with words share, when there are more than `SAY_ONCE_PAST` such lines
/// (ties: the first in order).
fn common_label(scene: &Scene) -> Option<String> {
    let labels: Vec<String> = scene.edges.iter().filter_map(|e| e.label()).collect();
    if labels.len() <= SAY_ONCE_PAST {
        return None;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &labels {
        *counts.entry(l).or_default() += 1;
    }
    let top = counts.values().copied().max()?;
    labels.iter().find(|l| counts[l.as_str()] == top).cloned()
}

/// Height of an edge label's background.
const EDGE_LABEL_H: f64 = 16.0;
/// Padding left and right of an edge label's text.
const EDGE_LABEL_PAD: f64 = 4.0;

/// The words on bundled lines, each where it covers no box, card or other label: at the
/// middle of its line if free there, else further along either way; left out (its line's
/// tooltip still says it) when no place is free, or when they are the `common` words the
/// legend gives.
fn write_edge_labels(
    out: &mut String,
    scene: &Scene,
    l: &Layout,
    anchor_rect: &dyn Fn(Anchor) -> Rect,
    common: Option<&str>,
) {
    let mut taken: Vec<Rect> = l
        .groups
        .iter()
        .flat_map(|g| std::iter::once(g.frame).chain(g.members.iter().copied()))
        .chain(l.peers.iter().copied())
        .chain([l.header])
        .collect();
    out.push_str("<g class=\"edge-labels\">\n");
    for (i, e) in scene.edges.iter().enumerate() {
        let Some(words) = e.label() else { continue };
        if common == Some(words.as_str()) {
            continue;
        }
        let words = cut(&words);
        let (ax, ay) = anchor_rect(e.a).centre();
        let (bx, by) = anchor_rect(e.b).centre();
        let w = text_width(&words, CHAR_W) + 2.0 * EDGE_LABEL_PAD;
        let spot = [0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74]
            .into_iter()
            .map(|t| {
                Rect::centred(
                    ax + (bx - ax) * t,
                    ay + (by - ay) * t,
                    Size { w, h: EDGE_LABEL_H },
                )
            })
            .find(|r| {
                // A margin keeps rounded coordinates apart too.
                let wide = Rect {
                    x: r.x - 2.0,
                    y: r.y - 2.0,
                    w: r.w + 4.0,
                    h: r.h + 4.0,
                };
                taken.iter().all(|t| !wide.overlaps(t)) && r.x >= 0.0 && r.y >= 0.0
            });
        let Some(r) = spot else { continue };
        let _ = writeln!(
            out,
            "<g class=\"edge-label\" data-edge=\"edge-{i}\">\n\
             <rect class=\"edge-label-bg\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"3\"/>\n\
             <text x=\"{}\" y=\"{}\">{}</text>\n</g>",
            num(r.x),
            num(r.y),
            num(r.w),
            num(r.h),
            num(r.x + EDGE_LABEL_PAD),
            num(r.y + 12.0),
            esc(&words)
        );
        taken.push(r);
    }
    out.push_str("</g>\n");
}

fn write_card(out: &mut String, r: &Rect, card: &Card, tooltip: &str) {
    let _ = writeln!(out, "<title>{}</title>", esc(tooltip));
    let _ = writeln!(
        out,
        "<rect class=\"card\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"6\"/>",
        num(r.x),
        num(r.y),
        num(r.w),
        num(r.h)
    );
    let x = r.x + CARD_PAD;
    let _ = writeln!(
        out,
        "<text class=\"heading\" x=\"{}\" y=\"{}\">{}</text>",
        num(x),
        num(r.y + CARD_PAD + 13.0),
        esc(&card.heading)
    );
    let value_x = num(x + KEY_COLS as f64 * CHAR_W);
    for (i, row) in card.rows.iter().enumerate() {
        let y = num(r.y + CARD_PAD + HEAD_H + i as f64 * LINE_H + 11.0);
        out.push_str("<text x=\"");
        out.push_str(&num(x));
        out.push_str("\" y=\"");
        out.push_str(&y);
        out.push_str("\">");
        if !row.key.is_empty() {
            let _ = write!(out, "<tspan class=\"key\">{}</tspan>", esc(row.key));
        }
        if !row.value.is_empty() {
            let _ = write!(out, "<tspan x=\"{value_x}\">{}</tspan>", esc(&row.value));
        }
        out.push_str("</text>\n");
    }
}

fn write_nodes(
    out: &mut String,
    topo: &Topology<'_>,
    scene: &Scene,
    l: &Layout,
    cards: &BTreeMap<End, Card>,
    local: Option<End>,
) {
    out.push_str("<g class=\"nodes\">\n");
    for (b, bx) in scene.boxes.iter().enumerate() {
        for (c, &end) in bx.cards.iter().enumerate() {
            let End::Node(s, m) = end else { continue };
            let seg = &topo.segments[s];
            let node = seg.nodes[m];
            let leader = m == seg.leader;
            let is_local = local == Some(end);
            let mut class = String::from("node");
            if leader && seg.nodes.len() > 1 {
                class.push_str(" leader");
            }
            if is_local {
                class.push_str(" local");
            }
            let _ = writeln!(
                out,
                "<g id=\"node-{s}-{m}\" class=\"{class}\" data-node=\"{}\" data-segment=\"{}\" \
                 data-location=\"{}\" data-leader=\"{leader}\">",
                esc(node.name.as_str()),
                esc(&seg.key.to_string()),
                esc(&bx.label)
            );
            let mut tooltip = node_card(topo, s, m, None).lines().join("\n");
            let _ = write!(tooltip, "\nlocation {}", bx.label);
            if leader {
                let _ = write!(tooltip, "\nleader of {}", seg.key);
            }
            if is_local {
                tooltip.push_str("\n(local node)");
            }
            if let Some(card) = cards.get(&end) {
                write_card(out, &l.groups[b].members[c], card, &tooltip);
            }
            out.push_str("</g>\n");
        }
    }
    out.push_str("</g>\n");
}

fn write_peers(
    out: &mut String,
    topo: &Topology<'_>,
    scene: &Scene,
    l: &Layout,
    cards: &[Card],
    local: Option<End>,
) {
    out.push_str("<g class=\"peers\">\n");
    for (i, &p) in scene.peer_cards.iter().enumerate() {
        let peer = &topo.peers[p];
        let class = if local == Some(End::Peer(p)) {
            "peer local"
        } else {
            "peer"
        };
        let _ = writeln!(
            out,
            "<g id=\"peer-{p}\" class=\"{class}\" data-peer=\"{}\">",
            esc(peer.name.as_str())
        );
        let tooltip = peer_card(peer, None).lines().join("\n");
        write_card(out, &l.peers[i], &cards[i], &tooltip);
        out.push_str("</g>\n");
    }
    out.push_str("</g>\n");
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use quick_xml::events::Event;

    use super::super::fixtures::*;
    use super::super::{Live, segment_label};
    use super::*;
    use crate::model::Granularity;

    /// The full view, whatever its size.
    fn full(topo: &Topology<'_>, opts: &GraphOptions) -> String {
        draw(topo, opts, Mode::Full, CAP_STEPS[0], None)
            .expect("no limit")
            .text
    }

    /// What a parsed SVG holds: `data-*` values by attribute, and the document's title text.
    #[derive(Debug, Default)]
    struct Parsed {
        data: BTreeMap<String, Vec<String>>,
        title: String,
        root: BTreeMap<String, String>,
        classes: Vec<String>,
    }

    impl Parsed {
        fn set(&self, attr: &str) -> BTreeSet<String> {
            self.data.get(attr).into_iter().flatten().cloned().collect()
        }
        fn count(&self, attr: &str) -> usize {
            self.data.get(attr).map_or(0, Vec::len)
        }
    }

    /// Parse with a real XML parser (which checks tags nest and close), failing on any error.
    fn parse(svg: &str) -> Parsed {
        let mut reader = quick_xml::Reader::from_str(svg);
        let mut parsed = Parsed::default();
        let mut depth = 0usize;
        let mut in_doc_title = false;
        loop {
            let event = reader.read_event().expect("well-formed XML");
            match &event {
                Event::Start(e) | Event::Empty(e) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).expect("utf-8");
                    for a in e.attributes() {
                        let a = a.expect("well-formed attribute");
                        let key = String::from_utf8(a.key.as_ref().to_vec()).expect("utf-8");
                        let value = a.unescape_value().expect("valid references").into_owned();
                        if depth == 0 {
                            parsed.root.insert(key.clone(), value.clone());
                        }
                        if key == "class" {
                            parsed.classes.push(value.clone());
                        }
                        if key.starts_with("data-") {
                            parsed.data.entry(key).or_default().push(value);
                        }
                    }
                    if depth == 0 {
                        assert_eq!(name, "svg", "root element");
                    }
                    if matches!(event, Event::Start(_)) {
                        in_doc_title = depth == 1 && name == "title";
                        depth += 1;
                    }
                }
                Event::End(_) => {
                    depth -= 1;
                    in_doc_title = false;
                }
                Event::Text(t) if in_doc_title => {
                    parsed.title.push_str(&t.decode().expect("utf-8"));
                }
                Event::GeneralRef(r) if in_doc_title => {
                    if let Some(c) = r.resolve_char_ref().expect("char ref") {
                        parsed.title.push(c);
                    } else {
                        let name = r.decode().expect("utf-8");
                        let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                            .expect("predefined entity");
                        parsed.title.push_str(resolved);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "every element closed");
        parsed
    }

    /// The names, tunnels and links the topology should show.
    struct Expected {
        nodes: BTreeSet<String>,
        peers: BTreeSet<String>,
        tunnels: BTreeSet<String>,
        tunnel_count: usize,
        links: BTreeSet<String>,
    }

    fn pair(a: &str, b: &str) -> String {
        if a <= b {
            format!("{a}--{b}")
        } else {
            format!("{b}--{a}")
        }
    }

    /// Computed from the topology directly, not through the exporter's own edge list.
    fn expected(topo: &Topology<'_>) -> Expected {
        let leaders: Vec<&str> = topo
            .segments
            .iter()
            .map(|s| s.leader_node().name.as_str())
            .collect();
        let peers: BTreeSet<String> = topo.peers.iter().map(|p| p.name.to_string()).collect();
        let mut tunnels = BTreeSet::new();
        for (i, a) in leaders.iter().enumerate() {
            for b in &leaders[i + 1..] {
                tunnels.insert(pair(a, b));
            }
            for p in &peers {
                tunnels.insert(pair(a, p));
            }
        }
        let n = leaders.len();
        let mut links = BTreeSet::new();
        for s in &topo.segments {
            for n in &s.nodes {
                if n.name != s.leader_node().name {
                    links.insert(pair(s.leader_node().name.as_str(), n.name.as_str()));
                }
            }
        }
        Expected {
            nodes: topo
                .segments
                .iter()
                .flat_map(|s| s.nodes.iter().map(|n| n.name.to_string()))
                .collect(),
            peers,
            tunnels,
            tunnel_count: n * (n - 1) / 2 + n * topo.peers.len(),
            links,
        }
    }

    fn assert_complete(topo: &Topology<'_>, svg: &str) -> Parsed {
        let parsed = parse(svg);
        let want = expected(topo);
        assert_eq!(parsed.set("data-node"), want.nodes);
        assert_eq!(
            parsed.count("data-node"),
            want.nodes.len(),
            "each node once"
        );
        assert_eq!(parsed.set("data-peer"), want.peers);
        assert_eq!(
            parsed.count("data-peer"),
            want.peers.len(),
            "each peer once"
        );
        assert_eq!(parsed.set("data-tunnel"), want.tunnels);
        assert_eq!(
            parsed.count("data-tunnel"),
            want.tunnel_count,
            "each tunnel once"
        );
        assert_eq!(parsed.set("data-link"), want.links);
        assert_eq!(parsed.count("data-segment"), want.nodes.len());
        let locations: BTreeSet<String> = topo.segments.iter().map(|s| segment_label(s)).collect();
        assert_eq!(
            parsed.count("data-node-count"),
            locations.len(),
            "one box per location"
        );
        let leaders = parsed
            .data
            .get("data-leader")
            .into_iter()
            .flatten()
            .filter(|v| *v == "true")
            .count();
        assert_eq!(leaders, topo.segments.len(), "one leader per segment");
        let viewbox = parsed.root.get("viewBox").expect("viewBox");
        assert!(viewbox.starts_with("0 0 "), "{viewbox}");
        parsed
    }

    #[test]
    fn svg_has_every_node_and_tunnel_for_three_clouds() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let parsed = assert_complete(&topo, &render(&topo, &GraphOptions::default()));
        assert_eq!(parsed.count("data-tunnel"), 3);
        assert_eq!(parsed.count("data-link"), 0);
        assert_eq!(
            parsed.set("data-location"),
            ["de-fra", "fi-hel", "fr-par"].map(String::from).into()
        );
    }

    #[test]
    fn svg_has_every_node_tunnel_and_link_for_locations() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let parsed = assert_complete(&topo, &render(&topo, &GraphOptions::default()));
        assert_eq!(topo.segments.len(), 3);
        assert_eq!(parsed.count("data-tunnel"), 3 + 3);
        assert_eq!(parsed.count("data-link"), 4);
        assert_eq!(parsed.set("data-peer"), ["laptop".to_owned()].into());
    }

    #[test]
    fn svg_has_every_node_and_tunnel_at_50_nodes() {
        let nodes = generated(50, 50);
        let peers = generated_peers(2);
        let topo = build(&nodes, &peers, Granularity::Full);
        let parsed = assert_complete(&topo, &full(&topo, &GraphOptions::default()));
        assert_eq!(parsed.count("data-tunnel"), 50 * 49 / 2 + 50 * 2);
    }

    #[test]
    fn svg_has_every_node_and_tunnel_at_50_nodes_in_5_locations() {
        let nodes = generated(50, 5);
        let topo = build(&nodes, &[], Granularity::Location);
        let parsed = assert_complete(&topo, &full(&topo, &GraphOptions::default()));
        assert_eq!(parsed.count("data-tunnel"), 10);
        assert_eq!(parsed.count("data-link"), 45);
    }

    #[test]
    fn svg_escapes_markup_in_names_and_stays_valid_xml() {
        let (nodes, peers) = nasty();
        let topo = build(&nodes, &peers, Granularity::Location);
        let title = r#"<mesh> & "friends" 'n' such"#;
        let opts = GraphOptions {
            local: Some(nodes[0].name.clone()),
            title: Some(title.to_owned()),
            live: None,
            view: View::Auto,
        };
        let svg = render(&topo, &opts);
        assert!(
            !svg.contains("<script"),
            "markup in a name must not become markup"
        );
        let parsed = assert_complete(&topo, &svg);
        assert_eq!(parsed.title, title);
        assert!(
            parsed.set("data-location").contains("back\\slash\nnewline"),
            "newline kept in attribute: {:?}",
            parsed.set("data-location")
        );
        assert!(parsed.classes.iter().any(|c| c == "node local"));
    }

    #[test]
    fn svg_is_self_contained() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let svg = render(&topo, &GraphOptions::default());
        for forbidden in [
            "href",
            "<script",
            "<image",
            "@import",
            "url(",
            "<foreignObject",
        ] {
            assert!(!svg.contains(forbidden), "{forbidden}");
        }
        assert_eq!(svg.matches("<style>").count(), 1);
        let parsed = parse(&svg);
        assert_eq!(
            parsed.root.get("xmlns").map(String::as_str),
            Some("http://www.w3.org/2000/svg")
        );
    }

    /// A live reading of three-clouds: fra-1 saw hel-1 12 s ago, par-1 never answered fra-1.
    fn three_clouds_live(nodes: &[crate::model::MeshNode]) -> Live {
        let key = |n: &str| key_of(nodes, n);
        let mut live = Live::default();
        live.seen.insert(
            "fra-1".into(),
            [
                (
                    key("hel-1"),
                    super::super::Seen {
                        age: Some(12),
                        tx_bytes: 1,
                    },
                ),
                (
                    key("par-1"),
                    super::super::Seen {
                        age: None,
                        tx_bytes: 148,
                    },
                ),
            ]
            .into(),
        );
        live
    }

    #[test]
    fn live_svg_colours_every_tunnel_by_its_state_and_draws_unknown_ones_too() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let opts = GraphOptions {
            local: Some("fra-1".into()),
            live: Some(three_clouds_live(&nodes)),
            ..GraphOptions::default()
        };
        let svg = render(&topo, &opts);
        let parsed = assert_complete(&topo, &svg);
        let health: BTreeMap<String, String> = parsed.data["data-tunnel"]
            .iter()
            .cloned()
            .zip(parsed.data["data-health"].iter().cloned())
            .collect();
        assert_eq!(
            health,
            [
                ("fra-1--hel-1".to_owned(), "fresh".to_owned()),
                ("fra-1--par-1".to_owned(), "stale".to_owned()),
                ("hel-1--par-1".to_owned(), "unknown".to_owned()),
            ]
            .into()
        );
        assert_eq!(parsed.data["data-handshake-age"], ["12"]);
        // The classes the style colours, on the tunnels and in the legend.
        for class in ["live-fresh", "live-stale", "live-unknown"] {
            let n = parsed
                .classes
                .iter()
                .filter(|c| c.split(' ').any(|w| w == class))
                .count();
            assert_eq!(n, 2, "{class}: one tunnel and one legend sample");
        }
        for colour in ["live-fresh{stroke:#2f9e44}", "live-stale{stroke:#e03131}"] {
            assert!(svg.contains(colour), "{colour}");
        }
        for words in [
            "handshake &lt; 2 min",
            "2–5 min, or none yet",
            "stale (&gt; 5 min, or never answered)",
            "no data",
        ] {
            assert!(svg.contains(words), "legend {words}");
        }
        assert!(svg.contains("handshakes from 1 agent"), "caption");
        assert!(svg.contains("WireGuard tunnel: fra-1 ↔ hel-1, handshake 12s ago (fresh)</title>"));
        // The live colours win over the local node's highlight: declared after it.
        let local = svg.find(".tunnel.local{").expect("local style");
        let fresh = svg.find(".tunnel.live-fresh{").expect("live style");
        assert!(fresh > local);
    }

    #[test]
    fn a_drawing_that_is_not_live_has_no_states() {
        let (nodes, peers) = example("three-clouds.yaml", false);
        let topo = build(&nodes, &peers, Granularity::Full);
        let svg = render(&topo, &GraphOptions::default());
        let parsed = parse(&svg);
        assert_eq!(parsed.count("data-health"), 0);
        assert!(!parsed.classes.iter().any(|c| c.contains("live-")));
        assert!(svg.contains("WireGuard tunnel</text>"), "the plain legend");
    }

    #[test]
    fn svg_is_deterministic() {
        let nodes = generated(12, 3);
        let peers = generated_peers(1);
        let a = build(&nodes, &peers, Granularity::Location);
        let b = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some("node-04".into()),
            title: Some("t".into()),
            live: None,
            view: View::Auto,
        };
        assert_eq!(render(&a, &opts), render(&b, &opts));
    }

    #[test]
    fn svg_marks_the_local_node_and_its_tunnels() {
        let (nodes, peers) = example("locations.yaml", true);
        let topo = build(&nodes, &peers, Granularity::Location);
        let opts = GraphOptions {
            local: Some("home-a".into()),
            title: Some("from home-a".into()),
            live: None,
            view: View::Auto,
        };
        let svg = render(&topo, &opts);
        let parsed = parse(&svg);
        assert_eq!(parsed.title, "from home-a");
        assert!(svg.contains(">from home-a</text>"), "title is drawn");
        assert_eq!(
            parsed.classes.iter().filter(|c| *c == "node local").count(),
            1
        );
        assert_eq!(
            parsed
                .classes
                .iter()
                .filter(|c| c.ends_with(" local"))
                .count(),
            1 + 1 + 3,
            "the node, its link, its leader's three tunnels"
        );
    }

    #[test]
    fn svg_lists_nodes_left_out() {
        let (mut nodes, peers) = example("three-clouds.yaml", false);
        nodes[1].endpoint = None;
        let topo = crate::topology::build(nodes.iter(), &peers, &Default::default());
        let svg = render(&topo, &GraphOptions::default());
        parse(&svg);
        assert!(svg.contains("node hel-1: no endpoint published yet"));
    }

    #[test]
    fn empty_mesh_is_still_a_valid_svg() {
        let topo = build(&[], &[], Granularity::Location);
        let parsed = parse(&render(&topo, &GraphOptions::default()));
        assert_eq!(parsed.count("data-node"), 0);
    }

    #[test]
    fn escape_covers_markup_quotes_and_control_characters() {
        assert_eq!(esc("plain-name.1"), "plain-name.1");
        assert_eq!(
            esc("a&b<c>\"d'\n\u{1}"),
            "a&amp;b&lt;c&gt;&quot;d&#39;&#10;\u{FFFD}"
        );
    }

    #[test]
    fn numbers_are_short_and_stable() {
        assert_eq!(num(12.0), "12");
        assert_eq!(num(12.04), "12");
        assert_eq!(num(12.25), "12.3");
        assert_eq!(num(-0.01), "0");
    }
}
