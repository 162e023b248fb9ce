//! The state file `lab.json`: what a lab is and what `lab up` created (namespaces, agent
//! processes, pods, file paths), so that later `status`, `check`, `graph` and `down` work from
//! any invocation.
//!
//! `lab up` writes it before creating anything and again after each step, so `down` also
//! finds what a half-failed `up` left. Depends on the spec, names, `serde_json` and `std::fs`.

use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::LabError;
use super::names::LabName;
use super::spec::{API_PORT, ClusterSpec, LabSpec, NodeSpec, Registry};

/// Version of the state file layout.
pub const STATE_VERSION: u32 = 1;
/// File name of the state file in the lab directory.
pub const STATE_FILE: &str = "lab.json";
/// File name of the nodes file in the lab directory.
pub const NODES_FILE: &str = "nodes.yaml";
/// Name of the WireGuard interface the agents create (the agent's default).
pub const WG_INTERFACE: &str = crate::topology::DEFAULT_INTERFACE;
/// File name of the CNI configuration each agent writes in its node's `cni/` directory.
pub const CONFLIST: &str = "10-wiremesh.conflist";

/// How far `lab up` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `up` is (or was, when it failed) creating the lab.
    Creating,
    /// Underlay, NAT, keys and files exist; no agents or pods (`--no-agents`).
    NoAgents,
    /// Everything is up: agents run, pods are attached.
    Up,
}

/// A process the lab started, identified by PID and start time (so a reused PID is never
/// mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// Process ID.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// One pod namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// Namespace name; also the CNI container ID.
    pub netns: String,
    /// Addresses the CNI plugins gave `eth0` (empty until ADD succeeded).
    pub ips: Vec<IpNetwork>,
    /// Where the final CNI ADD result is kept (the DEL input).
    pub result: PathBuf,
}

impl PodState {
    /// The pod's addresses without prefix length.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips.iter().map(IpNetwork::ip)
    }
}

/// One node: namespace, files and what runs in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The Node name.
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its directory in the lab directory.
    pub dir: PathBuf,
    /// Its WireGuard public key (base64), once generated.
    pub public_key: Option<String>,
    /// The agent process, once started.
    pub agent: Option<ProcRef>,
    /// Its pods.
    pub pods: Vec<PodState>,
}

impl NodeState {
    /// A node of lab `lab` (directory `dir`) before anything of it exists.
    pub fn new(lab: &LabName, dir: &Path, spec: &NodeSpec, pods_per_node: usize) -> NodeState {
        NodeState {
            name: spec.name.clone(),
            netns: lab.node_ns(spec.index),
            dir: dir.join("nodes").join(&spec.name),
            public_key: None,
            agent: None,
            pods: (1..=pods_per_node)
                .map(|j| {
                    let netns = lab.pod_ns(spec.index, j);
                    PodState {
                        result: dir.join("pods").join(format!("{netns}.json")),
                        netns,
                        ips: Vec::new(),
                    }
                })
                .collect(),
        }
    }

    /// The private key file.
    pub fn private_key(&self) -> PathBuf {
        self.dir.join("key")
    }

    /// The directory bind-mounted over `/run/wireguard` for the node's agent.
    pub fn wireguard_dir(&self) -> PathBuf {
        self.dir.join("wireguard")
    }

    /// The userspace WireGuard control socket of the node's interface.
    pub fn uapi_socket(&self) -> PathBuf {
        self.wireguard_dir().join(format!("{WG_INTERFACE}.sock"))
    }

    /// The CNI configuration file the agent writes.
    pub fn conflist(&self) -> PathBuf {
        self.dir.join("cni").join(CONFLIST)
    }

    /// The host-local IPAM data directory of the node's pods.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// The agent's log file.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
}

/// The lab's Kubernetes API server (`--registry kube`): where it listens, its files, and the
/// etcd and kube-apiserver processes, both running in the lab's API namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiServerState {
    /// The cluster it serves (1-based; a one-cluster lab has cluster 1).
    #[serde(default = "first_cluster")]
    pub cluster: usize,
    /// Its namespace, `wml-<lab>-api` (cluster `k` > 1: `wml-<lab>-api<k>`).
    pub netns: String,
    /// Its underlay address (it listens there; also in its certificate).
    pub ip: Ipv4Addr,
    /// Its port.
    pub port: u16,
    /// Its directory: PKI, etcd data, logs, kubeconfigs.
    pub dir: PathBuf,
    /// The kube-apiserver binary.
    pub binary: PathBuf,
    /// The etcd process, once started.
    pub etcd: Option<ProcRef>,
    /// The kube-apiserver process, while it runs (`None` after `lab apiserver stop`).
    pub apiserver: Option<ProcRef>,
}

