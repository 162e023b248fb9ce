//! Geometry of the SVG drawing: where each segment frame, node card and peer card goes.
//!
//! Pure arithmetic on counts and sizes; knows nothing of topology, text or XML. Depends on `std`
//! only.
//!
//! Segments (then peers) sit on one circle, clockwise from the top. For a given radius each box
//! is packed as soon after the one before as [`ITEM_GAP`] allows (cards are wider than tall, so
//! more fit at the sides than at the top) and the spare arc is shared out; the radius is the
//! smallest, on a 3 % scan, at which everything fits with no two boxes closer than the gap;
//! evenly spaced boxes are preferred when they fit on a radius at most 10 % larger.
//! Past [`SCAN_LIMIT`] boxes (or should the scan fail) arcs follow the boxes' diagonals and the
//! radius is the one at which even their bounding circles keep that distance.
//! Inside a segment's frame the cards form a near-square grid; the leader takes the cell facing
//! the circle's centre, where its tunnels leave, and its private links to the other members run
//! along the gutters between cards, never under one.

use std::f64::consts::PI;

/// Empty space around the whole drawing.
pub const MARGIN: f64 = 24.0;
/// Smallest distance between two boxes on the circle (segment frames or peer cards).
pub const ITEM_GAP: f64 = 56.0;
/// Space between cards inside a frame.
pub const CELL_GAP: f64 = 18.0;
/// Padding between a frame and its cards.
pub const FRAME_PAD: f64 = 12.0;
/// Height of a frame's label line, above its cards.
pub const LABEL_H: f64 = 20.0;
/// Above this many boxes the radius scan is skipped (its cost is quadratic per step).
const SCAN_LIMIT: usize = 400;

/// A width and a height.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Size {
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

/// An axis-aligned rectangle; `(x, y)` is its top-left corner.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rect {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

impl Rect {
    /// A rectangle of `size` centred on `(cx, cy)`.
    pub fn centred(cx: f64, cy: f64, size: Size) -> Rect {
        Rect {
            x: cx - size.w / 2.0,
            y: cy - size.h / 2.0,
            w: size.w,
            h: size.h,
        }
    }

    /// The centre point.
    pub fn centre(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }

    /// Whether the two rectangles share some area (touching edges do not count).
    pub fn overlaps(&self, other: &Rect) -> bool {
        self.x < other.x + other.w
            && other.x < self.x + self.w
            && self.y < other.y + other.h
            && other.y < self.y + self.h
    }

    /// The shortest distance between the two rectangles (0 when they overlap).
    pub fn distance(&self, other: &Rect) -> f64 {
        let dx = (other.x - (self.x + self.w)).max(self.x - (other.x + other.w));
        let dy = (other.y - (self.y + self.h)).max(self.y - (other.y + other.h));
        dx.max(0.0).hypot(dy.max(0.0))
    }

    /// Whether `other` lies entirely inside this rectangle.
    #[cfg(test)]
    pub fn contains(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.x + other.w <= self.x + self.w
            && other.y + other.h <= self.y + self.h
    }

    fn moved(&self, dx: f64, dy: f64) -> Rect {
        Rect {
            x: self.x + dx,
            y: self.y + dy,
            ..*self
        }
    }
}

/// One box to place (a location's frame): how many cards it holds, which is the leader and
/// which members it links to, how wide its label is, and the text rows under its cards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    /// Number of member cards (none for a box that only holds text rows).
    pub members: usize,
    /// Index of the leader among the members, if one has private links to others.
    pub leader: Option<usize>,
    /// The members `0..linked` are the leader's segment: it has a private link to each of them.
    pub linked: usize,
    /// Width of the frame's label text.
    pub label_width: f64,
    /// Size of the text rows under the cards (zero when there are none).
    pub extra: Size,
}

/// Everything the layout depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec<'s> {
    /// The segments, in drawing order.
    pub groups: &'s [Group],
    /// Number of peer cards, placed after the segments.
    pub peers: usize,
    /// Size of every card (node or peer).
    pub card: Size,
    /// Size of the header (title, caption, legend) above the circle.
    pub header: Size,
    /// Size of the footer below the circle; zero when there is none.
    pub footer: Size,
}

