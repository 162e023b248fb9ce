//! The lab's Kubernetes API server (`--registry kube`): a real etcd and kube-apiserver in their
//! own network namespace on the lab's underlay, as `tests/apiserver/up.sh` starts them for the
//! tests, with the lab's own PKI and tokens.
//!
//! ```text
//! wml-<lab>-ul: br0 ──port "api"── wml-<lab>-api: eth0 10.200.0.253/24
//!                                    kube-apiserver https://10.200.0.253:6443 (TLS, tokens, RBAC)
//!                                    etcd http://127.0.0.1:2379 (loopback of the namespace only)
//! ```
//!
//! Files, in `<labdir>/apiserver/`: `pki/` (a CA and a separate serving certificate whose SAN
//! holds the underlay address: rustls refuses a self-signed leaf; service-account keys; the
//! token file), `etcd/` (data), `etcd.log`, `apiserver.log`, `admin.kubeconfig` (user `admin`,
//! group `system:masters`) and `agent.kubeconfig` (user
//! `system:serviceaccount:kube-system:wiremesh`, whose rights come only from RBAC). Tokens are
//! random per lab.
//!
//! Both processes are started with `ip netns exec` (which execs, so the PIDs are theirs), in
//! their own process group, output to their logs; their PIDs and start times go into the state
//! file so `lab down` and `lab apiserver stop` end exactly them. Depends on the state, `sys` and
//! `net`; the requests to the API server are in [`super::cluster`].

use std::fs::OpenOptions;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

use super::LabError;
use super::state::{ApiServerState, LabState, ProcRef, create_dir, write_private};
use super::sys::{self, Tool};

/// Where `tests/apiserver/setup.sh` caches the kube-apiserver it builds.
pub const DEFAULT_APISERVER_BIN: &str = "/var/cache/wiremesh/kube-apiserver-v1.20.2";
/// etcd's client port on the API namespace's loopback (peers use the next one).
pub const ETCD_PORT: u16 = 2379;
/// The API server's interface in its namespace.
pub const API_IFACE: &str = "eth0";
/// The API namespace's port name on the underlay bridge (cluster 1's; cluster `k` > 1 has
/// `api<k>`).
pub const API_PORT_NAME: &str = "api";
/// The user the agents authenticate as: the wiremesh ServiceAccount, as in a cluster.
pub const AGENT_USER: &str = "system:serviceaccount:kube-system:wiremesh";
/// The service-account issuer the API server requires (1.20).
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The tools the API server needs besides the kube-apiserver binary.
pub const TOOLS: [Tool; 2] = [sys::ETCD, sys::OPENSSL];

/// The kube-apiserver binary: `explicit`, else [`DEFAULT_APISERVER_BIN`]; a clear error naming
/// `tests/apiserver/setup.sh` when it is not there.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    let path = explicit.unwrap_or(Path::new(DEFAULT_APISERVER_BIN));
    sys::find_program(&path.to_string_lossy())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| LabError::ApiServerBinary {
            path: path.to_owned(),
        })
}

/// Create the API namespace and attach it to the underlay bridge with its address.
pub fn create_netns(state: &LabState, api: &ApiServerState) -> Result<(), LabError> {
    super::net::create_attached(
        &api.netns,
        API_IFACE,
        &state.underlay_ns,
        &api.port_name(),
        api.ip.into(),
        state.spec.underlay.prefix(),
    )
}

/// `n` random bytes as lowercase hex, from the kernel's generator.
fn random_hex(n: usize) -> Result<String, LabError> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(LabError::io("read", "/dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `openssl args…` (paths must be absolute).
fn openssl(args: &[&str]) -> Result<(), LabError> {
    sys::run("openssl", args).map(drop)
}

fn path_str(p: &Path) -> Result<&str, LabError> {
    p.to_str()
        .ok_or_else(|| LabError::Options(format!("{} is not UTF-8", p.display())))
}

/// The `subjectAltName` of the serving certificate.
pub fn subject_alt_name(api: &ApiServerState) -> String {
    format!(
        "subjectAltName=IP:{},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc",
        api.ip
    )
}

/// A kubeconfig for `user` with `token`, trusting the lab's CA.
pub fn kubeconfig(
    lab: &str,
    api: &ApiServerState,
    ca_pem: &[u8],
    user: &str,
    token: &str,
) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "# Kubernetes API server of wiremesh lab {lab}, reachable inside the lab's namespaces:\n\
         #   ip netns exec {ns} kubectl --kubeconfig THIS-FILE get nodes\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: wml-{lab}\n  cluster: {{server: \"{url}\", certificate-authority-data: \"{ca}\"}}\n\
         users:\n\
         - name: {user}\n  user: {{token: \"{token}\"}}\n\
         contexts:\n\
         - name: wml-{lab}\n  context: {{cluster: wml-{lab}, user: {user}, namespace: default}}\n\
         current-context: wml-{lab}\n",
        ns = api.netns,
        url = api.url(),
    )
}

