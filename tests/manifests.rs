//! The install manifests in `manifests/`. Without a server: the bundles are what
//! `manifests/build.sh` makes of their parts, every document is a named Kubernetes object, and
//! the DaemonSets carry what the agent needs on every node. Against a real kube-apiserver
//! (`--features apiserver-tests`): the server accepts every document of both bundles without
//! dropping a field, the ClusterRole gives the agent's identity exactly the rights it needs (each
//! right and each refusal really tried), and the example Peers apply and read back unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Node, Secret};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchParams,
};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{Value, json};

use crate::util::apiserver::ApiServer;

/// The two install flavours: bundle name, and the host's CNI config and plugin directories.
const FLAVOURS: &[Flavour] = &[
    Flavour {
        name: "k3s",
        cni_conf_dir: "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        cni_bin_dir: "/var/lib/rancher/k3s/data/current/bin",
    },
    Flavour {
        name: "kubeadm",
        cni_conf_dir: "/etc/cni/net.d",
        cni_bin_dir: "/opt/cni/bin",
    },
];

struct Flavour {
    name: &'static str,
    cni_conf_dir: &'static str,
    cni_bin_dir: &'static str,
}

impl Flavour {
    fn bundle(&self) -> String {
        format!("wiremesh-{}.yaml", self.name)
    }
    fn daemonset_part(&self) -> String {
        format!("parts/daemonset-{}.yaml", self.name)
    }
    fn node_credentials_patch(&self) -> String {
        format!("node-credentials/daemonset-{}.yaml", self.name)
    }
    /// The kubelet's kubeconfig and the files it names (kubeadm: its certificate and key in one
    /// file, the CA inline; k3s: certificate, key and CA in three files).
    fn kubelet_files(&self) -> &'static [&'static str] {
        match self.name {
            "k3s" => &[
                "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
                "/var/lib/rancher/k3s/agent/client-kubelet.crt",
                "/var/lib/rancher/k3s/agent/client-kubelet.key",
                "/var/lib/rancher/k3s/agent/server-ca.crt",
            ],
            _ => &[
                "/etc/kubernetes/kubelet.conf",
                "/var/lib/kubelet/pki/kubelet-client-current.pem",
            ],
        }
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest_path(name: &str) -> PathBuf {
    repo().join("manifests").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn manifest(name: &str) -> String {
    read(&manifest_path(name))
}

/// Every YAML document of `text`, as JSON; empty documents (comments only) are skipped, as
/// kubectl skips them.
fn documents(text: &str, what: &str) -> Vec<Value> {
    wiremesh::yaml::documents::<Value>(text)
        .unwrap_or_else(|e| panic!("{what}: not YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// `kind/name` of a document, for messages.
fn label(doc: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    format!("{}/{}", s(&doc["kind"]), s(&doc["metadata"]["name"]))
}

/// Every file that `kubectl apply -f` may be given.
fn all_manifest_files() -> Vec<PathBuf> {
    let mut files = vec![
        manifest_path("crd-peer.yaml"),
        manifest_path("rbac.yaml"),
        repo().join("examples/peers.yaml"),
    ];
    files.push(manifest_path("node-credentials/rbac.yaml"));
    for f in FLAVOURS {
        files.push(manifest_path(&f.bundle()));
        files.push(manifest_path(&f.daemonset_part()));
        files.push(manifest_path(&f.node_credentials_patch()));
    }
    files
}

#[test]
fn bundles_are_up_to_date_with_their_parts() {
    let out = Command::new(manifest_path("build.sh"))
        .arg("--check")
        .output()
        .expect("run manifests/build.sh --check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubectl kustomize DIR` (kubectl's built-in kustomize), as YAML documents.
fn kustomize(dir: &str) -> Vec<Value> {
    let path = manifest_path(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("kubectl kustomize (scripts/setup.sh installs kubectl): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout), dir)
}

/// Documents by `kind/name`, each once.
fn by_label(docs: Vec<Value>, what: &str) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    for d in docs {
        let l = label(&d);
        assert!(out.insert(l.clone(), d).is_none(), "{what}: {l} twice");
    }
    out
}

#[test]
fn kustomize_overlays_render_the_same_objects_as_the_bundles() {
    for f in FLAVOURS {
        let rendered = by_label(kustomize(&format!("kustomize/{}", f.name)), f.name);
        let bundle = by_label(documents(&manifest(&f.bundle()), &f.bundle()), &f.bundle());
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            bundle.keys().collect::<Vec<_>>(),
            "{}: the same objects",
            f.name
        );
        for (l, want) in &bundle {
            assert_eq!(
                &rendered[l], want,
                "{}: {l} differs from the bundle's",
                f.name
            );
        }
    }
}

#[test]
fn example_overlay_changes_only_image_granularity_and_listen_port() {
    let mut rendered = by_label(kustomize("kustomize/example"), "example");
    let bundle = by_label(
        documents(&manifest("wiremesh-kubeadm.yaml"), "kubeadm"),
        "kubeadm",
    );
    let ds = rendered
        .get_mut("DaemonSet/wiremesh")
        .expect("the DaemonSet");
    let container = &mut ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/platform/wiremesh:0.1.0-example"
    );
    let env = container["env"].as_array_mut().expect("env");
    let value = |env: &[Value], name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(value(env, "WIREMESH_GRANULARITY"), Some(json!("full")));
    assert_eq!(value(env, "WIREMESH_PORT"), Some(json!("51821")));
    // Take the three changes back out: the rest is the kubeadm bundle.
    env.retain(|e| e["name"] != "WIREMESH_GRANULARITY" && e["name"] != "WIREMESH_PORT");
    container["image"] =
        bundle["DaemonSet/wiremesh"]["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_eq!(rendered, bundle);
}

#[test]
fn bundles_hold_the_crd_and_rbac_byte_for_byte_and_nothing_else() {
    let crd = manifest("crd-peer.yaml");
    let rbac = manifest("rbac.yaml");
    for f in FLAVOURS {
        let bundle = manifest(&f.bundle());
        let ds = manifest(&f.daemonset_part());
        for (part, text) in [
            ("crd-peer.yaml", &crd),
            ("rbac.yaml", &rbac),
            (f.daemonset_part().as_str(), &ds),
        ] {
            assert!(
                bundle.contains(&format!("---\n{text}")),
                "{} does not hold {part} verbatim",
                f.bundle()
            );
        }
        let mut parts = documents(&crd, "crd-peer.yaml");
        parts.extend(documents(&rbac, "rbac.yaml"));
        parts.extend(documents(&ds, &f.daemonset_part()));
        assert_eq!(documents(&bundle, &f.bundle()), parts, "{}", f.bundle());
    }
}

#[test]
fn every_document_is_a_named_kubernetes_object() {
    for path in all_manifest_files() {
        let what = path.display().to_string();
        let docs = documents(&read(&path), &what);
        assert!(!docs.is_empty(), "{what}: no document");
        for (i, d) in docs.iter().enumerate() {
            for field in [&d["apiVersion"], &d["kind"], &d["metadata"]["name"]] {
                assert!(
                    field.as_str().is_some_and(|s| !s.is_empty()),
                    "{what}: document {i} lacks apiVersion, kind or metadata.name: {d}"
                );
            }
        }
    }
}

#[test]
fn bundles_install_the_crd_and_rbac_before_the_daemonset() {
    for f in FLAVOURS {
        let docs = documents(&manifest(&f.bundle()), &f.bundle());
        let kinds: Vec<_> = docs.iter().map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet"
            ]
            .map(Some),
            "{}",
            f.bundle()
        );
    }
}

fn daemonset(f: &Flavour) -> DaemonSet {
    let docs = documents(&manifest(&f.bundle()), &f.bundle());
    let ds = docs
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap_or_else(|| panic!("{}: no DaemonSet", f.bundle()));
    serde_json::from_value(ds).unwrap_or_else(|e| panic!("{}: DaemonSet: {e}", f.bundle()))
}

#[test]
fn daemonset_runs_the_agent_on_every_node_in_the_host_network() {
    for f in FLAVOURS {
        let ds = daemonset(f);
        let b = f.bundle();
        assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"), "{b}");
        let spec = ds.spec.as_ref().expect("spec");
        let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{b}");
        let max = strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref());
        assert_eq!(
            max,
            Some(&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
            "{b}"
        );
        let pod = spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(pod.host_network, Some(true), "{b}");
        assert_eq!(
            pod.dns_policy.as_deref(),
            Some("ClusterFirstWithHostNet"),
            "{b}"
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("wiremesh"), "{b}");
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{b}"
        );
        // One toleration matching every taint: `operator: Exists` with no key and no effect.
        let tol = serde_json::to_value(&pod.tolerations).expect("tolerations");
        assert_eq!(tol, json!([{"operator": "Exists"}]), "{b}");
        assert_eq!(pod.containers.len(), 1, "{b}");
        let c = &pod.containers[0];
        assert_eq!(c.name, "wiremesh", "{b}");
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/wiremesh/wiremesh:0.1.0"),
            "{b}"
        );
        assert_eq!(c.args.as_deref(), Some(&["agent".to_owned()][..]), "{b}");
        assert!(c.command.is_none(), "{b}: the image's entrypoint runs");
        let res = serde_json::to_value(&c.resources).expect("resources");
        assert_eq!(
            res,
            json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "384Mi"}}),
            "{b}"
        );
    }
}

