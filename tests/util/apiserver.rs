//! A real etcd + kube-apiserver (v1.20, built by `tests/apiserver/setup.sh`) for the tests that
//! talk to Kubernetes: started fresh per test on free loopback ports by `tests/apiserver/up.sh`,
//! stopped and removed on drop (also when the test panics). At most two run at once: each takes
//! about 400 MB and 4 s to become ready.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex};

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();
const MAX_RUNNING: usize = 2;

/// A running etcd + kube-apiserver; both stopped and their files removed on drop.
pub struct ApiServer {
    /// Kubeconfig of an administrator (`system:masters`).
    pub kubeconfig: PathBuf,
    /// Kubeconfig of the agent's identity (`system:serviceaccount:kube-system:wiremesh`), whose
    /// rights come only from the RBAC in `manifests/`.
    pub agent_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    api_port: u16,
    etcd_port: u16,
    etcd_pid: i32,
    apiserver_pid: Option<i32>,
}

/// Wait until `k` more servers may run, and count them as running.
fn acquire(k: usize) {
    let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    while *n + k > MAX_RUNNING {
        n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    *n += k;
}

fn free_port(pair: bool) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = l.local_addr().expect("local address").port();
        if port < u16::MAX && (!pair || TcpListener::bind(("127.0.0.1", port + 1)).is_ok()) {
            return port;
        }
    }
    panic!("no free loopback port");
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/apiserver")
        .join(name)
}

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("up.sh printed no {key}: {out}"))
}

impl ApiServer {
    /// Start a fresh etcd and kube-apiserver (waits for `/readyz`).
    pub fn start() -> ApiServer {
        acquire(1);
        ApiServer::launch()
    }

    /// Start two, for tests of two clusters: both slots are taken at once, so two such tests
    /// never each hold one and wait for the other's.
    pub fn start_pair() -> (ApiServer, ApiServer) {
        acquire(2);
        (ApiServer::launch(), ApiServer::launch())
    }

    /// Start one in a slot already taken.
    fn launch() -> ApiServer {
        let dir = tempfile::Builder::new()
            .prefix("wm-kas.")
            .tempdir()
            .expect("temp dir");
        let mut s = ApiServer {
            kubeconfig: dir.path().join("kubeconfig"),
            agent_kubeconfig: dir.path().join("agent.kubeconfig"),
            api_port: free_port(false),
            etcd_port: free_port(true),
            dir,
            etcd_pid: 0,
            apiserver_pid: None,
        };
        let out = s.up(false);
        s.etcd_pid = value(&out, "ETCD_PID").parse().expect("etcd pid");
        s.apiserver_pid = Some(value(&out, "APISERVER_PID").parse().expect("apiserver pid"));
        s
    }