fn first_cluster() -> usize {
    1
}

impl ApiServerState {
    /// The API server of `cluster` in lab `name` (directory `dir`): namespace, address,
    /// directory (`apiserver/`, cluster `k` > 1: `apiserver<k>/`); nothing started yet.
    pub fn new(name: &LabName, dir: &Path, cluster: &ClusterSpec) -> ApiServerState {
        let sub = if cluster.index <= 1 {
            "apiserver".to_owned()
        } else {
            format!("apiserver{}", cluster.index)
        };
        ApiServerState {
            cluster: cluster.index,
            netns: name.cluster_api_ns(cluster.index),
            ip: cluster.api_ip(),
            port: API_PORT,
            dir: dir.join(sub),
            binary: PathBuf::new(),
            etcd: None,
            apiserver: None,
        }
    }

    /// Its port name on the underlay bridge: `api`, cluster `k` > 1: `api<k>`.
    pub fn port_name(&self) -> String {
        if self.cluster <= 1 {
            "api".to_owned()
        } else {
            format!("api{}", self.cluster)
        }
    }

    /// `https://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.ip, self.port)
    }

    /// The PKI directory: CA, serving certificate, service-account keys, token file.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// etcd's data directory.
    pub fn etcd_data(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    /// The administrator's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The agents' kubeconfig: user `system:serviceaccount:kube-system:wiremesh`, whose rights
    /// come only from RBAC.
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.dir.join("agent.kubeconfig")
    }

    /// The kube-apiserver's log.
    pub fn apiserver_log(&self) -> PathBuf {
        self.dir.join("apiserver.log")
    }

    /// etcd's log.
    pub fn etcd_log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }
}

/// The link between two clusters of a multi-cluster lab: `meshctl multicluster link`, run by
/// the lab in cluster 1's API namespace (it reaches every API server over the underlay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// The cluster passed as `--kubeconfig`/`--name` (1-based).
    pub cluster: usize,
    /// The cluster passed as `--remote-kubeconfig`/`--remote-name`.
    pub remote: usize,
    /// The namespace it runs in.
    pub netns: String,
    /// The link process, once started.
    pub process: Option<ProcRef>,
    /// Its output.
    pub log: PathBuf,
}

/// The state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// Layout version ([`STATE_VERSION`]).
    pub version: u32,
    /// The lab name.
    pub name: String,
    /// The lab directory.
    pub dir: PathBuf,
    /// How far `up` got.
    pub phase: Phase,
    /// Unix time `up` started.
    pub created_unix: u64,
    /// The lab's shape.
    pub spec: LabSpec,
    /// Every namespace, in creation order (underlay, LANs, nodes, pods).
    pub namespaces: Vec<String>,
    /// The underlay namespace.
    pub underlay_ns: String,
    /// The LAN namespaces, by LAN.
    pub lan_ns: Vec<String>,
    /// The nodes, in spec order.
    pub nodes: Vec<NodeState>,
    /// The agent binary the nodes run, when agents were started.
    pub agent_binary: Option<PathBuf>,
    /// Extra arguments of every agent (`--agent-arg`), also for nodes added later.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// The API server, with the Kubernetes registry (cluster 1's in a multi-cluster lab).
    #[serde(default)]
    pub apiserver: Option<ApiServerState>,
    /// The API servers of clusters 2, 3, … (`--clusters`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_apiservers: Vec<ApiServerState>,
    /// The links between the clusters (`--clusters`): one per pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkState>,
}

