//! `lab status`: per node its namespace, agent, leadership, mesh IP, pods and WireGuard peers
//! with endpoint, latest handshake and traffic, as a text table or JSON.
//!
//! [`collect`] does the I/O (process checks, the nodes file or the lab's API server, each node's
//! UAPI socket); [`render_text`] is pure. The JSON field names are a contract:
//! `{"nodes": [{"name", …}]}`. With the Kubernetes registry each node also shows the
//! annotations its agent published, and the status the API server's processes.
//! Depends on the state, `uapi`, `sys`, `cluster`, the registries and the topology engine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::state::{LabState, Phase, WG_INTERFACE};
use super::{cluster, sys, uapi};
use crate::cli::table;
use crate::model::{MeshNode, WgKey};
use crate::registry::annotations::{KILO_PREFIX, WIREMESH_PREFIX};
use crate::status::human_bytes;
use crate::topology;

/// The whole lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    /// The lab name.
    pub name: String,
    /// The lab directory.
    pub dir: String,
    /// How far `up` got.
    pub phase: Phase,
    /// Mesh granularity.
    pub granularity: String,
    /// Where the nodes came from.
    pub source: String,
    /// Where the agents read the cluster: `file` or `kube`.
    pub registry: String,
    /// The API server (`kube` registry; cluster 1's in a multi-cluster lab).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<ApiServerStatus>,
    /// Every cluster with its API server (`--clusters` 2 or more only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    /// The links between the clusters (`--clusters` 2 or more only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    /// The nodes.
    pub nodes: Vec<NodeStatus>,
}

/// One cluster of a multi-cluster lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// Its name, `cluster<k>`.
    pub name: String,
    /// Its mesh subnet.
    pub mesh_subnet: String,
    /// Its API server.
    pub apiserver: Option<ApiServerStatus>,
}

/// One `meshctl multicluster link` process of a multi-cluster lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkStatus {
    /// `--name`.
    pub cluster: String,
    /// `--remote-name`.
    pub remote: String,
    /// Its PID, once started.
    pub pid: Option<u32>,
    /// Whether it runs.
    pub running: bool,
    /// Its log.
    pub log: String,
}

/// The lab's API server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiServerStatus {
    /// `https://<underlay IP>:<port>`.
    pub url: String,
    /// Its namespace.
    pub namespace: String,
    /// The kube-apiserver's PID, unless stopped.
    pub apiserver_pid: Option<u32>,
    /// Whether it runs.
    pub apiserver_running: bool,
    /// etcd's PID.
    pub etcd_pid: Option<u32>,
    /// Whether etcd runs.
    pub etcd_running: bool,
    /// The administrator's kubeconfig (use it inside the namespace).
    pub admin_kubeconfig: String,
    /// Why the Nodes could not be read from it, if they could not.
    pub error: Option<String>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// The Node name.
    pub name: String,
    /// Its cluster, `cluster<k>` (multi-cluster labs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Its network namespace.
    pub namespace: String,
    /// Its location.
    pub location: String,
    /// Whether it sits behind a NAT router.
    pub behind_nat: bool,
    /// Its endpoint in the nodes file.
    pub endpoint: String,
    /// Its internal (LAN) IP.
    pub internal_ip: String,
    /// The agent's PID, if one was started.
    pub agent_pid: Option<u32>,
    /// Whether that agent still runs.
    pub agent_running: bool,
    /// Whether it leads its segment (holds the WireGuard tunnels).
    pub leader: bool,
    /// Its mesh IP (leaders only), as the topology gives it.
    pub mesh_ip: Option<String>,
    /// Its pods.
    pub pods: Vec<PodStatus>,
    /// Its WireGuard listen port as the daemon reports it.
    pub listen_port: Option<u16>,
    /// Its WireGuard peers.
    pub peers: Vec<PeerStatus>,
    /// Why the WireGuard state could not be read (no socket yet, no agent, …).
    pub wireguard_error: Option<String>,
    /// The mesh annotations (`kilo.squat.ai/…`, `wiremesh.io/…`) on the node's Node object
    /// (`kube` registry): what the lab set and what the agent published.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodStatus {
    /// Its namespace name.
    pub name: String,
    /// Its addresses.
    pub ips: Vec<String>,
}

