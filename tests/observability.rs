//! The agent's HTTP endpoint and what reads it: `meshctl status`, `meshctl lab status NODE`,
//! `meshctl lab graph --live`.
//!
//! Without root: `meshctl status` against no agent is one line and exit code 1. With root
//! (`--features netns-tests`): a lab of real agents, pods pinging each other through the
//! tunnels, then every agent's `/metrics` (parsed: a handshake age per peer, small, bytes both
//! ways), `/readyz`, `/healthz`, `/status`, the private key absent from all of them, and the lab
//! commands that read them. Each lab has its own name and a guard that runs `lab down` when the
//! test ends, also on panic.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::util::lab::{Lab, first_pod, node, poll, require_tools, text};

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

#[test]
fn meshctl_status_without_an_agent_is_one_line_and_exit_code_1() {
    // A port nothing listens on: bind one, learn it, close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let agent = format!("http://127.0.0.1:{port}");
    let o = Command::new(MESHCTL)
        .args(["status", "--agent", &agent])
        .output()
        .expect("meshctl runs");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("meshctl: cannot reach the agent at {agent}")),
        "{stderr}"
    );
    assert!(o.stdout.is_empty());

    let o = Command::new(MESHCTL)
        .args(["status", "--agent", "https://127.0.0.1:1107"])
        .output()
        .expect("meshctl runs");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only http://"));
}

/// One sample of an OpenMetrics text: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an OpenMetrics text (label values without escapes, as ours are).
fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or_else(|| panic!("{l}"))),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap_or_else(|| panic!("{l}"));
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("{l}")),
            }
        })
        .collect()
}

/// The value of `name` for the peer with `key`, if there is one.
fn peer_value(samples: &[Sample], name: &str, key: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get("public_key").map(String::as_str) == Some(key))
        .map(|s| s.value)
}