impl LabState {
    /// A fresh state for `spec`: every name decided, nothing created yet.
    pub fn new(name: &LabName, dir: &Path, spec: LabSpec, now_unix: u64) -> LabState {
        let lan_ns: Vec<String> = spec.lans.iter().map(|l| name.lan_ns(l.index)).collect();
        let nodes: Vec<NodeState> = spec
            .nodes
            .iter()
            .map(|n| NodeState::new(name, dir, n, spec.pods_per_node))
            .collect();
        let mut apiservers: Vec<ApiServerState> = if spec.registry == Registry::Kube {
            spec.clusters
                .iter()
                .map(|c| ApiServerState::new(name, dir, c))
                .collect()
        } else {
            Vec::new()
        };
        let more_apiservers = if apiservers.len() > 1 {
            apiservers.split_off(1)
        } else {
            Vec::new()
        };
        let apiserver = apiservers.pop();
        let links = spec
            .clusters
            .iter()
            .flat_map(|a| {
                spec.clusters
                    .iter()
                    .filter(move |b| b.index > a.index)
                    .map(move |b| LinkState {
                        cluster: a.index,
                        remote: b.index,
                        netns: name.api_ns(),
                        process: None,
                        log: dir.join(format!("link-{}-{}.log", a.name, b.name)),
                    })
            })
            .collect();
        let mut namespaces = vec![name.underlay_ns()];
        namespaces.extend(apiserver.as_ref().map(|a| a.netns.clone()));
        namespaces.extend(more_apiservers.iter().map(|a| a.netns.clone()));
        namespaces.extend(lan_ns.iter().cloned());
        namespaces.extend(nodes.iter().map(|n| n.netns.clone()));
        namespaces.extend(
            nodes
                .iter()
                .flat_map(|n| n.pods.iter().map(|p| p.netns.clone())),
        );
        LabState {
            version: STATE_VERSION,
            name: name.to_string(),
            dir: dir.to_owned(),
            phase: Phase::Creating,
            created_unix: now_unix,
            underlay_ns: name.underlay_ns(),
            lan_ns,
            nodes,
            namespaces,
            spec,
            agent_binary: None,
            agent_args: Vec::new(),
            apiserver,
            more_apiservers,
            links,
        }
    }

    /// Every API server, cluster 1's first.
    pub fn apiservers(&self) -> impl Iterator<Item = &ApiServerState> {
        self.apiserver.iter().chain(&self.more_apiservers)
    }

    /// The API server of cluster `k` (1-based).
    pub fn apiserver_of(&self, k: usize) -> Option<&ApiServerState> {
        self.apiservers().find(|a| a.cluster == k)
    }

    /// The API server of cluster `k`, to change it.
    pub fn apiserver_of_mut(&mut self, k: usize) -> Option<&mut ApiServerState> {
        self.apiserver
            .iter_mut()
            .chain(self.more_apiservers.iter_mut())
            .find(|a| a.cluster == k)
    }

    /// The API server of node `node`'s cluster, or why a command that needs it cannot run.
    pub fn require_apiserver_of(
        &self,
        command: &str,
        node: &str,
    ) -> Result<&ApiServerState, LabError> {
        self.require_apiserver(command)?;
        let k = self.spec.cluster_of(node);
        self.apiserver_of(k).ok_or_else(|| {
            LabError::Options(format!(
                "lab {} has no API server for cluster {k}",
                self.name
            ))
        })
    }

    /// Every process the state records: agents, etcd and kube-apiserver of every cluster, links.
    pub fn recorded_processes(&self) -> Vec<ProcRef> {
        let api = self.apiservers().flat_map(|a| [a.apiserver, a.etcd]);
        self.nodes
            .iter()
            .map(|n| n.agent)
            .chain(api)
            .chain(self.links.iter().map(|l| l.process))
            .flatten()
            .collect()
    }

    /// The lab's name, validated.
    pub fn lab_name(&self) -> Result<LabName, LabError> {
        self.name.parse()
    }

    /// The node named `name`, with its position in [`LabState::nodes`] (the same as in the
    /// spec's nodes).
    pub fn node(&self, name: &str) -> Option<(usize, &NodeState)> {
        self.nodes.iter().enumerate().find(|(_, n)| n.name == name)
    }

    /// The API server, or why a command that needs it cannot run.
    pub fn require_apiserver(&self, command: &str) -> Result<&ApiServerState, LabError> {
        self.apiserver.as_ref().ok_or_else(|| {
            LabError::Options(format!(
                "`lab {command}` needs a lab with a Kubernetes API server; lab {} reads a nodes \
                 file (start one with: meshctl lab up --registry kube)",
                self.name
            ))
        })
    }

    /// The nodes file.
    pub fn nodes_file(&self) -> PathBuf {
        self.dir.join(NODES_FILE)
    }

