//! `meshctl lab chaos restart-agent` end to end (file registry): a node's agent is killed with
//! SIGKILL and started again while its pod pings every other node's pod. Needs root and the
//! lab's tools: `--features netns-tests`. The API-server outage runs in `lab_kube`.

use std::time::Duration;

use crate::util::lab::{Lab, first_pod, node, peer, poll, require_tools, text};

/// The `kinds=[…]` of the restarted agent's first reconciliation in a chaos report.
fn first_reconciliation(report: &str) -> &str {
    report
        .lines()
        .find_map(|l| l.split_once("its first reconciliation:").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no first reconciliation in the report:\n{report}"))
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces: --features netns-tests"
)]
fn chaos_restart_agent_loses_no_packet_and_the_new_agent_rewrites_no_peer() {
    require_tools(&[]);
    let lab = Lab::new("kr");
    // The default lab: three clouds, the last node behind NAT.
    let up = lab.up(&[]);
    assert!(up.status.success(), "{}", text(&up));
    let status = lab.status();
    let names: Vec<String> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().expect("name").to_owned())
        .collect();
    for target in [&names[0], &names[2]] {
        let old_pid = node(&lab.status(), target)["agent_pid"].as_u64();
        let out = lab.run(&["lab", "chaos", "restart-agent", target]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "chaos on {target}: {}", text(&out));
        assert!(report.contains("killed with SIGKILL"), "{report}");
        assert!(report.contains(", 0 lost"), "{report}");
        // One flow per other node, each with traffic.
        assert_eq!(
            report.matches(&format!("({target}) ->")).count(),
            2,
            "{report}"
        );
        // The new agent adopted the device as it was: no peer written again.
        let first = first_reconciliation(&report);
        assert!(
            !first.contains("peer"),
            "peers rewritten on restart: {first}"
        );
        let s = lab.status();
        let n = node(&s, target);
        assert_eq!(n["agent_running"], true, "{n}");
        assert_ne!(n["agent_pid"].as_u64(), old_pid, "a new agent runs: {n}");
        // Handshakes survived: every peer of the restarted node has one.
        for p in n["peers"].as_array().expect("peers") {
            assert!(!p["latest_handshake_secs_ago"].is_null(), "{p}");
        }
    }
    lab.check_passes();
    lab.down_and_assert_gone();
}

