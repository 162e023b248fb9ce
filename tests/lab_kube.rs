//! `meshctl lab --registry kube` end to end: a real etcd + kube-apiserver in the lab's own
//! namespace on the underlay, real `wiremesh agent`s that know nothing but that API server,
//! real userspace WireGuard, real CNI pods.
//!
//! Needs root, the lab's tools, etcd, openssl and the kube-apiserver that
//! `tests/apiserver/setup.sh` builds: `--features netns-tests,apiserver-tests`. Each test has
//! its own lab (name, namespaces, API server) and a guard that runs `lab down` when it ends, also
//! on panic. Agents run with `--check-in-period 2s`; the outage outlasts the 60 s staleness threshold.
//! Waits are bounded polls, never fixed sleeps (but for the outage's length itself).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wiremesh::lab::chaos::{BackgroundPing, Flow};

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

/// Step 5: two Nodes conflict with running ones: one publishes node2's public key, the other a
/// pod CIDR that overlaps node1's. Both are left out, named in the agents' logs and in an Event
/// each, and the mesh carries on as before.
fn conflicting_nodes_are_reported_and_break_nothing(lab: &Lab) {
    use k8s_openapi::api::core::v1::{Event, Node};
    use kube::api::{Api, ListParams, PostParams};
    let state = lab.state();
    let api = state
        .apiserver
        .clone()
        .expect("a kube lab has an API server");
    let key2 = lab.public_key("node2");
    let cidr1: ipnetwork::IpNetwork = api_nodes(lab)
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("node1"))
        .and_then(|n| n.spec.as_ref()?.pod_cidr.clone())
        .expect("node1's pod CIDR")
        .parse()
        .expect("a CIDR");
    let overlap = ipnetwork::IpNetwork::new(cidr1.network(), cidr1.prefix() - 1).expect("cidr");
    let peers_before = lab.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["peers"].as_array().map_or(0, Vec::len))
        .collect::<Vec<_>>();
    // Sorted after the real nodes by name, so the real ones keep what they hold. The endpoints
    // are TEST-NET addresses: nothing is ever sent to them.
    let ghost = |name: &str, key: &str, cidr: &str, ip: &str| -> Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {
                "kilo.squat.ai/key": key,
                "kilo.squat.ai/endpoint": format!("{ip}:51820"),
                "kilo.squat.ai/location": "ghosts",
            }},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        }))
        .expect("a Node")
    };
    let dup = ghost("zz-dup-key", &key2, "10.250.1.0/24", "198.51.100.7");
    let ovl = ghost(
        "zz-overlap",
        "DyJqVnZ6dwF0cs0sJ7Ow1WTYDLzmSHasKC55yqIY8Xk=",
        &overlap.to_string(),
        "198.51.100.8",
    );
    wiremesh::lab::cluster::with_admin(&api, |c| async move {
        let nodes = Api::<Node>::all(c);
        for n in [&dup, &ovl] {
            nodes
                .create(&PostParams::default(), n)
                .await
                .map_err(wiremesh::lab::LabError::kube("creating a ghost Node"))?;
        }
        Ok(())
    })
    .expect("create the conflicting Nodes");

    // The ghosts are newer than the real nodes, so they lose the key and the pod CIDR (the
    // overlapping /23 may name either real node whose /24 it covers).
    let expected = [
        ("zz-dup-key", "is also published by node node2".to_owned()),
        ("zz-overlap", "is refused: it overlaps pod CIDR ".to_owned()),
    ];
    let events = poll(Duration::from_secs(30), || {
        let api = api.clone();
        let events: Vec<Event> = wiremesh::lab::cluster::with_admin(&api, |c| async move {
            Api::<Event>::namespaced(c, "default")
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .map_err(wiremesh::lab::LabError::kube("listing Events"))
        })
        .ok()?;
        expected
            .iter()
            .all(|(name, problem)| {
                events.iter().any(|e| {
                    e.involved_object.name.as_deref() == Some(*name)
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains(problem.as_str()))
                })
            })
            .then_some(events)
    });
    assert!(
        events.is_some(),
        "no Event for each conflict:\n{}",
        agent_logs(lab)
    );
    let logs = agent_logs(lab);
    for (name, problem) in &expected {
        assert!(
            logs.lines()
                .any(|l| l.contains(name) && l.contains(problem.as_str())),
            "{name}: {problem} not logged:\n{logs}"
        );
    }
    // Neither ghost became a peer anywhere, and every real node keeps its peers.
    let s = lab.status();
    let peers_after: Vec<usize> = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["peers"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(peers_after, peers_before, "{s}");
    assert!(
        !s.to_string().contains("198.51.100."),
        "a ghost became a peer: {s}"
    );
    lab.check_passes();
    no_private_key_leaks(lab, &events.unwrap_or_default());
}