    /// Read the state file of the lab in `dir`.
    pub fn load(dir: &Path) -> Result<LabState, LabError> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(LabError::io("read", &path))?;
        let mut state: LabState = serde_json::from_str(&text).map_err(|source| LabError::Json {
            what: path.display().to_string(),
            source,
        })?;
        state.spec.normalize()?;
        if state.version != STATE_VERSION {
            return Err(LabError::Options(format!(
                "{}: state version {} is not {STATE_VERSION}; remove the lab with the meshctl \
                 that made it",
                path.display(),
                state.version
            )));
        }
        Ok(state)
    }

    /// Write the state file atomically (temporary file, then rename), mode 0600.
    pub fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|source| LabError::Json {
            what: "lab state".to_owned(),
            source,
        })?;
        write_private(&tmp, text.as_bytes())?;
        fs::rename(&tmp, &path).map_err(LabError::io("rename into place", &path))
    }
}

/// Create (or truncate) `path` with mode 0600 and write `data` to it.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), LabError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(LabError::io("create", path))?;
    // The mode above only applies to new files.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(LabError::io("set mode of", path))?;
    f.write_all(data).map_err(LabError::io("write", path))
}

/// Create `path` and its parents; the last component gets `mode`.
pub fn create_dir(path: &Path, mode: u32) -> Result<(), LabError> {
    fs::create_dir_all(path).map_err(LabError::io("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(LabError::io("set mode of", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::spec::{SpecOptions, plan};

    #[test]
    fn new_state_names_every_namespace_and_round_trips_through_json() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions {
            pods_per_node: 2,
            ..SpecOptions::generated(3, 2)
        })
        .unwrap();
        let s = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 7);
        assert_eq!(
            s.namespaces,
            [
                "wml-wm-ul",
                "wml-wm-l1",
                "wml-wm-l2",
                "wml-wm-n1",
                "wml-wm-n2",
                "wml-wm-n3",
                "wml-wm-n1p1",
                "wml-wm-n1p2",
                "wml-wm-n2p1",
                "wml-wm-n2p2",
                "wml-wm-n3p1",
                "wml-wm-n3p2"
            ]
        );
        assert!(s.namespaces.iter().all(|n| name.owns(n)));
        assert_eq!(
            s.nodes[0].uapi_socket(),
            Path::new("/run/wiremesh-lab/wm/nodes/node1/wireguard/wiremesh0.sock")
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LabState>(&json).unwrap(), s);
        assert!(!json.contains("more_apiservers") && !json.contains("\"links\""));
    }

    #[test]
    fn a_two_cluster_state_has_an_api_server_per_cluster_and_one_link() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&SpecOptions {
            registry: crate::lab::spec::Registry::Kube,
            clusters: 2,
            ..SpecOptions::generated(2, 2)
        })
        .unwrap();
        let mut s = LabState::new(&name, Path::new("/run/wiremesh-lab/wm"), spec, 7);
        assert_eq!(
            s.namespaces[..3],
            ["wml-wm-ul", "wml-wm-api", "wml-wm-api2"]
        );
        let apis: Vec<(usize, &str, Ipv4Addr, String, PathBuf)> = s
            .apiservers()
            .map(|a| {
                (
                    a.cluster,
                    a.netns.as_str(),
                    a.ip,
                    a.port_name(),
                    a.dir.clone(),
                )
            })
            .collect();
        assert_eq!(
            apis,
            [
                (
                    1,
                    "wml-wm-api",
                    Ipv4Addr::new(10, 200, 0, 253),
                    "api".to_owned(),
                    PathBuf::from("/run/wiremesh-lab/wm/apiserver")
                ),
                (
                    2,
                    "wml-wm-api2",
                    Ipv4Addr::new(10, 200, 0, 252),
                    "api2".to_owned(),
                    PathBuf::from("/run/wiremesh-lab/wm/apiserver2")
                ),
            ]
        );
        assert_eq!(s.require_apiserver_of("x", "node2").unwrap().cluster, 2);
        assert_eq!((s.links[0].cluster, s.links[0].remote), (1, 2));
        let p = |pid| ProcRef { pid, start_time: 1 };
        s.nodes[0].agent = Some(p(1));
        if let Some(a) = s.apiserver_of_mut(2) {
            a.etcd = Some(p(2));
        }
        s.links[0].process = Some(p(3));
        let pids: Vec<u32> = s.recorded_processes().iter().map(|p| p.pid).collect();
        assert_eq!(pids, [1, 2, 3]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LabState>(&json).unwrap(), s);
    }
}
