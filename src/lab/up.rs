//! `lab up`: plan the lab, then create it step by step, recording each step in the state file.
//!
//! Order: state file → underlay (and the API namespaces) → LANs and NAT routers → node
//! namespaces → keys → nodes file, or with the Kubernetes registry, per cluster: PKI, etcd,
//! kube-apiserver, Peer CRD and RBAC, one Node per node of the cluster → agents (wait for each
//! agent's CNI configuration) → pods (CNI ADD) → with two clusters or more, the links
//! (`meshctl multicluster link`; wait until every cluster holds the others' segments as Peers
//! and every agent runs them). Everything that can be checked without touching the machine (root, tools,
//! options, agent and kube-apiserver binaries, name clash) is checked first. A failed step
//! leaves the lab as it is, for inspection; `lab down` removes it (processes are recorded in
//! the state file as soon as they start). Depends on every other lab module.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::LabError;
use super::names::LabName;
use super::spec::{self, Registry, SpecOptions};
use super::state::{self, LabState, Phase, create_dir, write_private};
use super::{agent, apiserver, cluster, cni, keys, link, net, sys};

/// The directory every agent's private `/run/wireguard` is bind-mounted on.
pub const RUN_WIREGUARD: &str = "/run/wireguard";
/// Marker in the root directory: a lab created `/run/wireguard`, the last `down` removes it.
pub const RUN_WIREGUARD_MARKER: &str = ".created-run-wireguard";

/// What `lab up` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct UpOptions {
    /// The directory holding lab directories.
    pub root: PathBuf,
    /// The lab's name.
    pub name: LabName,
    /// The lab's shape.
    pub spec: SpecOptions,
    /// Start agents and pods (off: underlay, NAT, keys and files only; a debugging aid).
    pub agents: bool,
    /// The `wiremesh` binary; `None`: next to the running executable.
    pub agent_binary: Option<PathBuf>,
    /// Extra arguments appended to every agent's command line.
    pub agent_args: Vec<String>,
    /// How long to wait for the agents' CNI configuration (and for the API server).
    pub timeout: Duration,
    /// The kube-apiserver binary (`--registry kube`); `None`:
    /// [`apiserver::DEFAULT_APISERVER_BIN`].
    pub apiserver_binary: Option<PathBuf>,
    /// Link the clusters of a multi-cluster lab (`meshctl multicluster link`); off
    /// (`--no-link`): the clusters stay apart, a debugging aid.
    pub link: bool,
}

/// The tools `up` needs for this lab.
pub fn needed_tools(spec: &spec::LabSpec, agents: bool) -> Vec<sys::Tool> {
    let mut tools = vec![sys::IP, sys::WG, sys::SYSCTL];
    if spec.lans.iter().any(|l| l.nat.is_some()) {
        tools.push(sys::NFT);
    }
    if agents {
        tools.extend([sys::WIREGUARD_GO, sys::CNI_BRIDGE, sys::CNI_HOST_LOCAL]);
    }
    if spec.registry == Registry::Kube {
        tools.extend(apiserver::TOOLS);
    }
    tools
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Create the lab. On failure after the first change the error is [`LabError::UpFailed`].
pub fn up(opts: &UpOptions) -> Result<LabState, LabError> {
    sys::require_root()?;
    let spec = spec::plan(&opts.spec)?;
    sys::require_tools(&needed_tools(&spec, opts.agents))?;
    if opts.agents && !Path::new("/dev/net/tun").exists() {
        return Err(LabError::MissingTools {
            missing: vec!["/dev/net/tun (modprobe tun)".to_owned()],
        });
    }
    let binary = if opts.agents {
        Some(agent::find_binary(opts.agent_binary.as_deref())?)
    } else {
        None
    };
    let apiserver_binary = match spec.registry {
        Registry::Kube => Some(apiserver::find_binary(opts.apiserver_binary.as_deref())?),
        Registry::File => None,
    };
    let dir = opts.name.dir(&opts.root);
    if dir.exists() {
        return Err(LabError::Exists {
            name: opts.name.to_string(),
            dir: dir.display().to_string(),
        });
    }
    if let Some(ns) = sys::netns_list()?.into_iter().find(|n| opts.name.owns(n)) {
        return Err(LabError::Exists {
            name: opts.name.to_string(),
            dir: format!("namespace {ns} is left over"),
        });
    }

    // From here on the machine changes.
    std::fs::create_dir_all(&opts.root).map_err(LabError::io("create directory", &opts.root))?;
    // create_dir, not create_dir_all: of two `up`s of one name, exactly one gets the directory.
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(LabError::Exists {
                name: opts.name.to_string(),
                dir: dir.display().to_string(),
            });
        }
        r => r.map_err(LabError::io("create directory", &dir))?,
    }
    create_dir(&dir, 0o700)?;
    let mut state = LabState::new(&opts.name, &dir, spec, now_unix());
    state.agent_binary = binary.clone();
    state.agent_args = opts.agent_args.clone();
    if let Some(bin) = apiserver_binary {
        for api in state
            .apiserver
            .iter_mut()
            .chain(state.more_apiservers.iter_mut())
        {
            api.binary = bin.clone();
        }
    }
    let failed = |e: LabError| LabError::UpFailed {
        name: opts.name.to_string(),
        dir: dir.clone(),
        source: Box::new(e),
    };
    state.save().map_err(failed)?;
    let result = build(&mut state, opts, binary.as_deref());
    if let Err(e) = result {
        let _ = state.save();
        return Err(failed(e));
    }
    Ok(state)
}

