//! Geometry checks of whole drawings over generated clusters of 3, 40 and 500 nodes in both
//! granularities and every view: the SVG is parsed with a real XML parser, and its boxes,
//! cards, labels and canvas are checked with the text-width estimate the layout uses.
//!
//! Test-only. Depends on the SVG writer (its estimate and bound), the fixtures and quick-xml.

use std::collections::{BTreeMap, BTreeSet};

use quick_xml::events::{BytesStart, Event};

use super::fixtures::{build, generated, generated_peers};
use super::layout::Rect;
use super::svg::{CHAR_W, HEAD_CHAR_W, MAX_CANVAS, TITLE_CHAR_W, render};
use super::{GraphOptions, Live, Seen, View};
use crate::model::{Granularity, MeshNode, NodeName};

/// One `<text>`: where it starts, the estimate of where it ends, its baseline.
#[derive(Debug)]
struct Text {
    content: String,
    left: f64,
    right: f64,
    baseline: f64,
}

/// What the checks need of a drawing.
#[derive(Debug, Default)]
struct Drawing {
    width: f64,
    height: f64,
    view: String,
    /// Location frames and boxes of words, with their `data-*`.
    frames: Vec<(Rect, BTreeMap<String, String>)>,
    /// Node and peer cards.
    cards: Vec<Rect>,
    /// Backgrounds of the words on bundled lines.
    label_bgs: Vec<Rect>,
    /// Texts outside the header and footer.
    texts: Vec<Text>,
    /// The names on node cards.
    node_names: Vec<String>,
}

fn attrs(e: &BytesStart<'_>) -> BTreeMap<String, String> {
    e.attributes()
        .map(|a| {
            let a = a.expect("well-formed attribute");
            (
                String::from_utf8(a.key.as_ref().to_vec()).expect("utf-8"),
                a.unescape_value().expect("valid references").into_owned(),
            )
        })
        .collect()
}

fn f(a: &BTreeMap<String, String>, k: &str) -> f64 {
    a.get(k)
        .unwrap_or_else(|| panic!("no {k} in {a:?}"))
        .parse()
        .expect("number")
}

fn rect(a: &BTreeMap<String, String>) -> Rect {
    Rect {
        x: f(a, "x"),
        y: f(a, "y"),
        w: f(a, "width"),
        h: f(a, "height"),
    }
}

/// The width of one character of text of `class`, as the writer estimates it.
fn char_w(class: &str) -> f64 {
    match class {
        "heading" => HEAD_CHAR_W,
        "title" => TITLE_CHAR_W,
        _ => CHAR_W,
    }
}

/// A `<text>` being read: class, baseline, segments (x, characters), content.
type Reading = (String, f64, Vec<(f64, usize)>, String);

