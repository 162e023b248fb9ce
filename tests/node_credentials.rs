//! The agent with its node's own credentials (a kubelet's client certificate, user
//! `system:node:NAME` in group `system:nodes`) against a real kube-apiserver with the Node
//! authorizer and the NodeRestriction admission plugin, as kubeadm and k3s run it: it publishes
//! and restores its own Node's annotations and cannot write another Node's, while the
//! DaemonSet's ServiceAccount can write every Node's. With the RBAC of
//! `manifests/node-credentials/rbac.yaml` it reads every Node and Peer. Needs
//! `--features apiserver-tests`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as KubeEvent, Node};
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, PostParams};

use wiremesh::agent::{
    AgentConfig, ClusterLink, HostInfo, Inputs, KernelConfig, Observer, RegistryConfig, run_with,
};
use wiremesh::model::{NodeName, WgKey};
use wiremesh::reconcile::OwnedState;
use wiremesh::registry::cluster::publish::{merge_patch, patch_node};
use wiremesh::registry::cluster::report::{EVENT_NAMESPACE, REASON_IDENTITY_RESTORED};
use wiremesh::registry::cluster::{
    ClientOptions, ClusterError, WatchOptions, list, peer_resource, peers_api, watch,
};
use wiremesh::topology::incremental::Event;

use crate::util::apiserver::{ApiServer, client};
use crate::util::mem_kernel::MemKernel;

const KEY_A: &str = "xNJEOu7NN15eM+y5mY6klkIdXAJfF9u84LdBYLvztTc=";
const KEY_B: &str = "GIRyTJ1vQ9q1P8VyBcm9X6zKX0Plfnp0gTQaTtCcmGk=";
const FORGED: &str = "0UHno+lxky2QJBklRgi1B3PLoZTn07vdJ1FhoO19AGo=";
const TOPOLOGY: &str = "topology.kubernetes.io/region";

/// Nodes `a` and `b`, each with a key, an endpoint and a pod CIDR (so both are mesh nodes), the
/// Peer CRD and one Peer, all written by the administrator.
async fn cluster(api: &ApiServer) -> Client {
    let admin = api.admin().await;
    let nodes = Api::<Node>::all(admin.clone());
    for (name, key, cidr, ip) in [
        ("a", KEY_A, "10.42.1.0/24", "10.0.0.5"),
        ("b", KEY_B, "10.42.2.0/24", "10.0.0.6"),
    ] {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "annotations": {
                "kilo.squat.ai/key": key,
                "kilo.squat.ai/location": name,
            } },
            "spec": { "podCIDR": cidr },
            "status": { "addresses": [{ "type": "InternalIP", "address": ip }] },
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/crd-peer.yaml"),
    )
    .unwrap();
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        wiremesh::yaml::from_str(&text).unwrap();
    Api::all(admin.clone())
        .create(&PostParams::default(), &crd)
        .await
        .unwrap();
    let mut peer = DynamicObject::new("laptop", &peer_resource());
    peer.data = serde_json::json!({ "spec": {
        "allowedIPs": ["10.5.0.1/32"], "publicKey": FORGED, "persistentKeepalive": 10,
    } });
    for _ in 0..100 {
        // The CRD is established after a moment.
        if peers_api(admin.clone())
            .create(&PostParams::default(), &peer)
            .await
            .is_ok()
        {
            return admin;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the Peer CRD never became usable");
}

fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}

fn forged_key() -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": {
        "wiremesh.io/key": FORGED,
        "wiremesh.io/force-endpoint": "198.51.100.66:51820",
    } } })
}

