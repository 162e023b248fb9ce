//! `meshctl multicluster link|unlink` between two real kube-apiservers (`--features
//! apiserver-tests`): the Peers each cluster gets for the other's segments, the overlap check
//! that writes nothing, a running link following joins, key rotations and leaves, and `unlink`
//! removing exactly what the link wrote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};

use wiremesh::model::WgKey;

use crate::meshctl_cluster::{apply_crd, command, create_peers, meshctl_async, stored_peers};
use crate::util::apiserver::ApiServer;

const LABEL: &str = "wiremesh.io/linked-cluster";
const LINK_USER: &str = "system:serviceaccount:kube-system:wiremesh-multicluster";

fn key(i: u8) -> String {
    WgKey([i; 32]).to_string()
}

/// A Node as a wiremesh agent leaves it: key `i`, endpoint `10.200.0.i`, internal IP, mesh IP
/// in `subnet_prefix` (e.g. `10.5`), pod CIDR `10.201.i.0/24`, in `location`.
fn node(name: &str, i: u8, location: &str, subnet_prefix: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                "kilo.squat.ai/location": location,
                "kilo.squat.ai/key": key(i),
                "kilo.squat.ai/endpoint": format!("10.200.0.{i}:51820"),
                "kilo.squat.ai/internal-ip": format!("10.210.0.{i}/24"),
                "kilo.squat.ai/wireguard-ip": format!("{subnet_prefix}.0.{i}/16"),
                "kilo.squat.ai/granularity": "location",
            }
        },
        "spec": { "podCIDR": format!("10.201.{i}.0/24") }
    }))
    .expect("a Node")
}

async fn create(client: &Client, nodes: &[Node]) {
    let api = Api::<Node>::all(client.clone());
    for n in nodes {
        api.create(&PostParams::default(), n)
            .await
            .unwrap_or_else(|e| panic!("create {:?}: {e}", n.metadata.name));
    }
}

/// The Peers a link wrote, by name: (label value, public key, allowed IPs).
async fn linked(client: &Client) -> BTreeMap<String, (String, String, Vec<String>)> {
    stored_peers(client)
        .await
        .into_iter()
        .filter_map(|p: DynamicObject| {
            let label = p.metadata.labels.as_ref()?.get(LABEL)?.clone();
            let spec = &p.data["spec"];
            let allowed = spec["allowedIPs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Some((
                p.metadata.name.clone()?,
                (label, spec["publicKey"].as_str()?.to_owned(), allowed),
            ))
        })
        .collect()
}