/// No node's private key is in any agent log, Event, Node object or `lab status`.
fn no_private_key_leaks(lab: &Lab, events: &[k8s_openapi::api::core::v1::Event]) {
    let state = lab.state();
    let events = serde_json::to_string(events).expect("JSON");
    let nodes = serde_json::to_string(&api_nodes(lab)).expect("JSON");
    let status = lab.ok(&["lab", "status", "-o", "json"]);
    for n in &state.nodes {
        let key = std::fs::read_to_string(n.private_key()).expect("private key");
        let key = key.trim();
        assert_eq!(key.len(), 44, "a base64 key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(n.private_key())
                .expect("key file")
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{}: key file mode {mode:o}", n.name);
        for (what, text) in [
            ("agent logs", agent_logs(lab)),
            ("Events", events.clone()),
            ("Node objects", nodes.clone()),
            ("lab status", status.clone()),
        ] {
            assert!(
                !text.contains(key),
                "{}'s private key is in the {what}",
                n.name
            );
        }
    }
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
    conflicting_nodes_are_reported_and_break_nothing(&lab);
    let panics = agent_logs(&lab);
    assert!(!panics.contains("panicked"), "an agent panicked:\n{panics}");
    // Agents publishing, republishing and moving never take their own writes for someone
    // else's.
    assert!(
        !panics.contains("someone else wrote"),
        "an identity incident without a foreign write:\n{panics}"
    );
    lab.down_and_assert_gone();
    eprintln!("kube lab scenario in {:?}", t0.elapsed());
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_survives_api_server_outages_and_an_agent_restarted_during_one_removes_nothing() {
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

    // 1. The API server is away for minutes, longer than the 60 s after which a heartbeat is stale:
    // every last-seen is older than that when it returns, and no agent may leave a node out
    // for it. `lab chaos` pings across the outage and waits until every agent has published
    // a heartbeat again and every WireGuard device matches the API server's Nodes.
    let out = lab.run(&["lab", "chaos", "apiserver-outage", "125"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{}", text(&out), agent_logs(&lab));
    assert!(report.contains("kube-apiserver stopped"), "{report}");
    assert!(report.contains(", 0 lost"), "{report}");
    eprintln!("{report}");
    // Every agent's watch reconnects, with backoff: a restarted API server may answer 403 for a
    // few seconds (its RBAC caches are still filling), which costs a watch one more retry (up
    // to 15 s) even after the publisher (what `chaos` waits for) already got through.
    let watching_again = poll(Duration::from_secs(40), || {
        lab.state()
            .nodes
            .iter()
            .all(|n| {
                std::fs::read_to_string(n.agent_log())
                    .unwrap_or_default()
                    .contains("Kubernetes API reachable again")
            })
            .then_some(())
    });
    let logs = agent_logs(&lab);
    assert!(logs.contains("lost the Kubernetes API"), "{logs}");
    assert!(
        watching_again.is_some(),
        "a watch did not reconnect: {logs}"
    );
    assert!(
        !logs.contains("heartbeat is stale"),
        "a node was judged stale because of the outage:\n{logs}"
    );

    // 2. An agent restarted while the API server is away starts with an empty cache: it must
    // remove nothing (no peer, no route) until it has listed everything.
    let status = lab.status();
    let (pod1, _) = first_pod(node(&status, "node1"));
    let (_, ip2) = first_pod(node(&status, "node2"));
    let peers_before = node(&status, "node1")["peers"].clone();
    let routes_before = lab.ip("n1", &["route", "show", "table", "all", "proto", "104"]);
    lab.ok(&["lab", "apiserver", "stop"]);
    let mut ping = BackgroundPing::start(Flow::new(
        pod1.clone(),
        "node1".into(),
        "node2".into(),
        ip2.parse().expect("pod IP"),
    ))
    .expect("start ping");
    let restarted = wiremesh::lab::chaos::kill_and_restart(
        std::path::Path::new(crate::util::lab::ROOT),
        &lab.name.parse().expect("lab name"),
        "node1",
    )
    .expect("restart node1's agent");
    drop(restarted.child);
    // The new agent cannot list, so it must not reconcile: give it time to do harm.
    std::thread::sleep(Duration::from_secs(10));
    let log1 = lab.state().nodes[0].agent_log();
    let reconciled = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("first reconciliation done")
            .count()
    };
    assert_eq!(
        reconciled(&log1),
        1,
        "the restarted agent reconciled without a complete list:\n{}",
        agent_logs(&lab)
    );
    let s = lab.status();
    let n1 = node(&s, "node1");
    assert_eq!(n1["agent_running"], true, "{n1}");
    assert_eq!(
        allowed_ips_of(&n1["peers"]),
        allowed_ips_of(&peers_before),
        "peers changed while the restarted agent could not list"
    );
    assert_eq!(
        lab.ip("n1", &["route", "show", "table", "all", "proto", "104"]),
        routes_before,
        "routes changed while the restarted agent could not list"
    );
    assert!(ping.running(), "the ping must span the restart");
    lab.ok(&["lab", "apiserver", "start"]);
    let first = poll(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log1).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("first reconciliation done"))
            .nth(1)
            .map(str::to_owned)
    });
    let Some(first) = first else {
        panic!(
            "the restarted agent never reconciled:\n{}",
            agent_logs(&lab)
        );
    };
    assert!(
        !first.contains("peer"),
        "peers rewritten after the restart: {first}"
    );
    let flow = ping.stop();
    assert!(flow.sent > 0, "{flow:?}");
    assert_eq!(flow.lost(), 0, "pod traffic lost packets: {flow:?}");

    // 3. A change made after the API server's return reaches everyone: a third node joins.
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
            "the agents did not learn of node3 within 60 s: {}\n{}",
            lab.status(),
            agent_logs(&lab)
        );
    };
    eprintln!(
        "node3 known everywhere {:?} after it was added",
        t0.elapsed()
    );
    let (pod3, ip3) = first_pod(node(&status, "node3"));
    assert!(lab.pod_pings(&pod1, &ip3), "{pod1} -> {ip3}");
    assert!(lab.pod_pings(&pod3, &ip2), "{pod3} -> {ip2}");
    let logs = agent_logs(&lab);
    assert!(!logs.contains("panicked"), "{logs}");
    lab.down_and_assert_gone();
}

