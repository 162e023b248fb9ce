//! The lab's requests to its own Kubernetes API server (`--registry kube`): readiness, the Peer
//! CRD and the agents' RBAC (both from `manifests/`), one Node per lab node (as a kubelet
//! registers it), annotations, deletions, and reading the Nodes back for `status` and `graph`.
//!
//! The API server listens only on the lab's underlay, so every request runs on a thread of its
//! own that first enters the API namespace (`setns`), with a current-thread tokio runtime: every
//! socket the client opens belongs to that namespace, and nothing else in `meshctl` changes
//! namespace or becomes async. Requests use the administrator's kubeconfig.
//!
//! Depends on `kube`, `k8s-openapi`, the state (paths) and the spec (Node objects).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sched::CloneFlags;

use super::LabError;
use super::spec::{NodeSpec, kube_node};
use super::state::ApiServerState;
use super::sys::NETNS_DIR;
use crate::model::{MeshNode, MeshPeer};
use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
use crate::registry::file::Loaded;

/// The Peer CRD, as shipped in `manifests/`.
pub const CRD_PEER: &str = include_str!("../../manifests/crd-peer.yaml");

/// The agents' identity and least-privilege rights, as shipped in `manifests/`: the
/// ServiceAccount `kube-system/wiremesh` (the agent kubeconfig's user is its name), its
/// ClusterRole and ClusterRoleBinding.
pub const RBAC: &str = include_str!("../../manifests/rbac.yaml");

/// The field manager of the lab's server-side applies.
pub const FIELD_MANAGER: &str = "meshctl-lab";

/// The label `meshctl multicluster link` puts on the Peers it keeps in a cluster: the name of
/// the cluster whose segment each stands for.
pub const LINKED_CLUSTER_LABEL: &str = crate::multicluster::LINK_LABEL;

/// Run `f` on a thread that entered network namespace `netns`, on a current-thread runtime.
pub fn in_netns<T, Fut>(netns: &str, f: impl FnOnce() -> Fut + Send) -> Result<T, LabError>
where
    T: Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    let path = Path::new(NETNS_DIR).join(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path).map_err(LabError::io("open", &path))?;
            // Only this thread changes namespace; the process stays where it was.
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                LabError::io("enter network namespace", &path)(std::io::Error::from(e))
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(LabError::io("start a runtime for", &path))?;
            rt.block_on(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(LabError::Options(format!(
                "the request thread in {netns} panicked"
            )))
        })
    })
}

/// A client from `kubeconfig`, with short timeouts (the API server is next door).
pub async fn client(kubeconfig: &Path) -> Result<Client, LabError> {
    let bad = |e: &dyn std::fmt::Display| {
        LabError::Options(format!("kubeconfig {}: {e}", kubeconfig.display()))
    };
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| bad(&e))?;
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(&e))?;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = Some(Duration::from_secs(20));
    cfg.write_timeout = Some(Duration::from_secs(20));
    Client::try_from(cfg).map_err(LabError::kube("building a client"))
}

/// Run `f` with an administrator client of `api`, in its namespace.
pub fn with_admin<T, Fut>(
    api: &ApiServerState,
    f: impl FnOnce(Client) -> Fut + Send,
) -> Result<T, LabError>
where
    T: Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    let kubeconfig = api.admin_kubeconfig();
    in_netns(&api.netns, || async move {
        let c = client(&kubeconfig).await?;
        f(c).await
    })
}

