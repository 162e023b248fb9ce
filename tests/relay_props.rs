//! Properties of relays (`topology::relays`): segments whose leaders report each other
//! unreachable reach each other through exactly one third segment that reaches both, every
//! node agrees on it, and only WireGuard allowed IPs move.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use proptest::prelude::*;
use wiremesh::desired::DesiredState;
use wiremesh::model::{MeshNode, WgKey};
use wiremesh::topology::{Topology, build, compute};

use crate::util::strategy as gens;

use gens::opts;

/// The same nodes with every report withdrawn (each agent still reports, nothing unreachable).
fn without_reports(nodes: &[MeshNode]) -> Vec<MeshNode> {
    nodes
        .iter()
        .cloned()
        .map(|mut n| {
            n.unreachable = n.unreachable.map(|_| BTreeSet::new());
            n
        })
        .collect()
}

/// Allowed IPs of each peer, by key.
fn allowed(d: &DesiredState) -> BTreeMap<WgKey, BTreeSet<IpNetwork>> {
    d.peers
        .iter()
        .map(|p| (p.public_key, p.allowed_ips.iter().copied().collect()))
        .collect()
}

/// Whether the leader of segment `i` reports the leader of `j`.
fn reports(t: &Topology<'_>, i: usize, j: usize) -> bool {
    let (a, b) = (t.segments[i].leader_node(), t.segments[j].leader_node());
    a.unreachable
        .as_ref()
        .zip(b.key)
        .is_some_and(|(u, k)| u.contains(&k))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property: every relayed pair is a reported pair of reporting agents, through a segment
    /// that neither end reports or is reported by (so it reaches both directly: no chain, no
    /// loop), each pair at most once; and a reported pair of reporting agents is relayed
    /// whenever such a segment exists.
    #[test]
    fn relays_join_only_reported_pairs_through_a_segment_that_reaches_both(
        nodes in gens::reporting_cluster(10),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let t = build(&nodes, &[], &o);
        let blocked = |i: usize, j: usize| reports(&t, i, j) || reports(&t, j, i);
        let agent = |i: usize| t.segments[i].leader_node().unreachable.is_some();
        let mut pairs = BTreeSet::new();
        for r in &t.relays {
            prop_assert!(r.a < r.b, "{:?}", r);
            prop_assert!(pairs.insert((r.a, r.b)), "pair relayed twice: {:?}", r);
            prop_assert!(blocked(r.a, r.b), "an unreported pair is relayed: {:?}", r);
            prop_assert!(agent(r.a) && agent(r.b) && agent(r.via));
            prop_assert!(r.via != r.a && r.via != r.b);
            prop_assert!(!blocked(r.a, r.via) && !blocked(r.b, r.via), "relay not reached: {:?}", r);
        }
        let n = t.segments.len();
        for a in 0..n {
            for b in a + 1..n {
                if !(blocked(a, b) && agent(a) && agent(b)) {
                    continue;
                }
                let any_relay = (0..n).any(|r| r != a && r != b && agent(r) && !blocked(a, r) && !blocked(b, r));
                prop_assert_eq!(pairs.contains(&(a, b)), any_relay, "pair {} {}", a, b);
            }
        }
    }

    /// Property: both ends of a relayed pair agree on the relay, and the relay forwards
    /// between them directly; every allowed IP reaches one peer, the relayed segment's on the
    /// relay's peer and the relayed peer keeps none (but a keepalive, to try the direct path);
    /// routes, rules and masquerading are those of the same mesh without reports.
    #[test]
    fn a_relay_moves_only_allowed_ips_and_both_ends_agree(
        nodes in gens::reporting_cluster(10),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let t = build(&nodes, &[], &o);
        let plain = without_reports(&nodes);
        for (l, seg) in t.segments.iter().enumerate() {
            let leader = seg.leader_node();
            let relayed = t.relayed_from(l);
            let (Ok(with), Ok(without)) = (
                compute(&nodes, &[], &leader.name, &o),
                compute(&plain, &[], &leader.name, &o),
            ) else {
                continue;
            };
            let (with, without) = (with.desired, without.desired);
            prop_assert_eq!(&with.routes, &without.routes);
            prop_assert_eq!(&with.rules, &without.rules);
            prop_assert_eq!(&with.masquerade, &without.masquerade);
            let (a, b) = (allowed(&with), allowed(&without));
            prop_assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (key, ips) in &b {
                match relayed.get(key) {
                    Some(via) => {
                        prop_assert!(a[key].is_empty(), "a relayed peer keeps allowed IPs");
                        prop_assert!(ips.is_subset(&a[via]), "the relay's peer lacks them");
                        prop_assert!(!relayed.contains_key(via), "a relay reached through a relay");
                        let p = with.peers.iter().find(|p| p.public_key == *key).expect("peer");
                        prop_assert!(p.persistent_keepalive != 0, "the direct path is not tried");
                        // The other end relays this segment through the same relay.
                        let other = t.segments.iter().position(|s| s.public_key() == Some(*key)).expect("segment");
                        let back = t.relayed_from(other);
                        prop_assert_eq!(back.get(&seg.public_key().expect("key")), Some(via));
                    }
                    None => prop_assert!(ips.is_subset(&a[key]), "a direct peer lost allowed IPs"),
                }
            }
            let count = |m: &BTreeMap<WgKey, BTreeSet<IpNetwork>>| m.values().map(BTreeSet::len).sum::<usize>();
            prop_assert_eq!(count(&a), count(&b), "allowed IPs added or lost");
        }
    }

    /// Property: without a report the mesh is Kilo's: agents that report nothing compute what
    /// agents that do not report at all (Kilo's) compute.
    #[test]
    fn without_reports_the_mesh_is_kilos(
        nodes in gens::cluster(10, false),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let reporting = without_reports(&nodes);
        let kilo: Vec<MeshNode> = nodes.iter().cloned().map(|mut n| { n.unreachable = None; n }).collect();
        prop_assert!(build(&reporting, &[], &o).relays.is_empty());
        for n in &nodes {
            prop_assert_eq!(
                compute(&reporting, &[], &n.name, &o).map(|p| p.desired),
                compute(&kilo, &[], &n.name, &o).map(|p| p.desired)
            );
        }
    }
}