/// Each peer's allowed IPs, keyed by public key (handshakes and counters left out).
fn allowed_ips_of(peers: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> = peers
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["public_key"].as_str().unwrap_or("").to_owned(),
                        allowed_ips(p),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
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

/// Seconds from a `lab check` report's "every pair answered within X s of the first ping".
fn connected_after(report: &str) -> Option<f64> {
    let rest = report.split("every pair answered within ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Issue 17: `lab up --registry kube` and at once `lab check`, again and again: every run
/// must pass, both directions of every pair pinged at the same moment. Each run is a fresh
/// lab (three-clouds: par-1 behind NAT). A run takes about 12 s here (up with the API server
/// 6–14 s, check ~1 s, down ~1 s), so eight take about 1.5 minutes (3 on a slower machine).
/// What this caught: a node whose mesh IP was renumbered while the mesh formed lost its
/// routes (Linux flushes them with the link's last address) until the next resync, in about
/// one run of five; eight runs catch that nine times in ten.
#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_check_right_after_up_passes_every_time() {
    const RUNS: usize = 8;
    require_kube_tools();
    let t0 = Instant::now();
    let mut times = Vec::new();
    for run in 1..=RUNS {
        let lab = Lab::new("ka");
        let up = lab.up(&["--registry", "kube"]);
        assert!(up.status.success(), "run {run}: {}", text(&up));
        let check = lab.run(&["lab", "check"]);
        let report = text(&check);
        if !check.status.success() || report.contains("LOSS") {
            panic!("run {run} of {RUNS}:\n{report}\n{}", lab.diagnostics());
        }
        let after = connected_after(&report)
            .unwrap_or_else(|| panic!("run {run}: no time to full connectivity in\n{report}"));
        eprintln!("run {run}: every pair answered {after:.1} s after the first ping");
        times.push(after);
        lab.down_and_assert_gone();
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "{RUNS} runs in {:?}; full connectivity after min {:.1} s, median {:.1} s, max {:.1} s",
        t0.elapsed(),
        times[0],
        times[RUNS / 2],
        times[RUNS - 1]
    );
}

/// The keys Node `name` publishes as unreachable (`wiremesh.io/unreachable`), if it reports.
fn unreachable_of(lab: &Lab, name: &str) -> Option<String> {
    api_nodes(lab)
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.annotations)
        .and_then(|a| a.get("wiremesh.io/unreachable").cloned())
}

/// Whether `a` reports `b` unreachable and the other way round.
fn report_each_other(lab: &Lab, a: &str, b: &str) -> bool {
    let (ka, kb) = (lab.public_key(a), lab.public_key(b));
    unreachable_of(lab, a).is_some_and(|u| u.contains(&kb))
        && unreachable_of(lab, b).is_some_and(|u| u.contains(&ka))
}

/// Issue 13, relays. Four locations, two behind NAT routers of their own: the two NATed nodes
/// cannot reach each other (each router answers the other's first packets itself, and the
/// mapping the other then needs is taken), as in Kilo. Each agent reports the other within
/// its bound, the mesh relays them through the first public node, and `lab check` passes and
/// names the relayed pair. Then a path between two public nodes breaks (node1 drops node2's
/// WireGuard packets): relayed too; and once it works again, the direct path comes back
/// (probed every minute) and nothing is relayed between them.
#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_relays_nated_locations_and_a_broken_path_and_goes_direct_once_it_works() {
    require_kube_tools();
    let lab = Lab::new("ry");
    let t0 = Instant::now();
    let up = lab.up(&[
        "--registry",
        "kube",
        "--nodes",
        "4",
        "--locations",
        "4",
        "--nat",
        "2",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    let up_took = t0.elapsed();
    poll(Duration::from_secs(60), || {
        report_each_other(&lab, "node3", "node4").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "node3 and node4 never reported each other\n{}",
            lab.diagnostics()
        )
    });
    let reported = t0.elapsed();
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    assert!(
        check.status.success() && !report.contains("LOSS"),
        "{report}\n{}",
        lab.diagnostics()
    );
    assert!(report.contains("node3 <-> node4 through node1"), "{report}");
    assert!(report.contains("relays: 1 pair(s)"), "{report}");
    assert!(
        report.contains("no plaintext pod packets on the underlay ok"),
        "{report}"
    );
    eprintln!(
        "relay: lab up {:.1} s, both NATed nodes reported each other {:.1} s after the start",
        up_took.as_secs_f64(),
        reported.as_secs_f64()
    );

    // node1 drops node2's WireGuard packets; pods of node2 keep pinging node1's.
    let state = lab.state();
    let ip_of = |name: &str| {
        state
            .spec
            .nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.underlay_ip)
            .expect("a public node")
            .to_string()
    };
    let rule = format!(
        "table inet wmtest {{ chain in {{ type filter hook input priority -10; ip saddr {} udp dport 51820 counter drop; }}; }}",
        ip_of("node2")
    );
    let nft = lab.exec("n1", &["nft", &rule]);
    assert!(nft.status.success(), "{}", text(&nft));
    let pod1 = state.nodes[0].pods[0].addrs().next().expect("a pod IP");
    let pinger = BackgroundPing::start(Flow::new(
        state.nodes[1].pods[0].netns.clone(),
        "node2".into(),
        "node1".into(),
        pod1,
    ))
    .expect("start ping");
    let broken = Instant::now();
    // node2's packets go unanswered; node1's still arrive (its handshake initiations, which
    // node2 answers in vain): one of them, or both, report the other.
    poll(Duration::from_secs(90), || {
        let reports = |a: &str, b: &str| {
            unreachable_of(&lab, a).is_some_and(|u| u.contains(&lab.public_key(b)))
        };
        (reports("node2", "node1") || reports("node1", "node2")).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "neither node1 nor node2 reported the other\n{}",
            lab.diagnostics()
        )
    });
    let relayed_after = broken.elapsed();
    let relayed = poll(Duration::from_secs(30), || {
        let r = wiremesh::lab::check::relayed(&lab.state());
        r.iter()
            .find(|(a, b, _)| a == "node1" && b == "node2")
            .cloned()
    })
    .unwrap_or_else(|| panic!("node1 and node2 not relayed\n{}", lab.diagnostics()));
    assert_eq!(relayed.2, "node3", "the first segment that reaches both");
    assert!(
        lab.pod_pings(&state.nodes[1].pods[0].netns, &pod1.to_string()),
        "node2's pod does not reach node1's through the relay\n{}",
        lab.diagnostics()
    );
    // The flow that ran into the cut goes on through the relay too.
    std::thread::sleep(Duration::from_secs(5));
    let flow = pinger.stop();
    let tail = flow.sent - flow.gap;
    assert!(
        flow.received >= 20 && tail >= 20,
        "the running ping did not get through the relay: {} sent, {} received, longest gap {}\n{}",
        flow.sent,
        flow.received,
        flow.gap,
        lab.diagnostics()
    );

    // The path works again: the next probe finds it, the reports go, the pair is direct.
    let nft = lab.exec("n1", &["nft", "delete", "table", "inet", "wmtest"]);
    assert!(nft.status.success(), "{}", text(&nft));
    let healed = Instant::now();
    poll(Duration::from_secs(120), || {
        let r = wiremesh::lab::check::relayed(&lab.state());
        (!r.iter().any(|(a, b, _)| a == "node1" && b == "node2")).then_some(())
    })
    .unwrap_or_else(|| panic!("node1 and node2 stayed relayed\n{}", lab.diagnostics()));
    let direct_after = healed.elapsed();
    eprintln!(
        "broken path: reported {:.1} s after the drop, direct again {:.1} s after the repair; \
         node2's pod pinging node1's from the drop until 5 s into the relay: {} sent, {} lost, \
         longest gap {}",
        relayed_after.as_secs_f64(),
        direct_after.as_secs_f64(),
        flow.sent,
        flow.lost(),
        flow.gap
    );
    lab.check_passes();
    let logs = agent_logs(&lab);
    assert!(!logs.contains("panicked"), "an agent panicked:\n{logs}");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_fails_a_location_over_when_its_leader_stops_forwarding_and_returns_once_it_does() {
    require_kube_tools();
    let lab = Lab::new("fo");
    // Two locations of two nodes; loc2 behind NAT. A short hold keeps the return quick.
    let up = lab.up(&[
        "--registry",
        "kube",
        "--nodes",
        "4",
        "--locations",
        "2",
        "--agent-arg=--failover-hold=15s",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    // Only a leader can be blackholed.
    let refused = lab.run(&["lab", "chaos", "leader-blackhole", "node2"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("node2 does not lead location:loc1 (node1 does)"),
        "{}",
        text(&refused)
    );
    let chaos = lab.run(&["lab", "chaos", "leader-blackhole", "node1"]);
    let report = text(&chaos);
    assert!(chaos.status.success(), "{report}\n{}", lab.diagnostics());
    assert!(report.contains("node2 took over"), "{report}");
    assert!(
        report.contains("while its leader was broken (bound 10.0s): ok"),
        "{report}"
    );
    assert!(report.contains("node1 led again"), "{report}");
    assert!(
        report.contains("leader changes: 2 (away and back)"),
        "{report}"
    );
    assert!(
        report.contains("plaintext pod packets on the underlay: 0"),
        "{report}"
    );
    // Two nodes acting as leader at once: at most a moment (the monitor samples every 250 ms).
    let both: f64 = report
        .split("two nodes held peers at once for ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no overlap figure: {report}"));
    assert!(both <= 1.0, "two leaders for {both} s: {report}");
    // The reports ended with their hold; the blackhole table is gone.
    for n in &api_nodes(&lab) {
        let failed = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("wiremesh.io/forwarding-failed"));
        assert_eq!(
            failed.map(String::as_str),
            Some(""),
            "{:?}",
            n.metadata.name
        );
    }
    let state = lab.state();
    let (_, node1) = state.node("node1").expect("node1");
    let tables = std::process::Command::new("ip")
        .args(["netns", "exec", &node1.netns, "nft", "list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("lab_leader_blackhole"),
        "the blackhole was not lifted"
    );
    let logs = agent_logs(&lab);
    assert!(
        logs.contains("the location's leader forwards nothing to other segments"),
        "node2 logged no report: {logs}"
    );
    assert!(!logs.contains("panicked"), "an agent panicked:\n{logs}");
    eprintln!("{report}");
    lab.down_and_assert_gone();
}

#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_rotates_a_key_under_pings_and_the_old_key_is_gone_everywhere() {
    require_kube_tools();
    let lab = Lab::new("rk");
    let up = lab.up(&["--registry", "kube", "--nodes", "3", "--locations", "3"]);
    assert!(up.status.success(), "{}", text(&up));
    let key_file =
        |i: usize| std::fs::read_to_string(lab.state().nodes[i].private_key()).expect("key file");
    let published = |name: &str| -> String {
        api_nodes(&lab)
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.annotations.clone())
            .and_then(|a| a.get("wiremesh.io/key").cloned())
            .expect("a published key")
    };
    let old_file = key_file(1);
    let old = published("node2");
    // Through the lab: pings to and from node2's pod across the rotation.
    let chaos = lab.run(&["lab", "chaos", "rotate-key", "node2"]);
    let report = text(&chaos);
    assert!(chaos.status.success(), "{report}\n{}", lab.diagnostics());
    assert!(report.contains("node2 publishes its new key"), "{report}");
    let new = published("node2");
    assert_ne!(new, old);
    let file = key_file(1);
    assert_ne!(file, old_file);
    let derived = {
        use std::io::Write as _;
        let mut c = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(file.as_bytes())
            .expect("write");
        String::from_utf8(c.wait_with_output().expect("wg").stdout).expect("utf8")
    };
    assert_eq!(derived.trim(), new, "the key file holds the key published");
    // The old key is gone from node2's device and every other node's peers.
    let state = lab.state();
    for (i, n) in state.nodes.iter().enumerate() {
        let dev = wiremesh::lab::uapi::get(&n.uapi_socket(), Duration::from_secs(2)).expect("uapi");
        let keys: Vec<String> = dev.peers.iter().map(|p| p.public_key.to_string()).collect();
        assert!(!keys.contains(&old), "{} still has the old key", n.name);
        if i != 1 {
            assert!(keys.contains(&new), "{} lacks node2's new key", n.name);
        }
    }
    // By hand, as an operator would: meshctl rotate-key against the API server, and back to
    // a working mesh.
    let kubeconfig = state
        .apiserver
        .as_ref()
        .expect("kube lab")
        .admin_kubeconfig();
    let o = lab.exec(
        "api",
        &[
            crate::util::lab::MESHCTL,
            "rotate-key",
            "node3",
            "--kubeconfig",
            kubeconfig.to_str().expect("path"),
        ],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("node node3: key rotated: "), "{out}");
    let unknown = lab.exec(
        "api",
        &[
            crate::util::lab::MESHCTL,
            "rotate-key",
            "node9",
            "--kubeconfig",
            kubeconfig.to_str().expect("path"),
        ],
    );
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("no node named node9"),
        "{}",
        text(&unknown)
    );
    let check = lab.run(&["lab", "check"]);
    assert!(
        check.status.success(),
        "{}\n{}",
        text(&check),
        lab.diagnostics()
    );
    eprintln!("{report}");
}

