//! The incremental engine: holds the cluster view, takes one event at a time and returns the
//! change to the local node's desired state.
//!
//! Common events (a node changes inside its location, an endpoint moves, a key rotates, a node
//! joins or leaves) recompute only the segments they touch: work proportional to the change.
//! Events whose effect is global (the local node itself changes, its segment's leader changes,
//! discovered endpoints change, allowed-location-ips, unreachable reports (relays), forwarding
//! reports (failover) or conflicting claims exist, any external peer changes) fall back to a
//! full recomputation and a diff. Both paths use the same per-segment contribution functions
//! as [`super::compute`], so they cannot disagree; a property test checks that any event
//! sequence ends in the full computation's state.
//!
//! Pure: no I/O, no clock, no async. Depends on the topology module, model and desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnetwork::IpNetwork;

use super::{
    CidrIndex, Contribution, LeaderProbe, LocalContext, LocalError, MeshOptions, PROBE_TARGETS,
    SegmentKey, allocate, make_segment, not_ready_reason, segment_key,
};
use crate::desired::{DesiredDelta, DesiredState, Masquerade, Rule, WgPeer};
use crate::diagnostic::Diagnostic;
use crate::model::{Granularity, MeshNode, MeshPeer, NodeName, WgKey};

/// One change in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node was added or changed. Shared: the registry keeps the same value to tell what
    /// changed, and the engine holds it without a copy.
    NodeUpsert(Arc<MeshNode>),
    /// A node was removed.
    NodeRemove(NodeName),
    /// An external peer was added or changed.
    PeerUpsert(MeshPeer),
    /// An external peer was removed.
    PeerRemove(NodeName),
}

impl Event {
    /// The event that adds or changes `node`.
    pub fn node(node: MeshNode) -> Self {
        Event::NodeUpsert(Arc::new(node))
    }

    /// The object the event is about: whether it is an external peer, and its name.
    pub fn object(&self) -> (bool, &NodeName) {
        match self {
            Event::NodeUpsert(n) => (false, &n.name),
            Event::NodeRemove(n) => (false, n),
            Event::PeerUpsert(p) => (true, &p.name),
            Event::PeerRemove(p) => (true, p),
        }
    }
}

/// What an event did to the local node's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The state changed by this delta (possibly empty).
    Delta(DesiredDelta),
    /// The local node became able to take part: here is its whole state.
    Full(DesiredState),
    /// The local node cannot take part (any more).
    Unavailable(LocalError),
}

/// How events were handled so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Events handled by recomputing only the touched segments.
    pub incremental: u64,
    /// Events (and the initial build) handled by a full recomputation.
    pub full: u64,
}

/// Every contribution to the local node's state, by who makes it.
#[derive(Debug, Clone, Default)]
struct Contributions {
    /// The local node's own (bridge, its pod CIDRs, rules).
    own: Contribution,
    /// Each segment's, in the engine's segment order (`Engine::order`): a vector, not a map
    /// (at 5,000 segments a hash map's spare buckets of these large values cost 0.7 MiB).
    segments: Vec<Contribution>,
    /// The external peers', in the order of the topology's peers (by name); only a full
    /// recomputation changes them.
    peers: Vec<Contribution>,
}

impl Contributions {
    /// Every contribution in the order a full computation merges them: the local node's, the
    /// segments' (mesh-IP order), the external peers'.
    fn iter(&self) -> impl Iterator<Item = &Contribution> {
        std::iter::once(&self.own)
            .chain(self.segments.iter())
            .chain(self.peers.iter())
    }

    /// The contribution of segment `key`, given the segment order the vector follows.
    fn segment(&self, order: &[SegmentKey], key: &SegmentKey) -> Option<&Contribution> {
        order
            .binary_search(key)
            .ok()
            .and_then(|i| self.segments.get(i))
    }

    /// All of them appended into one, in that order (what [`super::assemble`] takes).
    fn merged(&self) -> Contribution {
        let mut acc = Contribution::with_capacity(self.segments.len() + self.peers.len() + 1);
        for c in self.iter() {
            acc.absorb(c);
        }
        acc
    }
}

/// A segment recomputed on the fast path: its contribution, its leader and its position in the
/// new segment order.
type NewSegment = (Contribution, NodeName, usize);

/// What the contributions hold, as keys and counts, so one contribution can be swapped in
/// O(size · log n) and its effect on the whole state told. The values stay in the
/// contributions only: [`Engine::desired`] assembles them (at 5,000 nodes a second copy of
/// every peer and route was 2 MiB).
#[derive(Debug, Clone, Default)]
struct Index {
    /// Public keys of the peers.
    peers: BTreeSet<WgKey>,
    /// Allowed IPs held by some peer, with how many hold them.
    allowed: BTreeMap<IpNetwork, usize>,
    /// Table and destination of the routes.
    routes: BTreeSet<(u32, IpNetwork)>,
    rules: BTreeMap<Rule, usize>,
    sources: BTreeMap<IpNetwork, usize>,
    destinations: BTreeMap<IpNetwork, usize>,
    exempt: BTreeMap<IpNetwork, usize>,
}

