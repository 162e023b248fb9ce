//! `meshctl lab --registry kube` end to end: a real etcd + kube-apiserver in the lab's own
//! namespace on the underlay, real `wiremesh agent`s that know nothing but that API server,
//! real userspace WireGuard, real CNI pods.
//!
//! Needs root, the lab's tools, etcd, openssl and the kube-apiserver that
//! `tests/apiserver/setup.sh` builds: `--features netns-tests,apiserver-tests`. Each test has
//! its own lab (name, namespaces, API server) and a guard that runs `lab down` when it ends, also
//! on panic. Agents run with `--check-in-period 2s`; the outage test outlasts the 60 s staleness threshold.
//! Waits are bounded polls, never fixed sleeps (but for the outage's length itself).

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::lab::{
    Lab, allowed_ips, first_pod, netns_list, node, peer, poll, require_tools, text,
};

/// The agents' heartbeat period in these labs.
const CHECK_IN: &str = "--agent-arg=--check-in-period=2s";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn require_kube_tools() {
    require_tools(&["etcd", "openssl"]);
    assert!(
        std::path::Path::new(wiremesh::lab::apiserver::DEFAULT_APISERVER_BIN).exists(),
        "no kube-apiserver at {}: run tests/apiserver/setup.sh",
        wiremesh::lab::apiserver::DEFAULT_APISERVER_BIN
    );
}

/// A mesh annotation of a node in a status document.
fn annotation<'a>(n: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    n["annotations"][format!("kilo.squat.ai/{key}")].as_str()
}

/// The Node objects on the lab's API server, read through the library.
fn api_nodes(lab: &Lab) -> Vec<k8s_openapi::api::core::v1::Node> {
    let state = lab.state();
    let api = state
        .apiserver
        .as_ref()
        .expect("a kube lab has an API server");
    wiremesh::lab::cluster::nodes(api).expect("list Nodes")
}

/// Who wrote an annotation of Node `name`: the managers whose managed fields hold it.
fn managers_of(lab: &Lab, name: &str, key: &str) -> Vec<String> {
    let field = format!("f:{key}");
    api_nodes(lab)
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.managed_fields)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:metadata"]["f:annotations"].get(&field).is_some())
        })
        .filter_map(|m| m.manager)
        .collect()
}

/// The agent logs of the lab, concatenated.
fn agent_logs(lab: &Lab) -> String {
    lab.state()
        .nodes
        .iter()
        .map(|n| std::fs::read_to_string(n.agent_log()).unwrap_or_default())
        .collect()
}

/// Step 1: three nodes (two in loc1, one behind NAT in loc2) come up knowing nothing but the
/// API server; the mesh forms from what the agents publish.
fn mesh_forms_from_the_api_server_alone(lab: &Lab) {
    let t0 = Instant::now();
    let up = lab.up(&[
        "--registry",
        "kube",
        "--nodes",
        "3",
        "--locations",
        "2",
        CHECK_IN,
    ]);
    assert!(up.status.success(), "{}", text(&up));
    eprintln!("kube lab up in {:?}", t0.elapsed());

    // The agents' only source: the agent kubeconfig; there is no nodes file.
    assert!(!lab.dir().join("nodes.yaml").exists());
    let state = lab.state();
    for n in &state.nodes {
        let pid = n.agent.expect("agent started").pid;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("agent cmdline");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(args.iter().any(|a| a == "--kubeconfig"), "{args:?}");
        assert!(!args.iter().any(|a| a == "--nodes"), "{args:?}");
    }

    lab.check_passes();

    // Every Node carries what its agent published, written by the agent itself.
    let want = [
        ("node1", "10.200.0.1:51820", "10.210.1.11/24"),
        ("node2", "10.200.0.2:51820", "10.210.1.12/24"),
        ("node3", "10.210.2.11:51820", "10.210.2.11/24"),
    ];
    let status = poll(Duration::from_secs(20), || {
        let s = lab.status();
        // node1 leads loc1 and has seen node3 (behind NAT) at the router's address.
        let discovered = annotation(node(&s, "node1"), "discovered-endpoints")?;
        discovered
            .contains(&lab.public_key("node3"))
            .then_some(())?;
        Some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "node1 never published node3's discovered endpoint: {}",
            lab.status()
        )
    });
    assert_eq!(status["registry"], "kube");
    assert_eq!(status["apiserver"]["apiserver_running"], true, "{status}");
    for (name, endpoint, internal_ip) in want {
        let n = node(&status, name);
        assert_eq!(
            annotation(n, "key"),
            Some(lab.public_key(name).as_str()),
            "{n}"
        );
        assert_eq!(annotation(n, "endpoint"), Some(endpoint), "{n}");
        assert_eq!(annotation(n, "internal-ip"), Some(internal_ip), "{n}");
        assert_eq!(annotation(n, "granularity"), Some("location"), "{n}");
        let seen: i64 = annotation(n, "last-seen")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no last-seen: {n}"));
        assert!(
            (unix_now() - seen).abs() < 30,
            "stale last-seen {seen}: {n}"
        );
        assert_eq!(
            annotation(n, "wireguard-ip").is_some(),
            n["leader"] == true,
            "the mesh IP is published by leaders only: {n}"
        );
        assert_eq!(
            managers_of(lab, name, "kilo.squat.ai/key"),
            ["wiremesh"],
            "the key annotation of {name} must be the agent's"
        );
    }
    assert!(
        annotation(node(&status, "node1"), "discovered-endpoints")
            .is_some_and(|d| d.contains("10.200.0.3")),
        "node3 is seen at its NAT router's address: {status}"
    );
    assert_eq!(node(&status, "node3")["behind_nat"], true);
    // The graph is drawn from the Nodes on the API server.
    let dot = lab.ok(&["lab", "graph", "--format", "dot"]);
    assert!(dot.contains("node1") && dot.contains("node3"), "{dot}");
}

