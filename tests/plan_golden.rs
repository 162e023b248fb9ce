//! Golden tests of `meshctl plan -o json` on the examples, through the real binary.
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test --test main plan_golden`
//! and review the diff: every line is part of the JSON contract.

use std::path::Path;
use std::process::Command;

fn meshctl(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run meshctl");
    (
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
        out.status.success(),
    )
}

fn check_golden(name: &str, args: &[&str]) {
    let (stdout, stderr, ok) = meshctl(args);
    assert!(ok, "meshctl {args:?} failed: {stderr}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &stdout).expect("write golden");
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        stdout,
        want,
        "output of meshctl {args:?} differs from {}",
        path.display()
    );
    // The contract: exactly one JSON object with the documented fields.
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for field in [
        "node",
        "leader",
        "interface",
        "peers",
        "routes",
        "diagnostics",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert!(v["interface"].get("listen_port").is_some() && v["interface"].get("address").is_some());
}

#[test]
fn three_clouds_plans_match_golden() {
    for node in ["fra-1", "hel-1", "par-1"] {
        check_golden(
            &format!("three-clouds-{node}.json"),
            &[
                "plan",
                "--nodes",
                "examples/three-clouds.yaml",
                "--node",
                node,
                "-o",
                "json",
            ],
        );
    }
}

#[test]
fn locations_plans_match_golden() {
    for node in ["home-a", "home-b", "hetzner-1", "oracle-2"] {
        check_golden(
            &format!("locations-{node}.json"),
            &[
                "plan",
                "--nodes",
                "examples/locations.yaml",
                "--peers",
                "examples/peers.yaml",
                "--node",
                node,
                "-o",
                "json",
                "--encapsulate",
                "never",
            ],
        );
    }
}

#[test]
fn plan_reports_bad_nodes_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("nodes.yaml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-clouds.yaml"),
    )
    .expect("example")
    .replace("cpmjjEo1wKcecLnNDXzPhTFGyG68rKbZxhzDpiN/bAI=", "not-a-key");
    std::fs::write(&file, text).expect("write");
    let (stdout, stderr, ok) = meshctl(&[
        "plan",
        "--nodes",
        file.to_str().expect("path"),
        "--node",
        "fra-1",
        "-o",
        "json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        v["peers"].as_array().expect("peers").len(),
        1,
        "hel-1 is left out, par-1 stays"
    );
    let d = &v["diagnostics"][0];
    assert_eq!(d["name"], "hel-1");
    assert_eq!(d["key"], "kilo.squat.ai/key");
    assert!(
        d["problem"]
            .as_str()
            .expect("problem")
            .contains("not-a-key")
    );
}

/// The three-clouds example with the first `from` replaced by `to`, written to a file in `dir`.
fn edited_example(dir: &Path, from: &str, to: &str) -> String {
    edited_example_at(dir, &[(from, to)])
}

/// examples/three-clouds.yaml with each `from` replaced once by its `to`, written into `dir`.
fn edited_example_at(dir: &Path, edits: &[(&str, &str)]) -> String {
    edited_at(dir, "three-clouds.yaml", edits)
}

/// `examples/EXAMPLE` with `edits` applied, written under `dir`; returns its path.
fn edited_at(dir: &Path, example: &str, edits: &[(&str, &str)]) -> String {
    let file = dir.join("nodes.yaml");
    let mut text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example),
    )
    .expect("example");
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&file, text).expect("write");
    file.to_str().expect("path").to_owned()
}

/// The three clouds with `wiremesh.io/unreachable` as agents publish it: fra-1 has no handshake
/// with hel-1, hel-1 and par-1 report nothing unreachable.
fn reporting_example(dir: &Path) -> String {
    const FRA: &str = "6fcT3bwmiNulRE+RHfLJs4FfNX6IunjB0pJpmI6w5DA=";
    const HEL: &str = "cpmjjEo1wKcecLnNDXzPhTFGyG68rKbZxhzDpiN/bAI=";
    const PAR: &str = "f9r1NdEbmqO6dMerKkaahx+Im2GIJndztRrbqS9X3iU=";
    let report = |key: &str, unreachable: &str| {
        (
            format!("kilo.squat.ai/key: {key}\n"),
            format!("kilo.squat.ai/key: {key}\n      wiremesh.io/unreachable: \"{unreachable}\"\n"),
        )
    };
    let edits = [report(FRA, HEL), report(HEL, ""), report(PAR, "")];
    let edits: Vec<(&str, &str)> = edits
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    edited_example_at(dir, &edits)
}

#[test]
fn plan_shows_a_pair_without_a_handshake_relayed_through_the_third_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = reporting_example(dir.path());
    let plan = |node: &str, out: &str| {
        let (stdout, stderr, ok) = meshctl(&["plan", "--nodes", &file, "--node", node, "-o", out]);
        assert!(ok, "{stderr}");
        stdout
    };
    let peers = |node: &str| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&plan(node, "json")).expect("json");
        v["peers"].as_array().expect("peers").clone()
    };
    let by_name = |ps: &[serde_json::Value], n: &str| -> serde_json::Value {
        ps.iter().find(|p| p["name"] == n).cloned().expect(n)
    };
    // Both ends of the broken pair send the other's pods through par-1, whatever side reported.
    for (me, other) in [("fra-1", "hel-1"), ("hel-1", "fra-1")] {
        let ps = peers(me);
        let direct = by_name(&ps, other);
        assert_eq!(direct["relayed_via"], "par-1", "{me}: {direct}");
        assert_eq!(
            direct["allowed_ips"].as_array().map(Vec::len),
            Some(0),
            "{direct}"
        );
        let relay = by_name(&ps, "par-1");
        let ips: Vec<&str> = relay["allowed_ips"]
            .as_array()
            .expect("ips")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let other_pods = if other == "hel-1" {
            "10.42.1.0/24"
        } else {
            "10.42.0.0/24"
        };
        assert!(
            ips.contains(&other_pods),
            "{me}: par-1 carries {other_pods}: {ips:?}"
        );
        assert!(relay.get("relayed_via").is_none(), "{relay}");
    }
    // The relay keeps both ends direct, with their own pods only.
    for p in peers("par-1") {
        assert!(p.get("relayed_via").is_none(), "{p}");
        assert!(!p["allowed_ips"].as_array().expect("ips").is_empty(), "{p}");
    }
    let text = plan("fra-1", "text");
    assert!(text.contains("relayed through par-1"), "{text}");
}

#[test]
fn plan_keeps_a_node_with_a_malformed_keepalive_and_reports_the_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = edited_example(
        dir.path(),
        "198.51.100.20:51820\n      kilo.squat.ai/persistent-keepalive: \"20\"",
        "198.51.100.20:51820\n      kilo.squat.ai/persistent-keepalive: \"abc\"",
    );
    let plan = |node: &str, out: &str| {
        let (stdout, stderr, ok) = meshctl(&["plan", "--nodes", &file, "--node", node, "-o", out]);
        assert!(ok, "{stderr}");
        stdout
    };
    let v: serde_json::Value = serde_json::from_str(&plan("fra-1", "json")).expect("json");
    let peers = v["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2, "hel-1 stays in the mesh: {peers:?}");
    let d = &v["diagnostics"][0];
    assert_eq!(d["name"], "hel-1");
    assert_eq!(d["key"], "kilo.squat.ai/persistent-keepalive");
    assert_eq!(d["skipped"], false);
    assert!(d["problem"].as_str().expect("problem").contains("\"abc\""));
    // hel-1's own plan: no keepalive (Kilo's 0), the warning in the text output.
    let v: serde_json::Value = serde_json::from_str(&plan("hel-1", "json")).expect("json");
    for p in v["peers"].as_array().expect("peers") {
        assert_eq!(p["persistent_keepalive"], 0, "{p}");
    }
    let text = plan("hel-1", "text");
    assert!(
        text.contains("node hel-1: kilo.squat.ai/persistent-keepalive: \"abc\""),
        "{text}"
    );
    assert!(!text.contains("left out"), "{text}");
}

#[test]
fn plan_for_a_node_left_out_says_why_not_that_it_is_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = edited_example(
        dir.path(),
        "cpmjjEo1wKcecLnNDXzPhTFGyG68rKbZxhzDpiN/bAI=",
        "not-a-key",
    );
    for args in [
        &["plan", "--nodes", &file, "--node", "hel-1"][..],
        &["graph", "--nodes", &file, "--node", "hel-1"][..],
        &["graph", "--nodes", &file, "--focus", "hel-1"][..],
    ] {
        let (_, stderr, ok) = meshctl(args);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.contains("node hel-1 is left out: kilo.squat.ai/key: \"not-a-key\""),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("not in the cluster"), "{stderr}");
    }
    let (_, stderr, ok) = meshctl(&["graph", "--nodes", &file, "--focus", "nope"]);
    assert!(!ok);
    assert!(
        stderr.contains("node nope is not in the cluster"),
        "{stderr}"
    );
}

#[test]
fn plan_timings_print_parse_and_engine_phases() {
    let (_, stderr, ok) = meshctl(&[
        "plan",
        "--nodes",
        "examples/three-clouds.yaml",
        "--node",
        "fra-1",
        "--timings",
    ]);
    assert!(ok);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("parse: ") && l.ends_with(" ms")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("engine: ") && l.ends_with(" ms")),
        "{stderr}"
    );
}

#[test]
fn plan_for_unknown_node_fails_with_a_message() {
    let (_, stderr, ok) = meshctl(&[
        "plan",
        "--nodes",
        "examples/three-clouds.yaml",
        "--node",
        "nope",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("node nope is not in the cluster"),
        "{stderr}"
    );
}

/// The three-clouds example plus `extra` (YAML items), written to a file in `dir`.
fn example_with(dir: &Path, extra: &str) -> String {
    let file = dir.join("nodes.yaml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-clouds.yaml"),
    )
    .expect("example");
    std::fs::write(&file, format!("{text}{extra}")).expect("write");
    file.to_str().expect("path").to_owned()
}

#[test]
fn plan_leaves_out_a_node_whose_pod_cidr_covers_every_other_not_the_real_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Named to sort first, created before everyone, with a copy of fra-1's key and a pod CIDR
    // over every node's.
    let file = example_with(
        dir.path(),
        "- apiVersion: v1
  kind: Node
  metadata:
    name: 0-evil
    creationTimestamp: \"2000-01-01T00:00:00Z\"
    annotations:
      kilo.squat.ai/key: 6fcT3bwmiNulRE+RHfLJs4FfNX6IunjB0pJpmI6w5DA=
      kilo.squat.ai/endpoint: 192.0.2.66:51820
      kilo.squat.ai/internal-ip: 169.254.169.254/32
  spec:
    podCIDR: 10.42.0.0/16
",
    );
    let (stdout, stderr, ok) =
        meshctl(&["plan", "--nodes", &file, "--node", "fra-1", "-o", "json"]);
    assert!(ok, "meshctl plan failed: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let mut peers: Vec<&str> = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    peers.sort();
    assert_eq!(peers, ["hel-1", "par-1"]);
    let evil: Vec<&serde_json::Value> = v["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .filter(|d| d["name"] == "0-evil")
        .collect();
    assert!(
        evil.iter()
            .any(|d| d["key"] == "podCIDR" && d["skipped"] == true),
        "{evil:?}"
    );
}

/// examples/locations.yaml with every home node's agent reporting, home-a and home-c finding
/// their leader home-b not forwarding.
fn failover_example(dir: &Path) -> String {
    let report = |name: &str, failed: &str| {
        (
            format!("name: {name}\n    labels: {{kubernetes.io/arch: amd64}}\n    annotations:\n"),
            format!(
                "name: {name}\n    labels: {{kubernetes.io/arch: amd64}}\n    annotations:\n      \
                 wiremesh.io/forwarding-failed: \"{failed}\"\n"
            ),
        )
    };
    let home_c = (
        "name: home-c\n    labels: {kubernetes.io/arch: arm64}\n    annotations:\n".to_owned(),
        "name: home-c\n    labels: {kubernetes.io/arch: arm64}\n    annotations:\n      \
         wiremesh.io/forwarding-failed: home-b\n"
            .to_owned(),
    );
    let edits = [report("home-a", "home-b"), report("home-b", ""), home_c];
    let edits: Vec<(&str, &str)> = edits
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    edited_at(dir, "locations.yaml", &edits)
}

#[test]
fn plan_and_graph_show_a_location_failed_over_from_a_leader_that_does_not_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = failover_example(dir.path());
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--nodes", file.as_str()]);
        let (stdout, stderr, ok) = meshctl(&all);
        assert!(ok, "{stderr}");
        (stdout, stderr)
    };
    // home-b volunteers, but home-a (first by name of the rest) leads while reported.
    let (a, _) = run(&["plan", "--node", "home-a", "-o", "json"]);
    let a: serde_json::Value = serde_json::from_str(&a).expect("json");
    assert_eq!(a["leader"], true, "{a}");
    let (c, _) = run(&["plan", "--node", "home-c", "-o", "json"]);
    let c: serde_json::Value = serde_json::from_str(&c).expect("json");
    assert_eq!(c["leader"], false);
    let via: Vec<&str> = c["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter(|r| r["dst"] == "10.42.20.0/24")
        .filter_map(|r| r["gateway"].as_str())
        .collect();
    assert_eq!(via, ["192.168.1.11"], "home-c routes through home-a: {c}");
    let (text, _) = run(&["plan", "--node", "home-b"]);
    assert!(
        text.contains("home-b")
            && text.contains("wiremesh.io/forwarding-failed")
            && text.contains("home-a, home-c")
            && text.contains("home-a leads location:home instead"),
        "{text}"
    );
    let (dot, _) = run(&["graph", "--format", "dot"]);
    assert!(dot.contains("failover from home-b"), "{dot}");
    assert!(dot.contains("forwarding failed (2 reports)"), "{dot}");
    let (svg, _) = run(&["graph", "--format", "svg"]);
    assert!(svg.contains("failover from home-b"), "{svg}");
    // Without reports, Kilo's leader.
    let (plain, stderr, ok) = meshctl(&[
        "plan",
        "--node",
        "home-a",
        "-o",
        "json",
        "--nodes",
        "examples/locations.yaml",
    ]);
    assert!(ok, "{stderr}");
    let plain: serde_json::Value = serde_json::from_str(&plain).expect("json");
    assert_eq!(plain["leader"], false);
}

#[test]
fn graph_draws_the_relayed_tunnel_dotted_and_names_the_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = reporting_example(dir.path());
    let graph = |format: &str| {
        let (stdout, stderr, ok) = meshctl(&["graph", "--nodes", &file, "--format", format]);
        assert!(ok, "{stderr}");
        stdout
    };
    let dot = graph("dot");
    let relayed: Vec<&str> = dot.lines().filter(|l| l.contains("relayed via")).collect();
    assert_eq!(relayed.len(), 1, "one relayed tunnel: {dot}");
    assert!(
        relayed[0].contains("fra-1") && relayed[0].contains("hel-1"),
        "{}",
        relayed[0]
    );
    assert!(relayed[0].contains("relayed via par-1") && relayed[0].contains("dotted"));
    let svg = graph("svg");
    assert_eq!(
        svg.matches("data-relayed-via=\"par-1\"").count(),
        1,
        "{svg}"
    );
    assert!(
        svg.contains("no direct handshake: relayed through par-1"),
        "{svg}"
    );
    // Without reports nothing is relayed.
    let (plain, stderr, ok) = meshctl(&[
        "graph",
        "--format",
        "dot",
        "--nodes",
        "examples/three-clouds.yaml",
    ]);
    assert!(ok, "{stderr}");
    assert!(!plain.contains("relayed"), "{plain}");
}