/// Count `items` in; every network that appears is toggled in `flips`.
fn count_add(
    map: &mut BTreeMap<IpNetwork, usize>,
    items: &[IpNetwork],
    flips: &mut Flips,
    set: u8,
) {
    for i in items {
        let c = map.entry(*i).or_insert(0);
        if *c == 0 {
            flips.toggle(set, *i);
        }
        *c += 1;
    }
}

/// Count `items` out; every network that disappears is toggled in `flips`.
fn count_remove(
    map: &mut BTreeMap<IpNetwork, usize>,
    items: &[IpNetwork],
    flips: &mut Flips,
    set: u8,
) {
    for i in items {
        if let Some(c) = map.get_mut(i) {
            *c -= 1;
            if *c == 0 {
                map.remove(i);
                flips.toggle(set, *i);
            }
        }
    }
}

/// Networks whose presence changed an odd number of times: the net change of a set.
#[derive(Debug, Default)]
struct Flips(std::collections::BTreeSet<(u8, IpNetwork)>);

impl Flips {
    fn toggle(&mut self, set: u8, n: IpNetwork) {
        if !self.0.remove(&(set, n)) {
            self.0.insert((set, n));
        }
    }
}

/// The incremental engine for one local node.
#[derive(Debug, Clone)]
pub struct Engine {
    opts: MeshOptions,
    local: NodeName,
    nodes: BTreeMap<NodeName, Arc<MeshNode>>,
    peers: BTreeMap<NodeName, MeshPeer>,
    /// Segment keys in order: position = mesh IP index.
    order: Vec<SegmentKey>,
    /// Ready members of each segment, sorted by name.
    members: HashMap<SegmentKey, Vec<NodeName>>,
    /// Leader name of each segment.
    leaders: HashMap<SegmentKey, NodeName>,
    /// Which ready node holds which key.
    key_owner: HashMap<WgKey, NodeName>,
    /// Which ready node holds which pod CIDR.
    cidr_owner: CidrIndex,
    /// The endpoints and internal IPs of the nodes that take part.
    hosts: super::claims::Hosts,
    contributions: Contributions,
    ctx: Option<LocalContext>,
    local_segment: Option<SegmentKey>,
    index: Index,
    /// Diagnostics of the last full computation, plus readiness of nodes changed since.
    global_diagnostics: Vec<Diagnostic>,
    readiness: BTreeMap<NodeName, Diagnostic>,
    /// Set when the fast path cannot be trusted: conflicts, allowed-location-ips, no local node.
    slow: bool,
    local_error: Option<LocalError>,
    stats: EngineStats,
    /// Work done so far, in a full recomputation's per-segment cost (see [`Engine::apply_batch`]).
    work: usize,
    /// Inside [`Engine::fold_batch`]: recomputations skip their diff.
    folding: bool,
}

/// What recomputing one segment on the fast path costs, in a full recomputation's per-segment
/// cost. Measured at 5,000 nodes in full granularity (`benches/engine.rs`): a full
/// recomputation takes 16 ms (3 µs a segment), a node leaving recomputes 2,500 segments in
/// 24 ms (10 µs each), an endpoint move one segment in 4 µs. Rounded towards the renumbering
/// case, whose bursts cost seconds; a burst of moves is folded a little early instead.
const FAST_SEGMENT_COST: usize = 3;

impl Engine {
    /// An engine for node `local` over the given nodes and peers.
    pub fn new(
        nodes: impl IntoIterator<Item = impl Into<Arc<MeshNode>>>,
        peers: impl IntoIterator<Item = MeshPeer>,
        local: NodeName,
        opts: MeshOptions,
    ) -> Self {
        let mut e = Engine {
            opts,
            local,
            nodes: nodes
                .into_iter()
                .map(|n| {
                    let n = n.into();
                    (n.name.clone(), n)
                })
                .collect(),
            peers: peers.into_iter().map(|p| (p.name.clone(), p)).collect(),
            order: Vec::new(),
            members: HashMap::new(),
            leaders: HashMap::new(),
            key_owner: HashMap::new(),
            cidr_owner: CidrIndex::default(),
            hosts: super::claims::Hosts::default(),
            contributions: Contributions::default(),
            ctx: None,
            local_segment: None,
            index: Index::default(),
            global_diagnostics: Vec::new(),
            readiness: BTreeMap::new(),
            slow: true,
            local_error: None,
            stats: EngineStats::default(),
            work: 0,
            folding: false,
        };
        e.rebuild();
        e
    }

    /// How many events took the incremental and the full path.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// The options the engine computes with.
    pub fn options(&self) -> &MeshOptions {
        &self.opts
    }

    /// All nodes the engine knows, ready or not.
    pub fn nodes(&self) -> impl Iterator<Item = &MeshNode> {
        self.nodes.values().map(|n| &**n)
    }

    /// The node named `name`, ready or not.
    fn node(&self, name: &NodeName) -> Option<&MeshNode> {
        self.nodes.get(name).map(|n| &**n)
    }

    /// All external peers the engine knows.
    pub fn peers(&self) -> impl Iterator<Item = &MeshPeer> {
        self.peers.values()
    }