#[test]
fn two_nated_segments_go_through_the_first_public_one_and_back_once_direct_works() {
    let o = opts(true);
    let mut nodes: Vec<MeshNode> = (0..4u8)
        .map(|i| {
            let mut n = gens::fixed_node(i);
            n.unreachable = Some(BTreeSet::new());
            n
        })
        .collect();
    // n00 and n01 sit behind NAT (keepalive): n00 reports n01. n02 and n03 are public.
    nodes[0].persistent_keepalive = 25;
    nodes[1].persistent_keepalive = 25;
    nodes[0].unreachable = Some([gens::key(1)].into());
    let t = build(&nodes, &[], &o);
    assert_eq!(t.relays.len(), 1);
    let r = t.relays[0];
    assert_eq!(
        (r.a, r.b, r.via),
        (0, 1, 2),
        "the first segment without keepalive relays"
    );
    let d = compute(&nodes, &[], &nodes[1].name, &o).unwrap().desired;
    let peer = |k: WgKey| d.peers.iter().find(|p| p.public_key == k).unwrap();
    assert!(peer(gens::key(0)).allowed_ips.is_empty());
    assert!(
        peer(gens::key(2))
            .allowed_ips
            .contains(&nodes[0].pod_cidrs[0])
    );

    // n02 cannot reach n00 either: n03 relays.
    nodes[2].unreachable = Some([gens::key(0)].into());
    let t = build(&nodes, &[], &o);
    assert!(
        t.relays.iter().any(|r| (r.a, r.b, r.via) == (0, 1, 3)),
        "{:?}",
        t.relays
    );

    // The direct path works again: the reports are withdrawn, nothing is relayed.
    nodes[0].unreachable = Some(BTreeSet::new());
    nodes[2].unreachable = Some(BTreeSet::new());
    assert!(build(&nodes, &[], &o).relays.is_empty());
    let d = compute(&nodes, &[], &nodes[1].name, &o).unwrap().desired;
    let peer = |k: WgKey| d.peers.iter().find(|p| p.public_key == k).unwrap();
    assert_eq!(
        peer(gens::key(0)).allowed_ips.len(),
        2,
        "pod CIDR and mesh IP back on n00's peer"
    );
}

#[test]
fn a_kilo_end_is_never_relayed_and_the_report_says_why() {
    let o = opts(true);
    let mut nodes: Vec<MeshNode> = (0..3u8).map(gens::fixed_node).collect();
    nodes[0].unreachable = Some([gens::key(1)].into());
    nodes[2].unreachable = Some(BTreeSet::new());
    // n01 runs Kilo: it reports nothing and would drop relayed packets.
    let t = build(&nodes, &[], &o);
    assert!(t.relays.is_empty());
    assert!(
        t.diagnostics.iter().any(|d| d.name == "n00"
            && d.key.as_deref() == Some("wiremesh.io/unreachable")
            && d.problem.contains("n01")
            && d.problem.contains("does not relay")),
        "{:?}",
        t.diagnostics
    );
}