/// Step 2: a fourth node joins in a location of its own; every leader gets it as a peer and
/// every pod reaches its pod.
fn fourth_node_joins(lab: &Lab) {
    let t0 = Instant::now();
    let out = lab.ok(&["lab", "node", "add", "node4", "--location", "loc3"]);
    assert!(out.contains("node node4 added"), "{out}");
    let key4 = lab.public_key("node4");
    let settled = poll(Duration::from_secs(30), || {
        let s = lab.status();
        let everyone = ["node1", "node3"]
            .iter()
            .all(|n| peer(node(&s, n), &key4).is_some());
        let n4 = node(&s, "node4");
        (everyone && n4["leader"] == true && n4["peers"].as_array()?.len() == 2).then_some(())
    });
    assert!(
        settled.is_some(),
        "node4 not a peer of every leader after 30 s: {}",
        lab.status()
    );
    eprintln!("node4 joined everywhere after {:?}", t0.elapsed());
    lab.check_passes();
}

/// Step 3: node2's location annotation changes: it leaves loc1's segment and leads one of its
/// own, then comes back into loc1's segment; WireGuard peers and allowed IPs follow, pods keep
/// reaching each other.
fn location_change_regroups_the_mesh(lab: &Lab) {
    let (key1, key2) = (lab.public_key("node1"), lab.public_key("node2"));
    let pod2 = "10.201.2.0/24".to_owned();

    lab.ok(&["lab", "annotate", "node2", "location=loc9"]);
    let t0 = Instant::now();
    let split = poll(Duration::from_secs(30), || {
        let s = lab.status();
        let n2 = node(&s, "node2");
        let n3 = node(&s, "node3");
        let own_segment = n2["leader"] == true
            && n2["location"] == "loc9"
            && peer(n2, &lab.public_key("node3")).is_some();
        // node3 reaches node2's pods through node2 itself, no longer through loc1's leader.
        let via_node2 = peer(n3, &key2).is_some_and(|p| allowed_ips(p).contains(&pod2));
        let not_via_loc1 = peer(n3, &key1).is_some_and(|p| !allowed_ips(p).contains(&pod2));
        let node1_tunnels = peer(node(&s, "node1"), &key2).is_some();
        (own_segment && via_node2 && not_via_loc1 && node1_tunnels).then_some(s)
    });
    let Some(status) = split else {
        panic!(
            "node2 did not leave loc1's segment within 30 s: {}",
            lab.status()
        );
    };
    eprintln!("node2 leads its own segment after {:?}", t0.elapsed());
    let (pod_a, ip_a) = first_pod(node(&status, "node2"));
    for other in ["node1", "node3", "node4"] {
        let (pod_b, ip_b) = first_pod(node(&status, other));
        assert!(lab.pod_pings(&pod_a, &ip_b), "{pod_a} -> {ip_b}");
        assert!(lab.pod_pings(&pod_b, &ip_a), "{pod_b} -> {ip_a}");
    }

    lab.ok(&["lab", "annotate", "node2", "location=loc1"]);
    let t0 = Instant::now();
    let merged = poll(Duration::from_secs(30), || {
        let s = lab.status();
        let n2 = node(&s, "node2");
        let member =
            n2["leader"] == false && n2["location"] == "loc1" && n2["peers"].as_array()?.is_empty();
        let back = ["node3", "node4"].iter().all(|n| {
            let m = node(&s, n);
            peer(m, &key2).is_none()
                && peer(m, &key1).is_some_and(|p| allowed_ips(p).contains(&pod2))
        });
        let node1_forgot = peer(node(&s, "node1"), &key2).is_none();
        (member && back && node1_forgot).then_some(())
    });
    assert!(
        merged.is_some(),
        "node2 did not move back into loc1's segment within 30 s: {}",
        lab.status()
    );
    eprintln!("node2 back in loc1's segment after {:?}", t0.elapsed());
    lab.check_passes();
}