    /// What the local node probes of its location's leader's forwarding (location granularity,
    /// a member that does not lead): the leader, and the mesh IPs of the (up to three) segments
    /// after its own in the mesh's order, which it reaches through the leader.
    pub fn leader_probe(&self) -> Option<LeaderProbe> {
        let ctx = self.ctx.as_ref()?;
        if ctx.leader || self.opts.granularity != Granularity::Location {
            return None;
        }
        let key = self.local_segment.as_ref()?;
        let leader = self.leaders.get(key)?.clone();
        let pos = self.order.iter().position(|k| k == key)?;
        let n = self.order.len();
        let (targets, behind): (Vec<_>, Vec<_>) = (1..n)
            .map(|d| (pos + d) % n)
            .take(PROBE_TARGETS)
            .filter_map(|i| {
                let ip = allocate(self.opts.subnet, i)?;
                Some((ip, self.leaders.get(&self.order[i])?.clone()))
            })
            .unzip();
        (!targets.is_empty()).then_some(LeaderProbe {
            leader,
            targets,
            behind,
        })
    }

    /// The local node's current desired state.
    pub fn desired(&self) -> Result<DesiredState, LocalError> {
        self.available()?;
        match &self.ctx {
            Some(ctx) => Ok(self.materialize(ctx)),
            None => Err(LocalError::Unknown(self.local.to_string())),
        }
    }

    /// Whether [`Engine::desired`] has a state to give, without materialising it.
    fn available(&self) -> Result<(), LocalError> {
        if let Some(e) = &self.local_error {
            return Err(e.clone());
        }
        match self.ctx {
            Some(_) => Ok(()),
            None => Err(LocalError::Unknown(self.local.to_string())),
        }
    }