fn names(m: &BTreeMap<String, (String, String, Vec<String>)>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

/// Two clusters with the Peer CRD: `a` (nodes a1, a2 in location `eu`, mesh 10.4/16) and `b`
/// (b1 in `us`, b2 in `asia`, mesh `b_mesh`/16), and a Peer of the user's own in `a`.
async fn two_clusters(b_mesh: &str) -> (ApiServer, ApiServer, Client, Client) {
    let (a, b) = ApiServer::start_pair();
    let (ca, cb) = (a.admin().await, b.admin().await);
    apply_crd(&ca).await;
    apply_crd(&cb).await;
    create(
        &ca,
        &[node("a1", 1, "eu", "10.4"), node("a2", 2, "eu", "10.4")],
    )
    .await;
    create(
        &cb,
        &[node("b1", 3, "us", b_mesh), node("b2", 4, "asia", b_mesh)],
    )
    .await;
    create_peers(
        &ca,
        &[serde_json::json!({
            "apiVersion": "kilo.squat.ai/v1alpha1", "kind": "Peer",
            "metadata": {"name": "laptop"},
            "spec": {"allowedIPs": ["10.10.10.10/32"], "publicKey": key(99), "persistentKeepalive": 0}
        })],
    )
    .await;
    (a, b, ca, cb)
}

fn link_args<'a>(a: &'a ApiServer, b: &'a ApiServer, cmd: &'a str) -> Vec<&'a str> {
    vec![
        "multicluster",
        cmd,
        "--kubeconfig",
        a.kubeconfig.to_str().expect("utf-8"),
        "--remote-kubeconfig",
        b.kubeconfig.to_str().expect("utf-8"),
        "--name",
        "east",
        "--remote-name",
        "west",
    ]
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn link_once_writes_each_cluster_a_peer_per_segment_of_the_other_and_unlink_removes_them() {
    let (a, b, ca, cb) = two_clusters("10.5").await;
    // As the ServiceAccount of manifests/multicluster-link.yaml, not as an administrator.
    a.install_link_rbac().await;
    b.install_link_rbac().await;
    let (ka, kb) = (a.kubeconfig_as(LINK_USER), b.kubeconfig_as(LINK_USER));
    let (ka, kb) = (ka.to_str().expect("utf-8"), kb.to_str().expect("utf-8"));
    let mut args = link_args(&a, &b, "link");
    args[3] = ka;
    args[5] = kb;
    args.extend(["--remote-service-cidr", "10.97.0.0/16", "--once"]);
    let out = meshctl_async(&args).await.ok("link --once");
    assert!(
        out.contains("cluster east: 2 Peers for cluster west (2 created, 0 updated, 0 deleted)"),
        "{out}"
    );
    assert!(
        out.contains("cluster west: 1 Peers for cluster east (1 created, 0 updated, 0 deleted)"),
        "{out}"
    );
    let in_a = linked(&ca).await;
    assert_eq!(names(&in_a), ["west-location-asia", "west-location-us"]);
    // Kilo's order: location:asia gets the first mesh IP of b's subnet, and the service CIDR.
    let (label, public_key, allowed) = &in_a["west-location-asia"];
    assert_eq!(
        (label.as_str(), public_key.as_str()),
        ("west", key(4).as_str())
    );
    assert_eq!(allowed, &["10.201.4.0/24", "10.5.0.1/32", "10.97.0.0/16"]);
    assert_eq!(in_a["west-location-us"].2, ["10.201.3.0/24", "10.5.0.2/32"]);
    let in_b = linked(&cb).await;
    assert_eq!(names(&in_b), ["east-location-eu"]);
    assert_eq!(
        in_b["east-location-eu"].2,
        ["10.201.1.0/24", "10.201.2.0/24", "10.4.0.1/32"]
    );
    assert_eq!(in_b["east-location-eu"].1, key(1), "a1 leads eu by name");

    // Again: nothing to do.
    let again = meshctl_async(&args).await.ok("second link --once");
    assert!(
        again.contains("(0 created, 0 updated, 0 deleted)") && !again.contains("1 created"),
        "{again}"
    );

    let mut unlink = link_args(&a, &b, "unlink");
    unlink[3] = ka;
    unlink[5] = kb;
    let out = meshctl_async(&unlink).await.ok("unlink");
    assert_eq!(
        out,
        "cluster east: 2 Peers deleted\ncluster west: 1 Peers deleted\n"
    );
    assert!(linked(&ca).await.is_empty() && linked(&cb).await.is_empty());
    let left: Vec<_> = stored_peers(&ca)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(left, ["laptop"], "unlink removes only what the link wrote");
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn overlapping_mesh_subnets_are_refused_before_anything_is_written() {
    let (a, b, ca, cb) = two_clusters("10.4").await;
    let mut args = link_args(&a, &b, "link");
    args.push("--once");
    let line = meshctl_async(&args)
        .await
        .one_line_error("link with one mesh subnet");
    assert!(
        line.contains("mesh subnet 10.4.0.0/16 of cluster east overlaps mesh subnet 10.4.0.0/16 of cluster west"),
        "{line}"
    );
    // The long-running form refuses the same way.
    args.pop();
    let line = meshctl_async(&args)
        .await
        .one_line_error("link (running) with one mesh subnet");
    assert!(line.contains("overlaps"), "{line}");
    assert!(linked(&ca).await.is_empty() && linked(&cb).await.is_empty());
}

/// Kills the link process if the test fails before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How soon a running link must carry a change of one cluster into the other: measured 0.25 to
/// 0.4 s (a watch event, the 200 ms debounce, one sync), bounded here at more than ten times that.
const FOLLOW_BOUND: Duration = Duration::from_secs(5);

/// Poll until `cond` holds for the Peers linked in `client`; the time it took.
async fn until(
    client: &Client,
    what: &str,
    cond: impl Fn(&BTreeMap<String, (String, String, Vec<String>)>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let now = linked(client).await;
        if cond(&now) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < FOLLOW_BOUND,
            "{what}: not within {FOLLOW_BOUND:?}; linked: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn a_running_link_follows_joins_key_rotations_and_leaves_and_stops_on_sigterm() {
    let (a, b, ca, cb) = two_clusters("10.5").await;
    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = command(&link_args(&a, &b, "link"))
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().expect("log"))
        .spawn()
        .expect("start the link");
    let mut link = Running(child);
    until(&ca, "first sync", |m| m.len() == 2).await;
    until(&cb, "first sync", |m| m.len() == 1).await;

    // A node joins cluster b in a location of its own.
    create(&cb, &[node("b3", 5, "africa", "10.5")]).await;
    let join = until(&ca, "join", |m| m.contains_key("west-location-africa")).await;
    // The key of b1 (leading `us`) is rotated.
    let nodes_b = Api::<Node>::all(cb.clone());
    let patch = serde_json::json!({"metadata": {"annotations": {"kilo.squat.ai/key": key(42)}}});
    nodes_b
        .patch("b1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("rotate b1's key");
    let rotation = until(&ca, "rotation", |m| {
        m.get("west-location-us").is_some_and(|p| p.1 == key(42))
    })
    .await;
    // A node of cluster a leaves: cluster b's Peer for `eu` loses its pod CIDR.
    Api::<Node>::all(ca.clone())
        .delete("a2", &DeleteParams::default())
        .await
        .expect("delete a2");
    let leave_a = until(&cb, "leave in a", |m| {
        m.get("east-location-eu")
            .is_some_and(|p| !p.2.contains(&"10.201.2.0/24".to_owned()))
    })
    .await;
    // b2 leaves: its location's Peer goes.
    nodes_b
        .delete("b2", &DeleteParams::default())
        .await
        .expect("delete b2");
    let leave = until(&ca, "leave", |m| !m.contains_key("west-location-asia")).await;
    eprintln!(
        "link followed: join {join:?}, rotation {rotation:?}, leave in a {leave_a:?}, leave {leave:?}"
    );

    // SIGTERM: exits 0 and leaves the Peers in place.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(link.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the link");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = link.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the link did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(status.success(), "{status}: {text}");
    // Logged at info by default (the command removes RUST_LOG): a long-running link says what
    // it does.
    assert!(text.contains("clusters linked"), "{text}");
    assert!(text.contains("linked a segment of cluster west"), "{text}");
    assert_eq!(
        names(&linked(&ca).await),
        ["west-location-africa", "west-location-us"]
    );
}