/// Step 4: node4 is deleted; its peer and its routes disappear everywhere.
fn deleted_node_disappears_everywhere(lab: &Lab) {
    let key4 = lab.public_key("node4");
    let out = lab.ok(&["lab", "node", "remove", "node4"]);
    assert!(out.contains("(Node deleted)"), "{out}");
    assert!(
        !api_nodes(lab)
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("node4")),
        "the Node is still on the API server"
    );
    let t0 = Instant::now();
    let gone = poll(Duration::from_secs(20), || {
        let s = lab.status();
        let no_peer = s["nodes"]
            .as_array()?
            .iter()
            .all(|n| peer(n, &key4).is_none());
        let no_route = ["n1", "n2", "n3"].iter().all(|ns| {
            !lab.ip(ns, &["route", "show", "table", "all"])
                .contains("10.201.4.0/24")
        });
        (no_peer && no_route).then_some(())
    });
    assert!(
        gone.is_some(),
        "node4 still known after 20 s: {}\nnode1 routes:\n{}",
        lab.status(),
        lab.ip("n1", &["route", "show", "table", "all"])
    );
    eprintln!("node4 forgotten everywhere after {:?}", t0.elapsed());
    assert!(!netns_list().contains(&lab.ns("n4")));
    lab.check_passes();
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_mesh_forms_from_the_api_server_alone_then_grows_regroups_and_shrinks() {
    require_kube_tools();
    let lab = Lab::new("km");
    let t0 = Instant::now();
    mesh_forms_from_the_api_server_alone(&lab);
    fourth_node_joins(&lab);
    location_change_regroups_the_mesh(&lab);
    deleted_node_disappears_everywhere(&lab);
    let panics = agent_logs(&lab);
    assert!(!panics.contains("panicked"), "an agent panicked:\n{panics}");
    lab.down_and_assert_gone();
    eprintln!("kube lab scenario in {:?}", t0.elapsed());
}

/// A ping from a pod that runs in the background; killed if the test ends early.
struct BackgroundPing(Child);