    /// Problems in the current input, sorted.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut d = self.global_diagnostics.clone();
        d.extend(self.readiness.values().cloned());
        d.sort();
        d.dedup();
        d
    }

    /// Change the current time used for the last-seen check (recomputes everything).
    pub fn set_now(&mut self, now: Option<i64>) -> Update {
        self.opts.now = now;
        self.recompute()
    }

    /// The desired state: the contributions assembled as a full computation assembles them.
    fn materialize(&self, ctx: &LocalContext) -> DesiredState {
        super::assemble(ctx, self.contributions.merged()).0
    }

    /// Apply one event.
    pub fn apply(&mut self, event: Event) -> Update {
        match event {
            Event::NodeUpsert(n) => {
                let name = n.name.clone();
                let old = self.nodes.insert(name.clone(), n);
                self.node_changed(&name, old)
            }
            Event::NodeRemove(name) => match self.nodes.remove(&name) {
                Some(old) => self.node_changed(&name, Some(old)),
                None => self.unchanged(),
            },
            Event::PeerUpsert(p) => {
                self.peers.insert(p.name.clone(), p);
                self.recompute()
            }
            Event::PeerRemove(name) => {
                if self.peers.remove(&name).is_none() {
                    return self.unchanged();
                }
                self.recompute()
            }
        }
    }

    /// Apply a batch of events (a burst the registry delivered at once); the engine ends as if
    /// they had been applied one by one. They are taken one at a time, each update handed to
    /// `on_update` as it comes, while the work stays below one full recomputation's; the rest of
    /// the batch only changes the inputs, and one recomputation, whose update is the last,
    /// covers it. One event on the fast path usually costs microseconds, but one that renumbers
    /// the mesh (a node leaving a full mesh shifts the mesh IP of every segment after it) costs
    /// more than a full recomputation, and a burst may hold hundreds.
    pub fn apply_batch(
        &mut self,
        events: impl IntoIterator<Item = Event>,
        mut on_update: impl FnMut(Update),
    ) {
        let budget = self.order.len();
        let start = self.work;
        let mut events = events.into_iter();
        while let Some(ev) = events.next() {
            if self.work - start >= budget {
                self.set_input(ev);
                for ev in events.by_ref() {
                    self.set_input(ev);
                }
                on_update(self.recompute());
                return;
            }
            on_update(self.apply(ev));
        }
    }

    /// Apply a batch for a caller that plans from [`Engine::desired`] afterwards and needs no
    /// update (it already has changes of its own to plan in full): as [`Engine::apply_batch`],
    /// but a recomputation only rebuilds, without materialising the whole desired state before
    /// and after it to diff them. At 5,000 nodes in full granularity those two copies and their
    /// diff are most of a burst's memory peak (`examples/engine_memory.rs`).
    ///
    /// A batch holding an event that needs a recomputation anyway (an external peer, the local
    /// node) or that adds or removes a segment (which renumbers every segment after it, and
    /// costs the fast path more than one recomputation) goes straight to one recomputation:
    /// the fast path's work for the events before it would be thrown away.
    pub fn fold_batch(&mut self, events: impl IntoIterator<Item = Event>) {
        let events: Vec<Event> = events.into_iter().collect();
        self.folding = true;
        if events.iter().any(|ev| self.costly(ev)) {
            events.into_iter().for_each(|ev| self.set_input(ev));
            self.recompute();
        } else {
            self.apply_batch(events, |_| {});
        }
        self.folding = false;
    }

    /// Split a batch into the events the fast path takes cheaply and the rest: every event of a
    /// node (or external peer) that has a costly one in the batch goes with the rest, so each
    /// object's events keep their order. Applying the first part and then the second ends in
    /// the same state as applying the batch (the engine is a function of its inputs), and the
    /// state between is that of inputs that all existed.
    ///
    /// `held`: costly events of earlier batches not applied yet; the events of their objects
    /// go with the rest too.
    pub fn split_costly(&self, events: Vec<Event>, held: &[Event]) -> (Vec<Event>, Vec<Event>) {
        let costly: HashSet<(bool, NodeName)> = events
            .iter()
            .filter(|ev| self.costly(ev))
            .chain(held)
            .map(|ev| {
                let (peer, name) = ev.object();
                (peer, name.clone())
            })
            .collect();
        if costly.is_empty() {
            return (events, Vec::new());
        }
        events.into_iter().partition(|ev| {
            let (peer, name) = ev.object();
            !costly.contains(&(peer, name.clone()))
        })
    }

    /// Whether `ev`, taken against the current inputs, needs a recomputation or changes which
    /// segments exist. Only a cost estimate: both ways end in the same state.
    pub fn costly(&self, ev: &Event) -> bool {
        let (name, new) = match ev {
            Event::PeerUpsert(_) | Event::PeerRemove(_) => return true,
            Event::NodeUpsert(n) => (&n.name, Some(&**n)),
            Event::NodeRemove(name) => (name, None),
        };
        if *name == self.local {
            return true;
        }
        let seg =
            |n: Option<&MeshNode>| self.ready(n).map(|n| segment_key(n, self.opts.granularity));
        let old_seg = seg(self.nodes.get(name).map(|n| &**n));
        let new_seg = seg(new);
        if old_seg == new_seg {
            return false;
        }
        let emptied = old_seg
            .as_ref()
            .is_some_and(|k| self.members.get(k).is_none_or(|m| m.len() <= 1));
        let created = new_seg
            .as_ref()
            .is_some_and(|k| self.members.get(k).is_none_or(Vec::is_empty));
        emptied || created
    }

    /// Record an event in the inputs only (a recomputation must follow).
    fn set_input(&mut self, event: Event) {
        match event {
            Event::NodeUpsert(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Event::NodeRemove(name) => {
                self.nodes.remove(&name);
            }
            Event::PeerUpsert(p) => {
                self.peers.insert(p.name.clone(), p);
            }
            Event::PeerRemove(name) => {
                self.peers.remove(&name);
            }
        }
    }

    /// The update for an event that changed nothing.
    fn unchanged(&self) -> Update {
        match self.available() {
            Ok(()) => Update::Delta(DesiredDelta::default()),
            Err(e) => Update::Unavailable(e),
        }
    }

    fn ready<'a>(&self, n: Option<&'a MeshNode>) -> Option<&'a MeshNode> {
        n.filter(|n| not_ready_reason(n, self.opts.now).is_none())
    }

    /// Handle a changed node; `old` is its previous value (the new one is in `self.nodes`).
    fn node_changed(&mut self, name: &NodeName, old: Option<Arc<MeshNode>>) -> Update {
        match self.try_fast(name, old.as_deref()) {
            Some(delta) => {
                self.stats.incremental += 1;
                Update::Delta(delta)
            }
            None => self.recompute(),
        }
    }

    /// The fast path; `None` when the event needs a full recomputation (nothing was changed).
    fn try_fast(&mut self, name: &NodeName, old: Option<&MeshNode>) -> Option<DesiredDelta> {
        if self.slow || *name == self.local {
            return None;
        }
        let ctx = self.ctx.clone()?;
        let local_segment = self.local_segment.clone()?;
        let new = self.nodes.get(name).map(|n| &**n);
        let old_ready = self.ready(old);
        let new_ready = self.ready(new);
        // Global inputs: discovered endpoints, allowed-location-ips.
        fn discovered(n: Option<&MeshNode>) -> Option<&BTreeMap<WgKey, std::net::SocketAddr>> {
            n.map(|n| &n.discovered_endpoints).filter(|d| !d.is_empty())
        }
        if discovered(old_ready) != discovered(new_ready) {
            return None;
        }
        if new_ready.is_some_and(|n| !n.allowed_location_ips.is_empty()) {
            return None;
        }
        // An unreachable report may start, move or end a relay between any two segments.
        if new_ready.is_some_and(reports_unreachable) {
            return None;
        }
        // A forwarding report may move the leader of its location (and back when it ends).
        if old_ready.is_some_and(reports_forwarding) || new_ready.is_some_and(reports_forwarding) {
            return None;
        }
        if let Some(k) = new_ready.and_then(|n| n.key)
            && self.key_owner.get(&k).is_some_and(|o| o != name)
        {
            return None;
        }
        if let Some(n) = new_ready
            && old_ready.map(|o| &o.pod_cidrs) != Some(&n.pod_cidrs)
            && n.pod_cidrs
                .iter()
                .any(|c| self.cidr_owner.conflict(c, name).is_some())
        {
            return None;
        }
        // A claim the whole check would refuse or settle (an address another node holds, a
        // reserved range, a new IP family) needs the whole check.
        // The node's own old addresses count as its own (same name), not as another's.
        if let Some(n) = new_ready
            && !self
                .hosts
                .accepts(n, old_ready, &self.cidr_owner, &self.opts)
        {
            return None;
        }
        let old_seg = old_ready.map(|n| segment_key(n, self.opts.granularity));
        let new_seg = new_ready.map(|n| segment_key(n, self.opts.granularity));
        let old_key = old_ready.and_then(|n| n.key);
        let new_key = new_ready.and_then(|n| n.key);

        // New membership of the touched segments.
        let mut touched: BTreeMap<SegmentKey, Vec<NodeName>> = BTreeMap::new();
        for key in [&old_seg, &new_seg].into_iter().flatten() {
            let mut m = self.members.get(key).cloned().unwrap_or_default();
            m.retain(|n| n != name);
            touched.insert(key.clone(), m);
        }
        if let Some(k) = &new_seg
            && let Some(m) = touched.get_mut(k)
            && let Err(pos) = m.binary_search(name)
        {
            m.insert(pos, name.clone());
        }
        // New segment order: segments appear or disappear.
        let mut order = None;
        // The same insertions and removals, to replay on the contributions (see the commit).
        let mut shifts: Vec<Result<usize, usize>> = Vec::new();
        let mut first_shift = usize::MAX;
        for (key, m) in &touched {
            let pos = self.order.binary_search(key);
            match (pos, m.is_empty()) {
                (Ok(i), true) | (Err(i), false) => {
                    first_shift = first_shift.min(i);
                    let o = order.get_or_insert_with(|| self.order.clone());
                    let at = o.binary_search(key);
                    match at {
                        Ok(j) => {
                            o.remove(j);
                        }
                        Err(j) => o.insert(j, key.clone()),
                    }
                    shifts.push(at);
                }
                _ => {}
            }
        }
        let order_ref = order.as_ref().unwrap_or(&self.order);
        // The local segment must keep its place (its mesh IP is the interface address).
        if first_shift != usize::MAX {
            let local_pos = self.order.binary_search(&local_segment).ok()?;
            if local_pos >= first_shift {
                return None;
            }
        }
        // Segments whose contribution must be recomputed.
        let mut recompute: Vec<SegmentKey> = touched.keys().cloned().collect();
        if first_shift != usize::MAX {
            recompute.extend(order_ref.iter().skip(first_shift).cloned());
            recompute.sort();
            recompute.dedup();
        }
        self.work += FAST_SEGMENT_COST * recompute.len();
        let mut new_contribs: Vec<(SegmentKey, Option<NewSegment>)> =
            Vec::with_capacity(recompute.len());
        for key in &recompute {
            let members = touched.get(key).or_else(|| self.members.get(key));
            let Some(members) = members.filter(|m| !m.is_empty()) else {
                new_contribs.push((key.clone(), None));
                continue;
            };
            let idx = order_ref.binary_search(key).ok()?;
            let ip = allocate(self.opts.subnet, idx)?;
            let refs: Vec<&MeshNode> = members.iter().filter_map(|n| self.node(n)).collect();
            if refs.len() != members.len() {
                return None;
            }
            let seg = make_segment(key.clone(), refs, ip);
            let leader = seg.leader_node().name.clone();
            if *key == local_segment && self.leaders.get(key) != Some(&leader) {
                return None; // The local node's gateway or leadership changes.
            }
            let c = ctx.segment(&seg, *key == local_segment);
            new_contribs.push((key.clone(), Some((c, leader, idx))));
        }
        if !self.claims_are_free(&new_contribs) {
            return None;
        }

        // Commit: remove every replaced contribution first, then add the new ones, so a key or
        // route that moves between two touched segments is not lost.
        let mut delta = DesiredDelta::default();
        // Sized once: a renumbering replaces thousands of peers and routes, and vectors grown by
        // doubling would hold up to twice that at the agent's worst moment for memory.
        let (mut old_routes, mut new_routes, mut new_peers) = (0, 0, 0);
        for (key, c) in &new_contribs {
            if let Some(old) = self.contributions.segment(&self.order, key) {
                old_routes += old.routes.len();
            }
            if let Some((c, _, _)) = c {
                new_routes += c.routes.len();
                new_peers += c.peers.len();
            }
        }
        delta.peers_removed.reserve_exact(new_contribs.len());
        delta.routes_removed.reserve_exact(old_routes);
        delta.peers_upserted.reserve_exact(new_peers);
        delta.routes_added.reserve_exact(new_routes);
        let mut removed_peers: BTreeMap<WgKey, WgPeer> = BTreeMap::new();
        let mut flips = Flips::default();
        for (key, _) in &new_contribs {
            if let Ok(i) = self.order.binary_search(key) {
                let old_c = std::mem::take(&mut self.contributions.segments[i]);
                if let Some(p) = self.index_remove(old_c, &mut delta, &mut flips) {
                    removed_peers.insert(p.public_key, p);
                }
            }
        }
        // The vector follows the new order: a segment gone loses its (emptied) slot, a new
        // one gets a slot; every slot after the first shift is refilled below.
        for at in shifts {
            match at {
                Ok(j) => {
                    self.contributions.segments.remove(j);
                }
                Err(j) => self
                    .contributions
                    .segments
                    .insert(j, Contribution::default()),
            }
        }
        for (key, c) in new_contribs {
            match c {
                Some((c, leader, i)) => {
                    self.index_add(&c, &mut delta, &mut flips);
                    self.contributions.segments[i] = c;
                    self.leaders.insert(key, leader);
                }
                None => {
                    self.leaders.remove(&key);
                }
            }
        }
        // A peer re-added unchanged is no change.
        delta
            .peers_upserted
            .retain(|p| removed_peers.get(&p.public_key) != Some(p));
        delta
            .peers_removed
            .retain(|k| !self.index.peers.contains(k));
        for (key, m) in touched {
            if m.is_empty() {
                self.members.remove(&key);
            } else {
                self.members.insert(key, m);
            }
        }
        if let Some(o) = order {
            self.order = o;
        }
        if let Some(k) = old_key {
            self.key_owner.remove(&k);
        }
        for c in old_ready.iter().flat_map(|n| &n.pod_cidrs) {
            self.cidr_owner.remove(c, name);
        }
        if let Some(o) = old_ready {
            self.hosts.remove(o);
        }
        if let Some(n) = self.ready(self.nodes.get(name).map(|n| &**n)) {
            self.hosts.insert(n);
        }
        let new_ready = self.ready(self.nodes.get(name).map(|n| &**n));
        for c in new_ready.iter().flat_map(|n| &n.pod_cidrs) {
            self.cidr_owner.insert(c, name);
        }
        if let Some(k) = new_key {
            self.key_owner.insert(k, name.clone());
        }
        match self
            .nodes
            .get(name)
            .and_then(|n| not_ready_reason(n, self.opts.now))
        {
            Some(why) => {
                self.readiness
                    .insert(name.clone(), Diagnostic::node(name.as_str(), None, why));
            }
            None => {
                self.readiness.remove(name);
            }
        }
        self.normalize_delta(&mut delta);
        if !flips.0.is_empty() {
            delta.masquerade = Some(Masquerade {
                sources: self.index.sources.keys().copied().collect(),
                destinations: self.index.destinations.keys().copied().collect(),
                exempt: self.index.exempt.keys().copied().collect(),
            });
        }
        Some(delta)
    }

    /// Whether the new contributions claim no allowed IP or route that another contribution
    /// (outside the ones being replaced) holds, and none twice among themselves.
    ///
    /// What the replaced contributions hold is gathered first: a node leaving a full mesh
    /// renumbers every segment after it, so thousands are replaced at once, and scanning them
    /// for every claim was quadratic (seconds per event at 5,000 nodes). Sorted vectors, not
    /// hash sets: this runs at the worst moment for memory, and hash sets of those thousands
    /// held three times as much.
    fn claims_are_free(&self, new: &[(SegmentKey, Option<NewSegment>)]) -> bool {
        let (mut freed_keys, mut freed_ips, mut freed_routes) =
            (Vec::new(), Vec::new(), Vec::new());
        let (mut keys, mut ips, mut routes) = (Vec::new(), Vec::new(), Vec::new());
        for (k, c) in new {
            if let Some(old) = self.contributions.segment(&self.order, k) {
                if let Some(p) = old.peer() {
                    freed_keys.push(p.public_key);
                    freed_ips.extend_from_slice(&p.allowed_ips);
                }
                freed_routes.extend(old.routes.iter().map(|r| (r.table, r.dst)));
            }
            if let Some((c, _, _)) = c {
                if let Some(p) = c.peer() {
                    keys.push(p.public_key);
                    ips.extend_from_slice(&p.allowed_ips);
                }
                routes.extend(c.routes.iter().map(|r| (r.table, r.dst)));
            }
        }
        /// Sorted; `false` when an item appears twice.
        fn sort_unique<T: Ord>(v: &mut [T]) -> bool {
            v.sort_unstable();
            v.windows(2).all(|w| w[0] != w[1])
        }
        freed_keys.sort_unstable();
        freed_ips.sort_unstable();
        freed_routes.sort_unstable();
        sort_unique(&mut keys)
            && sort_unique(&mut ips)
            && sort_unique(&mut routes)
            && keys
                .iter()
                .all(|k| !self.index.peers.contains(k) || freed_keys.binary_search(k).is_ok())
            && ips.iter().all(|ip| {
                !self.index.allowed.contains_key(ip) || freed_ips.binary_search(ip).is_ok()
            })
            && routes
                .iter()
                .all(|r| !self.index.routes.contains(r) || freed_routes.binary_search(r).is_ok())
    }

    /// Remove a contribution from the index, recording what disappears (its routes and rules
    /// move into `delta`); gives back its peer.
    fn index_remove(
        &mut self,
        c: Contribution,
        delta: &mut DesiredDelta,
        flips: &mut Flips,
    ) -> Option<WgPeer> {
        if let Some(p) = c.peer() {
            self.index.peers.remove(&p.public_key);
            count_remove(
                &mut self.index.allowed,
                &p.allowed_ips,
                &mut Flips::default(),
                0,
            );
            delta.peers_removed.push(p.public_key);
        }
        for r in c.routes {
            if self.index.routes.remove(&(r.table, r.dst)) {
                delta.routes_removed.push(r);
            }
        }
        for r in c.rules {
            if let Some(n) = self.index.rules.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    self.index.rules.remove(&r);
                    delta.rules_removed.push(r);
                }
            }
        }
        count_remove(&mut self.index.sources, &c.nat_sources, flips, 1);
        count_remove(&mut self.index.destinations, &c.nat_destinations, flips, 2);
        count_remove(&mut self.index.exempt, &c.nat_exempt, flips, 3);
        c.peers.into_iter().next()
    }

    /// Add a contribution to the index, recording what appears.
    fn index_add(&mut self, c: &Contribution, delta: &mut DesiredDelta, flips: &mut Flips) {
        if let Some(p) = c.peer() {
            self.index.peers.insert(p.public_key);
            count_add(
                &mut self.index.allowed,
                &p.allowed_ips,
                &mut Flips::default(),
                0,
            );
            delta.peers_upserted.push(p.clone());
        }
        for r in &c.routes {
            self.index.routes.insert((r.table, r.dst));
            delta.routes_added.push(r.clone());
        }
        for r in &c.rules {
            let n = self.index.rules.entry(r.clone()).or_insert(0);
            if *n == 0 {
                delta.rules_added.push(r.clone());
            }
            *n += 1;
        }
        count_add(&mut self.index.sources, &c.nat_sources, flips, 1);
        count_add(&mut self.index.destinations, &c.nat_destinations, flips, 2);
        count_add(&mut self.index.exempt, &c.nat_exempt, flips, 3);
    }

    /// Cancel out removals and re-additions of the same thing, and sort.
    fn normalize_delta(&self, d: &mut DesiredDelta) {
        // A key both removed and upserted is an upsert.
        let upserted: std::collections::BTreeSet<WgKey> =
            d.peers_upserted.iter().map(|p| p.public_key).collect();
        d.peers_removed.retain(|k| !upserted.contains(k));
        d.peers_removed.sort();
        d.peers_removed.dedup();
        d.peers_upserted.sort();
        d.peers_upserted
            .dedup_by(|b, a| a.public_key == b.public_key);
        d.routes_added.sort();
        d.routes_removed.sort();
        cancel(&mut d.routes_added, &mut d.routes_removed);
        d.rules_added.sort();
        d.rules_removed.sort();
        cancel(&mut d.rules_added, &mut d.rules_removed);
    }

    /// Rebuild every index from scratch and diff against the previous state (in
    /// [`Engine::fold_batch`] only rebuild: its caller drops the update).
    fn recompute(&mut self) -> Update {
        if self.folding {
            self.rebuild();
            return self.unchanged();
        }
        let before = self.desired();
        self.rebuild();
        let after = self.desired();
        match (before, after) {
            (Ok(b), Ok(a)) => Update::Delta(DesiredDelta::between(&b, &a)),
            (_, Ok(a)) => Update::Full(a),
            (_, Err(e)) => Update::Unavailable(e),
        }
    }

    fn rebuild(&mut self) {
        self.stats.full += 1;
        self.work += self.order.len();
        let peers: Vec<MeshPeer> = self.peers.values().cloned().collect();
        let checked = super::claims::check(self.nodes.values().map(|n| &**n), &self.opts);
        let topo = super::build_checked(&checked, &peers, &self.opts);
        self.order = topo.segments.iter().map(|s| s.key.clone()).collect();
        self.members = topo
            .segments
            .iter()
            .map(|s| {
                (
                    s.key.clone(),
                    s.nodes.iter().map(|n| n.name.clone()).collect(),
                )
            })
            .collect();
        self.leaders = topo
            .segments
            .iter()
            .map(|s| (s.key.clone(), s.leader_node().name.clone()))
            .collect();
        self.cidr_owner = CidrIndex::default();
        self.hosts = super::claims::Hosts::default();
        for n in topo.segments.iter().flat_map(|s| s.nodes.iter()) {
            for c in &n.pod_cidrs {
                self.cidr_owner.insert(c, &n.name);
            }
            self.hosts.insert(n);
        }
        self.key_owner = topo
            .segments
            .iter()
            .flat_map(|s| s.nodes.iter())
            .filter_map(|n| n.key.map(|k| (k, n.name.clone())))
            .collect();
        self.readiness.clear();
        self.global_diagnostics.clear();
        self.contributions = Contributions::default();
        self.index = Index::default();
        self.ctx = None;
        self.local_segment = None;
        self.local_error = None;
        let any_alips = topo
            .segments
            .iter()
            .any(|s| s.nodes.iter().any(|n| !n.allowed_location_ips.is_empty()));
        let any_reports = topo.segments.iter().any(|s| {
            s.nodes
                .iter()
                .any(|n| reports_unreachable(n) || reports_forwarding(n))
        });
        let Some(idx) = topo.segment_of(&self.local) else {
            self.local_error = topo.desired_for(&self.local, &self.opts).err();
            self.global_diagnostics = topo.diagnostics;
            self.slow = true;
            return;
        };
        let ctx = LocalContext::new(&topo, idx, &self.local, &self.opts);
        let own = ctx.own();
        let segments = topo
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| ctx.segment(s, i == idx))
            .collect();
        let peers = topo.peers.iter().map(|p| ctx.peer(p)).collect();
        self.contributions = Contributions {
            own,
            segments,
            peers,
        };
        // Index every contribution. A claim made twice (an allowed IP, a route's destination)
        // is a conflict the assembly resolves and reports; only then is it run here, for its
        // diagnostics (`desired` assembles again when asked).
        let mut claimed_twice = false;
        let ix = &mut self.index;
        for c in self.contributions.iter() {
            if let Some(p) = c.peer() {
                ix.peers.insert(p.public_key);
                for ip in &p.allowed_ips {
                    let n = ix.allowed.entry(*ip).or_insert(0);
                    *n += 1;
                    claimed_twice |= *n > 1;
                }
            }
            for r in &c.routes {
                claimed_twice |= !ix.routes.insert((r.table, r.dst));
            }
            for r in &c.rules {
                *ix.rules.entry(r.clone()).or_insert(0) += 1;
            }
            let mut ignore = Flips::default();
            count_add(&mut ix.sources, &c.nat_sources, &mut ignore, 1);
            count_add(&mut ix.destinations, &c.nat_destinations, &mut ignore, 2);
            count_add(&mut ix.exempt, &c.nat_exempt, &mut ignore, 3);
        }
        let conflicts = if claimed_twice {
            super::assemble(&ctx, self.contributions.merged()).1
        } else {
            Vec::new()
        };
        self.local_segment = Some(topo.segments[idx].key.clone());
        self.ctx = Some(ctx);
        let mut diags = topo.diagnostics;
        diags.extend(conflicts);
        // Readiness diagnostics are tracked per node so the fast path can update them; any other
        // diagnostic (duplicate key, conflict, no mesh IP left) means a change elsewhere may bring
        // a shadowed node back, which only a full recomputation sees.
        for d in diags {
            let name = NodeName(d.name.clone());
            let unready = d.key.is_none()
                && self
                    .nodes
                    .get(&name)
                    .and_then(|n| not_ready_reason(n, self.opts.now))
                    .is_some_and(|why| why == d.problem);
            if unready {
                self.readiness.insert(name, d);
            } else {
                self.global_diagnostics.push(d);
            }
        }
        self.slow = any_alips || any_reports || !self.global_diagnostics.is_empty();
    }
}