    fn up(&self, skip_etcd: bool) -> String {
        let out = Command::new(script("up.sh"))
            .env("DIR", self.dir.path())
            .env("API_PORT", self.api_port.to_string())
            .env("ETCD_PORT", self.etcd_port.to_string())
            .env("SKIP_ETCD", if skip_etcd { "1" } else { "0" })
            .output()
            .expect("run tests/apiserver/up.sh");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "tests/apiserver/up.sh failed: {}\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// A client with administrator rights.
    pub async fn admin(&self) -> kube::Client {
        client(&self.kubeconfig).await
    }

    /// A client with the agent's rights only.
    pub async fn agent(&self) -> kube::Client {
        client(&self.agent_kubeconfig).await
    }

    /// A kubeconfig with a kubelet's identity for `node`: a client certificate for
    /// `CN=system:node:NODE, O=system:nodes` signed by the server's client CA, referenced by path
    /// as kubeadm's `kubelet.conf` and k3s's `kubelet.kubeconfig` do. The Node authorizer and
    /// NodeRestriction (both on, `tests/apiserver/up.sh`) give it a kubelet's rights and limits.
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        let pki = self.dir.path().join("pki");
        let dir = self.dir.path().join("nodes").join(node);
        std::fs::create_dir_all(&dir).expect("node credential dir");
        let (key, crt) = (dir.join("client.key"), dir.join("client.crt"));
        // X.509 v3 with the client usage, as a kubelet's certificate (rustls refuses v1).
        let out = Command::new("sh")
            .arg("-c")
            .arg(
                "set -e; printf 'extendedKeyUsage=clientAuth\\nkeyUsage=critical,digitalSignature\\n' \
                 > \"$DIR/client.ext\"; \
                 openssl req -newkey rsa:2048 -nodes -subj \"/O=system:nodes/CN=system:node:$NODE\" \
                 -keyout \"$KEY\" -out \"$DIR/client.csr\"; \
                 openssl x509 -req -in \"$DIR/client.csr\" -CA \"$PKI/ca.crt\" -CAkey \"$PKI/ca.key\" \
                 -CAcreateserial -days 1 -extfile \"$DIR/client.ext\" -out \"$CRT\"",
            )
            .env("DIR", &dir)
            .env("PKI", &pki)
            .env("NODE", node)
            .env("KEY", &key)
            .env("CRT", &crt)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "node certificate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: wm-kas\n  cluster:\n    \
             server: {url}\n    certificate-authority: {ca}\nusers:\n- name: node\n  user:\n    \
             client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: node\n  \
             context: {{cluster: wm-kas, user: node}}\ncurrent-context: node\n",
            url = self.url(),
            ca = pki.join("ca.crt").display(),
            crt = crt.display(),
            key = key.display(),
        );
        std::fs::write(&path, text).expect("write node kubeconfig");
        path
    }

    /// Create what `manifests/rbac.yaml` declares (ServiceAccount, ClusterRole, binding), so
    /// [`Self::agent`] has exactly the rights the DaemonSet's agent has.
    pub async fn install_rbac(&self) {
        self.install_rbac_file("manifests/rbac.yaml").await;
    }

    /// Create what `manifests/node-credentials/rbac.yaml` declares: the rights an agent running
    /// with its node's credentials needs beyond what the Node authorizer gives a kubelet.
    pub async fn install_node_rbac(&self) {
        self.install_rbac_file("manifests/node-credentials/rbac.yaml")
            .await;
    }

    /// Install `manifests/multicluster-link.yaml`: the identity of `meshctl multicluster link`.
    pub async fn install_link_rbac(&self) {
        self.install_rbac_file("manifests/multicluster-link.yaml")
            .await;
    }

    /// A kubeconfig of the administrator acting as `user` (impersonation): that user's rights
    /// only, as RBAC grants them.
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("read the kubeconfig");
        let mut v: serde_json::Value = wiremesh::yaml::from_str(&text).expect("a kubeconfig");
        for u in v["users"].as_array_mut().expect("users") {
            u["user"]["as"] = serde_json::Value::String(user.to_owned());
        }
        let path = self
            .dir
            .path()
            .join(format!("as-{}.kubeconfig", user.replace(':', "-")));
        std::fs::write(&path, wiremesh::yaml::to_string(&v).expect("yaml")).expect("write");
        path
    }

    async fn install_rbac_file(&self, file: &str) {
        use k8s_openapi::api::core::v1::ServiceAccount;
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        use kube::api::{Api, PostParams};
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        let admin = self.admin().await;
        let pp = PostParams::default();
        let docs: Vec<serde_json::Value> = wiremesh::yaml::documents(&text).expect("YAML");
        for v in docs {
            match v["kind"].as_str() {
                Some("ServiceAccount") => {
                    let sa: ServiceAccount = serde_json::from_value(v).expect("ServiceAccount");
                    let ns = sa.metadata.namespace.clone().unwrap_or_default();
                    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
                        .create(&pp, &sa)
                        .await
                        .expect("create ServiceAccount");
                }
                Some("ClusterRole") => {
                    let r: ClusterRole = serde_json::from_value(v).expect("ClusterRole");
                    Api::<ClusterRole>::all(admin.clone())
                        .create(&pp, &r)
                        .await
                        .expect("create ClusterRole");
                }
                Some("ClusterRoleBinding") => {
                    let b: ClusterRoleBinding =
                        serde_json::from_value(v).expect("ClusterRoleBinding");
                    Api::<ClusterRoleBinding>::all(admin.clone())
                        .create(&pp, &b)
                        .await
                        .expect("create ClusterRoleBinding");
                }
                None => {}
                Some(k) => panic!("unexpected kind {k} in {file}"),
            }
        }
    }

    /// Stop the API server (etcd keeps the data): an outage.
    pub fn stop_apiserver(&mut self) {
        if let Some(pid) = self.apiserver_pid.take() {
            kill_wait(pid);
        }
    }

    /// Start the API server again on the same port and data, after [`Self::stop_apiserver`].
    pub fn restart_apiserver(&mut self) {
        assert!(self.apiserver_pid.is_none(), "the API server is running");
        let out = self.up(true);
        self.apiserver_pid = Some(value(&out, "APISERVER_PID").parse().expect("apiserver pid"));
    }

    /// The API server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }
}

/// A client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// Whether `pid` still runs (a zombie left to init counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn kill_wait(pid: i32) {
    let raw = pid;
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    // Not our child (up.sh started it): poll until it is gone, then make sure.
    for _ in 0..100 {
        if !alive(raw) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..100 {
        if !alive(raw) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        kill_wait(self.etcd_pid);
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        // A pair may be waiting for two slots: wake every waiter to recount.
        FREED.notify_all();
    }
}