fn parse(svg: &str) -> Drawing {
    let mut reader = quick_xml::Reader::from_str(svg);
    let mut d = Drawing::default();
    // The open elements: name and attributes.
    let mut stack: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    // The text being read: class, baseline, segments (x, characters), content.
    let mut text: Option<Reading> = None;
    let mut pending_g: Option<BTreeMap<String, String>> = None;
    loop {
        let event = reader.read_event().expect("well-formed XML");
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let name = String::from_utf8(e.name().as_ref().to_vec()).expect("utf-8");
                let a = attrs(e);
                let in_chrome = stack.iter().any(|(n, a)| {
                    n == "g"
                        && a.get("class")
                            .is_some_and(|c| c == "header" || c == "footer")
                });
                match name.as_str() {
                    "svg" => {
                        d.width = f(&a, "width");
                        d.height = f(&a, "height");
                        d.view = a["data-view"].clone();
                    }
                    "g" => {
                        if a.contains_key("data-node") {
                            d.node_names.push(a["data-node"].clone());
                        }
                        pending_g = a.contains_key("data-node-count").then(|| a.clone());
                    }
                    "rect" => match a.get("class").map(String::as_str) {
                        Some("frame") => {
                            let data = pending_g.take().expect("a frame's group has its counts");
                            d.frames.push((rect(&a), data));
                        }
                        Some("card") => d.cards.push(rect(&a)),
                        Some("edge-label-bg") => d.label_bgs.push(rect(&a)),
                        _ => {}
                    },
                    "text" if !in_chrome => {
                        let class = a.get("class").cloned().unwrap_or_default();
                        text = Some((class, f(&a, "y"), vec![(f(&a, "x"), 0)], String::new()));
                    }
                    "tspan" => {
                        if let (Some((_, _, segs, _)), Some(x)) = (&mut text, a.get("x")) {
                            segs.push((x.parse().expect("number"), 0));
                        }
                    }
                    _ => {}
                }
                if matches!(event, Event::Start(_)) {
                    stack.push((name, a));
                }
            }
            Event::Text(t) => {
                if let Some((_, _, segs, content)) = &mut text {
                    let s = t.decode().expect("utf-8");
                    if let Some(last) = segs.last_mut() {
                        last.1 += s.chars().count();
                    }
                    content.push_str(&s);
                }
            }
            Event::GeneralRef(_) => {
                if let Some((_, _, segs, content)) = &mut text {
                    if let Some(last) = segs.last_mut() {
                        last.1 += 1;
                    }
                    content.push('&');
                }
            }
            Event::End(e) => {
                let (name, _) = stack.pop().expect("balanced");
                assert_eq!(name.as_bytes(), e.name().as_ref());
                if name == "text"
                    && let Some((class, baseline, segs, content)) = text.take()
                {
                    let w = char_w(&class);
                    // A key tspan continues the text's start; a value tspan starts anew.
                    let mut spans: Vec<(f64, usize)> = Vec::new();
                    for (x, n) in segs {
                        match spans.last_mut() {
                            Some(last) if (last.0 - x).abs() < 1e-9 => last.1 += n,
                            _ => spans.push((x, n)),
                        }
                    }
                    let left = spans.iter().map(|s| s.0).fold(f64::MAX, f64::min);
                    let right = spans
                        .iter()
                        .map(|(x, n)| x + *n as f64 * w)
                        .fold(f64::MIN, f64::max);
                    d.texts.push(Text {
                        content,
                        left,
                        right,
                        baseline,
                    });
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    d
}

/// The checks every drawing passes.
fn assert_readable(case: &str, nodes: &[MeshNode], svg: &str) {
    let d = parse(svg);
    assert!(
        d.width <= MAX_CANVAS.w && d.height <= MAX_CANVAS.h,
        "{case}: canvas {}×{} over the bound",
        d.width,
        d.height
    );
    let canvas = Rect {
        x: 0.0,
        y: 0.0,
        w: d.width,
        h: d.height,
    };
    // No two boxes overlap; cards do not overlap each other nor a box they are not in.
    for (i, (a, _)) in d.frames.iter().enumerate() {
        assert!(canvas.contains(a), "{case}: {a:?} off the canvas");
        for (b, _) in &d.frames[i + 1..] {
            assert!(!a.overlaps(b), "{case}: boxes {a:?} and {b:?} overlap");
        }
    }
    for (i, a) in d.cards.iter().enumerate() {
        assert!(canvas.contains(a), "{case}: card {a:?} off the canvas");
        for b in &d.cards[i + 1..] {
            assert!(!a.overlaps(b), "{case}: cards {a:?} and {b:?} overlap");
        }
        for (frame, _) in &d.frames {
            assert!(
                frame.contains(a) || !frame.overlaps(a),
                "{case}: card {a:?} half in box {frame:?}"
            );
        }
    }
    // Words on lines cover no box, card or other words.
    for (i, a) in d.label_bgs.iter().enumerate() {
        assert!(canvas.contains(a), "{case}: label {a:?} off the canvas");
        for b in d.frames.iter().map(|(r, _)| r).chain(&d.cards) {
            assert!(!a.overlaps(b), "{case}: line label {a:?} over {b:?}");
        }
        for b in &d.label_bgs[i + 1..] {
            assert!(
                !a.overlaps(b),
                "{case}: line labels {a:?} and {b:?} overlap"
            );
        }
    }
    // Every text fits the smallest box, card or label background it starts in.
    let all: Vec<Rect> = d
        .frames
        .iter()
        .map(|(r, _)| *r)
        .chain(d.cards.iter().copied())
        .chain(d.label_bgs.iter().copied())
        .collect();
    for t in &d.texts {
        let home = all
            .iter()
            .filter(|r| {
                t.left >= r.x && t.left < r.x + r.w && t.baseline > r.y && t.baseline <= r.y + r.h
            })
            .min_by(|a, b| (a.w * a.h).total_cmp(&(b.w * b.h)))
            .unwrap_or_else(|| panic!("{case}: text {:?} in no box", t.content));
        assert!(
            t.right <= home.x + home.w + 1e-6,
            "{case}: {:?} ends at {} past its box {home:?}",
            t.content,
            t.right
        );
        assert!(
            t.baseline - 10.0 >= home.y,
            "{case}: {:?} above its box",
            t.content
        );
    }
    // Every node is drawn or counted in its location's box (or the box of the other locations).
    let drawn: BTreeSet<&str> = d.node_names.iter().map(String::as_str).collect();
    assert_eq!(
        drawn.len(),
        d.node_names.len(),
        "{case}: a node drawn twice"
    );
    let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(
        drawn.is_subset(&names),
        "{case}: a node drawn that is not in the input"
    );
    let mut by_location: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        let l = if n.location.is_empty() {
            "no location"
        } else {
            n.location.as_str()
        };
        *by_location.entry(l).or_default() += 1;
    }
    let mut counted = 0;
    for (_, data) in &d.frames {
        let count: usize = data["data-node-count"].parse().expect("count");
        if let Some(l) = data.get("data-location") {
            assert_eq!(by_location.get(l.as_str()), Some(&count), "{case}: {l}");
            let in_box = nodes.iter().filter(|n| n.location == *l);
            let shown = in_box.filter(|n| drawn.contains(n.name.as_str())).count();
            assert!(shown <= count, "{case}: {l}");
            counted += count;
        } else if let Some(ls) = data.get("data-locations") {
            let sum: usize = ls.split('\n').map(|l| by_location[l]).sum();
            assert_eq!(sum, count, "{case}: the other locations");
            counted += count;
        }
    }
    assert_eq!(counted, nodes.len(), "{case}: every node counted once");
}

/// Every view of `nodes` (with two peers, and once live) passes the checks.
fn check_all_views(n: u32, locations: u32) {
    let nodes = generated(n, locations);
    let peers = generated_peers(2);
    for granularity in [Granularity::Location, Granularity::Full] {
        let topo = build(&nodes, &peers, granularity);
        let mut live = Live::default();
        for s in &topo.segments {
            let by_key = live.seen.entry(s.leader_node().name.clone()).or_default();
            for t in &topo.segments {
                if let Some(k) = t.public_key() {
                    by_key.insert(
                        k,
                        Seen {
                            age: Some(400),
                            tx_bytes: 1,
                        },
                    );
                }
            }
        }
        let views = [
            View::Auto,
            View::Overview,
            View::Location("site-1".to_owned()),
            View::Focus(NodeName::from("node-02")),
        ];
        for view in views {
            for live in [None, Some(live.clone())] {
                let case = format!(
                    "{n} nodes in {locations} locations, {granularity}, {view:?}, live {}",
                    live.is_some()
                );
                let opts = GraphOptions {
                    local: None,
                    title: None,
                    live,
                    view: view.clone(),
                };
                assert_readable(&case, &nodes, &render(&topo, &opts));
            }
        }
    }
}

#[test]
fn three_nodes_are_readable_in_every_view() {
    check_all_views(3, 3);
}

#[test]
fn forty_nodes_in_four_locations_are_readable_in_every_view() {
    check_all_views(40, 4);
}

#[test]
fn five_hundred_nodes_in_twenty_locations_are_readable_in_every_view() {
    check_all_views(500, 20);
}

#[test]
fn five_hundred_nodes_each_in_its_own_location_are_readable_in_every_view() {
    check_all_views(500, 500);
}

#[test]
fn small_meshes_are_drawn_in_full_and_large_ones_as_an_overview() {
    for (n, locations, want) in [(3, 3, "full"), (40, 4, "overview"), (500, 20, "overview")] {
        let nodes = generated(n, locations);
        for granularity in [Granularity::Location, Granularity::Full] {
            let topo = build(&nodes, &[], granularity);
            let d = parse(&render(&topo, &GraphOptions::default()));
            assert_eq!(d.view, want, "{n} nodes, {granularity}");
        }
    }
}

#[test]
fn nodes_of_one_location_share_one_box_in_full_granularity() {
    let nodes = generated(12, 3);
    let topo = build(&nodes, &[], Granularity::Full);
    let d = parse(&render(&topo, &GraphOptions::default()));
    assert_eq!(d.view, "full");
    assert_eq!(d.frames.len(), 3, "one box per location, not per node");
    assert_eq!(d.cards.len(), 12);
    for (frame, _) in &d.frames {
        assert_eq!(d.cards.iter().filter(|c| frame.contains(c)).count(), 4);
    }
}
