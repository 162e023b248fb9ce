//! Properties of the topology engine and of the incremental engine.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use wiremesh::desired::{DesiredState, RouteDev};
use wiremesh::model::{MeshNode, MeshPeer, NodeName};
use wiremesh::topology::incremental::{Engine, Event, Update};
use wiremesh::topology::{Encapsulate, MeshOptions, build, compute};

use crate::util::strategy as gens;

use gens::opts;

fn first(nodes: &[MeshNode]) -> NodeName {
    nodes[0].name.clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property: shuffling nodes and peers does not change any node's desired state.
    #[test]
    fn input_order_does_not_change_the_result(
        nodes in gens::cluster(10, false),
        full in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let o = opts(full);
        let mut shuffled = nodes.clone();
        // A deterministic permutation from the seed.
        let n = shuffled.len();
        for i in (1..n).rev() {
            let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        for local in &nodes {
            let a = compute(&nodes, &[], &local.name, &o);
            let b = compute(&shuffled, &[], &local.name, &o);
            prop_assert_eq!(a.map(|p| p.desired), b.map(|p| p.desired));
        }
    }

    /// Property: no allowed IP is given to two peers, whatever the input.
    #[test]
    fn no_allowed_ip_is_given_to_two_peers(
        nodes in gens::cluster(10, false),
        peers in (0..3u8).prop_flat_map(|n| (0..n).map(gens::peer).collect::<Vec<_>>()),
        full in any::<bool>(),
    ) {
        for local in &nodes {
            let Ok(plan) = compute(&nodes, &peers, &local.name, &opts(full)) else { continue };
            let mut seen = BTreeSet::new();
            for p in &plan.desired.peers {
                for ip in &p.allowed_ips {
                    prop_assert!(seen.insert(*ip), "{} given twice", ip);
                }
            }
        }
    }

    /// Property: with disjoint input ranges, allowed IPs of two peers never even overlap.
    #[test]
    fn allowed_ips_never_overlap_between_peers(
        nodes in gens::cluster(10, true),
        full in any::<bool>(),
    ) {
        for local in &nodes {
            let Ok(plan) = compute(&nodes, &[], &local.name, &opts(full)) else { continue };
            let all: Vec<(usize, ipnetwork::IpNetwork)> = plan.desired.peers.iter().enumerate()
                .flat_map(|(i, p)| p.allowed_ips.iter().map(move |ip| (i, *ip))).collect();
            for (i, a) in &all {
                for (j, b) in &all {
                    if i != j {
                        prop_assert!(!(a.contains(b.network()) || b.contains(a.network())), "{} and {} overlap", a, b);
                    }
                }
            }
        }
    }

    /// Property: every remote pod CIDR is reachable exactly once: one route, and on a leader
    /// exactly one peer carrying it; the local pod CIDR has no route.
    #[test]
    fn every_remote_pod_cidr_is_reachable_exactly_once(
        nodes in gens::cluster(10, true),
        full in any::<bool>(),
    ) {
        for local in &nodes {
            let Ok(plan) = compute(&nodes, &[], &local.name, &opts(full)) else { continue };
            let d = &plan.desired;
            for n in &nodes {
                for cidr in &n.pod_cidrs {
                    let routes = d.routes.iter().filter(|r| r.dst == *cidr).count();
                    let carried = d.peers.iter().filter(|p| p.allowed_ips.contains(cidr)).count();
                    if n.name == local.name {
                        prop_assert_eq!(routes, 0);
                        prop_assert_eq!(carried, 0);
                        continue;
                    }
                    prop_assert_eq!(routes, 1, "route to {}", cidr);
                    let route = d.routes.iter().find(|r| r.dst == *cidr).expect("route");
                    if d.leader && route.dev == RouteDev::WireGuard {
                        prop_assert_eq!(carried, 1, "peer for {}", cidr);
                    } else {
                        prop_assert_eq!(carried, 0, "{} goes over the private network", cidr);
                    }
                }
            }
        }
    }

    /// Property: no node peers with itself.
    #[test]
    fn no_node_peers_with_itself(nodes in gens::cluster(10, true), full in any::<bool>()) {
        for local in &nodes {
            let Ok(plan) = compute(&nodes, &[], &local.name, &opts(full)) else { continue };
            prop_assert!(plan.desired.peers.iter().all(|p| Some(p.public_key) != local.key));
        }
    }

    /// Property: in a full mesh, a peers with b exactly when b peers with a, and every node
    /// peers with every other node.
    #[test]
    fn full_mesh_is_symmetric_and_complete(nodes in gens::cluster(10, true)) {
        let o = opts(true);
        let plans: BTreeMap<&str, DesiredState> = nodes.iter()
            .map(|n| (n.name.as_str(), compute(&nodes, &[], &n.name, &o).expect("ready").desired))
            .collect();
        for a in &nodes {
            for b in &nodes {
                if a.name == b.name { continue; }
                let ab = plans[a.name.as_str()].peers.iter().any(|p| Some(p.public_key) == b.key);
                let ba = plans[b.name.as_str()].peers.iter().any(|p| Some(p.public_key) == a.key);
                prop_assert!(ab && ba, "{} <-> {}", a.name, b.name);
            }
        }
    }
}

/// One random event over a small pool of names, so events hit existing nodes.
fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => (0..10u8).prop_flat_map(|i| gens::node(i, false)).prop_map(Event::node),
        12 => (0..10u8).prop_flat_map(|i| gens::node(i, true)).prop_map(Event::node),
        2 => (0..10u8).prop_map(|i| Event::NodeRemove(NodeName(format!("n{i:02}")))),
        1 => (0..3u8).prop_flat_map(gens::peer).prop_map(Event::PeerUpsert),
        1 => (0..3u8).prop_map(|i| Event::PeerRemove(NodeName(format!("p{i}")))),
    ]
}