impl BackgroundPing {
    fn start(pod: &str, addr: &str, count: u32) -> BackgroundPing {
        let child = Command::new("ip")
            .args(["netns", "exec", pod, "ping", "-n", "-q", "-i", "0.5"])
            .args(["-c", &count.to_string(), addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ping");
        BackgroundPing(child)
    }

    fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Wait for the end; (transmitted, received).
    fn finish(mut self) -> (u32, u32, String) {
        let _ = self.0.wait();
        let mut out = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let summary = wiremesh::lab::check::parse_ping_summary(&out).unwrap_or((0, 0));
        (summary.0, summary.1, out)
    }
}

impl Drop for BackgroundPing {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_pod_traffic_survives_an_api_server_outage_and_agents_resync_after_it() {
    require_kube_tools();
    let lab = Lab::new("ko");
    let up = lab.up(&[
        "--registry",
        "kube",
        "--nodes",
        "2",
        "--locations",
        "2",
        "--nat",
        "0",
        CHECK_IN,
    ]);
    assert!(up.status.success(), "{}", text(&up));
    let status = lab.status();
    let (pod1, _) = first_pod(node(&status, "node1"));
    let (_, ip2) = first_pod(node(&status, "node2"));
    assert!(
        lab.pod_pings(&pod1, &ip2),
        "{pod1} -> {ip2} before the outage"
    );

    // 220 pings, 0.5 s apart: 110 s, across the whole outage, the restart and the time after
    // it when the agents judge heartbeats again.
    let mut ping = BackgroundPing::start(&pod1, &ip2, 220);
    std::thread::sleep(Duration::from_secs(1));
    let out = lab.ok(&["lab", "apiserver", "stop"]);
    assert!(out.contains("kube-apiserver stopped"), "{out}");
    let stopped = Instant::now();
    let status = lab.status();
    assert_eq!(status["apiserver"]["apiserver_running"], false, "{status}");
    assert_eq!(status["apiserver"]["etcd_running"], true, "{status}");
    // Every agent notices: its heartbeat (every 2 s) cannot be published.
    let noticed = poll(Duration::from_secs(15), || {
        let logs: Vec<String> = lab
            .state()
            .nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.agent_log()).unwrap_or_default())
            .collect();
        logs.iter()
            .all(|l| l.contains("cannot publish this node's annotations"))
            .then_some(())
    });
    assert!(
        noticed.is_some(),
        "the agents did not notice the outage:\n{}",
        agent_logs(&lab)
    );
    // Longer than the 60 s after which a heartbeat is stale: every last-seen on the API server
    // is older than that when it returns, and no agent may leave a node out for it.
    if let Some(rest) = Duration::from_secs(70).checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    // The tunnel works without the API server: a pod still reaches the other pod.
    let (pod2, ip1) = (
        first_pod(node(&lab.status(), "node2")).0,
        first_pod(node(&lab.status(), "node1")).1,
    );
    assert!(
        lab.pod_pings(&pod2, &ip1),
        "{pod2} -> {ip1} during the outage"
    );

    let out = lab.ok(&["lab", "apiserver", "start"]);
    assert!(out.contains("started"), "{out}");
    let restarted = unix_now();
    eprintln!("API server down for {:?}", stopped.elapsed());
    assert!(ping.running(), "the background ping must span the outage");

    // A change made after the restart reaches everyone: a third node joins.
    lab.ok(&["lab", "node", "add", "node3", "--location", "loc3"]);
    let key3 = lab.public_key("node3");
    let t0 = Instant::now();
    let resynced = poll(Duration::from_secs(60), || {
        let s = lab.status();
        ["node1", "node2"]
            .iter()
            .all(|n| peer(node(&s, n), &key3).is_some())
            .then_some(s)
    });
    let Some(status) = resynced else {
        panic!(
            "the agents did not learn of node3 within 60 s of the restart: {}\n{}",
            lab.status(),
            agent_logs(&lab)
        );
    };
    eprintln!(
        "node3 known everywhere {:?} after the restart",
        t0.elapsed()
    );
    // Every agent's heartbeat is published again.
    let fresh = poll(Duration::from_secs(60), || {
        let s = lab.status();
        ["node1", "node2", "node3"]
            .iter()
            .all(|n| {
                annotation(node(&s, n), "last-seen")
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|t| t >= restarted)
            })
            .then_some(())
    });
    assert!(
        fresh.is_some(),
        "heartbeats not published again within 60 s of the restart: {}",
        lab.status()
    );
    eprintln!(
        "every heartbeat published again {:?} after the restart",
        t0.elapsed()
    );
    let (pod3, ip3) = first_pod(node(&status, "node3"));
    assert!(lab.pod_pings(&pod1, &ip3), "{pod1} -> {ip3}");
    assert!(lab.pod_pings(&pod3, &ip2), "{pod3} -> {ip2}");

    // The ping still runs 15 s after the restart: past the moment (two check-in periods of
    // live API) when an agent that judged heartbeats too early dropped every peer.
    while t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        ping.running(),
        "the background ping must outlast the restart by 15 s"
    );
    let (transmitted, received, out) = ping.finish();
    assert!(transmitted >= 220, "{out}");
    assert_eq!(
        received, transmitted,
        "pod traffic lost packets across the outage: {out}"
    );
    let logs = agent_logs(&lab);
    assert!(logs.contains("Kubernetes API reachable again"), "{logs}");
    assert!(
        !logs.contains("heartbeat is stale"),
        "a node was judged stale because of the outage:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_up_that_fails_halfway_is_removed_by_down_with_its_api_server() {
    require_kube_tools();
    let lab = Lab::new("kf");
    let up = lab.up(&[
        "--registry",
        "kube",
        "--nodes",
        "2",
        "--locations",
        "2",
        "--nat",
        "0",
        "--agent",
        "/bin/false",
    ]);
    assert_eq!(up.status.code(), Some(1), "{}", text(&up));
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains("lab up failed: the agent of node"), "{err}");
    // The API server and etcd ran, are recorded, and still run for inspection.
    let state = lab.state();
    let api = state.apiserver.as_ref().expect("API server in the state");
    for p in [api.apiserver, api.etcd] {
        let p = p.expect("recorded");
        assert!(wiremesh::lab::sys::is_running(&p), "{p:?}");
    }
    assert_eq!(api_nodes(&lab).len(), 2, "both Nodes were registered");
    assert!(netns_list().contains(&lab.ns("api")));
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_without_the_apiserver_binary_says_how_to_build_it_and_touches_nothing() {
    require_tools(&["etcd", "openssl"]);
    let lab = Lab::new("kb");
    let up = lab.up(&[
        "--registry",
        "kube",
        "--apiserver-bin",
        "/nonexistent/kube-apiserver",
    ]);
    assert_eq!(up.status.code(), Some(2), "{}", text(&up));
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains("kube-apiserver not found at /nonexistent/kube-apiserver")
            && err.contains("tests/apiserver/setup.sh"),
        "{err}"
    );
    assert!(!lab.dir().exists());
    assert!(!netns_list().iter().any(|n| n.starts_with(&lab.prefix())));
}