/// A placed segment.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBox {
    /// The frame around the cards, label line included.
    pub frame: Rect,
    /// One card per member, in member order.
    pub members: Vec<Rect>,
    /// Per member, the private link from the leader as a polyline (empty for the leader and
    /// for members the leader has no link to).
    pub links: Vec<Vec<Point>>,
    /// Where the text rows under the cards go.
    pub extra: Rect,
}

/// The placed drawing.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Canvas width.
    pub width: f64,
    /// Canvas height.
    pub height: f64,
    /// Where the header goes.
    pub header: Rect,
    /// Where the footer goes.
    pub footer: Rect,
    /// One per segment, in input order.
    pub groups: Vec<GroupBox>,
    /// One card per peer.
    pub peers: Vec<Rect>,
}

/// Columns and rows of the near-square grid holding `k` cards (none for none).
fn grid(k: usize) -> (usize, usize) {
    if k == 0 {
        return (0, 0);
    }
    let mut cols = 1;
    while cols * cols < k {
        cols += 1;
    }
    (cols, k.div_ceil(cols))
}

/// Width and height of the grid of `k` cards.
fn grid_size(k: usize, card: Size) -> Size {
    let (cols, rows) = grid(k);
    let gaps = |n: usize| n.saturating_sub(1) as f64 * CELL_GAP;
    Size {
        w: cols as f64 * card.w + gaps(cols),
        h: rows as f64 * card.h + gaps(rows),
    }
}

/// The gap between the cards and the text rows under them, when there are both.
fn extra_gap(g: &Group) -> f64 {
    if g.members > 0 && g.extra.h > 0.0 {
        CELL_GAP / 2.0
    } else {
        0.0
    }
}

/// The size of a group's frame: label line, grid of cards, text rows, padding.
pub fn frame_size(g: &Group, card: Size) -> Size {
    let grid = grid_size(g.members, card);
    Size {
        w: grid.w.max(g.label_width).max(g.extra.w) + 2.0 * FRAME_PAD,
        h: LABEL_H + grid.h + extra_gap(g) + g.extra.h + 2.0 * FRAME_PAD,
    }
}

/// Place everything.
pub fn layout(spec: &Spec<'_>) -> Layout {
    let mut items: Vec<Size> = spec
        .groups
        .iter()
        .map(|g| frame_size(g, spec.card))
        .collect();
    items.extend(std::iter::repeat_n(spec.card, spec.peers));
    let (angles, radius) = ring(&items);
    let placed: Vec<Rect> = items
        .iter()
        .zip(&angles)
        .map(|(size, a)| Rect::centred(radius * a.cos(), radius * a.sin(), *size))
        .collect();

    // Shift the circle below the header, centred on the widest of circle, header and footer.
    let (min_x, min_y, max_x, max_y) = placed.iter().fold(
        (f64::MAX, f64::MAX, f64::MIN, f64::MIN),
        |(a, b, c, d), r| (a.min(r.x), b.min(r.y), c.max(r.x + r.w), d.max(r.y + r.h)),
    );
    let (body_w, body_h) = if placed.is_empty() {
        (0.0, 0.0)
    } else {
        (max_x - min_x, max_y - min_y)
    };
    let inner_w = body_w.max(spec.header.w).max(spec.footer.w);
    let body_top = MARGIN + spec.header.h + if spec.header.h > 0.0 { MARGIN } else { 0.0 };
    let dx = MARGIN + (inner_w - body_w) / 2.0 - min_x;
    let dy = body_top - min_y;
    let footer_top = body_top + body_h + if spec.footer.h > 0.0 { MARGIN } else { 0.0 };
    let height = footer_top + spec.footer.h + MARGIN;

    let mut groups = Vec::with_capacity(spec.groups.len());
    for ((g, frame), angle) in spec.groups.iter().zip(&placed).zip(&angles) {
        let frame = frame.moved(dx, dy);
        let inward = if items.len() > 1 {
            (-angle.cos(), -angle.sin())
        } else {
            (0.0, 0.0)
        };
        let (members, links) = cells(g, &frame, spec.card, inward);
        let grid = grid_size(g.members, spec.card);
        let extra = Rect {
            x: frame.x + FRAME_PAD,
            y: frame.y + FRAME_PAD + LABEL_H + grid.h + extra_gap(g),
            w: frame.w - 2.0 * FRAME_PAD,
            h: g.extra.h,
        };
        groups.push(GroupBox {
            frame,
            members,
            links,
            extra,
        });
    }
    let peers = placed[spec.groups.len()..]
        .iter()
        .map(|r| r.moved(dx, dy))
        .collect();
    Layout {
        width: inner_w + 2.0 * MARGIN,
        height,
        header: Rect {
            x: MARGIN,
            y: MARGIN,
            w: spec.header.w,
            h: spec.header.h,
        },
        footer: Rect {
            x: MARGIN,
            y: footer_top,
            w: spec.footer.w,
            h: spec.footer.h,
        },
        groups,
        peers,
    }
}

