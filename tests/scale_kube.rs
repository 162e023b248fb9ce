//! The agent under load, small enough for CI: a real etcd + kube-apiserver holding 400
//! synthetic Nodes, one real `wiremesh agent` (userspace WireGuard) in its own namespace, a
//! burst of 300 changes (endpoint moves, location changes, joins and leaves) sent as fast as the
//! API server takes them. The full-size run with figures is `benches/scale.sh`
//! (`examples/scale_load.rs`); both use `util::scale`.
//!
//! Each test asserts that the agent converges before and after the burst to exactly what
//! `meshctl plan` computes from the same API server (WireGuard peers with endpoints, allowed
//! IPs and keepalives; routes; rules; address; port), that it took the burst in fewer
//! reconciliations than changes, and that nothing is left once the harness is dropped
//! (namespaces, agent, wireguard-go, etcd, kube-apiserver). Needs root and the kube-apiserver of
//! `tests/apiserver/setup.sh`: `--features netns-tests,apiserver-tests`.

use std::path::PathBuf;
use std::time::Duration;

use crate::util::scale::{Mix, Options, Scale, StreamOptions, activity};

const NODES: usize = 400;
const CHANGES: usize = 300;

fn require_tools() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    assert!(root, "the scale tests must run as root");
    for tool in ["ip", "wireguard-go", "etcd", "openssl", "nft"] {
        assert!(
            wiremesh::lab::sys::find_program(tool).is_some(),
            "the scale tests need `{tool}` on PATH"
        );
    }
    assert!(
        std::path::Path::new(wiremesh::lab::apiserver::DEFAULT_APISERVER_BIN).exists(),
        "no kube-apiserver at {}: run tests/apiserver/setup.sh",
        wiremesh::lab::apiserver::DEFAULT_APISERVER_BIN
    );
}

/// Whether any process of `pids` still runs (zombies count as gone).
fn any_alive(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|p| wiremesh::lab::sys::start_time(*p).is_some())
        .collect()
}

fn burst_is_batched_and_ends_in_the_plan(granularity: &str) {
    require_tools();
    let mut s = Scale::new(Options {
        nodes: NODES,
        per_location: 10,
        granularity: granularity.to_owned(),
        wiremesh: PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")),
        meshctl: PathBuf::from(env!("CARGO_BIN_EXE_meshctl")),
    });
    s.create_nodes(16);
    s.start_agent();
    let (_, first) = s.wait_converged(Duration::from_secs(60));
    let expected_peers = match granularity {
        "full" => NODES + 1,
        _ => NODES / 10 + 1,
    };
    assert_eq!(
        first.peers.len(),
        expected_peers,
        "every synthetic segment and the probe are peers"
    );

    let rep = s.stream(&StreamOptions {
        rate: 5_000.0,
        changes: CHANGES,
        concurrency: 32,
        probe_every: 0,
        mix: Mix {
            moves: 60,
            relocations: 20,
            adds: 10,
            removes: 10,
        },
        seed: 7,
    });
    assert_eq!(
        rep.refused, 0,
        "the API server refused changes: {:?}",
        rep.first_error
    );
    assert_eq!(rep.accepted_total(), CHANGES);
    let (done, last) = s.wait_converged(Duration::from_secs(60));
    assert_ne!(first, last, "the burst changed the agent's state");

    let a = activity(&s.log(), rep.first_sent, done);
    eprintln!(
        "{granularity}: {CHANGES} changes at {:.0}/s: {} registry batches, {} engine events, \
         {} reconciliations, {} kernel operations",
        rep.achieved_rate(),
        a.batches,
        a.engine_events,
        a.reconciles,
        a.ops
    );
    assert!(
        a.reconciles >= 1 && a.reconciles < CHANGES,
        "{} changes took {} reconciliations ({} registry batches): not batched",
        CHANGES,
        a.reconciles,
        a.batches
    );
    assert_eq!(a.warnings, 0, "warnings:\n{}", s.log_tail(40));

    let namespaces = [s.api_ns.clone(), s.agent_ns.clone()];
    let mut pids = s.pids();
    pids.push(s.agent_pid());
    assert!(
        pids.len() >= 4,
        "agent, wireguard-go, etcd, kube-apiserver: {pids:?}"
    );
    drop(s);
    let left: Vec<String> = wiremesh::lab::sys::netns_list()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(
        any_alive(&pids).is_empty(),
        "processes left: {:?}",
        any_alive(&pids)
    );
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn scale_full_mesh_of_400_takes_a_burst_batched_ends_exactly_in_the_plan_and_leaves_nothing() {
    burst_is_batched_and_ends_in_the_plan("full");
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn scale_locations_of_400_take_a_burst_batched_end_exactly_in_the_plan_and_leave_nothing() {
    burst_is_batched_and_ends_in_the_plan("location");
}