/// Whether `n` reports a node of its location not forwarding (failover needs the full
/// computation: the leader of a location moves).
fn reports_forwarding(n: &MeshNode) -> bool {
    n.forwarding_failed.as_ref().is_some_and(|f| !f.is_empty())
}

/// Whether `n` reports a segment it cannot reach (relays then need the full computation).
fn reports_unreachable(n: &MeshNode) -> bool {
    n.unreachable.as_ref().is_some_and(|u| !u.is_empty())
}

/// Remove items present in both sorted lists, in place (a renumbered mesh's delta holds
/// thousands of routes; rebuilding both lists would hold them twice).
fn cancel<T: Ord>(added: &mut Vec<T>, removed: &mut Vec<T>) {
    use std::cmp::Ordering;
    let (mut keep_a, mut keep_r) = (vec![true; added.len()], vec![true; removed.len()]);
    let (mut i, mut j) = (0, 0);
    while i < added.len() && j < removed.len() {
        match added[i].cmp(&removed[j]) {
            Ordering::Equal => {
                keep_a[i] = false;
                keep_r[j] = false;
                i += 1;
                j += 1;
            }
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
        }
    }
    let mut k = keep_a.into_iter();
    added.retain(|_| k.next().unwrap_or(true));
    let mut k = keep_r.into_iter();
    removed.retain(|_| k.next().unwrap_or(true));
}

