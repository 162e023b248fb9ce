//! The Kubernetes registry against a real kube-apiserver (v1.20) and etcd: objects really stored,
//! watched, relisted, patched; Events really created. Needs `--features apiserver-tests`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as KubeEvent, Node};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;

use wiremesh::diagnostic::Diagnostic;
use wiremesh::model::{Granularity, WgKey};
use wiremesh::registry::cluster::publish::{Publication, merge_patch, patch_node};
use wiremesh::registry::cluster::report::{
    EVENT_NAMESPACE, REASON_NODE, REASON_NODE_FALLBACK, Reporter,
};
use wiremesh::registry::cluster::{Batch, WatchOptions, peers_api, watch};
use wiremesh::topology::incremental::Event;

use crate::util::apiserver::ApiServer;

const KEY_A: &str = "xNJEOu7NN15eM+y5mY6klkIdXAJfF9u84LdBYLvztTc=";
const KEY_B: &str = "0UHno+lxky2QJBklRgi1B3PLoZTn07vdJ1FhoO19AGo=";

fn node(name: &str, annotations: &[(&str, &str)], pod_cidr: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        },
        "spec": { "podCIDR": pod_cidr },
    }))
    .unwrap()
}

async fn create(client: &Client, n: &Node) {
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), n)
        .await
        .unwrap();
}

async fn annotate(client: &Client, name: &str, key: &str, value: Option<&str>) {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    Api::<Node>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn apply_crd(client: &Client) {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/crd-peer.yaml"),
    )
    .unwrap();
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        wiremesh::yaml::from_str(&text).unwrap();
    Api::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
    // Established takes a moment.
    for _ in 0..100 {
        if peers_api(client.clone())
            .list(&ListParams::default())
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the Peer CRD never became usable");
}

/// Batches until `pred` holds for the events gathered so far (and the last batch); panics after
/// `secs` seconds.
async fn until(
    rx: &mut mpsc::Receiver<Batch>,
    secs: u64,
    what: &str,
    mut pred: impl FnMut(&[Event], &Batch) -> bool,
) -> Vec<Event> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let b = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; events so far: {all:?}"))
            .expect("the watch task ended");
        all.extend(b.events.iter().cloned());
        if pred(&all, &b) {
            return all;
        }
    }
}

fn upserted(evs: &[Event], name: &str) -> bool {
    evs.iter()
        .any(|e| matches!(e, Event::NodeUpsert(n) if n.name.0 == name))
}

fn removed(evs: &[Event], name: &str) -> bool {
    evs.iter()
        .any(|e| matches!(e, Event::NodeRemove(n) if n.0 == name))
}