fn build(state: &mut LabState, opts: &UpOptions, binary: Option<&Path>) -> Result<(), LabError> {
    tracing::info!(lab = %state.name, "creating underlay, LANs and nodes");
    net::create_underlay(state)?;
    for api in state.apiservers() {
        apiserver::create_netns(state, api)?;
    }
    for lan in &state.spec.lans {
        net::create_lan(state, lan)?;
    }
    for node in &state.spec.nodes {
        net::create_node(state, node)?;
    }

    let mut public_keys = Vec::with_capacity(state.nodes.len());
    for node in &mut state.nodes {
        create_dir(&node.dir, 0o700)?;
        let key = keys::generate(&node.private_key())?;
        write_private(&node.dir.join("key.pub"), format!("{key}\n").as_bytes())?;
        node.public_key = Some(key.to_string());
        public_keys.push(key);
    }
    match state.spec.registry {
        Registry::File => {
            let text = spec::render_nodes_file(&state.spec, &opts.name, &public_keys)?;
            write_private(&state.nodes_file(), text.as_bytes())?;
        }
        Registry::Kube => {
            for k in super::clusters(state) {
                start_cluster(state, k, opts.timeout)?;
            }
        }
    }
    state.save()?;

    let Some(binary) = binary else {
        state.phase = Phase::NoAgents;
        return state.save();
    };

    // Every agent's bind mount needs the mount point on the host.
    let run_wg = Path::new(RUN_WIREGUARD);
    if !run_wg.exists() {
        std::fs::create_dir_all(run_wg).map_err(LabError::io("create directory", run_wg))?;
        write_private(&opts.root.join(RUN_WIREGUARD_MARKER), b"")?;
    }
    let mut children = Vec::with_capacity(state.nodes.len());
    for i in 0..state.nodes.len() {
        let (child, proc_ref) = agent::spawn(state, &state.nodes[i], binary, &opts.agent_args)?;
        children.push(child);
        state.nodes[i].agent = Some(proc_ref);
        state.save()?;
    }
    agent::wait_ready(&state.nodes, &mut children, opts.timeout)?;

    for i in 0..state.nodes.len() {
        attach_pods(state, i)?;
        agent::check_alive(&state.nodes, &mut children)?;
    }
    agent::check_alive(&state.nodes, &mut children)?;
    wait_for_natted_handshakes(state, std::time::Duration::from_secs(20));
    if opts.link && !state.links.is_empty() {
        start_links(state, opts.timeout)?;
    }
    state.phase = Phase::Up;
    state.save()
}