/// Each item's angle (clockwise from the top, item 0 at the top) and the circle's radius.
fn ring(items: &[Size]) -> (Vec<f64>, f64) {
    if items.len() < 2 {
        return (vec![-PI / 2.0; items.len()], 0.0);
    }
    if items.len() <= SCAN_LIMIT {
        // Neighbours' chords are shorter than their arcs, so the circle is at least as long as
        // the items' smaller sides and gaps: no smaller radius can work.
        let least: f64 = items.iter().map(|s| s.w.min(s.h) + ITEM_GAP).sum();
        let mut r = least / (2.0 * PI);
        for _ in 0..200 {
            if let Some(packed) = pack(items, r) {
                // Evenly spaced items look calmer: worth a radius up to a tenth larger.
                let even = angles(&vec![1.0; items.len()]);
                let mut r_even = r;
                while r_even <= r * 1.1 {
                    if fits(items, &even, r_even) {
                        return (even, r_even);
                    }
                    r_even *= 1.01;
                }
                return (packed, r);
            }
            r *= 1.03;
        }
    }
    let diagonal: Vec<f64> = items.iter().map(|s| s.w.hypot(s.h) + ITEM_GAP).collect();
    (angles(&diagonal), safe_radius(&diagonal))
}

/// Items packed clockwise from the top on a circle of radius `r`, each as soon after the one
/// before as `ITEM_GAP` allows plus an equal extra turn, the largest extra that still closes the
/// circle. `None` when they do not all fit.
fn pack(items: &[Size], r: f64) -> Option<Vec<f64>> {
    let (mut angles, spare) = place(items, r, 0.0)?;
    if spare < 0.0 {
        return None;
    }
    // The spare arc shrinks as the extra turn grows; an extra of 2π/n leaves none at all.
    let (mut lo, mut hi) = (0.0, 2.0 * PI / items.len() as f64);
    for _ in 0..30 {
        let mid = (lo + hi) / 2.0;
        match place(items, r, mid) {
            Some((a, spare)) if spare >= 0.0 => {
                lo = mid;
                angles = a;
            }
            _ => hi = mid,
        }
    }
    // Pairs that are not neighbours are checked here rather than assumed.
    fits(items, &angles, r).then_some(angles)
}