/// Write the PKI (CA, serving certificate for the underlay address, service-account key pair),
/// the token file and both kubeconfigs.
pub fn write_pki(lab: &str, api: &ApiServerState) -> Result<(), LabError> {
    // Cluster k > 1 of a multi-cluster lab names its CA and kubeconfigs `<lab>-cluster<k>`.
    let label = if api.cluster > 1 {
        format!("{lab}-cluster{}", api.cluster)
    } else {
        lab.to_owned()
    };
    let lab = label.as_str();
    let pki = api.pki();
    create_dir(&api.dir, 0o700)?;
    create_dir(&pki, 0o700)?;
    let p = |f: &str| pki.join(f);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    let (key, csr, crt, ext) = (
        p("apiserver.key"),
        p("apiserver.csr"),
        p("apiserver.crt"),
        p("apiserver.ext"),
    );
    let (sa_key, sa_pub) = (p("sa.key"), p("sa.pub"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        &format!("/CN=wiremesh-lab-{lab}-ca"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-keyout",
        path_str(&ca_key)?,
        "-out",
        path_str(&ca_crt)?,
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        path_str(&key)?,
        "-out",
        path_str(&csr)?,
    ])?;
    write_private(&ext, format!("{}\n", subject_alt_name(api)).as_bytes())?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr)?,
        "-CA",
        path_str(&ca_crt)?,
        "-CAkey",
        path_str(&ca_key)?,
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        path_str(&ext)?,
        "-out",
        path_str(&crt)?,
    ])?;
    openssl(&["genrsa", "-out", path_str(&sa_key)?, "2048"])?;
    openssl(&[
        "rsa",
        "-in",
        path_str(&sa_key)?,
        "-pubout",
        "-out",
        path_str(&sa_pub)?,
    ])?;

    let admin_token = random_hex(24)?;
    let agent_token = random_hex(24)?;
    write_private(
        &p("tokens.csv"),
        format!(
            "{admin_token},admin,admin-uid,\"system:masters\"\n\
             {agent_token},{AGENT_USER},wiremesh-uid,\"system:serviceaccounts,system:serviceaccounts:kube-system\"\n"
        )
        .as_bytes(),
    )?;
    let ca_pem = std::fs::read(&ca_crt).map_err(LabError::io("read", &ca_crt))?;
    write_private(
        &api.admin_kubeconfig(),
        kubeconfig(lab, api, &ca_pem, "admin", &admin_token).as_bytes(),
    )?;
    write_private(
        &api.agent_kubeconfig(),
        kubeconfig(lab, api, &ca_pem, "wiremesh", &agent_token).as_bytes(),
    )
}

/// etcd's command line (after `ip netns exec <ns>`).
pub fn etcd_args(api: &ApiServerState) -> Vec<String> {
    let client = format!("http://127.0.0.1:{ETCD_PORT}");
    let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 1);
    vec![
        "etcd".into(),
        "--name".into(),
        "wmlab".into(),
        "--data-dir".into(),
        api.etcd_data().display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("wmlab={peer}"),
        "--logger".into(),
        "zap".into(),
        "--log-outputs".into(),
        "stderr".into(),
    ]
}

/// kube-apiserver's command line (after `ip netns exec <ns>`), as `tests/apiserver/up.sh` runs
/// it: TLS with the lab's certificate, static tokens, RBAC, no plain-HTTP port.
pub fn apiserver_args(api: &ApiServerState) -> Vec<String> {
    let pki = api.pki();
    let f = |name: &str| pki.join(name).display().to_string();
    vec![
        api.binary.display().to_string(),
        format!("--etcd-servers=http://127.0.0.1:{ETCD_PORT}"),
        format!("--bind-address={}", api.ip),
        format!("--advertise-address={}", api.ip),
        format!("--secure-port={}", api.port),
        format!("--tls-cert-file={}", f("apiserver.crt")),
        format!("--tls-private-key-file={}", f("apiserver.key")),
        format!("--client-ca-file={}", f("ca.crt")),
        format!("--token-auth-file={}", f("tokens.csv")),
        "--authorization-mode=RBAC".into(),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-key-file={}", f("sa.pub")),
        format!("--service-account-signing-key-file={}", f("sa.key")),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        format!("--cert-dir={}", api.dir.join("certs").display()),
        "--enable-priority-and-fairness=false".into(),
        // Without it the apiserver logs an error every 10 s about its own Endpoints.
        "--endpoint-reconciler-type=none".into(),
        // No controller manager or kubelet here: no taints on new Nodes, no ServiceAccount
        // tokens to admit.
        "--disable-admission-plugins=TaintNodesByCondition,ServiceAccount".into(),
        "--logtostderr=true".into(),
        "--v=1".into(),
    ]
}