/// An outside machine of a kube lab: a namespace of its own plugged into the lab's underlay
/// bridge (10.200.0.250/24, no default route: it reaches the lab and nothing else), with a
/// temporary directory for its key and logs. Dropped: every process in it ends (by PID), then
/// it goes.
struct Outside {
    ns: String,
    dir: tempfile::TempDir,
}

/// The outside machine's underlay address: the lab gives nodes addresses from .1, the API server
/// .253 and the edge .254.
const OUTSIDE_IP: &str = "10.200.0.250";

impl Outside {
    fn new(lab: &Lab) -> Outside {
        let ns = lab.ns("out");
        wiremesh::lab::net::create_attached(
            &ns,
            "eth0",
            &lab.ns("ul"),
            "out",
            OUTSIDE_IP.parse().expect("IP"),
            24,
        )
        .expect("the outside namespace on the underlay");
        Outside {
            ns,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `ip netns exec <ns> args…`.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["netns", "exec", self.ns.as_str()];
        all.extend_from_slice(args);
        crate::util::lab::sh("ip", &all)
    }

    /// `meshctl args…` in the namespace, with the lab's admin kubeconfig.
    fn meshctl(&self, lab: &Lab, args: &[&str]) -> std::process::Output {
        let kubeconfig = lab.dir().join("apiserver/admin.kubeconfig");
        let mut all = vec![crate::util::lab::MESHCTL];
        all.extend_from_slice(args);
        all.extend(["--kubeconfig", kubeconfig.to_str().expect("UTF-8")]);
        self.exec(&all)
    }

    /// `ip -n <ns> args…`, its stdout whatever the status.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&crate::util::lab::sh("ip", &all).stdout).into_owned()
    }