/// One WireGuard peer of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    /// Its public key.
    pub public_key: String,
    /// The lab node(s) behind that key (a segment's members), if known.
    pub node: Option<String>,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Seconds since the latest handshake; `None`: never.
    pub latest_handshake_secs_ago: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Allowed IPs.
    pub allowed_ips: Vec<String>,
}

/// Leadership, mesh IP and the names behind each key, from the lab's nodes file.
struct Mesh {
    leader: BTreeMap<String, bool>,
    mesh_ip: BTreeMap<String, String>,
    by_key: BTreeMap<WgKey, String>,
}

fn mesh(state: &LabState, cluster: usize, nodes: &[MeshNode], m: &mut Mesh) {
    let opts = super::mesh_options(state, cluster);
    let checked = topology::claims::check(nodes, &opts);
    let topo = topology::build_checked(&checked, &[], &opts);
    for seg in &topo.segments {
        let leader = seg.leader_node();
        m.mesh_ip
            .insert(leader.name.to_string(), seg.mesh_ip.to_string());
        if let Some(k) = seg.public_key() {
            m.by_key.insert(k, seg.label());
        }
        for n in &seg.nodes {
            m.leader.insert(n.name.to_string(), n.name == leader.name);
        }
    }
}

/// The mesh annotations of each Node, by node name.
type Annotations = BTreeMap<String, BTreeMap<String, String>>;

