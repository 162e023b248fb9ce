//! `meshctl` on a live cluster, through the real binary: against a real kube-apiserver it prints
//! exactly what it prints for the same objects in files, and `peer add|list|delete` manage Kilo
//! Peers. The server tests need `--features apiserver-tests`; the error paths (no server, no
//! configuration, a silent server, invalid flags) run everywhere.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};

use wiremesh::registry::cluster::peers_api;

use crate::util::apiserver::ApiServer;

const LOCATIONS: &str = "examples/locations.yaml";
const LOCATIONS_NODES: &[&str] = &[
    "home-a",
    "home-b",
    "home-c",
    "hetzner-1",
    "hetzner-2",
    "oracle-1",
    "oracle-2",
];
const PEERS: &str = "examples/peers.yaml";
const THREE_CLOUDS: &str = "examples/three-clouds.yaml";
const KEY: &str = "uN6GxGhVSEBwdGc3biyYBmAKCFyywS0JuWcOHUm9RHk=";
const OTHER_KEY: &str = "xNJEOu7NN15eM+y5mY6klkIdXAJfF9u84LdBYLvztTc=";
const PSK: &str = "0UHno+lxky2QJBklRgi1B3PLoZTn07vdJ1FhoO19AGo=";

/// What one run of meshctl gave.
pub(crate) struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
            code: out.status.code(),
        }
    }

    /// Succeeded; returns stdout.
    pub(crate) fn ok(self, what: &str) -> String {
        assert_eq!(self.code, Some(0), "{what} failed: {}", self.stderr);
        self.stdout
    }

    /// Failed with exit code 1 and exactly one line on stderr; returns that line.
    pub(crate) fn one_line_error(self, what: &str) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "{what}: exit code (stdout {:?}, stderr {:?})",
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{what}: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: not one line: {:?}", self.stderr);
        assert!(lines[0].starts_with("meshctl: "), "{what}: {}", lines[0]);
        lines[0].to_owned()
    }
}

/// The command, with no ambient Kubernetes configuration or log filter.
pub(crate) fn command(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    c.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    c
}

pub(crate) fn meshctl(args: &[&str]) -> Run {
    Run::from(command(args).output().expect("run meshctl"))
}

/// [`meshctl`] without blocking the test's runtime.
pub(crate) async fn meshctl_async(args: &[&str]) -> Run {
    let out = tokio::process::Command::from(command(args))
        .output()
        .await
        .expect("run meshctl");
    Run::from(out)
}

/// `args` with `--kubeconfig K` appended (after the subcommand: the flag is global).
async fn on_cluster(api: &ApiServer, args: &[&str]) -> Run {
    let k = api.kubeconfig.to_str().expect("utf-8 path");
    let mut all = args.to_vec();
    all.extend(["--kubeconfig", k]);
    meshctl_async(&all).await
}

/// The objects of a YAML file: a list's items, or each document.
fn objects(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let docs: Vec<serde_json::Value> = wiremesh::yaml::documents(&text).expect("yaml");
    for v in docs {
        match v.get("items").and_then(|i| i.as_array()) {
            Some(items) => out.extend(items.iter().cloned()),
            None if !v.is_null() => out.push(v),
            None => {}
        }
    }
    out
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Create the Nodes. The API server ignores `status` on create, so it is set afterwards through
/// the status subresource, as a kubelet would.
async fn create_nodes(client: &Client, nodes: &[serde_json::Value]) {
    let api = Api::<Node>::all(client.clone());
    for v in nodes {
        let mut node: Node = serde_json::from_value(v.clone()).expect("a Node");
        let status = node.status.take();
        let name = node.metadata.name.clone().expect("named");
        api.create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
        if let Some(status) = status {
            let patch = serde_json::json!({ "status": status });
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| panic!("status of node {name}: {e}"));
        }
    }
}

/// Install the Peer CRD from `manifests/crd-peer.yaml` and wait until Peers can be listed.
pub(crate) async fn apply_crd(client: &Client) {
    let text = std::fs::read_to_string(example("manifests/crd-peer.yaml")).expect("crd file");
    let crd: CustomResourceDefinition = wiremesh::yaml::from_str(&text).expect("a CRD");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.create(&PostParams::default(), &crd)
        .await
        .expect("create the CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(api, "peers.kilo.squat.ai", conditions::is_crd_established()),
    )
    .await
    .expect("the CRD is established in time")
    .expect("watch the CRD");
    // Established is not yet served everywhere: wait for the endpoint itself.
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
    panic!("the Peer resource is never served");
}