#[test]
fn daemonset_probes_healthz_and_readyz_on_the_agents_port() {
    for f in FLAVOURS {
        let ds = daemonset(f);
        let c = &ds
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0];
        let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            let p = p
                .as_ref()
                .unwrap_or_else(|| panic!("{}: probe missing", f.bundle()));
            let get = p.http_get.as_ref().expect("httpGet");
            // Host network: the node's IP, the agent's default --listen port.
            assert!(get.host.is_none(), "{}", f.bundle());
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1107),
                "{}",
                f.bundle()
            );
            get.path.clone().unwrap_or_default()
        };
        assert_eq!(probe(&c.liveness_probe), "/healthz");
        assert_eq!(probe(&c.readiness_probe), "/readyz");
        // Lenient liveness: a minute without an answer before a restart.
        let live = c.liveness_probe.as_ref().expect("liveness");
        let window = live.period_seconds.unwrap_or(10) * live.failure_threshold.unwrap_or(3);
        assert!(window >= 60, "{}: liveness window {window} s", f.bundle());
    }
}

#[test]
fn daemonset_sets_the_agents_environment() {
    for f in FLAVOURS {
        let ds = daemonset(f);
        let b = f.bundle();
        let c = &ds
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0];
        let env = serde_json::to_value(c.env.as_ref().expect("env")).expect("env");
        assert_eq!(
            env,
            json!([
                {"name": "WIREMESH_HOSTNAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "WIREMESH_CNI_CONFIG",
                 "value": format!("{}/10-wiremesh.conflist", f.cni_conf_dir)},
                {"name": "WIREMESH_PRIVATE_KEY", "value": "/var/lib/wiremesh/key"},
                {"name": "WIREMESH_LOG_LEVEL", "value": "info"},
            ]),
            "{b}"
        );
        // In-cluster: nothing points the agent at a kubeconfig or a node file.
        assert!(c.env_from.is_none(), "{b}");
        assert!(
            !env.to_string().contains("KUBECONFIG") && !env.to_string().contains("NODES"),
            "{b}"
        );
    }
}