fn opts(node: &str) -> WatchOptions {
    WatchOptions {
        topology_label: "topology.kubernetes.io/region".into(),
        node: node.into(),
    }
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn watch_lists_then_follows_changes_and_skips_only_the_bad_node() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create(
        &admin,
        &node(
            "a",
            &[
                ("kilo.squat.ai/key", KEY_A),
                ("kilo.squat.ai/location", "x"),
            ],
            "10.42.1.0/24",
        ),
    )
    .await;
    create(
        &admin,
        &node("b", &[("kilo.squat.ai/key", KEY_B)], "10.42.2.0/24"),
    )
    .await;

    api.install_rbac().await;
    let mut rx = watch(api.agent().await, opts("a"));
    // The first complete list (no Peer CRD: peers are an empty, complete list).
    let evs = until(&mut rx, 30, "the first list", |_, b| b.synced).await;
    assert!(upserted(&evs, "a") && upserted(&evs, "b"), "{evs:?}");

    // A change to one node reaches the watch as that node's upsert, with the new value.
    annotate(&admin, "b", "kilo.squat.ai/location", Some("y")).await;
    let evs = until(&mut rx, 20, "b's new location", |e, _| upserted(e, "b")).await;
    let Some(Event::NodeUpsert(b)) = evs
        .iter()
        .find(|e| matches!(e, Event::NodeUpsert(n) if n.name.0 == "b"))
    else {
        unreachable!()
    };
    assert_eq!(b.location, "y");

    // A malformed annotation: that node leaves (removal + a precise diagnostic), the other stays.
    annotate(&admin, "b", "kilo.squat.ai/key", Some("not-a-key")).await;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let evs = until(&mut rx, 20, "b's removal and diagnostic", |e, batch| {
        if let Some(d) = &batch.diagnostics {
            diags = d.clone();
        }
        removed(e, "b") && !diags.is_empty()
    })
    .await;
    assert!(!removed(&evs, "a"));
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(diags[0].name, "b");
    assert_eq!(diags[0].key.as_deref(), Some("kilo.squat.ai/key"));

    // Fixed: it comes back and the diagnostic goes.
    annotate(&admin, "b", "kilo.squat.ai/key", Some(KEY_B)).await;
    let mut cleared = false;
    until(&mut rx, 20, "b back", |e, batch| {
        if batch.diagnostics.as_ref().is_some_and(Vec::is_empty) {
            cleared = true;
        }
        upserted(e, "b") && cleared
    })
    .await;

    // A malformed optional annotation: b stays (with Kilo's keepalive 0), with a kept
    // diagnostic naming the key.
    annotate(
        &admin,
        "b",
        "kilo.squat.ai/persistent-keepalive",
        Some("25"),
    )
    .await;
    until(&mut rx, 20, "b's keepalive", |e, _| {
        e.iter()
            .any(|e| matches!(e, Event::NodeUpsert(n) if n.name.0 == "b" && n.persistent_keepalive == 25))
    })
    .await;
    annotate(
        &admin,
        "b",
        "kilo.squat.ai/persistent-keepalive",
        Some("abc"),
    )
    .await;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let evs = until(&mut rx, 20, "b's fallback and warning", |e, batch| {
        if let Some(d) = &batch.diagnostics {
            diags = d.clone();
        }
        upserted(e, "b") && !diags.is_empty()
    })
    .await;
    assert!(!removed(&evs, "b"), "{evs:?}");
    assert!(
        evs.iter().any(
            |e| matches!(e, Event::NodeUpsert(n) if n.name.0 == "b" && n.persistent_keepalive == 0)
        ),
        "{evs:?}"
    );
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(
        diags[0].key.as_deref(),
        Some("kilo.squat.ai/persistent-keepalive")
    );
    assert!(!diags[0].skipped);

    // Deleted: removed.
    Api::<Node>::all(admin.clone())
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    until(&mut rx, 20, "b deleted", |e, _| removed(e, "b")).await;
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn peers_are_watched_once_the_crd_exists_and_bad_peers_are_reported() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    apply_crd(&admin).await;
    api.install_rbac().await;
    let mut rx = watch(api.agent().await, opts("a"));
    until(&mut rx, 30, "the first list", |_, b| b.synced).await;
    let laptop: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kilo.squat.ai/v1alpha1", "kind": "Peer",
        "metadata": { "name": "laptop" },
        "spec": { "allowedIPs": ["10.5.0.1/32"], "publicKey": KEY_A, "persistentKeepalive": 10 },
    }))
    .unwrap();
    peers_api(admin.clone())
        .create(&PostParams::default(), &laptop)
        .await
        .unwrap();
    let evs = until(&mut rx, 20, "the peer", |e, _| {
        e.iter()
            .any(|e| matches!(e, Event::PeerUpsert(p) if p.name.0 == "laptop"))
    })
    .await;
    let Some(Event::PeerUpsert(p)) = evs.iter().find(|e| matches!(e, Event::PeerUpsert(_))) else {
        unreachable!()
    };
    assert_eq!(p.key, KEY_A.parse::<WgKey>().unwrap());
    assert_eq!(p.persistent_keepalive, 10);

    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kilo.squat.ai/v1alpha1", "kind": "Peer",
        "metadata": { "name": "broken" },
        "spec": { "allowedIPs": ["10.5.0.300/32"], "publicKey": KEY_B },
    }))
    .unwrap();
    peers_api(admin.clone())
        .create(&PostParams::default(), &bad)
        .await
        .unwrap();
    let mut diags = Vec::new();
    let evs = until(&mut rx, 20, "the bad peer's diagnostic", |_, b| {
        if let Some(d) = &b.diagnostics {
            diags = d.clone();
        }
        diags.iter().any(|d| d.name == "broken")
    })
    .await;
    assert!(
        !evs.iter()
            .any(|e| matches!(e, Event::PeerUpsert(p) if p.name.0 == "broken")),
        "an invalid peer must not reach the engine"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.name == "broken" && d.key.as_deref() == Some("spec.allowedIPs")),
        "{diags:?}"
    );
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn an_outage_removes_nothing_and_the_watch_resumes_after_it() {
    let mut api = ApiServer::start();
    let admin = api.admin().await;
    for (n, k) in [("a", KEY_A), ("b", KEY_B)] {
        create(
            &admin,
            &node(n, &[("kilo.squat.ai/key", k)], "10.42.1.0/24"),
        )
        .await;
    }
    api.install_rbac().await;
    let mut rx = watch(api.agent().await, opts("a"));
    until(&mut rx, 30, "the first list", |_, b| b.synced).await;

    api.stop_apiserver();
    let evs = until(&mut rx, 60, "the watch to notice the outage", |_, b| {
        !b.connected
    })
    .await;
    assert!(evs.is_empty(), "events during an outage: {evs:?}");
    // Nothing arrives while it is down (in particular no removal).
    if let Ok(Some(b)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        assert!(
            b.events.is_empty(),
            "events during an outage: {:?}",
            b.events
        );
    }

    api.restart_apiserver();
    let admin = api.admin().await;
    // Changes made after the restart reach the watch.
    Api::<Node>::all(admin.clone())
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    create(
        &admin,
        &node("c", &[("kilo.squat.ai/key", KEY_B)], "10.42.3.0/24"),
    )
    .await;
    let evs = until(&mut rx, 60, "the changes made after the outage", |e, b| {
        b.connected && removed(e, "b") && upserted(e, "c")
    })
    .await;
    assert!(
        !removed(&evs, "a"),
        "a still exists and must not be removed: {evs:?}"
    );
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn publishing_writes_only_our_keys_on_our_node() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create(
        &admin,
        &node(
            "a",
            &[
                ("kilo.squat.ai/location", "home"),
                ("example.com/owner", "ops"),
            ],
            "10.42.1.0/24",
        ),
    )
    .await;
    let key: WgKey = KEY_A.parse().unwrap();
    let mut p = Publication {
        key: Some(key),
        endpoint: Some("203.0.113.5:51820".parse().unwrap()),
        internal_ip: Some("10.0.0.5/24".parse().unwrap()),
        wireguard_ip: Some("10.4.0.1/16".parse().unwrap()),
        granularity: Some(Granularity::Location),
        discovered_endpoints: BTreeMap::from([(key, "198.51.100.7:4000".parse().unwrap())]),
        unreachable: Default::default(),
        forwarding_failed: Some(Default::default()),
        key_rotated: None,
    };
    let before = Api::<Node>::all(admin.clone()).get("a").await.unwrap();
    api.install_rbac().await;
    let agent = api.agent().await;
    let after = patch_node(&agent, "a", &merge_patch(&p.annotations(), 1_800_000_000))
        .await
        .unwrap();
    assert!(p.is_on(&after));
    let ann = after.metadata.annotations.clone().unwrap();
    assert_eq!(
        ann["example.com/owner"], "ops",
        "someone else's annotation must stay"
    );
    assert_eq!(ann["kilo.squat.ai/location"], "home");
    assert_eq!(ann["kilo.squat.ai/last-seen"], "1800000000");
    assert_eq!(after.spec, before.spec, "the spec is never touched");
    // Our parser reads back what was published: the node is complete now.
    let m = wiremesh::registry::annotations::parse_node(&after, "x")
        .unwrap()
        .value;
    assert_eq!(m.key, Some(key));
    assert_eq!(m.wireguard_ip, p.wireguard_ip);
    assert_eq!(m.discovered_endpoints.len(), 1);
    // A value that goes away is removed, not left stale.
    p.wireguard_ip = None;
    let after = patch_node(&agent, "a", &merge_patch(&p.annotations(), 1_800_000_030))
        .await
        .unwrap();
    let ann = after.metadata.annotations.unwrap();
    assert!(!ann.contains_key("kilo.squat.ai/wireguard-ip"));
    assert_eq!(ann["kilo.squat.ai/last-seen"], "1800000030");
    assert!(after.metadata.resource_version != before.metadata.resource_version);
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn a_bad_annotation_becomes_one_event_on_that_node() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create(
        &admin,
        &node("a", &[("kilo.squat.ai/key", "bad")], "10.42.1.0/24"),
    )
    .await;
    let uid = Api::<Node>::all(admin.clone())
        .get("a")
        .await
        .unwrap()
        .metadata
        .uid;
    let diags = vec![Diagnostic::node(
        "a",
        Some("kilo.squat.ai/key"),
        "\"bad\" is not a WireGuard key",
    )];
    let events = Api::<KubeEvent>::namespaced(admin.clone(), EVENT_NAMESPACE);
    api.install_rbac().await;
    let mut mine = Reporter::new(api.agent().await, "a");
    mine.report(&diags, uid.as_deref()).await;
    // A resync with the same problem, this agent after a restart, and another agent: no repeat.
    mine.report(&diags, uid.as_deref()).await;
    Reporter::new(api.agent().await, "a")
        .report(&diags, uid.as_deref())
        .await;
    // Another node's agent does not report this node's problems.
    Reporter::new(api.agent().await, "b")
        .report(&diags, None)
        .await;
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1, "{list:?}");
    let ev = &list[0];
    assert_eq!(ev.involved_object.kind.as_deref(), Some("Node"));
    assert_eq!(ev.involved_object.name.as_deref(), Some("a"));
    assert_eq!(ev.involved_object.uid, uid);
    assert_eq!(ev.reason.as_deref(), Some(REASON_NODE));
    let msg = ev.message.clone().unwrap();
    assert!(
        msg.contains("kilo.squat.ai/key") && msg.contains("is not a WireGuard key"),
        "{msg}"
    );

    // Fixed, then broken again the same way: the same Event, counted twice.
    mine.report(&[], uid.as_deref()).await;
    mine.report(&diags, uid.as_deref()).await;
    let list = events.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].count, Some(2), "{:?}", list[0]);
    assert!(list[0].last_timestamp >= list[0].first_timestamp);

    // A different problem is a new change: one more Event.
    let diags2 = vec![Diagnostic::node(
        "a",
        Some("kilo.squat.ai/endpoint"),
        "port 0",
    )];
    mine.report(&diags2, uid.as_deref()).await;
    assert_eq!(
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // Kept with a fallback: an Event with its own reason, found by a field selector.
    let kept = vec![
        Diagnostic::node(
            "a",
            Some("kilo.squat.ai/persistent-keepalive"),
            "\"abc\" is not a number of seconds from 0 to 65535; no keepalive is used",
        )
        .kept(),
    ];
    mine.report(&kept, uid.as_deref()).await;
    let by_reason = ListParams::default().fields(&format!("reason={REASON_NODE_FALLBACK}"));
    let list = events.list(&by_reason).await.unwrap().items;
    assert_eq!(list.len(), 1, "{list:?}");
    let msg = list[0].message.clone().unwrap();
    assert!(
        msg.starts_with("kept in the mesh, with a fallback: kilo.squat.ai/persistent-keepalive"),
        "{msg}"
    );
    assert_eq!(list[0].involved_object.uid, uid);
}