/// Wait until the API server serves authorized requests, bounded by `timeout`: the
/// administrator reads `kube-system` (RBAC bootstrapped) and, once the agents' RBAC is installed,
/// the agents' identity may list Nodes (right after a restart the RBAC authorizer denies it
/// for a moment, while `system:masters` is already let in). `alive` is asked between tries and
/// fails the wait when a process died.
pub fn wait_ready(
    api: &ApiServerState,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), LabError> + Send,
) -> Result<(), LabError> {
    let url = api.url();
    let addr = std::net::SocketAddr::from((api.ip, api.port));
    let agent_kubeconfig = api.agent_kubeconfig();
    with_admin(api, |c| async move {
        let t0 = Instant::now();
        let namespaces = Api::<Namespace>::all(c.clone());
        let agent_nodes = Api::<Node>::all(client(&agent_kubeconfig).await?);
        let rbac = Api::<ClusterRoleBinding>::all(c);
        loop {
            // A plain connect first: the client logs every refused connection as an error.
            let err = match tokio::net::TcpStream::connect(addr).await {
                Err(e) => e.to_string(),
                Ok(_) => match namespaces.get("kube-system").await {
                    Err(e) => e.to_string(),
                    Ok(_) => match rbac.get_opt("wiremesh").await {
                        Err(e) => e.to_string(),
                        // Before `install` there is nothing the agents may do yet.
                        Ok(None) => return Ok(()),
                        Ok(Some(_)) => {
                            match agent_nodes.list(&ListParams::default().limit(1)).await {
                                Ok(_) => return Ok(()),
                                Err(e) => format!("the agents' identity: {e}"),
                            }
                        }
                    },
                },
            };
            alive()?;
            if t0.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("the API server at {url} to answer (last: {err})"),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Whether the API server answers now (one request, a few seconds at most).
pub fn reachable(api: &ApiServerState) -> Result<(), LabError> {
    with_admin(api, |c| async move {
        tokio::time::timeout(
            Duration::from_secs(5),
            Api::<Namespace>::all(c).get("kube-system"),
        )
        .await
        .map_err(|_| LabError::Timeout {
            what: "the API server to answer".to_owned(),
            secs: 5,
        })?
        .map(drop)
        .map_err(LabError::kube("reading namespace kube-system"))
    })
}

/// The YAML documents of `text` as JSON values (empty documents skipped).
fn documents(text: &str) -> Result<Vec<serde_json::Value>, LabError> {
    let docs: Vec<serde_json::Value> = crate::yaml::documents(text)?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: serde_json::Value) -> Result<T, LabError> {
    serde_json::from_value(v).map_err(|source| LabError::Json {
        what: what.to_owned(),
        source,
    })
}

/// Server-side apply `obj` named `name` through `api`.
async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), LabError>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map(drop)
    .map_err(LabError::kube(format!("applying {name}")))
}

/// Install the Peer CRD (and wait until it is established) and the agents' RBAC.
pub fn install(api: &ApiServerState) -> Result<(), LabError> {
    let crd: CustomResourceDefinition =
        decode("manifests/crd-peer.yaml", crate::yaml::from_str(CRD_PEER)?)?;
    let rbac = documents(RBAC)?;
    with_admin(api, |c| async move {
        let crds = Api::<CustomResourceDefinition>::all(c.clone());
        let crd_name = crd.metadata.name.clone().unwrap_or_default();
        apply(&crds, &crd_name, &crd).await?;
        for doc in rbac {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match kind.as_str() {
                "ServiceAccount" => {
                    let ns = doc["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned();
                    let obj: ServiceAccount = decode("RBAC ServiceAccount", doc)?;
                    apply(&Api::namespaced(c.clone(), &ns), &name, &obj).await?;
                }
                "ClusterRole" => {
                    let obj: ClusterRole = decode("RBAC ClusterRole", doc)?;
                    apply(&Api::all(c.clone()), &name, &obj).await?;
                }
                "ClusterRoleBinding" => {
                    let obj: ClusterRoleBinding = decode("RBAC ClusterRoleBinding", doc)?;
                    apply(&Api::all(c.clone()), &name, &obj).await?;
                }
                other => {
                    return Err(LabError::Options(format!(
                        "RBAC: unexpected kind {other:?}"
                    )));
                }
            }
        }
        // The Peer resource is served once the CRD is established (a moment after create).
        let t0 = Instant::now();
        loop {
            let crd = crds
                .get(&crd_name)
                .await
                .map_err(LabError::kube(format!("reading {crd_name}")))?;
            let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(LabError::Timeout {
                    what: format!("CRD {crd_name} to be established"),
                    secs: 20,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Create the Node of each of `nodes` and write its `status.addresses` (the API server drops
/// `status` on create).
pub fn register(api: &ApiServerState, nodes: &[NodeSpec]) -> Result<(), LabError> {
    let objects: Vec<(String, Node, serde_json::Value)> = nodes
        .iter()
        .map(|n| {
            let mut v = kube_node(n);
            let status = v["status"].take();
            decode(&format!("Node {}", n.name), v).map(|node| {
                (
                    n.name.clone(),
                    node,
                    serde_json::json!({ "status": status }),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    with_admin(api, |c| async move {
        let nodes = Api::<Node>::all(c);
        for (name, node, status) in &objects {
            nodes
                .create(&PostParams::default(), node)
                .await
                .map_err(LabError::kube(format!("creating Node {name}")))?;
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .map_err(LabError::kube(format!("writing the status of Node {name}")))?;
            tracing::info!(node = %name, "Node registered");
        }
        Ok(())
    })
}

/// One `lab annotate` argument: `KEY=VALUE` sets, `KEY-` removes. A key without a `/` gets
/// Kilo's prefix (`location=x` is `kilo.squat.ai/location=x`).
pub fn parse_annotation(arg: &str) -> Result<(String, Option<String>), LabError> {
    let (key, value) = match arg.split_once('=') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => match arg.strip_suffix('-') {
            Some(k) => (k, None),
            None => {
                return Err(LabError::Options(format!(
                    "{arg:?}: write KEY=VALUE to set an annotation or KEY- to remove it"
                )));
            }
        },
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    if !valid(key) || key.matches('/').count() > 1 {
        return Err(LabError::Options(format!(
            "{key:?} is not an annotation key (prefix/name of letters, digits, '-', '_', '.')"
        )));
    }
    let key = if key.contains('/') {
        key.to_owned()
    } else {
        format!("{}{key}", crate::registry::annotations::KILO_PREFIX)
    };
    Ok((key, value))
}

/// Set (`Some`) or remove (`None`) annotations of Node `node` with one merge patch.
pub fn annotate(
    api: &ApiServerState,
    node: &str,
    changes: &[(String, Option<String>)],
) -> Result<(), LabError> {
    let map: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.clone()
                    .map_or(serde_json::Value::Null, serde_json::Value::String),
            )
        })
        .collect();
    let patch = serde_json::json!({ "metadata": { "annotations": map } });
    with_admin(api, |c| async move {
        Api::<Node>::all(c)
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(LabError::kube(format!("annotating Node {node}")))
    })
}

/// Delete Node `node`; `false` when there was none.
pub fn delete_node(api: &ApiServerState, node: &str) -> Result<bool, LabError> {
    with_admin(api, |c| async move {
        match Api::<Node>::all(c)
            .delete(node, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(LabError::kube(format!("deleting Node {node}"))(e)),
        }
    })
}

/// Every Node, as the API server has it now.
pub fn nodes(api: &ApiServerState) -> Result<Vec<Node>, LabError> {
    with_admin(api, |c| async move {
        Api::<Node>::all(c)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(LabError::kube("listing Nodes"))
    })
}

/// The Nodes and Peers on `api`, parsed as the agents parse them (those left out come back as
/// diagnostics).
pub fn mesh(api: &ApiServerState) -> Result<(Loaded<MeshNode>, Loaded<MeshPeer>), LabError> {
    with_admin(api, |c| async move {
        crate::registry::cluster::list(&c, DEFAULT_TOPOLOGY_LABEL)
            .await
            .map_err(|e| {
                LabError::Options(format!("reading Nodes and Peers from {}: {e}", api.url()))
            })
    })
}

/// The Peers on `api` that link cluster `remote` (label [`LINKED_CLUSTER_LABEL`]`=remote`),
/// parsed; none while the Peer CRD is missing.
pub fn linked_peers(api: &ApiServerState, remote: &str) -> Result<Vec<MeshPeer>, LabError> {
    let selector = format!("{LINKED_CLUSTER_LABEL}={remote}");
    with_admin(api, |c| async move {
        let list = crate::registry::cluster::peers_api(c)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(LabError::kube(format!("listing Peers {selector}")))?;
        Ok(list
            .items
            .iter()
            .filter_map(|o| crate::registry::cluster::peer_entry(o).ok())
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_gives_the_agent_exactly_what_it_needs() {
        let docs = documents(RBAC).unwrap();
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
        );
        let role: ClusterRole = decode("role", docs[1].clone()).unwrap();
        let rules = role.rules.unwrap();
        let verbs = |group: &str, res: &str| -> Vec<String> {
            rules
                .iter()
                .find(|r| {
                    r.api_groups.as_deref() == Some(&[group.to_owned()][..])
                        && r.resources.as_deref() == Some(&[res.to_owned()][..])
                })
                .map(|r| r.verbs.clone())
                .unwrap_or_default()
        };
        assert_eq!(verbs("", "nodes"), ["get", "list", "watch", "patch"]);
        assert_eq!(verbs("kilo.squat.ai", "peers"), ["get", "list", "watch"]);
        assert_eq!(verbs("", "events"), ["create", "patch"]);
        let binding: ClusterRoleBinding = decode("binding", docs[2].clone()).unwrap();
        let s = &binding.subjects.unwrap()[0];
        // RBAC matches a ServiceAccount subject by the user name the agent's token carries.
        assert_eq!(
            format!(
                "system:serviceaccount:{}:{}",
                s.namespace.as_deref().unwrap(),
                s.name
            ),
            super::super::apiserver::AGENT_USER
        );
        let _: CustomResourceDefinition =
            decode("crd", crate::yaml::from_str(CRD_PEER).unwrap()).unwrap();
    }

    #[test]
    fn annotate_arguments_set_or_remove_and_bare_keys_are_kilos() {
        assert_eq!(
            parse_annotation("location=eu-west").unwrap(),
            (
                "kilo.squat.ai/location".to_owned(),
                Some("eu-west".to_owned())
            )
        );
        assert_eq!(
            parse_annotation("wiremesh.io/leader=").unwrap(),
            ("wiremesh.io/leader".to_owned(), Some(String::new()))
        );
        assert_eq!(
            parse_annotation("kilo.squat.ai/force-endpoint-").unwrap(),
            ("kilo.squat.ai/force-endpoint".to_owned(), None)
        );
        for bad in ["location", "=x", "a/b/c=1", "sp ace=1"] {
            assert!(parse_annotation(bad).is_err(), "{bad}");
        }
    }
}