pub(crate) async fn create_peers(client: &Client, peers: &[serde_json::Value]) {
    let api = peers_api(client.clone());
    for v in peers {
        let obj: DynamicObject = serde_json::from_value(v.clone()).expect("an object");
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create peer {:?}: {e}", obj.metadata.name));
    }
}

pub(crate) async fn stored_peers(client: &Client) -> Vec<DynamicObject> {
    peers_api(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list peers")
        .items
}

/// Write `objects` as a YAML list to `path` (a file the `--nodes`/`--peers` path reads).
fn write_list(path: &Path, objects: &[serde_json::Value]) {
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    std::fs::write(path, wiremesh::yaml::to_string(&list).expect("yaml")).expect("write");
}

/// A kubeconfig for `server` with a token nobody checks.
fn kubeconfig_for(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\"}}\n\
             users:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\n\
             current-context: c\n"
        ),
    )
    .expect("write kubeconfig");
    path
}

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address").port()
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn plan_graph_and_showconf_read_the_cluster_as_they_read_files() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create_nodes(&admin, &objects(&example(LOCATIONS))).await;
    apply_crd(&admin).await;
    create_peers(&admin, &objects(&example(PEERS))).await;
    let files = ["--nodes", LOCATIONS, "--peers", PEERS];

    for node in LOCATIONS_NODES {
        for format in ["json", "text"] {
            let args = ["plan", "--node", node, "-o", format];
            let from_files = meshctl_async(&[&args[..], &files].concat())
                .await
                .ok("plan from files");
            let from_cluster = on_cluster(&api, &args).await.ok("plan from the cluster");
            assert_eq!(from_cluster, from_files, "plan --node {node} -o {format}");
        }
    }
    // Not vacuous: the cluster's plan has the mesh's peers, the laptop among them.
    let json: serde_json::Value = serde_json::from_str(
        &on_cluster(&api, &["plan", "--node", "home-b", "-o", "json"])
            .await
            .ok("plan"),
    )
    .expect("json");
    let peers = json["peers"].as_array().expect("peers");
    assert!(peers.iter().any(|p| p["name"] == "laptop"), "{json}");
    assert!(peers.len() >= 3, "{json}");

    for args in [
        &["graph", "--format", "dot"][..],
        &["graph", "--format", "dot", "--node", "hetzner-1"][..],
        &["graph", "--format", "svg"][..],
        &["showconf", "peer", "laptop"][..],
        &["showconf", "node", "home-b"][..],
        &["showconf", "--as-peer", "-o", "yaml", "node", "hetzner-1"][..],
    ] {
        // The files right after the command (global flags go anywhere: meshctl_flags).
        let from_files = meshctl_async(&[&args[..1], &files, &args[1..]].concat()).await;
        let from_cluster = on_cluster(&api, args).await;
        assert_eq!(from_cluster.stderr, from_files.stderr, "{args:?}: warnings");
        let want = from_files.ok("from files");
        assert!(!want.is_empty(), "{args:?}");
        assert_eq!(from_cluster.ok("from the cluster"), want, "{args:?}");
    }
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn bad_objects_give_the_same_diagnostics_as_files() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    // Nodes whose internal IPs come from status.addresses, plus one with a broken key.
    let mut nodes = objects(&example(THREE_CLOUDS));
    nodes.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "zz-bad", "annotations": {"kilo.squat.ai/key": "garbage"}},
        "spec": {"podCIDR": "10.42.9.0/24"},
    }));
    // A peer the CRD schema accepts but the agent does not, and a good one.
    let mut peers = vec![serde_json::json!({
        "apiVersion": "kilo.squat.ai/v1alpha1", "kind": "Peer",
        "metadata": {"name": "bad-peer"},
        "spec": {"allowedIPs": ["10.5.0.9/32"], "publicKey": "nope"},
    })];
    peers.extend(objects(&example(PEERS)));
    create_nodes(&admin, &nodes).await;
    apply_crd(&admin).await;
    create_peers(&admin, &peers).await;

    // The same objects as files, in the API server's order (by name).
    let dir = tempfile::tempdir().expect("temp dir");
    let (nf, pf) = (dir.path().join("nodes.yaml"), dir.path().join("peers.yaml"));
    write_list(&nf, &nodes);
    write_list(&pf, &peers);
    let files = [
        "--nodes",
        nf.to_str().expect("utf-8"),
        "--peers",
        pf.to_str().expect("utf-8"),
    ];

    let args = ["plan", "--node", "fra-1", "-o", "json"];
    let want = meshctl_async(&[&args[..], &files].concat())
        .await
        .ok("plan from files");
    assert_eq!(
        on_cluster(&api, &args).await.ok("plan from the cluster"),
        want
    );
    let json: serde_json::Value = serde_json::from_str(&want).expect("json");
    let names: Vec<&str> = json["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(
        names.contains(&"zz-bad") && names.contains(&"bad-peer"),
        "{names:?}"
    );

    let args = ["graph", "--format", "dot"];
    let from_files = meshctl_async(&[&args[..], &files].concat()).await;
    let from_cluster = on_cluster(&api, &args).await;
    assert!(
        from_files
            .stderr
            .contains("warning: node zz-bad: kilo.squat.ai/key")
            && from_files
                .stderr
                .contains("warning: peer bad-peer: spec.publicKey"),
        "{}",
        from_files.stderr
    );
    assert_eq!(from_cluster.stderr, from_files.stderr);
    assert_eq!(from_cluster.ok("graph"), from_files.ok("graph"));
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn peer_add_list_showconf_delete_round_trip() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create_nodes(&admin, &objects(&example(LOCATIONS))).await;
    apply_crd(&admin).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let psk = dir.path().join("psk");
    std::fs::write(&psk, format!("{PSK}\n")).expect("write psk");
    let add = [
        "peer",
        "add",
        "phone",
        "--public-key",
        KEY,
        "--allowed-ips",
        "10.5.0.7,10.5.1.0/24",
        "--endpoint",
        "203.0.113.9:51820",
        "--persistent-keepalive",
        "25",
        "--preshared-key-file",
        psk.to_str().expect("utf-8"),
    ];

    let out = on_cluster(&api, &add).await.ok("peer add");
    assert!(out.starts_with("peer phone created"), "{out}");

    // Stored as a Kilo Peer, exactly.
    let stored = stored_peers(&admin).await;
    assert_eq!(stored.len(), 1);
    let v = serde_json::to_value(&stored[0]).expect("json");
    assert_eq!(v["apiVersion"], "kilo.squat.ai/v1alpha1");
    assert_eq!(v["kind"], "Peer");
    assert_eq!(v["metadata"]["name"], "phone");
    assert_eq!(
        v["spec"],
        serde_json::json!({
            "allowedIPs": ["10.5.0.7/32", "10.5.1.0/24"],
            "endpoint": {"dnsOrIP": {"ip": "203.0.113.9"}, "port": 51820},
            "persistentKeepalive": 25,
            "presharedKey": PSK,
            "publicKey": KEY,
        })
    );

    let list = on_cluster(&api, &["peer", "list"]).await.ok("peer list");
    let rows: Vec<Vec<&str>> = list
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(
        rows[0],
        ["NAME", "PUBLIC", "KEY", "ALLOWED", "IPS", "ENDPOINT"]
    );
    assert_eq!(
        rows[1],
        ["phone", KEY, "10.5.0.7/32,10.5.1.0/24", "203.0.113.9:51820"]
    );

    // The phone's WireGuard configuration: one [Peer] per mesh segment (the locations home,
    // hetzner and eu-amsterdam-1), each with the preshared key.
    let conf = on_cluster(&api, &["showconf", "peer", "phone"])
        .await
        .ok("showconf peer phone");
    assert_eq!(conf.matches("[Peer]").count(), 3, "{conf}");
    assert_eq!(
        conf.matches(&format!("PresharedKey = {PSK}")).count(),
        3,
        "{conf}"
    );
    assert!(conf.contains("ListenPort = 51820"), "{conf}");
    // … the same as from the Peer `--dry-run` prints, read from a file.
    let yaml = meshctl_async(&[&add[..], &["--dry-run"]].concat())
        .await
        .ok("peer add --dry-run");
    let pf = dir.path().join("peer.yaml");
    std::fs::write(&pf, &yaml).expect("write");
    let from_files = meshctl_async(&[
        "showconf",
        "--nodes",
        LOCATIONS,
        "--peers",
        pf.to_str().expect("utf-8"),
        "peer",
        "phone",
    ])
    .await
    .ok("showconf from files");
    assert_eq!(conf, from_files);

    let out = on_cluster(&api, &["peer", "delete", "phone"])
        .await
        .ok("peer delete");
    assert_eq!(out, "peer phone deleted\n");
    assert!(stored_peers(&admin).await.is_empty());
    let list = on_cluster(&api, &["peer", "list"]).await;
    assert_eq!(list.stderr, "no peers\n");
    assert_eq!(list.ok("peer list"), "");
    let e = on_cluster(&api, &["showconf", "peer", "phone"])
        .await
        .one_line_error("showconf of a deleted peer");
    assert!(e.contains("no peer named phone"), "{e}");
    let e = on_cluster(&api, &["peer", "delete", "phone"])
        .await
        .one_line_error("delete again");
    assert_eq!(e, "meshctl: no peer named phone in the cluster");
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn peer_add_checks_flags_before_any_request_and_never_replaces() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    apply_crd(&admin).await;

    let e = on_cluster(
        &api,
        &[
            "peer",
            "add",
            "laptop",
            "--public-key",
            "AAAA",
            "--allowed-ips",
            "10.5.0.1/32",
        ],
    )
    .await
    .one_line_error("bad key");
    assert!(
        e.starts_with("meshctl: peer laptop: --public-key: \"AAAA\" is not a WireGuard public key")
            && e.contains("decodes to 3 bytes"),
        "{e}"
    );
    assert!(
        stored_peers(&admin).await.is_empty(),
        "an object was created"
    );

    let add = |key: &'static str| {
        [
            "peer",
            "add",
            "laptop",
            "--public-key",
            key,
            "--allowed-ips",
            "10.5.0.1/32",
        ]
    };
    on_cluster(&api, &add(KEY)).await.ok("first add");
    let e = on_cluster(&api, &add(OTHER_KEY))
        .await
        .one_line_error("second add");
    assert!(
        e.contains("peer laptop already exists") && e.contains("409"),
        "{e}"
    );
    let stored = stored_peers(&admin).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].data["spec"]["publicKey"], KEY,
        "the peer was replaced"
    );
}