#[test]
#[cfg_attr(
    not(feature = "netns-tests"),
    ignore = "needs root and network namespaces"
)]
fn agents_serve_fresh_handshakes_readiness_and_status_and_the_lab_shows_them() {
    require_tools(&[]);
    let lab = Lab::new("ob");
    // Three clouds, full mesh, par-1 behind NAT.
    let up = lab.up(&[]);
    assert!(up.status.success(), "{}", text(&up));
    let status = lab.status();
    let names = ["fra-1", "hel-1", "par-1"];
    // Pods ping each other: every tunnel carries traffic and gets a handshake.
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            let (pod_a, ip_a) = first_pod(node(&status, a));
            let (pod_b, ip_b) = first_pod(node(&status, b));
            assert!(lab.pod_pings(&pod_a, &ip_b), "{pod_a} -> {ip_b}");
            assert!(lab.pod_pings(&pod_b, &ip_a), "{pod_b} -> {ip_a}");
        }
    }
    let state = lab.state();
    for n in names {
        let ready = poll(Duration::from_secs(10), || {
            let r = wiremesh::lab::probe::agent_get(&state, n, "/readyz").ok()?;
            (r.code == 200).then_some(r)
        });
        assert_eq!(
            ready.map(|r| r.body).as_deref(),
            Some("ready\n"),
            "{n} /readyz"
        );
        let health = wiremesh::lab::probe::agent_get(&state, n, "/healthz").expect("healthz");
        assert_eq!((health.code, health.body.as_str()), (200, "ok\n"), "{n}");

        let metrics = wiremesh::lab::probe::agent_get(&state, n, "/metrics").expect("metrics");
        assert_eq!(metrics.code, 200, "{n}");
        let samples = parse_metrics(&metrics.body);
        let one = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{n}: no {name}:\n{}", metrics.body))
                .value
        };
        assert_eq!(one("wiremesh_ready"), 1.0, "{n}");
        assert_eq!(one("wiremesh_wireguard_up"), 1.0, "{n}");
        assert_eq!(one("wiremesh_mesh_nodes"), 3.0, "{n}");
        assert_eq!(one("wiremesh_leader"), 1.0, "{n}");
        assert!(
            one("wiremesh_reconcile_duration_seconds_count") >= 1.0,
            "{n}"
        );
        // A handshake age for each of the two other nodes, recent, and traffic both ways.
        for other in names.iter().filter(|o| **o != n) {
            let key = lab.public_key(other);
            let age = peer_value(&samples, "wiremesh_peer_last_handshake_age_seconds", &key)
                .unwrap_or_else(|| panic!("{n}: no handshake age for {other}:\n{}", metrics.body));
            assert!((0.0..120.0).contains(&age), "{n} -> {other}: age {age}");
            let rx = peer_value(&samples, "wiremesh_peer_receive_bytes_total", &key);
            let tx = peer_value(&samples, "wiremesh_peer_transmit_bytes_total", &key);
            assert!(rx.is_some_and(|v| v > 0.0), "{n} <- {other}: {rx:?}");
            assert!(tx.is_some_and(|v| v > 0.0), "{n} -> {other}: {tx:?}");
            let info = samples
                .iter()
                .find(|s| {
                    s.name == "wiremesh_peer_info" && s.labels.get("public_key") == Some(&key)
                })
                .unwrap_or_else(|| panic!("{n}: no peer_info for {other}"));
            assert_eq!(info.labels["name"], *other);
            assert_eq!(info.labels["kind"], "node");
            assert!(!info.labels["endpoint"].is_empty(), "{info:?}");
        }

        // The private key is nowhere in what the agent serves.
        let private = std::fs::read_to_string(lab.dir().join("nodes").join(n).join("key"))
            .expect("private key");
        let private = private.trim();
        assert_eq!(private.len(), 44, "a base64 key");
        let status_body = wiremesh::lab::probe::agent_get(&state, n, "/status")
            .expect("status")
            .body;
        for (what, body) in [("/metrics", &metrics.body), ("/status", &status_body)] {
            assert!(!body.contains(private), "{n}: private key in {what}");
        }
        assert!(
            status_body.contains(&lab.public_key(n)),
            "{n}: {status_body}"
        );

        // The lab shows the same table, from the same endpoint.
        let json: serde_json::Value =
            serde_json::from_str(&lab.ok(&["lab", "status", n, "-o", "json"])).expect("JSON");
        assert_eq!(json["node"], n);
        assert_eq!(json["ready"], true);
        let peers = json["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 2, "{json}");
        for p in peers {
            assert_eq!(p["health"], "fresh", "{n}: {p}");
            assert!(p["handshake_age"].as_u64().is_some_and(|a| a < 120), "{p}");
            assert!(p["rx_bytes"].as_u64().is_some_and(|b| b > 0), "{p}");
        }
        let table = lab.ok(&["lab", "status", n]);
        for other in names.iter().filter(|o| **o != n) {
            let row = table
                .lines()
                .find(|l| l.starts_with(other))
                .unwrap_or_else(|| panic!("{n}: no row for {other}:\n{table}"));
            assert!(row.contains(" fresh "), "{row}");
        }
    }

    // Every tunnel is drawn as fresh in the live drawing, with the legend.
    let svg = lab.ok(&["lab", "graph", "--live"]);
    let healths: Vec<&str> = svg
        .split("data-health=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert_eq!(healths, ["fresh"; 3], "{svg}");
    assert!(svg.contains("handshakes from 3 agents"), "{svg}");
    let dot = lab.ok(&["lab", "graph", "--live", "--format", "dot"]);
    assert!(dot.contains("cluster_legend"), "{dot}");

    // An agent that is gone: its node's status fails in one line, its tunnels turn unknown.
    let par = state.node("par-1").expect("par-1").1.agent.expect("agent");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(par.pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop par-1's agent");
    let o = lab.run(&["lab", "status", "par-1"]);
    let graph = lab.run(&["lab", "graph", "--live"]);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(par.pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("node par-1"), "{stderr}");
    // The drawing still comes, with a warning; the other ends report par-1's tunnels.
    assert!(graph.status.success(), "{}", text(&graph));
    let warning = String::from_utf8_lossy(&graph.stderr);
    assert!(
        warning.contains("node par-1") && warning.contains("drawn as unknown"),
        "{warning}"
    );
    let svg = String::from_utf8_lossy(&graph.stdout);
    assert!(svg.contains("handshakes from 2 agents"), "{svg}");
    assert!(!svg.contains("data-health=\"unknown\""), "{svg}");

    lab.down_and_assert_gone();
}