/// The `max gap` column of every flow of a chaos report, in seconds.
fn gaps(report: &str) -> Vec<f64> {
    report
        .lines()
        .filter(|l| l.contains(") -> "))
        .filter_map(|l| l.split_whitespace().last()?.strip_suffix('s')?.parse().ok())
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces: --features netns-tests"
)]
fn an_agent_stopped_for_ten_seconds_leaks_nothing_and_loses_nothing() {
    require_tools(&[]);
    let lab = Lab::new("ks");
    let up = lab.up(&["--nodes", "3", "--locations", "3", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let out = lab.run(&["lab", "chaos", "stop-agent", "node1", "10"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(report.contains("(it stayed stopped for 10s)"), "{report}");
    assert!(
        report.contains("plaintext pod packets on the underlay: 0"),
        "{report}"
    );
    assert!(report.contains(", 0 lost"), "{report}");
    assert_eq!(report.matches("(node1) ->").count(), 2, "{report}");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces: --features netns-tests"
)]
fn renumbering_the_mesh_under_pings_sends_no_plaintext_and_loses_no_packet() {
    // The measurement: a 4-node full mesh, node2 leaves the nodes file and comes back
    // (node3 and node4 are renumbered twice) while node3's and node4's pods ping node1's pod
    // and node1's pings node4's. Before the fix: 312 plaintext pod packets in 16 s and a cut.
    require_tools(&[]);
    let lab = Lab::new("kn");
    let up = lab.up(&["--nodes", "4", "--locations", "4", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let before = lab.ip("n3", &["-j", "addr", "show", "dev", "wiremesh0"]);
    let out = lab.run(&["lab", "chaos", "renumber", "node2"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{report}");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        report.contains("node2 taken out of the nodes file"),
        "{report}"
    );
    assert!(report.contains("converged without it"), "{report}");
    assert!(
        report.contains("node2 put back into the nodes file"),
        "{report}"
    );
    assert!(
        report.contains("plaintext pod packets on the underlay: 0"),
        "{report}"
    );
    assert!(report.contains(", 0 lost"), "{report}");
    for f in ["(node3) -> node1", "(node4) -> node1", "(node1) -> node4"] {
        assert!(report.contains(f), "no flow {f}: {report}");
    }
    assert!(gaps(&report).iter().all(|g| *g == 0.0), "{report}");
    // node3 came back to its old mesh IP: renumbered twice, as the test means.
    assert_eq!(
        lab.ip("n3", &["-j", "addr", "show", "dev", "wiremesh0"]),
        before
    );
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces: --features netns-tests"
)]
fn chaos_refuses_an_unknown_node_and_a_lab_without_api_server() {
    require_tools(&[]);
    let lab = Lab::new("kx");
    let up = lab.up(&["--nodes", "2", "--locations", "2", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    let out = lab.run(&["lab", "chaos", "restart-agent", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("has no node nosuch"), "{}", text(&out));
    let out = lab.run(&["lab", "chaos", "apiserver-outage", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("kube"), "{}", text(&out));
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces: --features netns-tests"
)]
fn a_route_the_kernel_refuses_is_reported_and_retried_with_backoff_while_the_rest_works() {
    require_tools(&[]);
    let lab = Lab::new("kk");
    let up = lab.up(&["--nodes", "3", "--locations", "3", "--nat", "0"]);
    assert!(up.status.success(), "{}", text(&up));
    // Someone else's route on node1 holds the destination node4's pods will have: node1's agent
    // must not replace it, so its own route there is refused by the kernel.
    let dst = "10.201.4.0/24";
    lab.ip("n1", &["route", "add", dst, "dev", "lo", "proto", "static"]);
    assert!(
        lab.ip("n1", &["route", "show", dst])
            .contains("proto static")
    );
    lab.ok(&["lab", "node", "add", "node4"]);
    let s = lab.status();
    let (pod4, ip4) = first_pod(node(&s, "node4"));
    assert!(
        ip4.starts_with("10.201.4."),
        "node4's pods are in {dst}: {ip4}"
    );
    let log1 = lab.state().nodes[0].agent_log();
    let refusals = || {
        std::fs::read_to_string(&log1)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("kernel refused an operation"))
            .count()
    };
    let first = poll(Duration::from_secs(20), || (refusals() >= 1).then_some(()));
    assert!(first.is_some(), "no refusal reported");
    let t0 = std::time::Instant::now();
    let log = std::fs::read_to_string(&log1).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("kernel refused an operation"))
        .expect("a refusal line");
    assert!(line.contains("route") && line.contains(dst), "{line}");
    // Everything else is programmed: node1 has node4's peer, and the other nodes reach node4.
    let key4 = lab.public_key("node4");
    assert!(peer(node(&lab.status(), "node1"), &key4).is_some());
    let (pod2, _) = first_pod(node(&s, "node2"));
    assert!(lab.pod_pings(&pod2, &ip4), "{pod2} -> {ip4}");
    let (pod1, ip1) = first_pod(node(&s, "node1"));
    assert!(lab.pod_pings(&pod1, &first_pod(node(&s, "node3")).1));
    // Retried with backoff (1 s, 2 s, 4 s, … plus jitter), not in a hot loop.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(t0.elapsed()));
    let n = refusals();
    assert!((2..=6).contains(&n), "{n} refusals in ~8 s");
    // The foreign route stays untouched throughout.
    assert!(
        lab.ip("n1", &["route", "show", dst])
            .contains("proto static")
    );
    // wiremesh's guard for the destination is in, below the foreign route (which wins).
    assert!(
        lab.ip("n1", &["route", "show", dst]).contains("blackhole"),
        "{}",
        lab.ip("n1", &["route", "show", dst])
    );
    // Once it is gone, the next retry installs wiremesh's route and node1 reaches node4's pods
    // (until then the guard drops their packets: nothing leaves by the default route).
    lab.ip("n1", &["route", "del", dst, "proto", "static"]);
    let fixed = poll(Duration::from_secs(40), || {
        lab.ip("n1", &["route", "show", dst])
            .lines()
            .any(|l| l.contains("dev wiremesh0") && l.contains("proto 104"))
            .then_some(())
    });
    assert!(fixed.is_some(), "the route was not retried");
    assert!(lab.pod_pings(&pod1, &ip4), "{pod1} -> {ip4}");
    assert!(lab.pod_pings(&pod4, &ip1), "{pod4} -> {ip1}");
    lab.check_passes();
    lab.down_and_assert_gone();
}