/// Place items clockwise from the top, each `extra` past the least turn at which it clears the
/// item before; also return the arc left before item 0 comes round again (negative if none).
fn place(items: &[Size], r: f64, extra: f64) -> Option<(Vec<f64>, f64)> {
    let at = |i: usize, angle: f64| Rect::centred(r * angle.cos(), r * angle.sin(), items[i]);
    // The least turn past `from` at which item `next` clears item `prev` standing at `from`.
    let step = |prev: usize, from: f64, next: usize| -> Option<f64> {
        let placed = at(prev, from);
        if placed.distance(&at(next, from + PI)) < ITEM_GAP {
            return None;
        }
        let (mut lo, mut hi) = (0.0, PI);
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if placed.distance(&at(next, from + mid)) >= ITEM_GAP {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    };
    let n = items.len();
    let mut angles = Vec::with_capacity(n);
    let mut angle = -PI / 2.0;
    angles.push(angle);
    for i in 1..n {
        angle += step(i - 1, angle, i)? + extra;
        angles.push(angle);
    }
    let spare = angles[0] + 2.0 * PI - angle - step(n - 1, angle, 0)? - extra;
    Some((angles, spare))
}

/// Item centres on an arc proportional to each weight, item 0 at the top, clockwise.
fn angles(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let first = weights.first().copied().unwrap_or(0.0) / 2.0;
    let mut before = 0.0;
    weights
        .iter()
        .map(|w| {
            let mid = before + w / 2.0 - first;
            before += w;
            -PI / 2.0 + 2.0 * PI * mid / total
        })
        .collect()
}

/// A radius at which items on arcs proportional to `diagonal` (diagonal + gap) cannot overlap.
///
/// Bounding circles of radius diag/2 keep `ITEM_GAP` apart when the chord between two centres
/// is at least x = (w_a + w_b) / 2. The chord of the shorter arc only grows with the arc, which
/// is at least x, and `x / sin(πx/total)` grows with x: the two largest items bound every pair.
fn safe_radius(diagonal: &[f64]) -> f64 {
    let total: f64 = diagonal.iter().sum();
    let mut sorted = diagonal.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let x = (sorted[0] + sorted[1]) / 2.0;
    x / (2.0 * (PI * x / total).sin())
}

/// Whether items at `angles` on a circle of radius `r` all keep `ITEM_GAP` apart.
fn fits(items: &[Size], angles: &[f64], r: f64) -> bool {
    let rects: Vec<Rect> = items
        .iter()
        .zip(angles)
        .map(|(s, a)| Rect::centred(r * a.cos(), r * a.sin(), *s))
        .collect();
    rects
        .iter()
        .enumerate()
        .all(|(i, a)| rects[i + 1..].iter().all(|b| a.distance(b) >= ITEM_GAP))
}

/// A point.
pub type Point = (f64, f64);

/// The cards of one frame and the private links from the leader to the others.
///
/// The cards form a grid below the label; the leader takes the cell that faces `inward` (ties go
/// to the first cell), the others the remaining cells in order. A link leaves the leader's card
/// into the gutter between it and the member's side of the grid, runs along gutters only, and
/// enters the member's card from a gutter beside it: links never pass under a card. Every link
/// starts at the leader, so links that share a stretch of gutter draw the same dashes there.
fn cells(g: &Group, frame: &Rect, card: Size, inward: Point) -> (Vec<Rect>, Vec<Vec<Point>>) {
    if g.members == 0 {
        return (Vec::new(), Vec::new());
    }
    let (cols, rows) = grid(g.members);
    let Size {
        w: grid_w,
        h: grid_h,
    } = grid_size(g.members, card);
    let left = frame.x + (frame.w - grid_w) / 2.0;
    let top = frame.y + FRAME_PAD + LABEL_H;
    let cell = |c: usize| Rect {
        x: left + (c % cols) as f64 * (card.w + CELL_GAP),
        y: top + (c / cols) as f64 * (card.h + CELL_GAP),
        w: card.w,
        h: card.h,
    };
    let (gx, gy) = (left + grid_w / 2.0, top + grid_h / 2.0);
    let facing = |c: usize| {
        let (cx, cy) = cell(c).centre();
        (cx - gx) * inward.0 + (cy - gy) * inward.1
    };
    let Some(leader) = g.leader.filter(|&l| l < g.members) else {
        let cards = (0..g.members).map(cell).collect();
        return (cards, vec![Vec::new(); g.members]);
    };
    let mut leader_cell = 0;
    for c in 1..cols * rows {
        // A margin keeps ties (and float noise) with the earlier cell.
        if facing(c) > facing(leader_cell) + 1e-6 {
            leader_cell = c;
        }
    }
    let mut free = (0..cols * rows).filter(|&c| c != leader_cell);
    let assigned: Vec<usize> = (0..g.members)
        .map(|m| {
            if m == leader {
                leader_cell
            } else {
                free.next().unwrap_or(leader_cell)
            }
        })
        .collect();

    // Gutter lines: below row `r` (the last one runs in the frame's bottom padding), and left of
    // column `c` (the first and last in the side padding).
    let below = |r: usize| {
        if r + 1 == rows {
            top + grid_h + FRAME_PAD / 2.0
        } else {
            top + (r + 1) as f64 * (card.h + CELL_GAP) - CELL_GAP / 2.0
        }
    };
    let left_of = |c: usize| {
        if c == 0 {
            left - FRAME_PAD / 2.0
        } else {
            left + c as f64 * (card.w + CELL_GAP) - CELL_GAP / 2.0
        }
    };
    let right_of = |c: usize| {
        if c + 1 == cols {
            left + grid_w + FRAME_PAD / 2.0
        } else {
            left_of(c + 1)
        }
    };
    let (lr, lc) = (leader_cell / cols, leader_cell % cols);
    let lead = cell(leader_cell);
    let (lx, ly) = lead.centre();
    let links = assigned
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let (mr, mc) = (c / cols, c % cols);
            let m = cell(c);
            let (mx, my) = m.centre();
            if c == leader_cell || k >= g.linked {
                return Vec::new();
            }
            if mr == lr && mc.abs_diff(lc) == 1 {
                let (from, to) = if mc > lc {
                    (lead.x + lead.w, m.x)
                } else {
                    (lead.x, m.x + m.w)
                };
                return vec![(from, ly), (to, my)];
            }
            if mc == lc && mr.abs_diff(lr) == 1 {
                let (from, to) = if mr > lr {
                    (lead.y + lead.h, m.y)
                } else {
                    (lead.y, m.y + m.h)
                };
                return vec![(lx, from), (mx, to)];
            }
            // The gutter on the member's side of the leader's row (below, for the same row:
            // the one above row 0 is the label's line).
            let (gutter, leave) = if mr < lr {
                (below(lr - 1), lead.y)
            } else {
                (below(lr), lead.y + lead.h)
            };
            let mut path = vec![(lx, leave), (lx, gutter)];
            let next_to_gutter = if mr < lr { mr + 1 == lr } else { mr <= lr + 1 };
            if next_to_gutter {
                let enter = if mr > lr { m.y } else { m.y + m.h };
                path.extend([(mx, gutter), (mx, enter)]);
            } else {
                // Along the gutter to the vertical gutter beside the member on the leader's
                // side, down (or up) it, then into the member's side.
                let (side, enter) = if mc < lc {
                    (right_of(mc), m.x + m.w)
                } else {
                    (left_of(mc), m.x)
                };
                path.extend([(side, gutter), (side, my), (enter, my)]);
            }
            path
        })
        .collect();
    (assigned.into_iter().map(cell).collect(), links)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: Size = Size { w: 230.0, h: 96.0 };
    const HEADER: Size = Size { w: 600.0, h: 70.0 };

    fn singletons(n: usize) -> Vec<Group> {
        (0..n)
            .map(|_| Group {
                members: 1,
                leader: Some(0),
                linked: 1,
                label_width: 60.0,
                extra: Size::default(),
            })
            .collect()
    }

    fn mixed(n: usize) -> Vec<Group> {
        (0..n)
            .map(|i| Group {
                members: 1 + i % 5,
                leader: Some((i % 5) / 2),
                linked: 1 + i % 5,
                label_width: 40.0 + 30.0 * (i % 3) as f64,
                extra: Size::default(),
            })
            .collect()
    }

    fn spec(groups: &[Group], peers: usize) -> Spec<'_> {
        Spec {
            groups,
            peers,
            card: CARD,
            header: HEADER,
            footer: Size { w: 300.0, h: 40.0 },
        }
    }

    /// Every card (node or peer) with a label saying which it is.
    fn cards(l: &Layout) -> Vec<(String, Rect)> {
        let mut out = Vec::new();
        for (s, g) in l.groups.iter().enumerate() {
            for (m, r) in g.members.iter().enumerate() {
                out.push((format!("node {s}/{m}"), *r));
            }
        }
        for (p, r) in l.peers.iter().enumerate() {
            out.push((format!("peer {p}"), *r));
        }
        out
    }

    fn assert_legible(l: &Layout) {
        let all = cards(l);
        for (i, (a, ra)) in all.iter().enumerate() {
            for (b, rb) in &all[i + 1..] {
                assert!(!ra.overlaps(rb), "{a} {ra:?} overlaps {b} {rb:?}");
            }
        }
        let boxes: Vec<Rect> = l
            .groups
            .iter()
            .map(|g| g.frame)
            .chain(l.peers.iter().copied())
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                assert!(a.distance(b) > ITEM_GAP - 1.0, "{a:?} too close to {b:?}");
            }
        }
        let canvas = Rect {
            x: 0.0,
            y: 0.0,
            w: l.width,
            h: l.height,
        };
        for g in &l.groups {
            for m in &g.members {
                assert!(g.frame.contains(m), "{m:?} outside its frame {:?}", g.frame);
            }
        }
        for b in &boxes {
            assert!(canvas.contains(b), "{b:?} off the canvas");
            assert!(!b.overlaps(&l.header), "{b:?} under the header");
            assert!(!b.overlaps(&l.footer), "{b:?} under the footer");
        }
    }

    /// Whether the segment from `a` to `b` passes through the inside of `r` (sampled every
    /// half unit; touching the border does not count).
    fn crosses(a: Point, b: Point, r: &Rect) -> bool {
        let steps = ((b.0 - a.0).hypot(b.1 - a.1) * 2.0).ceil().max(1.0) as usize;
        (0..=steps).any(|i| {
            let t = i as f64 / steps as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            x > r.x + 0.5 && x < r.x + r.w - 0.5 && y > r.y + 0.5 && y < r.y + r.h - 0.5
        })
    }

    /// Whether `p` lies on the border of `r`.
    fn on_border(p: Point, r: &Rect) -> bool {
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let inside = p.0 >= r.x && p.0 <= r.x + r.w && p.1 >= r.y && p.1 <= r.y + r.h;
        let edge = near(p.0, r.x) || near(p.0, r.x + r.w) || near(p.1, r.y) || near(p.1, r.y + r.h);
        inside && edge
    }

    #[test]
    fn private_links_run_in_gutters_from_leader_to_member() {
        for members in 2..=16 {
            for leader in [0, members / 2, members - 1] {
                for inward in [(0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-0.7, 0.7), (0.0, 0.0)] {
                    let g = Group {
                        members,
                        leader: Some(leader),
                        linked: members,
                        label_width: 50.0,
                        extra: Size::default(),
                    };
                    let size = frame_size(&g, CARD);
                    let frame = Rect::centred(500.0, 500.0, size);
                    let (cards, links) = cells(&g, &frame, CARD, inward);
                    let case = format!("{members} members, leader {leader}, inward {inward:?}");
                    assert!(links[leader].is_empty(), "{case}");
                    for (m, path) in links.iter().enumerate().filter(|(m, _)| *m != leader) {
                        assert!(path.len() >= 2, "{case}: member {m}");
                        assert!(
                            on_border(path[0], &cards[leader]),
                            "{case}: starts at the leader"
                        );
                        assert!(
                            on_border(path[path.len() - 1], &cards[m]),
                            "{case}: ends at {m}"
                        );
                        for w in path.windows(2) {
                            assert!(
                                w[0].0 == w[1].0 || w[0].1 == w[1].1,
                                "{case}: {m} not orthogonal"
                            );
                            assert!(
                                frame.contains(&Rect {
                                    x: w[0].0.min(w[1].0),
                                    y: w[0].1.min(w[1].1),
                                    w: (w[0].0 - w[1].0).abs(),
                                    h: (w[0].1 - w[1].1).abs(),
                                }),
                                "{case}: {m} leaves the frame"
                            );
                            for (o, r) in cards.iter().enumerate() {
                                assert!(!crosses(w[0], w[1], r), "{case}: link to {m} under {o}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn no_two_cards_overlap_at_3_12_and_50_nodes() {
        for n in [1, 2, 3, 12, 50] {
            assert_legible(&layout(&spec(&singletons(n), 0)));
            assert_legible(&layout(&spec(&singletons(n), 2)));
        }
    }

    #[test]
    fn no_two_cards_overlap_with_mixed_segment_sizes() {
        for n in [1, 2, 3, 7, 12, 50] {
            assert_legible(&layout(&spec(&mixed(n), 0)));
            assert_legible(&layout(&spec(&mixed(n), 3)));
        }
    }

    #[test]
    fn peers_only_still_lay_out() {
        assert_legible(&layout(&spec(&[], 4)));
        let empty = layout(&spec(&[], 0));
        assert!(empty.width >= HEADER.w && empty.height >= HEADER.h);
    }

    #[test]
    fn radius_grows_with_count_but_stays_compact() {
        let width = |n| layout(&spec(&singletons(n), 0)).width;
        assert!(width(3) < width(12) && width(12) < width(50));
        // 50 cards of 230 px: a circle of circumference near the sum of their widths, not
        // of their bounding circles.
        assert!(
            width(50) < 50.0 * (CARD.w + ITEM_GAP) / PI * 1.5,
            "{}",
            width(50)
        );
    }

    #[test]
    fn leader_faces_the_centre() {
        // Two segments of four: one at the top, one at the bottom of the circle.
        let groups = [
            Group {
                members: 4,
                leader: Some(0),
                linked: 4,
                label_width: 10.0,
                extra: Size::default(),
            },
            Group {
                members: 4,
                leader: Some(3),
                linked: 4,
                label_width: 10.0,
                extra: Size::default(),
            },
        ];
        let l = layout(&spec(&groups, 0));
        let (top, bottom) = (&l.groups[0], &l.groups[1]);
        let below = |g: &GroupBox, m: usize| {
            g.members
                .iter()
                .all(|r| r.centre().1 <= g.members[m].centre().1)
        };
        let above = |g: &GroupBox, m: usize| {
            g.members
                .iter()
                .all(|r| r.centre().1 >= g.members[m].centre().1)
        };
        assert!(below(top, 0), "top leader should sit in the bottom row");
        assert!(above(bottom, 3), "bottom leader should sit in the top row");
    }

    #[test]
    fn distance_is_euclidean_between_edges() {
        let a = Rect {
            x: 0.0,
            y: 0.0,
            w: 10.0,
            h: 10.0,
        };
        let b = Rect {
            x: 13.0,
            y: 14.0,
            w: 5.0,
            h: 5.0,
        };
        assert_eq!(a.distance(&b), 5.0);
        assert_eq!(b.distance(&a), 5.0);
        let c = Rect {
            x: 5.0,
            y: 5.0,
            w: 10.0,
            h: 10.0,
        };
        assert_eq!(a.distance(&c), 0.0);
        assert!(a.overlaps(&c) && !a.overlaps(&b));
    }

    #[test]
    fn safe_radius_never_overlaps() {
        for n in [2, 3, 5, 12, 50, 120] {
            let items: Vec<Size> = (0..n)
                .map(|i| Size {
                    w: 100.0 + 37.0 * (i % 7) as f64,
                    h: 60.0 + 113.0 * (i % 3) as f64,
                })
                .collect();
            let diagonal: Vec<f64> = items.iter().map(|s| s.w.hypot(s.h) + ITEM_GAP).collect();
            // A hair of slack: bounding circles may touch at exactly ITEM_GAP.
            let r = safe_radius(&diagonal) * (1.0 + 1e-9);
            assert!(fits(&items, &angles(&diagonal), r), "{n}");
        }
    }

    #[test]
    fn layout_is_deterministic() {
        let groups = mixed(20);
        assert_eq!(layout(&spec(&groups, 2)), layout(&spec(&groups, 2)));
    }
}