#[cfg_attr(
    not(feature = "apiserver-tests"),
    ignore = "needs a kube-apiserver: --features apiserver-tests"
)]
#[tokio::test]
async fn without_the_peer_crd_nodes_still_read_and_peer_commands_say_what_to_apply() {
    let api = ApiServer::start();
    let admin = api.admin().await;
    create_nodes(&admin, &objects(&example(LOCATIONS))).await;

    let args = ["plan", "--node", "home-a", "-o", "json"];
    let want = meshctl_async(&[&args[..], &["--nodes", LOCATIONS]].concat())
        .await
        .ok("plan from files");
    assert_eq!(
        on_cluster(&api, &args).await.ok("plan from the cluster"),
        want
    );

    for args in [
        &["peer", "list"][..],
        &["peer", "delete", "x"][..],
        &[
            "peer",
            "add",
            "x",
            "--public-key",
            KEY,
            "--allowed-ips",
            "10.5.0.1",
        ][..],
    ] {
        let e = on_cluster(&api, args).await.one_line_error("no CRD");
        assert!(
            e.contains("has no Peer resource") && e.contains("manifests/crd-peer.yaml"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn unreachable_cluster_is_one_line_and_exit_code_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("https://127.0.0.1:{}", closed_port());
    let k = kubeconfig_for(dir.path(), &url);
    let k = k.to_str().expect("utf-8");
    for args in [
        &["plan", "--node", "a", "--kubeconfig", k][..],
        &["plan", "--node", "a", "--kubeconfig", k, "--context", "c"][..],
        &["graph", "--kubeconfig", k][..],
        &["showconf", "--kubeconfig", k, "peer", "laptop"][..],
        &["peer", "list", "--kubeconfig", k][..],
        &["peer", "delete", "x", "--kubeconfig", k][..],
        &[
            "peer",
            "add",
            "x",
            "--public-key",
            KEY,
            "--allowed-ips",
            "10.0.0.1",
            "--kubeconfig",
            k,
        ][..],
    ] {
        let e = meshctl(args).one_line_error(&format!("{args:?}"));
        assert!(
            e.starts_with(&format!(
                "meshctl: cannot reach the Kubernetes API server at {url}: "
            )) && e.contains("Connection refused"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn missing_configuration_is_one_line_naming_what_to_give() {
    let home = tempfile::tempdir().expect("temp dir");
    let run = Run::from(
        command(&["plan", "--node", "a"])
            .env("HOME", home.path())
            .output()
            .expect("run"),
    );
    let e = run.one_line_error("no configuration");
    assert!(
        e.contains("no usable Kubernetes configuration") && e.contains("--kubeconfig"),
        "{e}"
    );

    let e = meshctl(&["graph", "--kubeconfig", "/nonexistent/kubeconfig"])
        .one_line_error("missing kubeconfig file");
    assert!(e.contains("/nonexistent/kubeconfig"), "{e}");

    let dir = tempfile::tempdir().expect("temp dir");
    let k = kubeconfig_for(dir.path(), "https://127.0.0.1:1");
    let e = meshctl(&[
        "graph",
        "--kubeconfig",
        k.to_str().expect("utf-8"),
        "--context",
        "nope",
    ])
    .one_line_error("unknown context");
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn silent_server_times_out_in_one_line() {
    // Accepts connections (the kernel's backlog) but never answers the TLS handshake.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "https://127.0.0.1:{}",
        silent.local_addr().expect("addr").port()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let k = kubeconfig_for(dir.path(), &url);
    let started = Instant::now();
    let e = meshctl(&[
        "peer",
        "list",
        "--kubeconfig",
        k.to_str().expect("utf-8"),
        "--request-timeout",
        "1",
    ])
    .one_line_error("silent server");
    assert_eq!(
        e,
        format!(
            "meshctl: no answer from the Kubernetes API server at {url} within 1 s (--request-timeout)"
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn invalid_peer_is_refused_before_the_cluster_is_contacted() {
    // The cluster is unreachable: the error is about the flags, so no request was made.
    let dir = tempfile::tempdir().expect("temp dir");
    let k = kubeconfig_for(dir.path(), &format!("https://127.0.0.1:{}", closed_port()));
    let k = k.to_str().expect("utf-8");
    for (args, want) in [
        (
            &["--public-key", "not-a-key", "--allowed-ips", "10.5.0.1/32"][..],
            "--public-key: \"not-a-key\" is not a WireGuard public key",
        ),
        (
            &[
                "--public-key",
                KEY,
                "--allowed-ips",
                "10.5.0.1/32,10.5.0.300/32",
            ][..],
            "--allowed-ips: \"10.5.0.300/32\" is not a CIDR",
        ),
        (
            &[
                "--public-key",
                KEY,
                "--allowed-ips",
                "10.5.0.1",
                "--endpoint",
                "vpn.example.net",
            ][..],
            "--endpoint: \"vpn.example.net\" is not an endpoint: expected host:port",
        ),
        (
            &[
                "--public-key",
                KEY,
                "--allowed-ips",
                "10.5.0.1",
                "--endpoint",
                "1.2.3.4:0",
            ][..],
            "--endpoint: \"1.2.3.4:0\" is not an endpoint: port \"0\"",
        ),
        (
            &[
                "--public-key",
                KEY,
                "--allowed-ips",
                "10.5.0.1",
                "--persistent-keepalive",
                "70000",
            ][..],
            "--persistent-keepalive: 70000 is not a number of seconds",
        ),
    ] {
        let all = [&["peer", "add", "laptop"][..], args, &["--kubeconfig", k]].concat();
        let e = meshctl(&all).one_line_error(&format!("{args:?}"));
        assert!(
            e.starts_with(&format!("meshctl: peer laptop: {want}")),
            "{args:?}: {e}"
        );
    }
    let e = meshctl(&[
        "peer",
        "add",
        "Laptop",
        "--public-key",
        KEY,
        "--allowed-ips",
        "10.5.0.1",
        "--kubeconfig",
        k,
    ])
    .one_line_error("bad name");
    assert!(e.contains("\"Laptop\" is not a valid peer name"), "{e}");
}

#[test]
fn peer_add_dry_run_needs_no_cluster_and_feeds_showconf() {
    let home = tempfile::tempdir().expect("temp dir");
    let run = Run::from(
        command(&[
            "peer",
            "add",
            "laptop",
            "--public-key",
            KEY,
            "--allowed-ips",
            "10.5.0.1",
            "--persistent-keepalive",
            "10",
            "--dry-run",
        ])
        .env("HOME", home.path())
        .output()
        .expect("run"),
    );
    let yaml = run.ok("dry run without any configuration");
    // The same Peer as examples/peers.yaml, so the same configuration.
    let want: serde_json::Value = serde_json::to_value(&objects(&example(PEERS))[0]).expect("json");
    let got: serde_json::Value = wiremesh::yaml::from_str(&yaml).expect("yaml");
    assert_eq!(got, want);
    let pf = home.path().join("peer.yaml");
    std::fs::write(&pf, &yaml).expect("write");
    let conf = |peers: &str| {
        meshctl(&[
            "showconf", "--nodes", LOCATIONS, "--peers", peers, "peer", "laptop",
        ])
        .ok("showconf")
    };
    assert_eq!(conf(pf.to_str().expect("utf-8")), conf(PEERS));
}