    /// Whether `addr` answers a ping from the namespace (up to 3 tries of 2 s).
    fn pings(&self, addr: &str) -> bool {
        (0..3).any(|_| {
            self.exec(&["ping", "-n", "-c", "1", "-W", "2", addr])
                .status
                .success()
        })
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let procs: Vec<_> = wiremesh::lab::sys::pids_in_netns(std::slice::from_ref(&self.ns))
            .into_iter()
            .filter_map(wiremesh::lab::sys::proc_ref)
            .collect();
        wiremesh::lab::sys::terminate(&procs, Duration::from_secs(3));
        let _ = crate::util::lab::sh("ip", &["netns", "del", &self.ns]);
    }
}

/// A running `meshctl connect` in the outside namespace, its output in a file.
struct Connect {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Connect {
    fn start(lab: &Lab, out: &Outside, name: &str, extra: &[&str]) -> Connect {
        let log = out
            .dir
            .path()
            .join(format!("connect-{name}-{}.log", unix_now()));
        let file = std::fs::File::create(&log).expect("log file");
        let kubeconfig = lab.dir().join("apiserver/admin.kubeconfig");
        let key = out.dir.path().join("connect.key");
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &out.ns,
                crate::util::lab::MESHCTL,
                "connect",
                name,
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--private-key")
            .arg(&key)
            .args(extra)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("meshctl connect starts");
        Connect { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then its exit status (bounded wait).
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        poll(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        })
        .unwrap_or_else(|| panic!("connect did not exit within 20 s:\n{}", self.log()))
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `meshctl connect` from a namespace acting as a machine outside the cluster: it creates its
/// Peer, reaches every pod of the lab (the location behind NAT too: with `--endpoint`, that
/// location's leader opens its NAT towards it), and on SIGTERM exits 0 having removed its
/// interface, routes, guards, WireGuard daemon and Peer. With `--keep` everything stays, and
/// the next run (same key) adopts the Peer and the interface. A Peer someone else made is
/// refused in one line and left as it was.
#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_connect_reaches_every_pod_from_outside_and_cleans_up_on_sigterm() {
    require_kube_tools();
    let t0 = Instant::now();
    let lab = Lab::new("cn");
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
    let out = Outside::new(&lab);
    let name = format!("out{}", std::process::id() % 100_000);
    let iface = format!("wmc{}", std::process::id() % 100_000);
    let endpoint = format!("{OUTSIDE_IP}:51820");
    let args = [
        "--allowed-ip",
        "10.5.0.1/32",
        "--endpoint",
        &endpoint,
        "--interface",
        &iface,
        "--service-cidr",
        "10.96.0.0/12",
        "--resync-period",
        "5",
    ];
    let pods: Vec<String> = lab.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .flat_map(|n| n["pods"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["ips"][0].as_str().map(str::to_owned))
        .collect();
    assert_eq!(pods.len(), 3, "one pod per node");
    let peers = |o: &Outside| {
        String::from_utf8_lossy(&o.meshctl(&lab, &["peer", "list"]).stdout).into_owned()
    };

    // 1. A Peer someone else made is not touched.
    let other = "someone-else";
    let add = out.meshctl(
        &lab,
        &[
            "peer",
            "add",
            other,
            "--public-key",
            "GFq2ybvXDH4BtAkl+fuAkW+BXmYhN6V8gl5nE4bkJXo=",
            "--allowed-ips",
            "10.5.0.9/32",
        ],
    );
    assert!(add.status.success(), "{}", text(&add));
    let mut refused = Connect::start(&lab, &out, other, &args);
    let status = poll(Duration::from_secs(30), || {
        refused.child.try_wait().ok().flatten()
    })
    .unwrap_or_else(|| panic!("connect to a foreign Peer kept running:\n{}", refused.log()));
    assert_eq!(status.code(), Some(1), "{}", refused.log());
    let log = refused.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("meshctl: peer someone-else exists and is not this machine's"),
        "{log}"
    );
    assert!(
        peers(&out).contains("10.5.0.9/32"),
        "the foreign Peer is unchanged"
    );
    assert!(!out.ip(&["link"]).contains(&iface), "nothing was set up");

    // 2. Connected with --keep: reaches every pod; SIGTERM leaves everything in place.
    let mut keep_args = args.to_vec();
    keep_args.push("--keep");
    let mut first = Connect::start(&lab, &out, &name, &keep_args);
    let reached = poll(Duration::from_secs(60), || {
        pods.iter().all(|p| out.pings(p)).then_some(())
    });
    assert!(
        reached.is_some(),
        "not every pod answered within 60 s:\n{}\nroutes:\n{}\n{}",
        first.log(),
        out.ip(&["route", "show", "table", "all"]),
        lab.diagnostics()
    );
    eprintln!("every pod reached from outside after {:?}", t0.elapsed());
    assert!(peers(&out).contains(&name), "{}", peers(&out));
    let routes = out.ip(&["route", "show", "proto", "104"]);
    for cidr in [
        "10.201.1.0/24",
        "10.201.2.0/24",
        "10.201.3.0/24",
        "10.96.0.0/12",
    ] {
        assert!(
            routes.contains(&format!("{cidr} dev {iface}")),
            "{cidr}: {routes}"
        );
        assert!(
            routes.contains(&format!("blackhole {cidr}")),
            "guard of {cidr}: {routes}"
        );
    }
    assert!(
        out.ip(&["-4", "addr", "show", "dev", &iface])
            .contains("10.5.0.1/32")
    );
    assert_eq!(first.stop().code(), Some(0), "{}", first.log());
    assert!(first.log().contains("--keep"), "{}", first.log());
    assert!(peers(&out).contains(&name), "--keep leaves the Peer");
    assert!(
        out.ip(&["link"]).contains(&iface),
        "--keep leaves the interface"
    );
    assert!(!out.ip(&["route", "show", "proto", "104"]).is_empty());

    // 3. The next run adopts the Peer and the interface (the WireGuard daemon the first run
    // started keeps running); SIGTERM removes everything.
    let daemons = wiremesh::lab::sys::pids_in_netns(std::slice::from_ref(&out.ns));
    assert_eq!(
        daemons.len(),
        1,
        "the first run's WireGuard daemon: {daemons:?}"
    );
    let mut second = Connect::start(&lab, &out, &name, &args);
    let connected = poll(Duration::from_secs(60), || {
        second.log().contains("connected").then_some(())
    });
    let log = second.log();
    assert!(
        connected.is_some(),
        "the second run never connected:\n{log}"
    );
    assert!(log.contains("Peer adopted as it is"), "{log}");
    assert!(
        daemons
            .iter()
            .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
        "the WireGuard daemon was restarted instead of adopted"
    );
    let reached = poll(Duration::from_secs(60), || {
        pods.iter().all(|p| out.pings(p)).then_some(())
    });
    assert!(
        reached.is_some(),
        "not every pod answered again:\n{}",
        second.log()
    );
    // A node joins while connect runs: its pod is reached without a restart (the watch).
    lab.ok(&["lab", "node", "add", "node4", "--location", "loc3"]);
    let joined = Instant::now();
    let pod4 = lab.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node4")
        .and_then(|n| n["pods"][0]["ips"][0].as_str().map(str::to_owned))
        .expect("node4's pod");
    let reached = poll(Duration::from_secs(30), || out.pings(&pod4).then_some(()));
    assert!(
        reached.is_some(),
        "node4's pod {pod4} not reached from outside within 30 s:\n{}\n{}",
        second.log(),
        out.ip(&["route", "show", "proto", "104"])
    );
    eprintln!(
        "a node joined while connected: its pod reached {:?} after `lab node add` returned",
        joined.elapsed()
    );
    assert_eq!(second.stop().code(), Some(0), "{}", second.log());
    let log = second.log();
    assert!(log.contains("Peer deleted"), "{log}");
    assert!(
        !peers(&out).contains(&name),
        "the Peer is gone: {}",
        peers(&out)
    );
    assert!(!out.ip(&["link"]).contains(&iface), "the interface is gone");
    assert_eq!(
        out.ip(&["route", "show", "table", "all", "proto", "104"]),
        "",
        "routes and guards are gone"
    );
    let left = wiremesh::lab::sys::pids_in_netns(std::slice::from_ref(&out.ns));
    assert!(left.is_empty(), "processes left in the namespace: {left:?}");
    assert!(peers(&out).contains(other), "the foreign Peer stays");
    drop(out);
    lab.down_and_assert_gone();
    eprintln!("connect scenario in {:?}", t0.elapsed());
}

/// `lab up --registry kube --clusters 2`: two clusters (each its own API server, mesh subnet
/// and nodes) on one underlay, linked by the product's own `meshctl multicluster link`, which
/// the lab runs and records; `lab check` passes for every pod pair, across the clusters too; a
/// node joining cluster 2 shows up in cluster 1's Peers (the time it takes is printed); `down`
/// leaves nothing, the link included.
#[test]
#[cfg_attr(
    not(all(feature = "netns-tests", feature = "apiserver-tests")),
    ignore = "needs root and a kube-apiserver: --features netns-tests,apiserver-tests"
)]
fn kube_lab_of_two_linked_clusters_passes_check_across_them_and_links_a_joining_node() {
    require_kube_tools();
    let lab = Lab::new("mc");
    // Refused before anything is touched: two clusters need the kube registry, and no NAT.
    for (args, says) in [
        (
            vec!["--clusters", "2"],
            "--clusters 2 needs --registry kube",
        ),
        (
            vec![
                "--registry",
                "kube",
                "--clusters",
                "2",
                "--nodes",
                "4",
                "--nat",
                "1",
            ],
            "--clusters 2 has no NAT routers",
        ),
    ] {
        let up = lab.up(&args);
        assert_eq!(up.status.code(), Some(1), "{}", text(&up));
        assert!(text(&up).contains(says), "{}", text(&up));
        assert!(!lab.dir().exists());
    }

    let t0 = Instant::now();
    let up = lab.up(&[
        "--registry",
        "kube",
        "--clusters",
        "2",
        "--nodes",
        "4",
        "--locations",
        "2",
        CHECK_IN,
    ]);
    assert!(up.status.success(), "{}", text(&up));
    eprintln!("two-cluster lab up (and linked) in {:?}", t0.elapsed());

    let state = lab.state();
    let apis: Vec<_> = state.apiservers().cloned().collect();
    assert_eq!(apis.len(), 2);
    assert_eq!(
        (apis[0].netns.clone(), apis[1].netns.clone()),
        (lab.ns("api"), lab.ns("api2"))
    );
    for a in &apis {
        for p in [a.apiserver, a.etcd] {
            assert!(
                wiremesh::lab::sys::is_running(&p.expect("recorded")),
                "{a:?}"
            );
        }
    }
    // Each cluster's API server knows its own nodes only.
    let names = |a: &wiremesh::lab::state::ApiServerState| -> Vec<String> {
        let mut v: Vec<String> = wiremesh::lab::cluster::nodes(a)
            .expect("list Nodes")
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&apis[0]), ["node1", "node2"]);
    assert_eq!(names(&apis[1]), ["node3", "node4"]);
    // Every agent reads its own cluster and allocates from its cluster's mesh subnet.
    for n in &state.nodes {
        let pid = n.agent.expect("agent started").pid;
        let args = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .expect("agent cmdline")
            .replace('\0', " ");
        let (dir, subnet) = if state.spec.cluster_of(&n.name) == 1 {
            ("apiserver/", "--subnet 10.4.0.0/16")
        } else {
            ("apiserver2/", "--subnet 10.5.0.0/16")
        };
        assert!(
            args.contains(dir) && args.contains(subnet),
            "{}: {args}",
            n.name
        );
    }
    // The link runs as a process of the lab, in cluster 1's API namespace.
    let link = state.links[0].process.expect("link recorded");
    assert!(wiremesh::lab::sys::is_running(&link));
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", link.pid))
        .expect("link cmdline")
        .replace('\0', " ");
    assert!(
        cmdline.contains("multicluster link")
            && cmdline.contains("--name cluster1 --remote-name cluster2"),
        "{cmdline}"
    );
    let status = lab.status();
    assert_eq!(node(&status, "node3")["cluster"], "cluster2", "{status}");
    assert_eq!(status["links"][0]["running"], true, "{status}");
    // node1 leads loc1 of cluster 1 and has cluster 2's leader as its WireGuard peer.
    assert!(
        peer(node(&status, "node1"), &lab.public_key("node3")).is_some(),
        "{status}"
    );

    let t1 = Instant::now();
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    if !check.status.success() || report.contains("LOSS") {
        panic!("{report}\n{}", lab.diagnostics());
    }
    assert!(
        report.contains("across clusters: 8 pairs, 0 lost packets; within clusters: 4 pairs"),
        "{report}"
    );
    assert!(
        report.contains("no plaintext pod packets on the underlay ok"),
        "{report}"
    );
    eprintln!("check across both clusters in {:?}", t1.elapsed());

    // A node joins cluster 2 in a location of its own: cluster 1 gets a Peer for it.
    let t2 = Instant::now();
    let out = lab.ok(&[
        "lab",
        "node",
        "add",
        "node5",
        "--cluster",
        "2",
        "--location",
        "loc5",
    ]);
    assert!(out.contains("node node5 added"), "{out}");
    let added = t2.elapsed();
    let state = lab.state();
    let linked = poll(Duration::from_secs(60), || {
        wiremesh::lab::link::missing_peers(&state)
            .ok()?
            .is_empty()
            .then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "cluster 1 has no Peer for node5 after 60 s: {:?}",
            wiremesh::lab::link::missing_peers(&state)
        )
    });
    let converged = poll(Duration::from_secs(60), || {
        wiremesh::lab::chaos::divergence(&lab.state(), None)
            .ok()?
            .is_empty()
            .then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "not converged 60 s after node5 joined: {:?}",
            wiremesh::lab::chaos::divergence(&lab.state(), None)
        )
    });
    eprintln!(
        "node5 joined cluster 2: `node add` {:?}; in cluster 1's Peers {:?} after it returned; \
         every agent of both clusters runs it {:?} after it returned",
        added,
        linked.duration_since(t2) - added,
        converged.duration_since(t2) - added
    );
    let check = lab.run(&["lab", "check"]);
    let report = text(&check);
    if !check.status.success() || report.contains("LOSS") {
        panic!("{report}\n{}", lab.diagnostics());
    }
    assert!(
        report.contains("across clusters: 12 pairs, 0 lost packets"),
        "{report}"
    );

    let logs = agent_logs(&lab);
    assert!(!logs.contains("panicked"), "an agent panicked:\n{logs}");
    lab.down_and_assert_gone();
    assert!(
        !wiremesh::lab::sys::is_running(&link),
        "the link still runs"
    );
    eprintln!("two-cluster lab scenario in {:?}", t0.elapsed());
}