/// The nodes as the agents see them, and with the `kube` registry each Node's mesh annotations
/// and the API server's status.
fn read_nodes(
    state: &LabState,
    cluster: usize,
) -> (Option<Vec<MeshNode>>, Annotations, Option<ApiServerStatus>) {
    let Some(api) = state.apiserver_of(cluster) else {
        return (
            super::mesh_nodes(state, cluster).ok().map(|l| l.items),
            BTreeMap::new(),
            None,
        );
    };
    let running = |p: &Option<super::state::ProcRef>| p.as_ref().is_some_and(sys::is_running);
    let mut status = ApiServerStatus {
        url: api.url(),
        namespace: api.netns.clone(),
        apiserver_pid: api.apiserver.map(|p| p.pid),
        apiserver_running: running(&api.apiserver),
        etcd_pid: api.etcd.map(|p| p.pid),
        etcd_running: running(&api.etcd),
        admin_kubeconfig: api.admin_kubeconfig().display().to_string(),
        error: None,
    };
    if !status.apiserver_running {
        status.error = Some("the API server is not running".to_owned());
        return (None, BTreeMap::new(), Some(status));
    }
    match cluster::nodes(api) {
        Ok(objects) => {
            let ours = |k: &String| k.starts_with(KILO_PREFIX) || k.starts_with(WIREMESH_PREFIX);
            let annotations = objects
                .iter()
                .map(|n| {
                    let a = n
                        .metadata
                        .annotations
                        .iter()
                        .flatten()
                        .filter(|(k, _)| ours(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    (n.metadata.name.clone().unwrap_or_default(), a)
                })
                .collect();
            (
                Some(super::parse_nodes(&objects).items),
                annotations,
                Some(status),
            )
        }
        Err(e) => {
            status.error = Some(e.to_string());
            (None, BTreeMap::new(), Some(status))
        }
    }
}

/// Gather the status of every node. `now_unix` turns handshake times into ages.
pub fn collect(state: &LabState, now_unix: u64) -> LabStatus {
    // Each cluster from its own registry; node names are unique across the lab.
    let mut mesh_nodes: Option<Vec<MeshNode>> = None;
    let mut annotations = Annotations::new();
    let mut mesh_of = Mesh {
        leader: BTreeMap::new(),
        mesh_ip: BTreeMap::new(),
        by_key: BTreeMap::new(),
    };
    let mut any_mesh = false;
    let mut clusters = Vec::new();
    let mut apiserver = None;
    for k in super::clusters(state) {
        let (nodes, a, api) = read_nodes(state, k);
        if let Some(nodes) = nodes {
            mesh(state, k, &nodes, &mut mesh_of);
            any_mesh = true;
            mesh_nodes.get_or_insert_with(Vec::new).extend(nodes);
        }
        annotations.extend(a);
        if k == 1 {
            apiserver.clone_from(&api);
        }
        if let (true, Some(c)) = (state.spec.multi_cluster(), state.spec.cluster(k)) {
            clusters.push(ClusterStatus {
                name: c.name.clone(),
                mesh_subnet: c.mesh_subnet.to_string(),
                apiserver: api,
            });
        }
    }
    let mesh = any_mesh.then_some(mesh_of);
    let cluster_name = |name: &str| {
        state
            .spec
            .multi_cluster()
            .then(|| state.spec.cluster(state.spec.cluster_of(name)))
            .flatten()
            .map(|c| c.name.clone())
    };
    let links = state
        .links
        .iter()
        .map(|l| {
            let name = |k: usize| {
                state
                    .spec
                    .cluster(k)
                    .map_or_else(|| format!("cluster{k}"), |c| c.name.clone())
            };
            LinkStatus {
                cluster: name(l.cluster),
                remote: name(l.remote),
                pid: l.process.map(|p| p.pid),
                running: l.process.as_ref().is_some_and(sys::is_running),
                log: l.log.display().to_string(),
            }
        })
        .collect();
    let published = |name: &str| {
        mesh_nodes
            .iter()
            .flatten()
            .find(|m| m.name.as_str() == name)
            .and_then(|m| m.endpoint.as_ref().map(ToString::to_string))
    };
    let namespaces = sys::netns_list().unwrap_or_default();
    let nodes = state
        .nodes
        .iter()
        .zip(&state.spec.nodes)
        .map(|(n, spec)| {
            let agent_running = n.agent.as_ref().is_some_and(sys::is_running);
            let socket = n.uapi_socket();
            let answer = if socket.exists() {
                uapi::get(&socket, Duration::from_secs(2)).map_err(|e| e.to_string())
            } else {
                Err(format!("no WireGuard control socket {WG_INTERFACE}.sock"))
            };
            let (listen_port, peers, wireguard_error) = match answer {
                Ok(dev) => (
                    dev.listen_port,
                    dev.peers
                        .iter()
                        .map(|p| PeerStatus {
                            public_key: p.public_key.to_string(),
                            node: mesh
                                .as_ref()
                                .and_then(|m| m.by_key.get(&p.public_key).cloned()),
                            endpoint: p.endpoint.map(|e| e.to_string()),
                            latest_handshake_secs_ago: p
                                .last_handshake_unix
                                .map(|t| now_unix.saturating_sub(t)),
                            rx_bytes: p.rx_bytes,
                            tx_bytes: p.tx_bytes,
                            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                        })
                        .collect(),
                    None,
                ),
                Err(e) => (None, Vec::new(), Some(e)),
            };
            NodeStatus {
                name: n.name.clone(),
                cluster: cluster_name(&n.name),
                namespace: n.netns.clone(),
                location: match &state.apiserver {
                    // The Node's location (an annotation may have moved it).
                    Some(_) => mesh_nodes
                        .iter()
                        .flatten()
                        .find(|m| m.name.as_str() == n.name)
                        .map_or_else(|| spec.location.clone(), |m| m.location.clone()),
                    None => spec.location.clone(),
                },
                behind_nat: spec.behind_nat(),
                endpoint: match &state.apiserver {
                    // What the agent published (and the others use).
                    Some(_) => published(&n.name).unwrap_or_else(|| "-".to_owned()),
                    None => spec.endpoint(state.spec.port).to_string(),
                },
                internal_ip: spec.lan_ip.to_string(),
                agent_pid: n.agent.map(|p| p.pid),
                agent_running,
                leader: mesh
                    .as_ref()
                    .and_then(|m| m.leader.get(&n.name).copied())
                    .unwrap_or(false),
                mesh_ip: mesh.as_ref().and_then(|m| m.mesh_ip.get(&n.name).cloned()),
                pods: n
                    .pods
                    .iter()
                    .filter(|p| !p.ips.is_empty() || namespaces.contains(&p.netns))
                    .map(|p| PodStatus {
                        name: p.netns.clone(),
                        ips: p.addrs().map(|a| a.to_string()).collect(),
                    })
                    .collect(),
                listen_port,
                peers,
                wireguard_error,
                annotations: annotations.remove(&n.name).unwrap_or_default(),
            }
        })
        .collect();
    LabStatus {
        name: state.name.clone(),
        dir: state.dir.display().to_string(),
        phase: state.phase,
        granularity: state.spec.granularity.to_string(),
        source: state.spec.source.clone(),
        registry: state.spec.registry.to_string(),
        apiserver,
        clusters,
        links,
        nodes,
    }
}

/// The status as text: a node table, then each node's peers.
pub fn render_text(s: &LabStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lab {} ({} granularity, from {}), {}, {}\n",
        s.name,
        s.granularity,
        s.source,
        match s.phase {
            Phase::Creating => "incomplete (up failed or still running)",
            Phase::NoAgents => "no agents (--no-agents)",
            Phase::Up => "up",
        },
        s.dir
    );
    let proc_state = |pid: Option<u32>, running: bool| match (pid, running) {
        (None, _) => "stopped".to_owned(),
        (Some(p), true) => format!("{p} running"),
        (Some(p), false) => format!("{p} exited"),
    };
    let apis: Vec<(String, &ApiServerStatus)> = if s.clusters.is_empty() {
        s.apiserver.iter().map(|a| (String::new(), a)).collect()
    } else {
        s.clusters
            .iter()
            .filter_map(|c| {
                let a = c.apiserver.as_ref()?;
                Some((format!("{} (mesh {}): ", c.name, c.mesh_subnet), a))
            })
            .collect()
    };
    for (cluster, a) in apis {
        let _ = writeln!(
            out,
            "{cluster}Kubernetes API server {} in {}: kube-apiserver {}, etcd {}{}\n  \
             kubectl: ip netns exec {} kubectl --kubeconfig {} get nodes\n",
            a.url,
            a.namespace,
            proc_state(a.apiserver_pid, a.apiserver_running),
            proc_state(a.etcd_pid, a.etcd_running),
            a.error
                .as_ref()
                .map(|e| format!("; Nodes not readable: {e}"))
                .unwrap_or_default(),
            a.namespace,
            a.admin_kubeconfig
        );
    }
    for l in &s.links {
        let _ = writeln!(
            out,
            "link {} <-> {} (meshctl multicluster link): {}, log {}\n",
            l.cluster,
            l.remote,
            proc_state(l.pid, l.running),
            l.log
        );
    }
    let multi = s.nodes.iter().any(|n| n.cluster.is_some());
    let mut rows = vec![
        [
            "NODE",
            "CLUSTER",
            "NAMESPACE",
            "LOCATION",
            "AGENT",
            "LEADER",
            "MESH IP",
            "ENDPOINT",
            "PODS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for n in &s.nodes {
        let agent = match (n.agent_pid, n.agent_running) {
            (None, _) => "-".to_owned(),
            (Some(pid), true) => format!("{pid} running"),
            (Some(pid), false) => format!("{pid} exited"),
        };
        let pods: Vec<String> = n.pods.iter().flat_map(|p| p.ips.iter().cloned()).collect();
        rows.push(vec![
            n.name.clone(),
            n.cluster.clone().unwrap_or_default(),
            n.namespace.clone(),
            if n.location.is_empty() {
                "-".to_owned()
            } else {
                n.location.clone()
            },
            agent,
            if n.leader { "yes" } else { "no" }.to_owned(),
            n.mesh_ip.clone().unwrap_or_else(|| "-".to_owned()),
            format!("{}{}", n.endpoint, if n.behind_nat { " (NAT)" } else { "" }),
            if pods.is_empty() {
                "-".to_owned()
            } else {
                pods.join(",")
            },
        ]);
    }
    if !multi {
        // One cluster: no CLUSTER column.
        for r in &mut rows {
            r.remove(1);
        }
    }
    out.push_str(&table(&rows));
    for n in &s.nodes {
        let _ = write!(out, "\n{} peers", n.name);
        if let Some(e) = &n.wireguard_error {
            let _ = writeln!(out, ": none readable ({e})");
            continue;
        }
        if n.peers.is_empty() {
            let _ = writeln!(out, ": none");
            continue;
        }
        out.push('\n');
        let mut rows = vec![
            ["  PEER", "KEY", "ENDPOINT", "HANDSHAKE", "RX", "TX"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for p in &n.peers {
            rows.push(vec![
                format!("  {}", p.node.as_deref().unwrap_or("?")),
                p.public_key.chars().take(10).collect::<String>() + "…",
                p.endpoint.clone().unwrap_or_else(|| "(none)".to_owned()),
                p.latest_handshake_secs_ago
                    .map_or_else(|| "never".to_owned(), |s| format!("{s} s ago")),
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LabStatus {
        LabStatus {
            name: "wm".into(),
            dir: "/run/wiremesh-lab/wm".into(),
            phase: Phase::Up,
            granularity: "full".into(),
            source: "examples/three-clouds.yaml".into(),
            registry: "file".into(),
            apiserver: None,
            clusters: Vec::new(),
            links: Vec::new(),
            nodes: vec![NodeStatus {
                name: "fra-1".into(),
                cluster: None,
                namespace: "wml-wm-n1".into(),
                location: "de-fra".into(),
                behind_nat: false,
                endpoint: "10.200.0.1:51820".into(),
                internal_ip: "10.210.1.11".into(),
                agent_pid: Some(42),
                agent_running: true,
                leader: true,
                mesh_ip: Some("10.4.0.1".into()),
                pods: vec![PodStatus {
                    name: "wml-wm-n1p1".into(),
                    ips: vec!["10.42.0.2".into()],
                }],
                listen_port: Some(51820),
                peers: vec![PeerStatus {
                    public_key: "cpmjjEo1wKcecLnNDXzPhTFGyG68rKbZxhzDpiN/bAI=".into(),
                    node: Some("hel-1".into()),
                    endpoint: Some("10.200.0.2:51820".into()),
                    latest_handshake_secs_ago: Some(7),
                    rx_bytes: 2048,
                    tx_bytes: 100,
                    allowed_ips: vec!["10.42.1.0/24".into()],
                }],
                wireguard_error: None,
                annotations: BTreeMap::new(),
            }],
        }
    }

    #[test]
    fn json_has_the_contract_fields() {
        let v = serde_json::to_value(sample()).unwrap();
        let n = &v["nodes"][0];
        assert_eq!(n["name"], "fra-1");
        assert_eq!(n["namespace"], "wml-wm-n1");
        assert_eq!(n["agent_running"], true);
        assert_eq!(n["pods"][0]["ips"][0], "10.42.0.2");
        let p = &n["peers"][0];
        for key in [
            "public_key",
            "endpoint",
            "latest_handshake_secs_ago",
            "rx_bytes",
            "tx_bytes",
        ] {
            assert!(p.get(key).is_some(), "{key} missing");
        }
        assert_eq!(p["latest_handshake_secs_ago"], 7);
    }

    #[test]
    fn text_lists_nodes_then_peers_with_handshake_age() {
        let text = render_text(&sample());
        assert!(
            text.contains("fra-1  wml-wm-n1  de-fra    42 running  yes"),
            "{text}"
        );
        assert!(
            text.contains("hel-1  cpmjjEo1wK…  10.200.0.2:51820  7 s ago    2.0 KiB  100 B"),
            "{text}"
        );
        let mut s = sample();
        s.nodes[0].wireguard_error = Some("no socket".into());
        assert!(render_text(&s).contains("fra-1 peers: none readable (no socket)"));
        assert!(
            !text.contains("CLUSTER"),
            "one cluster: no cluster column\n{text}"
        );
        let json = serde_json::to_value(sample()).unwrap();
        assert!(json.get("clusters").is_none() && json["nodes"][0].get("cluster").is_none());
    }

    #[test]
    fn a_multi_cluster_status_shows_each_nodes_cluster_and_the_link() {
        let mut s = sample();
        s.nodes[0].cluster = Some("cluster2".into());
        s.links.push(LinkStatus {
            cluster: "cluster1".into(),
            remote: "cluster2".into(),
            pid: Some(77),
            running: true,
            log: "/run/wiremesh-lab/wm/link-cluster1-cluster2.log".into(),
        });
        let text = render_text(&s);
        assert!(text.contains("NODE   CLUSTER   NAMESPACE"), "{text}");
        assert!(text.contains("fra-1  cluster2  wml-wm-n1"), "{text}");
        assert!(
            text.contains("link cluster1 <-> cluster2 (meshctl multicluster link): 77 running"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["nodes"][0]["cluster"], "cluster2");
        assert_eq!(json["links"][0]["pid"], 77);
    }
}