/// Start `args` in `netns` with output appended to `log`, in its own process group; `what`
/// names the program in errors.
pub(super) fn spawn_in<S: AsRef<std::ffi::OsStr>>(
    netns: &str,
    args: &[S],
    log: &Path,
    what: &str,
) -> Result<(Child, ProcRef), LabError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(LabError::io("open", log))?;
    let err = out.try_clone().map_err(LabError::io("open", log))?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|source| LabError::Spawn {
            program: format!("ip netns exec {netns} {what}"),
            source,
        })?;
    let pid = child.id();
    let start_time = sys::start_time(pid).unwrap_or_default();
    Ok((child, ProcRef { pid, start_time }))
}

/// Start etcd.
pub fn start_etcd(api: &ApiServerState) -> Result<(Child, ProcRef), LabError> {
    create_dir(&api.etcd_data(), 0o700)?;
    tracing::info!(netns = %api.netns, "starting etcd");
    spawn_in(&api.netns, &etcd_args(api), &api.etcd_log(), "etcd")
}

/// Start kube-apiserver (etcd must run).
pub fn start_apiserver(api: &ApiServerState) -> Result<(Child, ProcRef), LabError> {
    create_dir(&api.dir.join("certs"), 0o700)?;
    tracing::info!(netns = %api.netns, url = %api.url(), "starting kube-apiserver");
    spawn_in(
        &api.netns,
        &apiserver_args(api),
        &api.apiserver_log(),
        "kube-apiserver",
    )
}

/// Fail with the log tail of the first of `procs` (child, name, log) that has exited.
pub fn check_alive(procs: &mut [(&mut Child, &str, &Path)]) -> Result<(), LabError> {
    for (child, name, log) in procs.iter_mut() {
        let status = child.try_wait().map_err(LabError::io("wait for", *log))?;
        if let Some(status) = status {
            return Err(LabError::Command {
                command: (*name).to_owned(),
                status: status.to_string(),
                stderr: format!(
                    "exited while the lab waited for it; last lines of {}:\n{}",
                    log.display(),
                    sys::tail(log, 15)
                ),
            });
        }
    }
    Ok(())
}

/// End the kube-apiserver (SIGTERM, then SIGKILL after `grace`); etcd and its data stay. Returns
/// whether it ran.
pub fn stop_apiserver(api: &mut ApiServerState, grace: Duration) -> Result<bool, LabError> {
    let Some(p) = api.apiserver.take() else {
        return Ok(false);
    };
    if !sys::is_running(&p) {
        return Ok(false);
    }
    let left = sys::terminate(&[p], grace);
    if left.is_empty() {
        Ok(true)
    } else {
        api.apiserver = Some(p);
        Err(LabError::Leftovers(vec![format!(
            "kube-apiserver process {}",
            p.pid
        )]))
    }
}

/// `lab apiserver stop`: end the kube-apiserver of lab `lab` (an outage); etcd and the data
/// stay. Returns whether it ran.
pub fn stop(root: &Path, lab: &super::LabName) -> Result<bool, LabError> {
    let mut state = super::load(root, lab)?;
    let mut api = state.require_apiserver("apiserver stop")?.clone();
    // kube-apiserver closes its listener at once on SIGTERM but holds open watches for a long
    // graceful shutdown; an outage is meant here, so it gets 2 s.
    let result = stop_apiserver(&mut api, Duration::from_secs(2));
    state.apiserver = Some(api);
    state.save()?;
    result
}

/// `lab apiserver start`: start the kube-apiserver of lab `lab` again (and etcd, should it have
/// exited) on the same data, and wait until it answers. Returns whether it was started (false:
/// it already ran).
pub fn start(root: &Path, lab: &super::LabName, timeout: Duration) -> Result<bool, LabError> {
    let mut state = super::load(root, lab)?;
    let mut api = state.require_apiserver("apiserver start")?.clone();
    if api.apiserver.as_ref().is_some_and(sys::is_running) {
        return Ok(false);
    }
    let mut etcd = None;
    if !api.etcd.as_ref().is_some_and(sys::is_running) {
        let (child, r) = start_etcd(&api)?;
        api.etcd = Some(r);
        etcd = Some(child);
    }
    let (mut kas, r) = start_apiserver(&api)?;
    api.apiserver = Some(r);
    state.apiserver = Some(api.clone());
    state.save()?;
    let (etcd_log, kas_log) = (api.etcd_log(), api.apiserver_log());
    super::cluster::wait_ready(&api, timeout, || {
        let mut procs: Vec<(&mut Child, &str, &Path)> =
            vec![(&mut kas, "kube-apiserver", kas_log.as_path())];
        if let Some(e) = etcd.as_mut() {
            procs.push((e, "etcd", etcd_log.as_path()));
        }
        check_alive(&mut procs)
    })?;
    Ok(true)
}