/// Start every link of a multi-cluster lab (`meshctl multicluster link`, recorded in the state
/// as soon as it runs), then wait (bounded by `timeout`) until each cluster holds a Peer for
/// every pod CIDR of the others and every agent runs the mesh its cluster's Nodes and Peers
/// give it, failing as soon as a link exits (with its log's tail).
pub fn start_links(state: &mut LabState, timeout: Duration) -> Result<(), LabError> {
    let meshctl = std::env::current_exe().map_err(LabError::io("locate", "current executable"))?;
    let mut children = Vec::with_capacity(state.links.len());
    for i in 0..state.links.len() {
        let (child, r) = link::spawn(state, &state.links[i], &meshctl)?;
        state.links[i].process = Some(r);
        state.save()?;
        children.push(child);
    }
    let t0 = std::time::Instant::now();
    loop {
        link::check_alive(&state.links, &mut children)?;
        let mut missing = link::missing_peers(state)?;
        if missing.is_empty() {
            missing = super::chaos::divergence(state, None)?;
        }
        if missing.is_empty() {
            tracing::info!(after = ?t0.elapsed(), "clusters linked");
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(LabError::Timeout {
                what: format!("the clusters to be linked: {}", missing.join("; ")),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Create and attach the pods of `state.nodes[i]` with the CNI configuration its agent wrote,
/// recording each in the state.
pub fn attach_pods(state: &mut LabState, i: usize) -> Result<(), LabError> {
    create_dir(&state.dir.join("pods"), 0o700)?;
    let path = state.nodes[i].conflist();
    let text = std::fs::read_to_string(&path).map_err(LabError::io("read", &path))?;
    let list: serde_json::Value = serde_json::from_str(&text).map_err(|source| LabError::Json {
        what: path.display().to_string(),
        source,
    })?;
    for j in 0..state.nodes[i].pods.len() {
        let node = &state.nodes[i];
        let pod = &node.pods[j];
        net::create_pod_ns(&pod.netns)?;
        let at = cni::Attachment {
            node_ns: node.netns.clone(),
            pod_ns: pod.netns.clone(),
            ifname: "eth0".to_owned(),
            ipam_dir: node.ipam_dir(),
        };
        let result = cni::add(&list, &at)?;
        write_private(&pod.result, result.to_string().as_bytes())?;
        let ips = cni::result_ips(&result);
        tracing::info!(pod = %pod.netns, ?ips, "pod attached");
        state.nodes[i].pods[j].ips = ips;
        state.save()?;
    }
    Ok(())
}

/// Start the lab's API server (PKI, etcd, kube-apiserver, each recorded in the state as soon as
/// it runs), wait until it answers (bounded by `timeout`), install the Peer CRD and the agents'
/// RBAC, and register every node's Node.
fn start_cluster(state: &mut LabState, cluster: usize, timeout: Duration) -> Result<(), LabError> {
    let mut api = state.apiserver_of(cluster).cloned().ok_or_else(|| {
        LabError::Options(format!("no API server of cluster {cluster} in the state"))
    })?;
    tracing::info!(lab = %state.name, url = %api.url(), "starting the Kubernetes API server");
    apiserver::write_pki(&state.name, &api)?;
    let (mut etcd, etcd_ref) = apiserver::start_etcd(&api)?;
    api.etcd = Some(etcd_ref);
    record(state, &api);
    state.save()?;
    let (mut kas, kas_ref) = apiserver::start_apiserver(&api)?;
    api.apiserver = Some(kas_ref);
    record(state, &api);
    state.save()?;
    let (etcd_log, kas_log) = (api.etcd_log(), api.apiserver_log());
    cluster::wait_ready(&api, timeout, || {
        apiserver::check_alive(&mut [
            (&mut etcd, "etcd", &etcd_log),
            (&mut kas, "kube-apiserver", &kas_log),
        ])
    })?;
    cluster::install(&api)?;
    // The agents start next: wait until their identity is let in (RBAC caches).
    cluster::wait_ready(&api, timeout, || {
        apiserver::check_alive(&mut [
            (&mut etcd, "etcd", &etcd_log),
            (&mut kas, "kube-apiserver", &kas_log),
        ])
    })?;
    let nodes: Vec<spec::NodeSpec> = state
        .spec
        .nodes
        .iter()
        .filter(|n| n.cluster == cluster)
        .cloned()
        .collect();
    cluster::register(&api, &nodes)
}

/// Put `api` into the state in place of its cluster's entry.
fn record(state: &mut LabState, api: &state::ApiServerState) {
    if let Some(slot) = state.apiserver_of_mut(api.cluster) {
        *slot = api.clone();
    }
}

/// Wait (bounded) until every leader behind NAT has a handshake with each of its peers, so the
/// lab is usable as soon as `up` returns.
///
/// Why: a NATed node is unreachable until it has sent something. Its first handshake, sent as
/// soon as its agent configures a peer (it has a keepalive), is dropped when it reaches a peer
/// whose agent has not configured the NATed node yet, a few milliseconds later; WireGuard then
/// retries only after 5 s (`REKEY_TIMEOUT`).
pub fn wait_for_natted_handshakes(state: &LabState, limit: std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        let status = super::status::collect(state, now_unix());
        let pending: Vec<&str> = status
            .nodes
            .iter()
            .filter(|n| n.behind_nat && n.leader)
            .filter(|n| {
                n.peers
                    .iter()
                    .any(|p| p.latest_handshake_secs_ago.is_none())
            })
            .map(|n| n.name.as_str())
            .collect();
        if pending.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            tracing::warn!(nodes = ?pending, "nodes behind NAT have not reached every peer yet");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A one-screen summary of a lab that just came up.
pub fn summary(state: &LabState) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "lab {} is up ({} granularity, {} nodes from {}, {} registry, {}){}",
        state.name,
        state.spec.granularity,
        state.nodes.len(),
        state.spec.source,
        state.spec.registry,
        state.spec.family,
        if state.phase == Phase::NoAgents {
            ", without agents or pods"
        } else {
            ""
        }
    );
    for (n, spec) in state.nodes.iter().zip(&state.spec.nodes) {
        let pods: Vec<String> = n
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| ip.ip().to_string()))
            .collect();
        let _ = writeln!(
            s,
            "  {:<12} {:<12} location {:<14} endpoint {}{}{}",
            n.name,
            n.netns,
            if spec.location.is_empty() {
                "-"
            } else {
                &spec.location
            },
            spec.endpoint(state.spec.port),
            if spec.behind_nat() {
                " (behind NAT)"
            } else {
                ""
            },
            if pods.is_empty() {
                String::new()
            } else {
                format!(", pods {}", pods.join(" "))
            }
        );
    }
    match &state.apiserver {
        Some(_) if state.spec.multi_cluster() => {
            let _ = writeln!(s, "state {}", state.dir.join(state::STATE_FILE).display());
            for api in state.apiservers() {
                let c = state.spec.cluster(api.cluster);
                let members: Vec<&str> = state
                    .spec
                    .nodes
                    .iter()
                    .filter(|n| n.cluster == api.cluster)
                    .map(|n| n.name.as_str())
                    .collect();
                let _ = writeln!(
                    s,
                    "{} ({}; mesh {}): Kubernetes API server {} in namespace {}\n  \
                     kubectl: ip netns exec {} kubectl --kubeconfig {} get nodes",
                    c.map_or("?", |c| c.name.as_str()),
                    members.join(", "),
                    c.map_or_else(String::new, |c| c.mesh_subnet.to_string()),
                    api.url(),
                    api.netns,
                    api.netns,
                    api.admin_kubeconfig().display()
                );
            }
            for l in &state.links {
                let _ = writeln!(
                    s,
                    "link cluster{} <-> cluster{}: {}",
                    l.cluster,
                    l.remote,
                    match l.process {
                        Some(p) => format!(
                            "meshctl multicluster link, PID {}, log {}",
                            p.pid,
                            l.log.display()
                        ),
                        None => "not started (--no-link)".to_owned(),
                    }
                );
            }
        }
        Some(api) => {
            let _ = writeln!(
                s,
                "state {}, Kubernetes API server {} in namespace {}\n\
                 kubectl: ip netns exec {} kubectl --kubeconfig {} get nodes",
                state.dir.join(state::STATE_FILE).display(),
                api.url(),
                api.netns,
                api.netns,
                api.admin_kubeconfig().display()
            );
        }
        None => {
            let _ = writeln!(
                s,
                "state {}, nodes file {}",
                state.dir.join(state::STATE_FILE).display(),
                state.nodes_file().display()
            );
        }
    }
    let _ = write!(
        s,
        "next: meshctl lab status --name {n} · meshctl lab check --name {n} · meshctl lab down --name {n}",
        n = state.name
    );
    s
}
