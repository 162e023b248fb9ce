//! A node's identity is its own: the agent (over an in-memory kernel) against a real
//! kube-apiserver, with someone else writing its Node's key. Needs `--features apiserver-tests`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as KubeEvent, Node};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use wiremesh::agent::{
    AgentConfig, HostInfo, Inputs, KernelConfig, Observer, RegistryConfig, run_with,
};
use wiremesh::model::{NodeName, WgKey};
use wiremesh::reconcile::OwnedState;
use wiremesh::registry::cluster::report::{EVENT_NAMESPACE, REASON_IDENTITY_RESTORED};
use wiremesh::registry::cluster::{ClientOptions, WatchOptions, watch};

use crate::util::apiserver::ApiServer;
use crate::util::mem_kernel::MemKernel;

const KEY: &str = "xNJEOu7NN15eM+y5mY6klkIdXAJfF9u84LdBYLvztTc=";
const FORGED: &str = "0UHno+lxky2QJBklRgi1B3PLoZTn07vdJ1FhoO19AGo=";

fn config(dir: &std::path::Path) -> AgentConfig {
    AgentConfig {
        node: NodeName("a".into()),
        registry: RegistryConfig::Kubernetes(ClientOptions::default()),
        private_key: dir.join("key"),
        topology_label: "topology.kubernetes.io/region".into(),
        resync_period: Duration::from_secs(3600),
        check_in_period: Duration::from_secs(30),
        failover_hold: None,
        kernel: KernelConfig {
            interface: "wiremesh0".into(),
            bridge: "wmbr0".into(),
            wireguard: "auto".into(),
            wireguard_userspace: "wireguard-go".into(),
            firewall: "auto".into(),
            cni_config: dir.join("cni.conflist"),
        },
        mesh: Default::default(),
        listen: None,
    }
}

fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}

/// Polls Node `a` until `pred` holds; panics after 20 s.
async fn until_node(api: &Api<Node>, what: &str, pred: impl Fn(&BTreeMap<String, String>) -> bool) {
    for _ in 0..200 {
        let n = api.get("a").await.unwrap();
        if pred(&annotations(&n)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = api.get("a").await.unwrap();
    panic!("timed out waiting for {what}: {:?}", annotations(&n));
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn a_forged_key_on_the_agents_node_is_written_back_under_both_prefixes_with_an_event() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    let nodes = Api::<Node>::all(admin.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "a", "annotations": { "kilo.squat.ai/location": "home" } },
        "spec": { "podCIDR": "10.42.1.0/24" },
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.5" }] },
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    api.install_rbac().await;
    let client = api.agent().await;

    let key: WgKey = KEY.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let registry = watch(
        client.clone(),
        WatchOptions {
            topology_label: cfg.topology_label.clone(),
            node: "a".into(),
        },
    );
    let link = wiremesh::agent::ClusterLink::spawn(client, "a".into(), cfg.check_in_period);
    let observer = Observer::new("a", Some(key));
    let (_events, kernel_events) = tokio::sync::mpsc::channel(1);
    let inputs = Inputs {
        registry,
        cluster: Some(link),
        kernel_events,
        host: HostInfo::default(),
        observer: observer.clone(),
        device: None,
    };
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let mut kernel = MemKernel(OwnedState::default(), key);
        run_with(cfg, &mut kernel, key, inputs, async {
            let _ = stop_rx.await;
        })
        .await
    });

    // The agent publishes its key and endpoint under both prefixes.
    let both = |a: &BTreeMap<String, String>, name: &str, want: &str| {
        ["kilo.squat.ai/", "wiremesh.io/"]
            .iter()
            .all(|p| a.get(&format!("{p}{name}")).map(String::as_str) == Some(want))
    };
    until_node(&nodes, "the key and endpoint under both prefixes", |a| {
        both(a, "key", KEY) && both(a, "endpoint", "10.0.0.5:51820")
    })
    .await;
    // Seen by the agent's watch too (its picture of its Node holds its own values).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Someone else writes this node's key (and an endpoint) under wiremesh's prefix, which
    // wiremesh reads first.
    let forged = serde_json::json!({ "metadata": { "annotations": {
        "wiremesh.io/key": FORGED,
        "wiremesh.io/endpoint": "198.51.100.66:51820",
    } } });
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    // Written back at once (well before the 30 s heartbeat), under both prefixes.
    until_node(&nodes, "this agent's key and endpoint back", |a| {
        both(a, "key", KEY) && both(a, "endpoint", "10.0.0.5:51820")
    })
    .await;
    let events = Api::<KubeEvent>::namespaced(admin.clone(), EVENT_NAMESPACE);
    let mut found = Vec::new();
    for _ in 0..100 {
        found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(REASON_IDENTITY_RESTORED))
            .collect();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let ev = &found[0];
    assert_eq!(ev.involved_object.kind.as_deref(), Some("Node"));
    assert_eq!(ev.involved_object.name.as_deref(), Some("a"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let msg = ev.message.clone().unwrap_or_default();
    assert!(
        msg.contains("wiremesh.io/key") && msg.contains(FORGED),
        "{msg}"
    );
    let m = wiremesh::agent::metrics::render(
        &observer.view(),
        &wiremesh::agent::metrics::Live {
            at: std::time::SystemTime::now(),
            peers: Ok(Vec::new()),
        },
        observer.metrics(),
        false,
    );
    assert!(m.contains("wiremesh_identity_restored_total 1\n"), "{m}");

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
