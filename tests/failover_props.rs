//! Properties of leader failover (`topology::elect_leader`): whatever the forwarding reports,
//! every location has exactly one leader and every node of it agrees; a leader most of its
//! location reports is passed over unless every candidate is; without reports, or with one node
//! that does not report, the leader is Kilo's.

use proptest::prelude::*;
use wiremesh::model::{MeshNode, NodeName};
use wiremesh::topology::{build, compute, find_leader, forwarding_failed};

use crate::util::strategy as gens;

use gens::opts;

/// Nodes with random forwarding reports naming nodes of the cluster (`None`: no report).
fn reporting(max: u8) -> impl Strategy<Value = Vec<MeshNode>> {
    let report = prop::option::weighted(0.9, prop::collection::btree_set(0..max, 0..3));
    (
        gens::cluster(max, true),
        prop::collection::vec(report, max as usize),
    )
        .prop_map(|(mut nodes, reports)| {
            let names: Vec<NodeName> = nodes.iter().map(|n| n.name.clone()).collect();
            for (n, r) in nodes.iter_mut().zip(reports) {
                n.forwarding_failed = r.map(|r| {
                    r.into_iter()
                        .filter_map(|i| names.get(usize::from(i)).cloned())
                        .collect()
                });
            }
            nodes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Property: each node's own plan says it leads exactly when the mesh's segment says so:
    /// one leader per location, and every member routes its location's remote traffic to that
    /// leader's internal IP.
    #[test]
    fn every_location_has_one_leader_that_all_its_nodes_agree_on(nodes in reporting(10)) {
        let o = opts(false);
        let t = build(&nodes, &[], &o);
        for s in &t.segments {
            let leader = s.leader_node();
            for n in &s.nodes {
                let plan = compute(&nodes, &[], &n.name, &o).expect("a node of the mesh");
                prop_assert_eq!(plan.desired.leader, n.name == leader.name, "{}", n.name);
                if n.name != leader.name && let Some(ip) = leader.internal_ip {
                    let gateways: Vec<_> = plan.desired.routes.iter()
                        .filter(|r| r.table == wiremesh::desired::MAIN_TABLE && r.dst == wiremesh::model::network_of(o.subnet))
                        .map(|r| r.gateway)
                        .collect();
                    prop_assert_eq!(gateways, vec![Some(ip.ip())], "{} routes the mesh to its leader", n.name);
                }
            }
        }
    }

    /// Property: the leader is Kilo's when no node reports anything or some node of the
    /// location does not report at all; otherwise a reported leader leads only when every node
    /// of the location is reported (Kilo's then), and no unreported candidate ranks before it.
    #[test]
    fn a_reported_leader_leads_only_when_every_candidate_is(nodes in reporting(10)) {
        let t = build(&nodes, &[], &opts(false));
        for s in &t.segments {
            let all_report = s.nodes.iter().all(|n| n.forwarding_failed.is_some());
            let failed: Vec<bool> = (0..s.nodes.len()).map(|i| forwarding_failed(&s.nodes, i)).collect();
            prop_assert_eq!(s.preferred, find_leader(&s.nodes));
            if !all_report || !failed.contains(&true) || s.nodes.len() < 2 {
                prop_assert_eq!(s.leader, s.preferred);
            } else if failed.iter().all(|&f| f) {
                prop_assert_eq!(s.leader, s.preferred);
            } else {
                prop_assert!(!failed[s.leader], "a reported node leads {}", s.key);
            }
        }
    }
}

#[test]
fn the_strategy_produces_failovers() {
    // Not a property: the generator must reach the case the properties are about.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut failovers = 0;
    for _ in 0..512 {
        let nodes = reporting(10)
            .new_tree(&mut runner)
            .expect("value")
            .current();
        let t = build(&nodes, &[], &opts(false));
        failovers += t
            .segments
            .iter()
            .filter(|s| s.leader != s.preferred)
            .count();
    }
    assert!(failovers > 10, "only {failovers} failovers in 512 clusters");
}