/// The HTTP status of a refused request, or what succeeded.
fn status<T: std::fmt::Debug>(r: Result<T, ClusterError>) -> Result<u16, String> {
    match r {
        Err(ClusterError::Api(kube::Error::Api(e))) => Ok(e.code),
        other => Err(format!("{other:?}")),
    }
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn the_service_account_may_patch_every_nodes_annotations_a_node_credential_only_its_own() {
    let api = ApiServer::start();
    let admin = cluster(&api).await;
    let nodes = Api::<Node>::all(admin);
    api.install_rbac().await;

    // The DaemonSet's ServiceAccount: one identity for every node's agent, so any agent's
    // token writes any Node's key (the forgery the agent's re-assertion repairs).
    let sa = api.agent().await;
    patch_node(&sa, "b", &forged_key()).await.unwrap();
    assert_eq!(
        annotations(&nodes.get("b").await.unwrap())
            .get("wiremesh.io/key")
            .map(String::as_str),
        Some(FORGED)
    );
    let undo = serde_json::json!({ "metadata": { "annotations": {
        "wiremesh.io/key": null, "wiremesh.io/force-endpoint": null,
    } } });
    patch_node(&sa, "b", &undo).await.unwrap();
    let b_before = annotations(&nodes.get("b").await.unwrap());

    // Node a's own credentials: its own Node, with the patch the agent publishes...
    let a = client(&api.node_kubeconfig("a")).await;
    let mine = merge_patch(
        &BTreeMap::from([(
            "wiremesh.io/endpoint".to_owned(),
            Some("10.0.0.5:51820".to_owned()),
        )]),
        1_700_000_000,
    );
    patch_node(&a, "a", &mine).await.unwrap();
    assert_eq!(
        annotations(&nodes.get("a").await.unwrap())
            .get("wiremesh.io/endpoint")
            .map(String::as_str),
        Some("10.0.0.5:51820")
    );
    // ...but not node b's: refused by NodeRestriction, b unchanged.
    assert_eq!(status(patch_node(&a, "b", &forged_key()).await), Ok(403));
    assert_eq!(status(patch_node(&a, "b", &mine).await), Ok(403));
    assert_eq!(annotations(&nodes.get("b").await.unwrap()), b_before);
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn a_node_credential_reads_every_node_and_peer_only_with_the_node_credentials_rbac() {
    let api = ApiServer::start();
    cluster(&api).await;
    let a = client(&api.node_kubeconfig("a")).await;

    // A kubelet may read Nodes (Kubernetes 1.20's Node authorizer), but not Peers.
    Api::<Node>::all(a.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(status(list(&a, TOPOLOGY).await), Ok(403));

    api.install_node_rbac().await;
    let mut seen = Err(String::new());
    for _ in 0..50 {
        // RBAC takes effect once the authorizer's cache has the binding.
        seen = list(&a, TOPOLOGY).await.map_err(|e| e.to_string());
        if seen.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (nodes, peers) = seen.unwrap();
    let names: Vec<&str> = nodes.items.iter().map(|n| n.name.0.as_str()).collect();
    assert_eq!(names, ["a", "b"], "{:?}", nodes.diagnostics);
    assert_eq!(peers.items.len(), 1, "{:?}", peers.diagnostics);

    // The agent's watch of both.
    let mut rx = watch(
        a,
        WatchOptions {
            topology_label: TOPOLOGY.into(),
            node: "a".into(),
        },
    );
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let b = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no synced watch of Nodes and Peers: {events:?}"))
            .expect("the watch task ended");
        events.extend(b.events);
        if b.synced {
            assert!(b.connected);
            break;
        }
    }
    let upserted = |name: &str| {
        events.iter().any(|e| match e {
            Event::NodeUpsert(n) => n.name.0 == name,
            Event::PeerUpsert(p) => p.name.0 == name,
            _ => false,
        })
    };
    assert!(
        upserted("a") && upserted("b") && upserted("laptop"),
        "{events:?}"
    );
}

/// Polls Node `name` until `pred` holds; panics after 20 s.
async fn until_node(
    api: &Api<Node>,
    name: &str,
    what: &str,
    pred: impl Fn(&BTreeMap<String, String>) -> bool,
) {
    for _ in 0..200 {
        if pred(&annotations(&api.get(name).await.unwrap())) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = api.get(name).await.unwrap();
    panic!("timed out waiting for {what}: {:?}", annotations(&n));
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn the_agent_with_its_nodes_credentials_publishes_and_restores_its_own_annotations_only() {
    let api = ApiServer::start();
    let admin = cluster(&api).await;
    let nodes = Api::<Node>::all(admin.clone());
    api.install_node_rbac().await;
    let a = client(&api.node_kubeconfig("a")).await;
    let b_before = annotations(&nodes.get("b").await.unwrap());

    let key: WgKey = KEY_A.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        node: NodeName("a".into()),
        registry: RegistryConfig::Kubernetes(ClientOptions::default()),
        private_key: dir.path().join("key"),
        topology_label: TOPOLOGY.into(),
        resync_period: Duration::from_secs(3600),
        check_in_period: Duration::from_secs(30),
        failover_hold: None,
        kernel: KernelConfig {
            interface: "wiremesh0".into(),
            bridge: "wmbr0".into(),
            wireguard: "auto".into(),
            wireguard_userspace: "wireguard-go".into(),
            firewall: "auto".into(),
            cni_config: dir.path().join("cni.conflist"),
        },
        mesh: Default::default(),
        listen: None,
    };
    let registry = watch(
        a.clone(),
        WatchOptions {
            topology_label: cfg.topology_label.clone(),
            node: "a".into(),
        },
    );
    let link = ClusterLink::spawn(a.clone(), "a".into(), cfg.check_in_period);
    let observer = Observer::new("a", Some(key));
    let (_kernel_tx, kernel_events) = tokio::sync::mpsc::channel(1);
    let inputs = Inputs {
        registry,
        cluster: Some(link),
        kernel_events,
        host: HostInfo::default(),
        observer,
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

    let both = |ann: &BTreeMap<String, String>, name: &str, want: &str| {
        ["kilo.squat.ai/", "wiremesh.io/"]
            .iter()
            .all(|p| ann.get(&format!("{p}{name}")).map(String::as_str) == Some(want))
    };
    until_node(
        &nodes,
        "a",
        "a's key and endpoint under both prefixes",
        |ann| both(ann, "key", KEY_A) && both(ann, "endpoint", "10.0.0.5:51820"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Someone else forges a's key: the agent writes its own back, as node a, and records the
    // incident as an Event (a kubelet may create Events).
    nodes
        .patch(
            "a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&forged_key()),
        )
        .await
        .unwrap();
    until_node(&nodes, "a", "a's own key back", |ann| {
        both(ann, "key", KEY_A)
    })
    .await;
    let events = Api::<KubeEvent>::namespaced(admin, EVENT_NAMESPACE);
    let mut restored = 0;
    for _ in 0..100 {
        restored = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some(REASON_IDENTITY_RESTORED))
            .count();
        if restored > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(restored, 1);

    // The same credentials cannot write b's key, whatever the agent were made to do.
    assert_eq!(status(patch_node(&a, "b", &forged_key()).await), Ok(403));
    assert_eq!(annotations(&nodes.get("b").await.unwrap()), b_before);

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