#[test]
fn daemonset_drops_every_capability_but_net_admin_and_net_raw_on_a_read_only_root() {
    for f in FLAVOURS {
        let ds = daemonset(f);
        let c = &ds
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0];
        let sc = serde_json::to_value(&c.security_context).expect("securityContext");
        assert_eq!(
            sc,
            json!({
                "privileged": false,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }),
            "{}",
            f.bundle()
        );
    }
}

#[test]
fn daemonset_gives_the_read_only_root_a_small_writable_tmp() {
    for f in FLAVOURS {
        let ds = daemonset(f);
        let pod = ds.spec.expect("spec").template.spec.expect("pod");
        let mount = pod.containers[0]
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|m| m.mount_path == "/tmp")
            .unwrap_or_else(|| panic!("{}: no /tmp", f.bundle()))
            .clone();
        let v = pod
            .volumes
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|v| v.name == mount.name)
            .expect("volume")
            .clone();
        let empty = v.empty_dir.expect("/tmp is an emptyDir");
        assert_eq!(empty.medium.as_deref(), Some("Memory"), "{}", f.bundle());
        assert!(empty.size_limit.is_some(), "{}", f.bundle());
    }
}

/// (host path, hostPath type, path in the container, read only) of every hostPath volume (the
/// `/tmp` emptyDir is checked on its own).
fn host_mounts(ds: &DaemonSet) -> Vec<(String, String, String, bool)> {
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let pod = pod.expect("pod spec");
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = pod.containers[0]
        .volume_mounts
        .as_deref()
        .unwrap_or_default();
    assert_eq!(volumes.len(), mounts.len(), "one mount per volume");
    mounts
        .iter()
        .filter(|m| m.mount_path != "/tmp")
        .map(|m| {
            let v = volumes
                .iter()
                .find(|v| v.name == m.name)
                .unwrap_or_else(|| panic!("mount {} has no volume", m.name));
            let hp = v
                .host_path
                .as_ref()
                .unwrap_or_else(|| panic!("volume {} is not a hostPath", v.name));
            (
                hp.path.clone(),
                hp.type_.clone().unwrap_or_default(),
                m.mount_path.clone(),
                m.read_only.unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn daemonset_mounts_the_flavours_cni_paths_and_the_agents_host_state() {
    for f in FLAVOURS {
        let mounts = host_mounts(&daemonset(f));
        let m = |host: &str, ty: &str, inside: &str, ro: bool| {
            (host.to_owned(), ty.to_owned(), inside.to_owned(), ro)
        };
        let want = vec![
            // Same path inside, so WIREMESH_CNI_CONFIG is the host's file.
            m(f.cni_conf_dir, "DirectoryOrCreate", f.cni_conf_dir, false),
            // Where `meshctl doctor` looks for the plugins.
            m(f.cni_bin_dir, "DirectoryOrCreate", "/opt/cni/bin", true),
            m(
                "/var/lib/wiremesh",
                "DirectoryOrCreate",
                "/var/lib/wiremesh",
                false,
            ),
            m("/lib/modules", "Directory", "/lib/modules", true),
            m("/dev/net/tun", "CharDevice", "/dev/net/tun", false),
            m(
                "/var/run/wireguard",
                "DirectoryOrCreate",
                "/var/run/wireguard",
                false,
            ),
            m(
                "/run/xtables.lock",
                "FileOrCreate",
                "/run/xtables.lock",
                false,
            ),
        ];
        assert_eq!(mounts, want, "{}", f.bundle());
    }
}

#[test]
fn k3s_and_kubeadm_daemonsets_differ_only_in_cni_paths() {
    let [k3s, kubeadm] = FLAVOURS else {
        panic!("two flavours")
    };
    let text = serde_json::to_string(&daemonset(k3s))
        .expect("json")
        .replace(k3s.cni_conf_dir, kubeadm.cni_conf_dir)
        .replace(k3s.cni_bin_dir, kubeadm.cni_bin_dir);
    let k3s_as_kubeadm: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        k3s_as_kubeadm,
        serde_json::to_value(daemonset(kubeadm)).expect("json")
    );
}

#[test]
fn cluster_role_has_no_wildcards_and_no_write_beyond_node_patch_and_events() {
    let docs = documents(&manifest("rbac.yaml"), "rbac.yaml");
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let rules = role["rules"].as_array().expect("rules");
    for r in rules {
        let strings = |k: &str| -> Vec<&str> {
            r[k].as_array()
                .unwrap_or_else(|| panic!("rule without {k}: {r}"))
                .iter()
                .map(|v| v.as_str().expect("string"))
                .collect()
        };
        for k in ["apiGroups", "resources", "verbs"] {
            assert!(!strings(k).contains(&"*"), "wildcard in {r}");
        }
        let writes: Vec<_> = strings("verbs")
            .into_iter()
            .filter(|v| !["get", "list", "watch"].contains(v))
            .collect();
        let resources = strings("resources");
        match resources.as_slice() {
            ["nodes"] => assert_eq!(writes, ["patch"], "{r}"),
            ["events"] => assert_eq!(writes, ["create", "patch"], "{r}"),
            _ => assert!(writes.is_empty(), "{r} writes"),
        }
    }
}

#[test]
fn node_credentials_role_only_reads_nodes_and_peers_for_the_group_system_nodes() {
    let docs = documents(
        &manifest("node-credentials/rbac.yaml"),
        "node-credentials/rbac.yaml",
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let rules: Vec<(Value, Value, Value)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["apiGroups"].clone(),
                r["resources"].clone(),
                r["verbs"].clone(),
            )
        })
        .collect();
    let read = json!(["get", "list", "watch"]);
    assert_eq!(
        rules,
        [
            (json!([""]), json!(["nodes"]), read.clone()),
            (json!(["kilo.squat.ai"]), json!(["peers"]), read),
        ]
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes" }])
    );
}

// ---- Against a real kube-apiserver ----

/// Every field of `sent` is in `got` with the same value (objects by key, arrays by index):
/// paths of the ones that are not. The server drops fields it does not know (1.20 has no strict
/// field validation), so this is how a misspelt field shows.
fn dropped_fields(sent: &Value, got: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, got) {
        (Value::Object(s), Value::Object(g)) => {
            for (k, v) in s {
                match g.get(k) {
                    Some(gv) => dropped_fields(v, gv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(s), Value::Array(g)) if s.len() == g.len() => {
            for (i, (sv, gv)) in s.iter().zip(g).enumerate() {
                dropped_fields(sv, gv, &format!("{path}[{i}]"), out);
            }
        }
        _ if sent == got => {}
        _ => out.push(format!("{path}: sent {sent}, got {got}")),
    }
}

#[track_caller]
fn assert_nothing_dropped(sent: &Value, got: &DynamicObject, what: &str) {
    let mut dropped = Vec::new();
    let got = serde_json::to_value(got).expect("json");
    dropped_fields(sent, &got, "", &mut dropped);
    assert!(dropped.is_empty(), "{what}: the server dropped {dropped:?}");
}

fn gvk_of(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// The API of the document's kind, in its namespace (or `default`) when namespaced. Retried for
/// a while: discovery lags a freshly established CRD.
async fn api_for(client: &kube::Client, doc: &Value) -> (Api<DynamicObject>, ApiResource) {
    let gvk = gvk_of(doc);
    let mut last = None;
    for _ in 0..50 {
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok((ar, caps)) => {
                let api = match caps.scope {
                    Scope::Cluster => Api::all_with(client.clone(), &ar),
                    Scope::Namespaced => {
                        let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                        Api::namespaced_with(client.clone(), ns, &ar)
                    }
                };
                return (api, ar);
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{gvk:?} not served: {last:?}")
}

fn dynamic(doc: &Value) -> DynamicObject {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", label(doc)))
}

/// Create `doc` for real (server-side apply, as `kubectl apply --server-side` does) and check
/// that nothing of it was dropped.
async fn apply(client: &kube::Client, doc: &Value) -> DynamicObject {
    let (api, _) = api_for(client, doc).await;
    let name = doc["metadata"]["name"].as_str().expect("name");
    let pp = PatchParams::apply("wiremesh-test");
    let got = api
        .patch(name, &pp, &Patch::Apply(dynamic(doc)))
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", label(doc)));
    assert_nothing_dropped(doc, &got, &label(doc));
    got
}

/// Apply a file's documents for real, in order; wait until a CRD among them is established.
async fn apply_file(client: &kube::Client, path: &Path) {
    for doc in documents(&read(path), &path.display().to_string()) {
        apply(client, &doc).await;
        if doc["kind"] == "CustomResourceDefinition" {
            let name = doc["metadata"]["name"].as_str().expect("name");
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let established = kube::runtime::wait::await_condition(
                crds,
                name,
                kube::runtime::wait::conditions::is_crd_established(),
            );
            tokio::time::timeout(Duration::from_secs(20), established)
                .await
                .unwrap_or_else(|_| panic!("CRD {name} not established within 20 s"))
                .unwrap_or_else(|e| panic!("waiting for CRD {name}: {e}"));
        }
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
async fn server_accepts_every_bundle_document_in_a_dry_run_without_dropping_a_field() {
    let server = ApiServer::start();
    let admin = server.admin().await;
    for f in FLAVOURS {
        for doc in documents(&manifest(&f.bundle()), &f.bundle()) {
            let what = format!("{}: {}", f.bundle(), label(&doc));
            let (api, _) = api_for(&admin, &doc).await;
            let pp = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let got = api
                .create(&pp, &dynamic(&doc))
                .await
                .unwrap_or_else(|e| panic!("{what}: refused: {e}"));
            assert_nothing_dropped(&doc, &got, &what);
            // A dry run: nothing stored.
            let name = doc["metadata"]["name"].as_str().expect("name");
            let stored = api.get_opt(name).await.expect("get");
            assert!(stored.is_none(), "{what}: stored by a dry run");
        }
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
async fn example_peers_apply_and_read_back_unchanged() {
    let server = ApiServer::start();
    let admin = server.admin().await;
    apply_file(&admin, &manifest_path("crd-peer.yaml")).await;
    let path = repo().join("examples/peers.yaml");
    let docs = documents(&read(&path), "examples/peers.yaml");
    assert!(!docs.is_empty());
    for doc in &docs {
        apply(&admin, doc).await;
    }
    let (peers, _) = api_for(&admin, &docs[0]).await;
    let listed = peers.list(&Default::default()).await.expect("list peers");
    assert_eq!(listed.items.len(), docs.len());
    for doc in &docs {
        let name = doc["metadata"]["name"].as_str().expect("name");
        let got = peers.get(name).await.expect("get peer");
        assert_eq!(got.data["spec"], doc["spec"], "peer {name}");
    }
}

/// The request was refused by authorization: HTTP 403.
#[track_caller]
fn assert_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
async fn agent_may_read_nodes_and_peers_patch_nodes_and_record_events_and_nothing_more() {
    let server = ApiServer::start();
    let admin = server.admin().await;
    // Before the RBAC: the agent's identity may do nothing.
    let agent = server.agent().await;
    let agent_nodes: Api<Node> = Api::all(agent.clone());
    assert_forbidden(
        agent_nodes.list(&Default::default()).await,
        "list nodes without RBAC",
    );

    apply_file(&admin, &manifest_path("crd-peer.yaml")).await;
    apply_file(&admin, &manifest_path("rbac.yaml")).await;
    apply_file(&admin, &repo().join("examples/peers.yaml")).await;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "annotations": {"kilo.squat.ai/location": "fra"}},
    }))
    .expect("node");
    let admin_nodes: Api<Node> = Api::all(admin.clone());
    admin_nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");

    // Allowed: what the agent does.
    let listed = agent_nodes
        .list(&Default::default())
        .await
        .expect("list nodes");
    assert_eq!(listed.items.len(), 1);
    let got = agent_nodes.get("node-a").await.expect("get node");
    let rv = got
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion");
    let wp = WatchParams::default().timeout(1);
    drop(agent_nodes.watch(&wp, &rv).await.expect("watch nodes"));
    let merge = json!({"metadata": {"annotations": {"wiremesh.io/public-key": "merge"}}});
    agent_nodes
        .patch("node-a", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .expect("merge-patch node annotations");
    let ssa = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "annotations": {"wiremesh.io/endpoint": "192.0.2.1:51820"}},
    });
    agent_nodes
        .patch(
            "node-a",
            &PatchParams::apply("wiremesh"),
            &Patch::Apply(&ssa),
        )
        .await
        .expect("server-side apply of node annotations");
    let annotations = admin_nodes
        .get("node-a")
        .await
        .expect("get node")
        .metadata
        .annotations
        .unwrap_or_default();
    assert_eq!(annotations["wiremesh.io/public-key"], "merge");
    assert_eq!(annotations["wiremesh.io/endpoint"], "192.0.2.1:51820");
    assert_eq!(annotations["kilo.squat.ai/location"], "fra");

    let peer_doc = documents(&read(&repo().join("examples/peers.yaml")), "peers")
        .into_iter()
        .next()
        .expect("a peer");
    let (_, peer_ar) = api_for(&admin, &peer_doc).await;
    let agent_peers: Api<DynamicObject> = Api::all_with(agent.clone(), &peer_ar);
    let peers = agent_peers
        .list(&Default::default())
        .await
        .expect("list peers");
    assert!(!peers.items.is_empty());
    agent_peers.get("laptop").await.expect("get peer");
    let rv = peers
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion");
    drop(agent_peers.watch(&wp, &rv).await.expect("watch peers"));

    // Core v1 Events about a Node go to `default`, as the kubelet's do.
    let core_events: Api<Event> = Api::namespaced(agent.clone(), "default");
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"name": "node-a.wiremesh-test", "namespace": "default"},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": "node-a"},
        "reason": "Test", "message": "core v1 event", "type": "Normal",
        "source": {"component": "wiremesh"},
    }))
    .expect("event");
    core_events
        .create(&PostParams::default(), &ev)
        .await
        .expect("create core event");
    core_events
        .patch(
            "node-a.wiremesh-test",
            &PatchParams::default(),
            &Patch::Merge(json!({"count": 2})),
        )
        .await
        .expect("patch core event");
    // events.k8s.io Events (eventTime set) about a cluster-scoped object: older API servers (this
    // 1.20 one) accept them only in kube-system ("involvedObject.namespace: does not match
    // event.namespace" in `default`); newer ones accept `default` too.
    let events: Api<EventV1> = Api::namespaced(agent.clone(), "kube-system");
    let ev: EventV1 = serde_json::from_value(json!({
        "metadata": {"name": "node-a.wiremesh-test-v1", "namespace": "kube-system"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": "node-a"},
        "reason": "Test", "note": "events.k8s.io/v1 event", "type": "Normal",
        "action": "Test", "reportingController": "wiremesh.io/agent",
        "reportingInstance": "wiremesh-node-a",
    }))
    .expect("events.k8s.io event");
    events
        .create(&PostParams::default(), &ev)
        .await
        .expect("create events.k8s.io event");
    let series = json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}});
    events
        .patch(
            "node-a.wiremesh-test-v1",
            &PatchParams::default(),
            &Patch::Merge(&series),
        )
        .await
        .expect("patch events.k8s.io event");

    // Forbidden: everything else tried here.
    assert_forbidden(
        agent_nodes.delete("node-a", &DeleteParams::default()).await,
        "delete a node",
    );
    let mut other = node.clone();
    other.metadata.name = Some("node-b".into());
    assert_forbidden(
        agent_nodes.create(&PostParams::default(), &other).await,
        "create a node",
    );
    let mut current = admin_nodes.get("node-a").await.expect("get node");
    current.metadata.labels = Some([("x".to_owned(), "y".to_owned())].into());
    assert_forbidden(
        agent_nodes
            .replace("node-a", &PostParams::default(), &current)
            .await,
        "update (replace) a node",
    );
    assert_forbidden(
        agent_nodes
            .patch_status("node-a", &PatchParams::default(), &Patch::Merge(json!({})))
            .await,
        "patch nodes/status",
    );
    let secrets: Api<Secret> = Api::all(agent.clone());
    assert_forbidden(secrets.list(&Default::default()).await, "list secrets");
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "kube-system");
    assert_forbidden(
        secrets.list(&Default::default()).await,
        "list secrets in kube-system",
    );
    let mut new_peer = dynamic(&peer_doc);
    new_peer.metadata.name = Some("intruder".into());
    new_peer.metadata.resource_version = None;
    assert_forbidden(
        agent_peers.create(&PostParams::default(), &new_peer).await,
        "create a peer",
    );
    assert_forbidden(
        agent_peers.delete("laptop", &DeleteParams::default()).await,
        "delete a peer",
    );
    assert_forbidden(core_events.list(&Default::default()).await, "list events");
    let crds: Api<CustomResourceDefinition> = Api::all(agent.clone());
    assert_forbidden(
        crds.delete("peers.kilo.squat.ai", &DeleteParams::default())
            .await,
        "delete the Peer CRD",
    );
    // And the refused writes changed nothing.
    assert!(admin_nodes.get_opt("node-b").await.expect("get").is_none());
    let still = admin_nodes
        .get("node-a")
        .await
        .expect("node-a is still there");
    assert!(!still.metadata.labels.unwrap_or_default().contains_key("x"));
    let (admin_peers, _) = api_for(&admin, &peer_doc).await;
    admin_peers
        .get("laptop")
        .await
        .expect("peer laptop is still there");
    assert!(
        admin_peers
            .get_opt("intruder")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
async fn node_credentials_patch_points_the_agent_at_the_kubelets_kubeconfig_and_mounts_only_its_files()
 {
    let server = ApiServer::start();
    let admin = server.admin().await;
    let api: Api<DaemonSet> = Api::namespaced(admin, "kube-system");
    for f in FLAVOURS {
        let before = daemonset(f);
        api.create(&PostParams::default(), &before)
            .await
            .unwrap_or_else(|e| panic!("{}: create the DaemonSet: {e}", f.name));
        // `kubectl patch --patch-file` sends the file as a strategic merge patch.
        let patch = documents(
            &manifest(&f.node_credentials_patch()),
            &f.node_credentials_patch(),
        );
        let [patch] = patch.as_slice() else {
            panic!("{}: one document", f.node_credentials_patch())
        };
        let after = api
            .patch(
                "wiremesh",
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .unwrap_or_else(|e| panic!("{}: refused: {e}", f.node_credentials_patch()));
        let pod = |ds: &DaemonSet| ds.spec.clone().and_then(|s| s.template.spec).expect("pod");
        let (old, new) = (pod(&before), pod(&after));
        assert_eq!(
            new.automount_service_account_token,
            Some(false),
            "{}",
            f.name
        );
        assert_eq!(new.dns_policy.as_deref(), Some("Default"), "{}", f.name);
        let c = &new.containers[0];
        let env: Vec<(String, Option<String>)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        let kubeconfig = f.kubelet_files()[0];
        assert!(
            env.contains(&("WIREMESH_KUBECONFIG".into(), Some(kubeconfig.into()))),
            "{}: {env:?}",
            f.name
        );
        // Everything else kept: one more variable, the old mounts plus the kubelet's files,
        // each read-only at its own path.
        assert_eq!(
            env.len(),
            old.containers[0].env.as_ref().map_or(0, Vec::len) + 1
        );
        let (old_mounts, new_mounts) = (host_mounts(&before), host_mounts(&after));
        let added: Vec<_> = new_mounts
            .iter()
            .filter(|m| !old_mounts.contains(m))
            .cloned()
            .collect();
        assert_eq!(
            new_mounts.len(),
            old_mounts.len() + added.len(),
            "{}",
            f.name
        );
        let want: Vec<_> = f
            .kubelet_files()
            .iter()
            .map(|p| (p.to_string(), "File".to_string(), p.to_string(), true))
            .collect();
        assert_eq!(added, want, "{}", f.name);
        api.delete("wiremesh", &DeleteParams::default())
            .await
            .expect("delete the DaemonSet");
        for _ in 0..100 {
            if api.get_opt("wiremesh").await.expect("get").is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