fn full_state(
    nodes: &BTreeMap<NodeName, MeshNode>,
    peers: &BTreeMap<NodeName, MeshPeer>,
    local: &NodeName,
    o: &MeshOptions,
) -> Result<DesiredState, wiremesh::topology::LocalError> {
    let n: Vec<MeshNode> = nodes.values().cloned().collect();
    let p: Vec<MeshPeer> = peers.values().cloned().collect();
    compute(&n, &p, local, o).map(|p| p.desired)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property: any sequence of events applied incrementally ends in exactly the state a full
    /// recomputation gives, and the reported deltas replay to that same state.
    #[test]
    fn incremental_events_end_in_the_full_recompute_state(
        start in gens::cluster(8, true),
        events in prop::collection::vec(event(), 1..40),
        full in any::<bool>(),
        encap in prop_oneof![Just(Encapsulate::Never), Just(Encapsulate::Always), Just(Encapsulate::CrossSubnet)],
    ) {
        let mut o = opts(full);
        o.encapsulate = encap;
        let local = first(&start);
        let mut engine = Engine::new(start.clone(), Vec::new(), local.clone(), o.clone());
        let mut nodes: BTreeMap<NodeName, MeshNode> = start.into_iter().map(|n| (n.name.clone(), n)).collect();
        let mut peers: BTreeMap<NodeName, MeshPeer> = BTreeMap::new();
        let mut mirror = engine.desired();
        prop_assert_eq!(&mirror, &full_state(&nodes, &peers, &local, &o));
        for ev in events {
            apply_inputs(&mut nodes, &mut peers, std::slice::from_ref(&ev));
            match engine.apply(ev) {
                Update::Delta(d) => {
                    let m = mirror.as_mut().expect("a delta needs a previous state");
                    d.apply_to(m);
                }
                Update::Full(s) => mirror = Ok(s),
                Update::Unavailable(e) => mirror = Err(e),
            }
            let expected = full_state(&nodes, &peers, &local, &o);
            prop_assert_eq!(&engine.desired(), &expected);
            prop_assert_eq!(&mirror, &expected);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Property: batches of events end in the full recomputation's state, and their updates
    /// replay to it, whether a batch was taken event by event or folded into one recomputation.
    #[test]
    fn batches_end_in_the_full_recompute_state(
        start in gens::cluster(8, true),
        batches in prop::collection::vec(prop::collection::vec(event(), 1..12), 1..6),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let local = first(&start);
        let mut engine = Engine::new(start.clone(), Vec::new(), local.clone(), o.clone());
        let mut nodes: BTreeMap<NodeName, MeshNode> = start.into_iter().map(|n| (n.name.clone(), n)).collect();
        let mut peers: BTreeMap<NodeName, MeshPeer> = BTreeMap::new();
        let mut mirror = engine.desired();
        for batch in batches {
            apply_inputs(&mut nodes, &mut peers, &batch);
            let mut updates = Vec::new();
            engine.apply_batch(batch, |u| updates.push(u));
            for u in updates {
                match u {
                    Update::Delta(d) => {
                        let m = mirror.as_mut().expect("a delta needs a previous state");
                        d.apply_to(m);
                    }
                    Update::Full(s) => mirror = Ok(s),
                    Update::Unavailable(e) => mirror = Err(e),
                }
            }
            let expected = full_state(&nodes, &peers, &local, &o);
            prop_assert_eq!(&engine.desired(), &expected);
            prop_assert_eq!(&mirror, &expected);
        }
    }
}

/// `events` applied to the inputs `nodes` and `peers`, as the engine takes them.
fn apply_inputs(
    nodes: &mut BTreeMap<NodeName, MeshNode>,
    peers: &mut BTreeMap<NodeName, MeshPeer>,
    events: &[Event],
) {
    for ev in events {
        match ev {
            Event::NodeUpsert(n) => {
                nodes.insert(n.name.clone(), (**n).clone());
            }
            Event::NodeRemove(n) => {
                nodes.remove(n);
            }
            Event::PeerUpsert(p) => {
                peers.insert(p.name.clone(), p.clone());
            }
            Event::PeerRemove(p) => {
                peers.remove(p);
            }
        }
    }
}

/// The objects (node or external peer, by name) that `events` touch.
fn touched(events: &[Event]) -> BTreeSet<(bool, NodeName)> {
    events
        .iter()
        .map(|ev| {
            let (peer, name) = ev.object();
            (peer, name.clone())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Property: a batch split into its cheap and costly events (the agent reconciles the cheap
    /// ones first, and may hold the costly ones over several batches) keeps every object's
    /// events on one side and behind its held ones; the engine after each step has the full
    /// recomputation's state of the inputs applied so far, and it ends where the batches
    /// folded whole end.
    #[test]
    fn batches_split_into_cheap_and_costly_events_end_in_the_full_recompute_state(
        start in gens::cluster(8, true),
        batches in prop::collection::vec(
            (prop::collection::vec(event(), 1..12), any::<bool>()),
            1..6,
        ),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let local = first(&start);
        let mut split = Engine::new(start.clone(), Vec::new(), local.clone(), o.clone());
        let mut folded = Engine::new(start.clone(), Vec::new(), local.clone(), o.clone());
        let mut nodes: BTreeMap<NodeName, MeshNode> = start.into_iter().map(|n| (n.name.clone(), n)).collect();
        let mut peers: BTreeMap<NodeName, MeshPeer> = BTreeMap::new();
        let mut held: Vec<Event> = Vec::new();
        for (batch, hold) in batches {
            let (cheap, costly) = split.split_costly(batch.clone(), &held);
            prop_assert_eq!(cheap.len() + costly.len(), batch.len());
            prop_assert!(touched(&cheap).is_disjoint(&touched(&costly)));
            prop_assert!(touched(&cheap).is_disjoint(&touched(&held)));
            prop_assert!(cheap.iter().all(|ev| !split.costly(ev)));
            apply_inputs(&mut nodes, &mut peers, &cheap);
            split.fold_batch(cheap);
            prop_assert_eq!(&split.desired(), &full_state(&nodes, &peers, &local, &o));
            held.extend(costly);
            if !hold {
                apply_inputs(&mut nodes, &mut peers, &held);
                split.fold_batch(std::mem::take(&mut held));
                prop_assert_eq!(&split.desired(), &full_state(&nodes, &peers, &local, &o));
            }
            folded.fold_batch(batch);
        }
        apply_inputs(&mut nodes, &mut peers, &held);
        split.fold_batch(held);
        let expected = full_state(&nodes, &peers, &local, &o);
        prop_assert_eq!(&split.desired(), &expected);
        prop_assert_eq!(&folded.desired(), &expected);
    }
}

#[test]
fn a_batch_with_a_leave_is_folded_into_one_recomputation_without_the_fast_path() {
    let nodes = mesh(300);
    let mut engine = Engine::new(
        nodes.clone(),
        Vec::new(),
        NodeName("n000".into()),
        opts(true),
    );
    // A move, then a node leaving the middle of the mesh (renumbering the 150 segments after
    // it): the fast path would recompute those before giving up; the fold goes straight to one
    // recomputation.
    let mut moved = nodes[10].clone();
    moved.endpoint = Some("198.51.100.7:4000".parse().unwrap());
    let leave = Event::NodeRemove(nodes[150].name.clone());
    assert!(engine.costly(&leave));
    assert!(!engine.costly(&Event::node(moved.clone())));
    let before = engine.stats();
    engine.fold_batch([Event::node(moved.clone()), leave]);
    let after = engine.stats();
    assert_eq!(after.full - before.full, 1, "one recomputation: {after:?}");
    assert_eq!(
        after.incremental, before.incremental,
        "no fast path: {after:?}"
    );
    let mut rest: BTreeMap<NodeName, MeshNode> =
        nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
    rest.remove(&NodeName("n150".into()));
    rest.insert(moved.name.clone(), moved);
    assert_eq!(
        engine.desired(),
        full_state(
            &rest,
            &BTreeMap::new(),
            &NodeName("n000".into()),
            &opts(true)
        )
    );
}

/// A full mesh of `n` ready nodes `n000`… (the local node is `n000`).
fn mesh(n: usize) -> Vec<MeshNode> {
    (0..n)
        .map(|i| {
            let mut m = MeshNode::new(format!("n{i:03}"));
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            m.key = Some(wiremesh::model::WgKey(key));
            m.endpoint = Some(
                format!("203.0.113.{}:{}", i % 250, 1024 + i)
                    .parse()
                    .unwrap(),
            );
            m.pod_cidrs = vec![
                format!("10.{}.{}.0/24", 64 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
            ];
            m
        })
        .collect()
}

#[test]
fn a_burst_of_nodes_leaving_a_full_mesh_is_folded_into_one_recomputation() {
    let nodes = mesh(300);
    let mut engine = Engine::new(
        nodes.clone(),
        Vec::new(),
        NodeName("n000".into()),
        opts(true),
    );
    // Each leave renumbers every segment after it: ten of them, one by one, would recompute
    // more than ten times what one full recomputation does.
    let burst: Vec<Event> = (100..110)
        .map(|i| Event::NodeRemove(nodes[i].name.clone()))
        .collect();
    let before = engine.stats();
    let mut updates = Vec::new();
    engine.apply_batch(burst, |u| updates.push(u));
    let after = engine.stats();
    assert_eq!(after.full - before.full, 1, "one recomputation: {after:?}");
    assert!(updates.len() < 10, "{} updates", updates.len());
    let rest: Vec<MeshNode> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(100..110).contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    let expected = full_state(
        &rest.into_iter().map(|n| (n.name.clone(), n)).collect(),
        &BTreeMap::new(),
        &NodeName("n000".into()),
        &opts(true),
    );
    assert_eq!(engine.desired(), expected);
}

#[test]
fn a_burst_of_endpoint_moves_smaller_than_the_mesh_stays_on_the_fast_path() {
    let nodes = mesh(300);
    let mut engine = Engine::new(
        nodes.clone(),
        Vec::new(),
        NodeName("n000".into()),
        opts(true),
    );
    // 80 moves recompute 80 segments, less than one recomputation of 300 costs.
    let burst: Vec<Event> = (1..81)
        .map(|i| {
            let mut n = nodes[i].clone();
            n.endpoint = Some(format!("198.51.100.{}:4000", i % 250).parse().unwrap());
            Event::node(n)
        })
        .collect();
    let mut updates = Vec::new();
    engine.apply_batch(burst, |u| updates.push(u));
    assert_eq!(updates.len(), 80, "one update per event");
    assert_eq!(
        engine.stats().full,
        1,
        "only the initial build: {:?}",
        engine.stats()
    );
}

#[test]
fn incremental_endpoint_move_touches_only_that_peer() {
    let nodes: Vec<MeshNode> = (0..50u8)
        .map(|i| {
            let mut n = MeshNode::new(format!("n{i:02}"));
            n.key = Some(gens::key(i));
            n.endpoint = Some(format!("203.0.113.{i}:51820").parse().unwrap());
            n.pod_cidrs = vec![format!("10.42.{i}.0/24").parse().unwrap()];
            n
        })
        .collect();
    let mut engine = Engine::new(
        nodes.clone(),
        Vec::new(),
        NodeName("n00".into()),
        opts(true),
    );
    let mut moved = nodes[7].clone();
    moved.endpoint = Some("198.51.100.1:4000".parse().unwrap());
    let Update::Delta(d) = engine.apply(Event::node(moved)) else {
        panic!("expected a delta")
    };
    assert_eq!(d.peers_upserted.len(), 1);
    assert_eq!(
        d.peers_upserted[0].endpoint.as_ref().unwrap().to_string(),
        "198.51.100.1:4000"
    );
    assert!(d.peers_removed.is_empty() && d.routes_added.is_empty() && d.routes_removed.is_empty());
    assert!(d.masquerade.is_none());
    assert_eq!(
        engine.stats().incremental,
        1,
        "an endpoint move takes the incremental path"
    );
    // And the build() view agrees on which nodes exist.
    assert_eq!(build(&nodes, &[], &opts(true)).segments.len(), 50);
}

#[test]
fn random_event_sequences_exercise_both_paths() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let strategy = (
        gens::cluster(8, true),
        prop::collection::vec(event(), 1..40),
        any::<bool>(),
    );
    let mut total = wiremesh::topology::incremental::EngineStats::default();
    for _ in 0..64 {
        let (start, events, full) = strategy.new_tree(&mut runner).expect("value").current();
        let local = first(&start);
        let mut engine = Engine::new(start, Vec::new(), local, opts(full));
        for ev in events {
            engine.apply(ev);
        }
        total.incremental += engine.stats().incremental;
        total.full += engine.stats().full;
    }
    assert!(
        total.incremental > 100,
        "incremental path taken {} times",
        total.incremental
    );
    assert!(total.full > 64, "full path taken {} times", total.full);
}