#[cfg(test)]
mod tests {
    use super::cancel;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Counts of each item: a multiset.
    fn counts(v: &[u8]) -> BTreeMap<u8, i32> {
        let mut m = BTreeMap::new();
        for x in v {
            *m.entry(*x).or_insert(0) += 1;
        }
        m
    }

    proptest! {
        /// Property: `cancel` removes each item found in both lists once from each (a
        /// removal and a re-addition of the same thing), keeps the rest sorted, and what each
        /// list gains or loses is the same net change.
        #[test]
        fn cancel_removes_what_both_lists_hold(
            mut a in proptest::collection::vec(0u8..12, 0..20),
            mut r in proptest::collection::vec(0u8..12, 0..20),
        ) {
            a.sort();
            r.sort();
            let (ca, cr) = (counts(&a), counts(&r));
            let (mut a2, mut r2) = (a.clone(), r.clone());
            cancel(&mut a2, &mut r2);
            prop_assert!(a2.is_sorted() && r2.is_sorted());
            for x in 0u8..12 {
                let (na, nr) = (ca.get(&x).copied().unwrap_or(0), cr.get(&x).copied().unwrap_or(0));
                let both = na.min(nr);
                prop_assert_eq!(counts(&a2).get(&x).copied().unwrap_or(0), na - both);
                prop_assert_eq!(counts(&r2).get(&x).copied().unwrap_or(0), nr - both);
            }
        }
    }
}
