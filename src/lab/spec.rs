//! The lab's shape, decided before anything is created: nodes, locations and their LANs, which
//! LANs sit behind a NAT router, every address, and the nodes file all agents read.
//!
//! ```text
//! --nodes/--locations  ─┐
//! --from FILE (parsed) ─┴─ plan() ─→ LabSpec ─ render_nodes_file(keys) ─→ NodeList YAML
//! ```
//!
//! Address plan (all inside the lab's namespaces, never routed anywhere else):
//!
//! | what | range |
//! | --- | --- |
//! | underlay (public nodes, NAT routers' uplinks) | `10.200.0.0/24`, from `.1` |
//! | LAN of location `k` (internal IPs) | `10.210.k.0/24`: router `.1`, nodes from `.11` |
//! | pod CIDR of generated node `i` | `10.201.i.0/24` (`--from` keeps the file's) |
//! | WireGuard mesh | the agent's default `10.4.0.0/16` |
//! | the API server (`--registry kube`) | `10.200.0.253:6443` on the underlay |
//!
//! With IPv6 ([`Family::Ipv6`], [`Family::DualStack`]) the same plan repeats in unique local
//! addresses, host numbers unchanged (`.11` is `::b`): underlay `fd00:200::/64`, LAN `k`
//! `fd00:210:0:k::/64`, pod CIDR of node `i` `fd00:201:0:i::/64` (`--from` keeps the file's
//! IPv6 CIDRs, if any). An IPv6-only lab meshes over IPv6 (endpoints, internal IPs) with mesh
//! subnet [`MESH_SUBNET6`]; a dual-stack lab meshes over IPv4 (endpoints, internal IPs, mesh
//! subnet as in an IPv4 lab) and gives every link and every pod both families. Neither has
//! NAT routers: IPv6 needs none, and a dual-stack location behind an IPv4-only NAT would
//! reach the others over IPv6 anyway.
//!
//! With the Kubernetes registry, [`kube_node`] renders each node as a kubelet would register it
//! (name, labels, pod CIDRs, addresses, the user's annotations) and nothing of what the agent
//! publishes itself. [`add_node`] and [`remove_node`] change a planned lab (`lab node add|remove`).
//!
//! Pure: depends on the model, the annotation key names, `ipnetwork` and `serde`; no I/O.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use super::LabError;
use super::names::LabName;
use crate::model::{Endpoint, Granularity, MeshNode, WgKey};
use crate::registry::annotations::{DEFAULT_TOPOLOGY_LABEL, KILO_PREFIX, keys};
use crate::topology::{DEFAULT_PORT, DEFAULT_SUBNET};

/// The example the default lab mirrors: three nodes in three clouds, full mesh.
pub const THREE_CLOUDS: &str = include_str!("../../examples/three-clouds.yaml");
/// Where [`THREE_CLOUDS`] comes from, for messages and the state file.
pub const THREE_CLOUDS_NAME: &str = "examples/three-clouds.yaml";
/// The underlay network shared by public nodes and NAT routers.
pub const UNDERLAY: Ipv4Network =
    Ipv4Network::new_checked(Ipv4Addr::new(10, 200, 0, 0), 24).expect("a /24 is a valid prefix");
/// The IPv6 underlay, `fd00:200::/64`.
pub const UNDERLAY6: Ipv6Network =
    Ipv6Network::new_checked(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0), 64)
        .expect("a /64 is a valid prefix");
/// First two groups of the IPv6 location LANs, `fd00:210:0:k::/64`.
pub const LAN6_BASE: [u16; 2] = [0xfd00, 0x210];
/// First two groups of the generated IPv6 pod CIDRs, `fd00:201:0:i::/64`.
pub const POD6_BASE: [u16; 2] = [0xfd00, 0x201];
/// The mesh subnet of an IPv6-only lab.
pub const MESH_SUBNET6: &str = "fd00:4::/64";
/// First two octets of the location LANs, `10.210.k.0/24`.
pub const LAN_BASE: [u8; 2] = [10, 210];
/// First two octets of the generated pod CIDRs, `10.201.i.0/24`.
pub const POD_BASE: [u8; 2] = [10, 201];
/// Host part of the first node address on a LAN (`.1` is the router).
pub const LAN_FIRST_NODE: u8 = 11;
/// Persistent keepalive given to a node behind NAT whose source sets none.
pub const NAT_KEEPALIVE: u16 = 25;
/// Most nodes a lab may have.
pub const MAX_NODES: usize = 100;
/// Nodes per location at most (LAN host numbers 11..=254).
pub const MAX_NODES_PER_LAN: usize = 244;
/// Host number of the API server on the underlay (`--registry kube`); nodes and routers get
/// lower ones, the edge has 254.
pub const API_HOST: u8 = 253;
/// The API server's port.
pub const API_PORT: u16 = 6443;
/// Most clusters a lab may have (`--clusters`): API servers at `.253` down to `.250`, mesh
/// subnets `10.4.0.0/16` to `10.7.0.0/16`.
pub const MAX_CLUSTERS: usize = 4;
/// Second octet of cluster 1's mesh subnet (the agent's default `10.4.0.0/16`); cluster `k`
/// has `10.<3+k>.0.0/16`.
pub const MESH_OCTET: u8 = 4;

/// The address families of the lab's networks (underlay, LANs, pods).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// IPv4 only: the lab as it always was.
    #[default]
    Ipv4,
    /// IPv6 only (`--ipv6`): endpoints, internal IPs, pod CIDRs and the mesh subnet are IPv6.
    Ipv6,
    /// Both (`--dual-stack`): every link and pod has both families; the mesh runs over IPv4.
    DualStack,
}

impl Family {
    /// Whether the lab's networks carry IPv4.
    pub fn has_ipv4(self) -> bool {
        self != Family::Ipv6
    }

    /// Whether the lab's networks carry IPv6.
    pub fn has_ipv6(self) -> bool {
        self != Family::Ipv4
    }

    /// The `lab up` flag that asks for it (none for IPv4).
    pub fn flag(self) -> &'static str {
        match self {
            Family::Ipv4 => "",
            Family::Ipv6 => "--ipv6",
            Family::DualStack => "--dual-stack",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
            Family::DualStack => "dual-stack",
        })
    }
}

/// Where the lab's agents read the cluster from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Registry {
    /// A nodes file written by the lab (`wiremesh agent --nodes FILE`).
    #[default]
    File,
    /// A real etcd + kube-apiserver in the lab's own namespace; the agents watch Nodes and
    /// publish their own annotations (`wiremesh agent --kubeconfig FILE`).
    Kube,
}

impl std::fmt::Display for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Registry::File => "file",
            Registry::Kube => "kube",
        })
    }
}

/// Where the lab's nodes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// `nodes` nodes spread over `locations` locations, named `node1…`, `loc1…`.
    Generated {
        /// Number of nodes.
        nodes: usize,
        /// Number of locations.
        locations: usize,
    },
    /// Names, locations, leader flags, keepalives and pod CIDRs from a nodes file.
    File {
        /// The file's name, for messages.
        name: String,
        /// The nodes it holds, in file order.
        nodes: Vec<MeshNode>,
    },
}

/// What `lab up` was asked for, after the command line was parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecOptions {
    /// Where the nodes come from.
    pub source: Source,
    /// Mesh granularity; `None`: the file's published one, else `location` when some location
    /// has two nodes or more, else `full`.
    pub granularity: Option<Granularity>,
    /// Locations behind NAT; `None`: one when there are two locations or more.
    pub nat: Option<usize>,
    /// Pod namespaces per node.
    pub pods_per_node: usize,
    /// Where the agents read the cluster from.
    pub registry: Registry,
    /// MTU of every link of the lab's network (underlay, LANs, NAT uplinks); `None`: the
    /// kernel's 1500.
    pub underlay_mtu: Option<u32>,
    /// The address families of the lab's networks.
    pub family: Family,
    /// Number of clusters (`--clusters`, 1 = the lab as it always was): the nodes are split
    /// into them in order, each with its own API server and mesh subnet.
    pub clusters: usize,
}

impl SpecOptions {
    /// `nodes` generated nodes in `locations` generated locations, the rest as `lab up`
    /// defaults it: granularity and NAT chosen by the shape, one pod per node, the nodes file,
    /// IPv4, one cluster.
    pub fn generated(nodes: usize, locations: usize) -> SpecOptions {
        SpecOptions {
            source: Source::Generated { nodes, locations },
            granularity: None,
            nat: None,
            pods_per_node: 1,
            registry: Registry::File,
            underlay_mtu: None,
            family: Family::Ipv4,
            clusters: 1,
        }
    }
}

/// One cluster of the lab: its own API server (namespace, address, files) and mesh subnet.
/// A lab without `--clusters` has one, `cluster1`, which is the lab as it always was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// 1-based index.
    pub index: usize,
    /// Its name, `cluster<index>` (what the link command calls it).
    pub name: String,
    /// The mesh subnet its agents allocate from (`--subnet`).
    pub mesh_subnet: IpNetwork,
    /// Host number of its API server on the underlay (`.253` for cluster 1, then down).
    pub api_host: u8,
}

impl ClusterSpec {
    /// Cluster `index` (1-based) of a lab meshing in `mesh_subnet` when it has one cluster:
    /// `cluster<index>`, mesh subnet `10.<3+index>.0.0/16` (cluster 1 keeps `mesh_subnet`), API
    /// server at `10.200.0.<254-index>`.
    pub fn new(index: usize, mesh_subnet: IpNetwork) -> Result<ClusterSpec, LabError> {
        if index == 0 || index > MAX_CLUSTERS {
            return Err(LabError::Options(format!(
                "--clusters: a lab has 1 to {MAX_CLUSTERS} clusters"
            )));
        }
        let offset = u8::try_from(index - 1).unwrap_or(u8::MAX);
        let mesh_subnet = if index == 1 {
            mesh_subnet
        } else {
            Ipv4Network::new(Ipv4Addr::new(10, MESH_OCTET + offset, 0, 0), 16)
                .map(IpNetwork::V4)
                .map_err(|_| LabError::Options("bad mesh subnet".to_owned()))?
        };
        Ok(ClusterSpec {
            index,
            name: format!("cluster{index}"),
            mesh_subnet,
            api_host: API_HOST - offset,
        })
    }

    /// Its API server's underlay address (`--registry kube`, IPv4 only).
    pub fn api_ip(&self) -> Ipv4Addr {
        host4(UNDERLAY, self.api_host)
    }
}

fn first_cluster() -> usize {
    1
}

/// A NAT router: the LAN's gateway, masquerading onto the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRouter {
    /// Its address on the LAN (the LAN nodes' default gateway).
    pub lan_ip: Ipv4Addr,
    /// Its address on the underlay (what the other nodes see NATed traffic come from).
    pub underlay_ip: Ipv4Addr,
}

/// One location's LAN: an L2 segment on which the location's nodes reach each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanSpec {
    /// 1-based index (the third octet of the subnet, the number in the namespace name).
    pub index: usize,
    /// The location it serves (may be empty: nodes without a location).
    pub location: String,
    /// The LAN's subnet (IPv6 in an IPv6-only lab).
    pub subnet: IpNetwork,
    /// Its IPv6 subnet in a dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Network>,
    /// The NAT router, when the location is behind NAT.
    pub nat: Option<NatRouter>,
}

/// One node of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// 1-based index (the number in the namespace name).
    pub index: usize,
    /// The Node name.
    pub name: String,
    /// Its location.
    pub location: String,
    /// 0-based index of its LAN in [`LabSpec::lans`].
    pub lan: usize,
    /// Whether it volunteers to lead its location.
    pub leader: bool,
    /// Its pod CIDRs.
    pub pod_cidrs: Vec<IpNetwork>,
    /// Its address on its location's LAN: the internal IP (IPv6 in an IPv6-only lab).
    pub lan_ip: IpAddr,
    /// Its underlay address, of the family of `lan_ip`; `None` behind NAT.
    pub underlay_ip: Option<IpAddr>,
    /// Its IPv6 address on its LAN in a dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan_ip6: Option<Ipv6Addr>,
    /// Its IPv6 underlay address in a dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip6: Option<Ipv6Addr>,
    /// Persistent keepalive in seconds (0 = off).
    pub persistent_keepalive: u16,
    /// Its cluster (1-based index into [`LabSpec::clusters`]).
    #[serde(default = "first_cluster")]
    pub cluster: usize,
}

impl NodeSpec {
    /// Whether the node sits behind its LAN's NAT router.
    pub fn behind_nat(&self) -> bool {
        self.underlay_ip.is_none()
    }

    /// The endpoint written into the nodes file: the underlay address, or behind NAT the
    /// private LAN address (the others learn the router's address when the node's packets
    /// arrive: WireGuard roaming).
    pub fn endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.underlay_ip.unwrap_or(self.lan_ip), port)
    }
}

/// The whole lab, decided up front; stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Where the nodes came from (`generated` or the file name).
    pub source: String,
    /// Where the agents read the cluster from.
    #[serde(default)]
    pub registry: Registry,
    /// Mesh granularity the agents run with.
    pub granularity: Granularity,
    /// Pod namespaces per node.
    pub pods_per_node: usize,
    /// The address families of the lab's networks.
    #[serde(default)]
    pub family: Family,
    /// The underlay subnet (IPv6 in an IPv6-only lab).
    pub underlay: IpNetwork,
    /// The IPv6 underlay subnet of a dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay6: Option<Ipv6Network>,
    /// MTU of every link of the lab's network; `None`: the kernel's 1500.
    #[serde(default)]
    pub underlay_mtu: Option<u32>,
    /// The mesh subnet the agents allocate from.
    pub mesh_subnet: IpNetwork,
    /// The WireGuard listen port of every node.
    pub port: u16,
    /// One LAN per location, in order of first appearance.
    pub lans: Vec<LanSpec>,
    /// The nodes, in source order.
    pub nodes: Vec<NodeSpec>,
    /// The clusters, in order (one unless `--clusters`); empty in a state file written before
    /// clusters existed, which [`LabSpec::normalize`] fills in.
    #[serde(default)]
    pub clusters: Vec<ClusterSpec>,
}

impl LabSpec {
    /// Every pod CIDR of every node.
    pub fn pod_cidrs(&self) -> Vec<IpNetwork> {
        self.nodes
            .iter()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .collect()
    }

    /// The LAN of `node`.
    pub fn lan_of(&self, node: &NodeSpec) -> &LanSpec {
        &self.lans[node.lan]
    }

    /// The API server's underlay address (`--registry kube`, which needs an IPv4 underlay),
    /// `10.200.0.253`: cluster 1's.
    pub fn api_ip(&self) -> Ipv4Addr {
        host4(UNDERLAY, API_HOST)
    }

    /// Give a spec read from an older state file its one cluster.
    pub fn normalize(&mut self) -> Result<(), LabError> {
        if self.clusters.is_empty() {
            self.clusters = vec![ClusterSpec::new(1, self.mesh_subnet)?];
        }
        Ok(())
    }

    /// Whether the lab has two clusters or more (`--clusters`).
    pub fn multi_cluster(&self) -> bool {
        self.clusters.len() > 1
    }

    /// Cluster `index` (1-based).
    pub fn cluster(&self, index: usize) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| c.index == index)
    }

    /// The cluster of node `name` (1 for a node the spec does not know).
    pub fn cluster_of(&self, name: &str) -> usize {
        self.node(name).map_or(1, |n| n.cluster)
    }

    /// The mesh subnet of cluster `index` (the lab's for an unknown one).
    pub fn mesh_subnet_of(&self, index: usize) -> IpNetwork {
        self.cluster(index)
            .map_or(self.mesh_subnet, |c| c.mesh_subnet)
    }

    /// Every cluster's mesh subnet.
    pub fn mesh_subnets(&self) -> Vec<IpNetwork> {
        if self.clusters.is_empty() {
            return vec![self.mesh_subnet];
        }
        self.clusters.iter().map(|c| c.mesh_subnet).collect()
    }

    /// The lowest underlay host number an API server takes; nodes and routers stay below it.
    pub fn lowest_api_host(&self) -> u8 {
        self.clusters
            .iter()
            .map(|c| c.api_host)
            .min()
            .unwrap_or(API_HOST)
    }

    /// The underlay subnets: one per family.
    pub fn underlays(&self) -> Vec<IpNetwork> {
        std::iter::once(self.underlay)
            .chain(self.underlay6.map(IpNetwork::V6))
            .collect()
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// A node before addresses are given out.
struct Proto {
    name: String,
    location: String,
    leader: bool,
    pod_cidrs: Vec<IpNetwork>,
    keepalive: u16,
    /// The source gives it no public endpoint (a hint that it lives behind NAT).
    private: bool,
    granularity: Option<Granularity>,
}

fn protos(source: &Source) -> Result<Vec<Proto>, LabError> {
    match source {
        Source::Generated { nodes, locations } => {
            if *locations == 0 || *locations > *nodes {
                return Err(LabError::Options(format!(
                    "--locations must be between 1 and the number of nodes ({nodes})"
                )));
            }
            Ok((0..*nodes)
                .map(|i| Proto {
                    name: format!("node{}", i + 1),
                    location: format!("loc{}", i * locations / nodes + 1),
                    leader: false,
                    pod_cidrs: Vec::new(),
                    keepalive: 0,
                    private: false,
                    granularity: None,
                })
                .collect())
        }
        Source::File { name, nodes } => {
            let mut seen = std::collections::BTreeSet::new();
            let mut out = Vec::with_capacity(nodes.len());
            for n in nodes {
                if !seen.insert(n.name.as_str()) {
                    return Err(LabError::Options(format!(
                        "{name}: node {} appears twice",
                        n.name
                    )));
                }
                out.push(Proto {
                    name: n.name.to_string(),
                    location: n.location.clone(),
                    leader: n.leader,
                    pod_cidrs: n.pod_cidrs.clone(),
                    keepalive: n.persistent_keepalive,
                    private: !n.endpoint.as_ref().is_some_and(Endpoint::is_public),
                    granularity: n.granularity,
                })
            }
            Ok(out)
        }
    }
}

/// Decide the lab: group nodes into locations, choose the NATed ones, give out every address.
pub fn plan(opts: &SpecOptions) -> Result<LabSpec, LabError> {
    let protos = protos(&opts.source)?;
    if protos.is_empty() || protos.len() > MAX_NODES {
        return Err(LabError::Options(format!(
            "a lab has 1 to {MAX_NODES} nodes, not {}",
            protos.len()
        )));
    }
    if opts.pods_per_node > 9 {
        return Err(LabError::Options("--pods is at most 9 per node".to_owned()));
    }

    // Locations in order of first appearance, with their members.
    let mut locations: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, p) in protos.iter().enumerate() {
        match locations.iter_mut().find(|(l, _)| *l == p.location) {
            Some((_, members)) => members.push(i),
            None => locations.push((p.location.clone(), vec![i])),
        }
    }
    if let Some((l, m)) = locations.iter().find(|(_, m)| m.len() > MAX_NODES_PER_LAN) {
        return Err(LabError::Options(format!(
            "location {l:?} has {} nodes; a lab location holds at most {MAX_NODES_PER_LAN}",
            m.len()
        )));
    }

    let granularity = opts.granularity.unwrap_or_else(|| {
        protos.iter().find_map(|p| p.granularity).unwrap_or(
            if locations.iter().any(|(_, m)| m.len() > 1) {
                Granularity::Location
            } else {
                Granularity::Full
            },
        )
    });

    let family = opts.family;
    if family != Family::Ipv4 {
        if opts.nat.is_some_and(|n| n > 0) {
            return Err(LabError::Options(format!(
                "--nat: a lab with {} has no NAT routers (IPv6 needs none); leave out --nat \
                 or pass --nat 0",
                family.flag()
            )));
        }
        if opts.registry == Registry::Kube {
            return Err(LabError::Options(format!(
                "--registry kube runs on an IPv4 lab only: leave out {}",
                family.flag()
            )));
        }
    }
    let largest = locations.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    check_dual_stack_segments(family, granularity, largest)?;
    check_clusters(opts, protos.len())?;
    let nat_count = match family {
        Family::Ipv4 if opts.clusters > 1 => 0,
        Family::Ipv4 => opts.nat.unwrap_or(if locations.len() >= 2 { 1 } else { 0 }),
        Family::Ipv6 | Family::DualStack => 0,
    };
    if nat_count > 0 && nat_count >= locations.len() {
        return Err(LabError::Options(format!(
            "--nat {nat_count}: at most {} of the {} locations may be behind NAT (one must be \
             reachable on the underlay)",
            locations.len().saturating_sub(1),
            locations.len()
        )));
    }
    // Locations where some node lacks a public endpoint first (a home LAN), then from the last
    // location back.
    let mut natted = vec![false; locations.len()];
    let hinted = locations
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| m.iter().any(|&i| protos[i].private))
        .map(|(k, _)| k);
    let from_end = (0..locations.len()).rev();
    for k in hinted.chain(from_end) {
        if natted.iter().filter(|&&n| n).count() == nat_count {
            break;
        }
        natted[k] = true;
    }

    let v6 = family == Family::Ipv6;
    let dual = family == Family::DualStack;
    let underlay = if v6 {
        IpNetwork::V6(UNDERLAY6)
    } else {
        IpNetwork::V4(UNDERLAY)
    };
    let underlay6 = dual.then_some(UNDERLAY6);
    let mut next_underlay = 1u8;
    // Cluster k's API server takes host 254 - k.
    let lowest_api = u8::try_from(usize::from(API_HOST) + 1 - opts.clusters.max(1))
        .map_err(|_| LabError::Options("too many clusters".to_owned()))?;
    let mut take_underlay = || -> Result<u8, LabError> {
        let h = next_underlay;
        if h >= lowest_api {
            return Err(LabError::Options("the underlay is full".to_owned()));
        }
        next_underlay += 1;
        Ok(h)
    };
    let mut lans = Vec::with_capacity(locations.len());
    let mut nodes: Vec<Option<NodeSpec>> = vec![None; protos.len()];
    for (k, (location, members)) in locations.iter().enumerate() {
        let index = k + 1;
        let subnet = lan_subnet(index, v6)?;
        let subnet6 = if dual {
            Some(lan_subnet6(index)?)
        } else {
            None
        };
        let nat = match (natted[k], subnet) {
            (true, IpNetwork::V4(lan)) => Some(NatRouter {
                lan_ip: host4(lan, 1),
                underlay_ip: host4(UNDERLAY, take_underlay()?),
            }),
            _ => None,
        };
        for (j, &i) in members.iter().enumerate() {
            let p = &protos[i];
            let h = u8::try_from(usize::from(LAN_FIRST_NODE) + j)
                .map_err(|_| LabError::Options("LAN full".to_owned()))?;
            let (underlay_ip, underlay_ip6) = if nat.is_some() {
                (None, None)
            } else {
                let u = take_underlay()?;
                (Some(host(underlay, u)), underlay6.map(|n| host6(n, u)))
            };
            nodes[i] = Some(NodeSpec {
                index: i + 1,
                name: p.name.clone(),
                location: location.clone(),
                lan: k,
                leader: p.leader,
                pod_cidrs: pod_cidrs_of(family, &p.pod_cidrs, i + 1)?,
                lan_ip: host(subnet, h),
                underlay_ip,
                lan_ip6: subnet6.map(|n| host6(n, h)),
                underlay_ip6,
                persistent_keepalive: if nat.is_some() && p.keepalive == 0 {
                    NAT_KEEPALIVE
                } else {
                    p.keepalive
                },
                cluster: cluster_of_index(i, protos.len(), opts.clusters),
            });
        }
        lans.push(LanSpec {
            index,
            location: location.clone(),
            subnet,
            subnet6,
            nat,
        });
    }
    let nodes: Vec<NodeSpec> = nodes.into_iter().flatten().collect();
    let mesh_subnet: IpNetwork = if v6 { MESH_SUBNET6 } else { DEFAULT_SUBNET }
        .parse()
        .map_err(|_| LabError::Options("bad default mesh subnet".to_owned()))?;
    let clusters = (1..=opts.clusters.max(1))
        .map(|k| ClusterSpec::new(k, mesh_subnet))
        .collect::<Result<Vec<_>, _>>()?;
    let mesh_subnets: Vec<IpNetwork> = clusters.iter().map(|c| c.mesh_subnet).collect();
    check_overlaps(&nodes, &mesh_subnets)?;
    Ok(LabSpec {
        source: match &opts.source {
            Source::Generated { .. } => "generated".to_owned(),
            Source::File { name, .. } => name.clone(),
        },
        registry: opts.registry,
        granularity,
        pods_per_node: opts.pods_per_node,
        underlay_mtu: opts.underlay_mtu,
        family,
        underlay,
        underlay6,
        mesh_subnet,
        port: DEFAULT_PORT,
        lans,
        nodes,
        clusters,
    })
}

/// The cluster (1-based) of node `i` (0-based) of `nodes` split in order into `clusters`
/// blocks, as generated locations are: the first block is cluster 1.
pub fn cluster_of_index(i: usize, nodes: usize, clusters: usize) -> usize {
    i * clusters.max(1) / nodes.max(1) + 1
}

/// `--clusters`: 1 to [`MAX_CLUSTERS`]; two or more only with the Kubernetes registry (each
/// cluster is an API server), without NAT (a cluster's Peers carry a fixed endpoint, which a
/// leader behind NAT does not have), and with a node per cluster at least.
fn check_clusters(opts: &SpecOptions, nodes: usize) -> Result<(), LabError> {
    let n = opts.clusters;
    if n == 0 || n > MAX_CLUSTERS {
        return Err(LabError::Options(format!(
            "--clusters {n}: a lab has 1 to {MAX_CLUSTERS} clusters"
        )));
    }
    if n == 1 {
        return Ok(());
    }
    if opts.registry != Registry::Kube {
        return Err(LabError::Options(format!(
            "--clusters {n} needs --registry kube (each cluster is its own API server)"
        )));
    }
    if opts.nat.is_some_and(|k| k > 0) {
        return Err(LabError::Options(format!(
            "--clusters {n} has no NAT routers (the Peers that link the clusters carry each              leader's published endpoint, which a leader behind NAT does not have): leave out              --nat or pass --nat 0"
        )));
    }
    if nodes < n {
        return Err(LabError::Options(format!(
            "--clusters {n}: {nodes} nodes are too few, each cluster needs one at least"
        )));
    }
    Ok(())
}
/// A dual-stack lab in location granularity cannot have a location of two nodes or more
/// (`largest`: the most nodes of one location): its members reach their leader by its IPv4
/// internal IP only (a node has one internal IP), and an IPv6 route cannot take an IPv4
/// gateway, so their IPv6 pods would be cut off.
fn check_dual_stack_segments(
    family: Family,
    granularity: Granularity,
    largest: usize,
) -> Result<(), LabError> {
    if family == Family::DualStack && granularity == Granularity::Location && largest > 1 {
        return Err(LabError::Options(
            "--dual-stack in location granularity with a location of two nodes or more: its \
             members reach their leader by its IPv4 internal IP only (one internal IP per \
             node), so their IPv6 pods would be cut off; pass --granularity full, or give \
             each node a location of its own"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Host `h` of an IPv4 network: its network address plus `h`.
pub fn host4(net: Ipv4Network, h: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(u32::from(h)))
}

/// Host `h` of an IPv6 network: its network address plus `h`.
pub fn host6(net: Ipv6Network, h: u8) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()).saturating_add(u128::from(h)))
}

/// Host `h` of `net`: its network address plus `h`.
pub fn host(net: IpNetwork, h: u8) -> IpAddr {
    match net {
        IpNetwork::V4(n) => IpAddr::V4(host4(n, h)),
        IpNetwork::V6(n) => IpAddr::V6(host6(n, h)),
    }
}

/// `index` (1-based: a LAN or node number) as the byte it takes in an address.
fn address_index(index: usize, what: &str) -> Result<u8, LabError> {
    u8::try_from(index)
        .ok()
        .filter(|&t| t < 255)
        .ok_or_else(|| LabError::Options(format!("more than 254 {what}")))
}

/// The IPv6 LAN of location `index` (1-based), `fd00:210:0:index::/64`.
fn lan_subnet6(index: usize) -> Result<Ipv6Network, LabError> {
    let k = u16::from(address_index(index, "locations")?);
    Ipv6Network::new_checked(
        Ipv6Addr::new(LAN6_BASE[0], LAN6_BASE[1], 0, k, 0, 0, 0, 0),
        64,
    )
    .ok_or_else(|| LabError::Options("bad LAN subnet".to_owned()))
}

/// The LAN of location `index` (1-based): `10.210.index.0/24`, or with `v6` [`lan_subnet6`].
fn lan_subnet(index: usize, v6: bool) -> Result<IpNetwork, LabError> {
    if v6 {
        return lan_subnet6(index).map(IpNetwork::V6);
    }
    let k = address_index(index, "locations")?;
    Ipv4Network::new_checked(Ipv4Addr::new(LAN_BASE[0], LAN_BASE[1], k, 0), 24)
        .map(IpNetwork::V4)
        .ok_or_else(|| LabError::Options("bad LAN subnet".to_owned()))
}

/// The generated pod CIDR of node `index` (1-based) in one family: `10.201.index.0/24` or
/// `fd00:201:0:index::/64`.
fn pod_cidr(index: usize, v6: bool) -> Result<IpNetwork, LabError> {
    let i = address_index(index, "nodes")?;
    let net = if v6 {
        let base = Ipv6Addr::new(POD6_BASE[0], POD6_BASE[1], 0, u16::from(i), 0, 0, 0, 0);
        Ipv6Network::new_checked(base, 64).map(IpNetwork::V6)
    } else {
        let base = Ipv4Addr::new(POD_BASE[0], POD_BASE[1], i, 0);
        Ipv4Network::new_checked(base, 24).map(IpNetwork::V4)
    };
    net.ok_or_else(|| LabError::Options("bad pod CIDR".to_owned()))
}

/// The pod CIDRs of node `index` in a `family` lab: the source's (those of the lab's families
/// in an IPv6-only lab), and a generated one for each family of the lab the source has none
/// of. An IPv4 lab keeps the source's CIDRs as they are (an IPv6 one gives dual-stack pods
/// meshed over IPv4).
fn pod_cidrs_of(
    family: Family,
    source: &[IpNetwork],
    index: usize,
) -> Result<Vec<IpNetwork>, LabError> {
    let mut out: Vec<IpNetwork> = source
        .iter()
        .filter(|c| family != Family::Ipv6 || c.is_ipv6())
        .copied()
        .collect();
    if family.has_ipv4()
        && (out.is_empty() || family == Family::DualStack)
        && !out.iter().any(IpNetwork::is_ipv4)
    {
        out.push(pod_cidr(index, false)?);
    }
    if family.has_ipv6() && !out.iter().any(IpNetwork::is_ipv6) {
        out.push(pod_cidr(index, true)?);
    }
    Ok(out)
}

/// Pod CIDRs must not overlap each other or the lab's own ranges (`meshes`: every cluster's mesh
/// subnet), or routing would be ambiguous.
fn check_overlaps(nodes: &[NodeSpec], meshes: &[IpNetwork]) -> Result<(), LabError> {
    let lans = |v6: bool| -> Result<IpNetwork, LabError> {
        let prefix = if v6 { 32 } else { 16 };
        IpNetwork::new(lan_subnet(1, v6)?.network(), prefix)
            .and_then(|n| IpNetwork::new(n.network(), prefix))
            .map_err(|_| LabError::Options("bad LAN range".to_owned()))
    };
    let mut lab_ranges = vec![
        ("the underlay", IpNetwork::V4(UNDERLAY)),
        ("the IPv6 underlay", IpNetwork::V6(UNDERLAY6)),
        ("the LANs", lans(false)?),
        ("the IPv6 LANs", lans(true)?),
    ];
    lab_ranges.extend(meshes.iter().map(|m| ("the mesh subnet", *m)));
    let all: Vec<(&str, IpNetwork)> = nodes
        .iter()
        .flat_map(|n| n.pod_cidrs.iter().map(move |c| (n.name.as_str(), *c)))
        .collect();
    for (i, (node, cidr)) in all.iter().enumerate() {
        for (what, range) in &lab_ranges {
            if overlaps(cidr, range) {
                return Err(LabError::Options(format!(
                    "pod CIDR {cidr} of node {node} overlaps {what} ({range})"
                )));
            }
        }
        for (other, c2) in &all[i + 1..] {
            if overlaps(cidr, c2) {
                return Err(LabError::Options(format!(
                    "pod CIDR {cidr} of node {node} overlaps {c2} of node {other}"
                )));
            }
        }
    }
    Ok(())
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Check that `name` can name a Node and a directory: 1 to 63 lowercase letters, digits, `-`
/// and `.`, starting and ending with a letter or digit, no `..`.
pub fn check_node_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(LabError::Options(format!(
            "node name {name:?}: use 1 to 63 lowercase letters, digits, '-' and '.', starting and \
             ending with a letter or digit"
        )))
    }
}

/// Add node `name` to a planned lab, in `location` (its LAN, or a new LAN without NAT for a new
/// location) and `cluster` (default: the cluster of the location's first node, else 1): the
/// next index, a free underlay address, the next free LAN host, pod CIDR
/// `10.201.<index>.0/24`. Returns the new node.
pub fn add_node(
    spec: &mut LabSpec,
    name: &str,
    location: &str,
    cluster: Option<usize>,
) -> Result<NodeSpec, LabError> {
    check_node_name(name)?;
    let cluster = match cluster {
        Some(k) if spec.cluster(k).is_none() => {
            return Err(LabError::Options(format!(
                "--cluster {k}: lab clusters are 1 to {}",
                spec.clusters.len().max(1)
            )));
        }
        Some(k) => k,
        None => spec
            .nodes
            .iter()
            .find(|n| n.location == location)
            .map_or(1, |n| n.cluster),
    };
    if spec.node(name).is_some() {
        return Err(LabError::Options(format!(
            "the lab already has a node {name}"
        )));
    }
    if spec.nodes.len() >= MAX_NODES {
        return Err(LabError::Options(format!(
            "a lab has at most {MAX_NODES} nodes"
        )));
    }
    let index = spec.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
    let members = spec.nodes.iter().filter(|n| n.location == location).count();
    check_dual_stack_segments(spec.family, spec.granularity, members + 1)?;
    let v6 = spec.family == Family::Ipv6;
    let lan = match spec.lans.iter().position(|l| l.location == location) {
        Some(k) => k,
        None => {
            let k = spec.lans.len() + 1;
            let subnet6 = if spec.family == Family::DualStack {
                Some(lan_subnet6(k)?)
            } else {
                None
            };
            spec.lans.push(LanSpec {
                index: k,
                location: location.to_owned(),
                subnet: lan_subnet(k, v6)?,
                subnet6,
                nat: None,
            });
            k - 1
        }
    };
    let lan_spec = &spec.lans[lan];
    let used_lan: Vec<IpAddr> = spec
        .nodes
        .iter()
        .filter(|n| n.lan == lan)
        .map(|n| n.lan_ip)
        .collect();
    let lan_host = (LAN_FIRST_NODE..=254)
        .find(|&h| !used_lan.contains(&host(lan_spec.subnet, h)))
        .ok_or_else(|| LabError::Options(format!("the LAN of location {location:?} is full")))?;
    let underlay_host = if lan_spec.nat.is_some() {
        None
    } else {
        let used: Vec<IpAddr> = spec
            .nodes
            .iter()
            .filter_map(|n| n.underlay_ip)
            .chain(
                spec.lans
                    .iter()
                    .filter_map(|l| l.nat.map(|r| IpAddr::V4(r.underlay_ip))),
            )
            .collect();
        Some(
            (1..spec.lowest_api_host())
                .find(|&h| !used.contains(&host(spec.underlay, h)))
                .ok_or_else(|| LabError::Options("the underlay is full".to_owned()))?,
        )
    };
    let node = NodeSpec {
        index,
        name: name.to_owned(),
        location: location.to_owned(),
        lan,
        leader: false,
        pod_cidrs: pod_cidrs_of(spec.family, &[], index)?,
        lan_ip: host(lan_spec.subnet, lan_host),
        underlay_ip: underlay_host.map(|h| host(spec.underlay, h)),
        lan_ip6: lan_spec.subnet6.map(|n| host6(n, lan_host)),
        underlay_ip6: underlay_host.and_then(|h| spec.underlay6.map(|n| host6(n, h))),
        persistent_keepalive: if underlay_host.is_none() {
            NAT_KEEPALIVE
        } else {
            0
        },
        cluster,
    };
    let mut all = spec.nodes.clone();
    all.push(node.clone());
    check_overlaps(&all, &spec.mesh_subnets())?;
    spec.nodes = all;
    Ok(node)
}

/// Remove node `name` from a planned lab (its LAN stays). Returns it.
pub fn remove_node(spec: &mut LabSpec, name: &str) -> Result<NodeSpec, LabError> {
    let at = spec
        .nodes
        .iter()
        .position(|n| n.name == name)
        .ok_or_else(|| LabError::Options(format!("the lab has no node {name}")))?;
    Ok(spec.nodes.remove(at))
}

/// The Node object of `node` as a kubelet (and the operator) would register it with the
/// Kubernetes registry: name, labels (`kubernetes.io/hostname`, the location as region label),
/// the user's annotations (location, persistent keepalive, leader), `spec.podCIDR(s)` and
/// `status.addresses`: InternalIP = LAN address, ExternalIP = underlay address (public nodes
/// only), Hostname. Nothing the agent publishes itself (key, endpoint, internal IP, mesh IP,
/// granularity, last-seen). The API server drops `status` on create: write it with a status
/// patch.
pub fn kube_node(node: &NodeSpec) -> serde_json::Value {
    let ann = |k: &str| format!("{KILO_PREFIX}{k}");
    let mut annotations = BTreeMap::new();
    if !node.location.is_empty() {
        annotations.insert(ann(keys::LOCATION), node.location.clone());
    }
    if node.persistent_keepalive > 0 {
        annotations.insert(
            ann(keys::PERSISTENT_KEEPALIVE),
            node.persistent_keepalive.to_string(),
        );
    }
    if node.leader {
        annotations.insert(ann(keys::LEADER), "true".to_owned());
    }
    let mut labels = BTreeMap::from([("kubernetes.io/hostname".to_owned(), node.name.clone())]);
    if !node.location.is_empty() {
        labels.insert(DEFAULT_TOPOLOGY_LABEL.to_owned(), node.location.clone());
    }
    let mut addresses =
        vec![serde_json::json!({"type": "InternalIP", "address": node.lan_ip.to_string()})];
    if let Some(ip) = node.underlay_ip {
        addresses.push(serde_json::json!({"type": "ExternalIP", "address": ip.to_string()}));
    }
    addresses.push(serde_json::json!({"type": "Hostname", "address": node.name}));
    let cidrs: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels, "annotations": annotations},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {"addresses": addresses},
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeListDoc<'a> {
    api_version: &'a str,
    kind: &'a str,
    items: Vec<NodeDoc>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeDoc {
    api_version: &'static str,
    kind: &'static str,
    metadata: MetaDoc,
    spec: SpecDoc,
    status: StatusDoc,
}

#[derive(Serialize)]
struct MetaDoc {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct SpecDoc {
    #[serde(rename = "podCIDR")]
    pod_cidr: String,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
}

#[derive(Serialize)]
struct StatusDoc {
    addresses: Vec<AddressDoc>,
}

#[derive(Serialize)]
struct AddressDoc {
    #[serde(rename = "type")]
    kind: &'static str,
    address: String,
}

/// The nodes file (a `NodeList`, as `kubectl get nodes -o yaml` prints it) that every agent of
/// the lab reads; `keys[i]` is the public key of `spec.nodes[i]`.
pub fn render_nodes_file(
    spec: &LabSpec,
    lab: &LabName,
    keys: &[WgKey],
) -> Result<String, LabError> {
    if keys.len() != spec.nodes.len() {
        return Err(LabError::Options(format!(
            "{} keys for {} nodes",
            keys.len(),
            spec.nodes.len()
        )));
    }
    let ann = |k: &str| format!("{KILO_PREFIX}{k}");
    let items = spec
        .nodes
        .iter()
        .zip(keys)
        .map(|(n, key)| {
            let mut annotations = BTreeMap::new();
            annotations.insert(ann(keys::KEY), key.to_string());
            annotations.insert(ann(keys::FORCE_ENDPOINT), n.endpoint(spec.port).to_string());
            annotations.insert(ann(keys::LOCATION), n.location.clone());
            annotations.insert(
                ann(keys::INTERNAL_IP),
                format!("{}/{}", n.lan_ip, spec.lan_of(n).subnet.prefix()),
            );
            annotations.insert(ann(keys::GRANULARITY), spec.granularity.to_string());
            if n.persistent_keepalive > 0 {
                annotations.insert(
                    ann(keys::PERSISTENT_KEEPALIVE),
                    n.persistent_keepalive.to_string(),
                );
            }
            if n.leader {
                annotations.insert(ann(keys::LEADER), "true".to_owned());
            }
            let mut labels = BTreeMap::new();
            if !n.location.is_empty() {
                labels.insert(DEFAULT_TOPOLOGY_LABEL.to_owned(), n.location.clone());
            }
            NodeDoc {
                api_version: "v1",
                kind: "Node",
                metadata: MetaDoc {
                    name: n.name.clone(),
                    labels,
                    annotations,
                },
                spec: SpecDoc {
                    pod_cidr: n
                        .pod_cidrs
                        .first()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    pod_cidrs: n.pod_cidrs.iter().map(ToString::to_string).collect(),
                },
                status: StatusDoc {
                    addresses: vec![
                        AddressDoc {
                            kind: "InternalIP",
                            address: n.lan_ip.to_string(),
                        },
                        AddressDoc {
                            kind: "Hostname",
                            address: n.name.clone(),
                        },
                    ],
                },
            }
        })
        .collect();
    let body = crate::yaml::to_string(&NodeListDoc {
        api_version: "v1",
        kind: "NodeList",
        items,
    })?;
    Ok(format!(
        "# Nodes of wiremesh lab {lab} (from {}), written by `meshctl lab up`.\n\
         # Every agent of the lab reads this file (--nodes). Behind NAT: {}.\n{body}",
        spec.source,
        natted_names(spec),
    ))
}

fn natted_names(spec: &LabSpec) -> String {
    let names: Vec<&str> = spec
        .nodes
        .iter()
        .filter(|n| n.behind_nat())
        .map(|n| n.name.as_str())
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::file::decode_nodes;

    fn from_example(text: &str, name: &str) -> Source {
        let loaded = decode_nodes(text, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
        Source::File {
            name: name.to_owned(),
            nodes: loaded.items,
        }
    }

    fn opts(source: Source) -> SpecOptions {
        SpecOptions {
            source,
            granularity: None,
            nat: None,
            pods_per_node: 1,
            registry: Registry::File,
            underlay_mtu: None,
            clusters: 1,
            family: Family::Ipv4,
        }
    }

    fn keys(n: usize) -> Vec<WgKey> {
        (0..n)
            .map(|i| WgKey([u8::try_from(i).unwrap() + 1; 32]))
            .collect()
    }

    #[test]
    fn default_mirrors_three_clouds_full_mesh_with_the_last_cloud_behind_nat() {
        let spec = plan(&opts(from_example(THREE_CLOUDS, THREE_CLOUDS_NAME))).unwrap();
        assert_eq!(spec.granularity, Granularity::Full);
        let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["fra-1", "hel-1", "par-1"]);
        assert_eq!(spec.lans.len(), 3);
        let natted: Vec<&str> = spec
            .nodes
            .iter()
            .filter(|n| n.behind_nat())
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(natted, ["par-1"]);
        let par = &spec.nodes[2];
        assert_eq!(par.lan_ip, IpAddr::from([10, 210, 3, 11]));
        assert_eq!(par.endpoint(51820).to_string(), "10.210.3.11:51820");
        assert_eq!(par.persistent_keepalive, 20, "the file's keepalive is kept");
        assert_eq!(
            spec.lans[2].nat,
            Some(NatRouter {
                lan_ip: Ipv4Addr::new(10, 210, 3, 1),
                underlay_ip: Ipv4Addr::new(10, 200, 0, 3),
            })
        );
        assert_eq!(
            spec.nodes[0].underlay_ip,
            Some(IpAddr::from([10, 200, 0, 1]))
        );
        assert_eq!(
            spec.nodes[1].underlay_ip,
            Some(IpAddr::from([10, 200, 0, 2]))
        );
        assert_eq!(
            spec.nodes[0].pod_cidrs,
            vec!["10.42.0.0/24".parse::<IpNetwork>().unwrap()]
        );
    }

    fn two_clusters(nodes: usize, locations: usize) -> SpecOptions {
        let mut o = opts(Source::Generated { nodes, locations });
        o.registry = Registry::Kube;
        o.clusters = 2;
        o
    }

    #[test]
    fn two_clusters_split_the_nodes_in_order_each_with_its_api_server_and_mesh_subnet() {
        let spec = plan(&two_clusters(4, 2)).unwrap();
        let of: Vec<(&str, usize)> = spec
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.cluster))
            .collect();
        assert_eq!(of, [("node1", 1), ("node2", 1), ("node3", 2), ("node4", 2)]);
        assert!(spec.multi_cluster());
        let c: Vec<(usize, &str, String, Ipv4Addr)> = spec
            .clusters
            .iter()
            .map(|c| {
                (
                    c.index,
                    c.name.as_str(),
                    c.mesh_subnet.to_string(),
                    c.api_ip(),
                )
            })
            .collect();
        assert_eq!(
            c,
            [
                (
                    1,
                    "cluster1",
                    "10.4.0.0/16".to_owned(),
                    Ipv4Addr::new(10, 200, 0, 253)
                ),
                (
                    2,
                    "cluster2",
                    "10.5.0.0/16".to_owned(),
                    Ipv4Addr::new(10, 200, 0, 252)
                ),
            ]
        );
        assert_eq!(
            spec.mesh_subnet.to_string(),
            "10.4.0.0/16",
            "cluster 1 keeps the lab's"
        );
        assert_eq!(spec.mesh_subnet_of(2).to_string(), "10.5.0.0/16");
        assert_eq!(spec.cluster_of("node3"), 2);
        assert_eq!(spec.lowest_api_host(), 252);
        // No NAT by default: every node is on the underlay, pod CIDRs unique per node.
        assert!(spec.lans.iter().all(|l| l.nat.is_none()));
        let cidrs: Vec<String> = spec.pod_cidrs().iter().map(ToString::to_string).collect();
        assert_eq!(
            cidrs,
            [
                "10.201.1.0/24",
                "10.201.2.0/24",
                "10.201.3.0/24",
                "10.201.4.0/24"
            ]
        );
        // Uneven splits put the larger block first, like locations.
        let odd = plan(&two_clusters(5, 5)).unwrap();
        let k: Vec<usize> = odd.nodes.iter().map(|n| n.cluster).collect();
        assert_eq!(k, [1, 1, 1, 2, 2]);
        // One cluster: the lab as it always was.
        let one = plan(&opts(Source::Generated {
            nodes: 3,
            locations: 3,
        }))
        .unwrap();
        assert!(!one.multi_cluster());
        assert_eq!(one.clusters.len(), 1);
        assert!(one.nodes.iter().all(|n| n.cluster == 1));
        assert_eq!(one.lowest_api_host(), API_HOST);
    }

    #[test]
    fn more_clusters_are_refused_clearly_where_they_do_not_fit() {
        let err = |o: SpecOptions| plan(&o).unwrap_err().to_string();
        let mut file = two_clusters(4, 2);
        file.registry = Registry::File;
        assert!(err(file).contains("--clusters 2 needs --registry kube"));
        let mut nat = two_clusters(4, 2);
        nat.nat = Some(1);
        assert!(err(nat).contains("--clusters 2 has no NAT routers"));
        assert!(
            plan(&{
                let mut o = two_clusters(4, 2);
                o.nat = Some(0);
                o
            })
            .is_ok()
        );
        assert!(err(two_clusters(1, 1)).contains("1 nodes are too few"));
        let mut five = two_clusters(6, 2);
        five.clusters = MAX_CLUSTERS + 1;
        assert!(err(five).contains("a lab has 1 to 4 clusters"));
        let mut zero = two_clusters(4, 2);
        zero.clusters = 0;
        assert!(err(zero).contains("a lab has 1 to 4 clusters"));
        let mut v6 = two_clusters(4, 2);
        v6.family = Family::Ipv6;
        v6.nat = None;
        assert!(err(v6).contains("--registry kube runs on an IPv4 lab only"));
    }

    #[test]
    fn a_pod_cidr_in_another_clusters_mesh_subnet_is_refused() {
        let loaded = decode_nodes(
            "apiVersion: v1\nkind: NodeList\nitems:\n\
             - metadata: {name: a}\n  spec: {podCIDR: 10.42.0.0/24}\n\
             - metadata: {name: b}\n  spec: {podCIDR: 10.5.1.0/24}\n",
            DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap();
        let mut o = opts(Source::File {
            name: "f".into(),
            nodes: loaded.items,
        });
        assert!(plan(&o).is_ok(), "one cluster: 10.5.0.0/16 is nobody's");
        o.registry = Registry::Kube;
        o.clusters = 2;
        let e = plan(&o).unwrap_err().to_string();
        assert!(e.contains("overlaps the mesh subnet (10.5.0.0/16)"), "{e}");
    }

    #[test]
    fn a_node_added_to_a_two_cluster_lab_joins_its_locations_cluster_or_the_one_asked() {
        let mut spec = plan(&two_clusters(4, 2)).unwrap();
        let n5 = add_node(&mut spec, "node5", "loc2", None).unwrap();
        assert_eq!(n5.cluster, 2, "loc2's nodes are in cluster 2");
        let n6 = add_node(&mut spec, "node6", "far", Some(2)).unwrap();
        assert_eq!(n6.cluster, 2);
        let n7 = add_node(&mut spec, "node7", "farther", None).unwrap();
        assert_eq!(n7.cluster, 1, "a new location defaults to cluster 1");
        assert!(add_node(&mut spec, "node8", "x", Some(3)).is_err());
        // Underlay hosts stay below both API servers.
        assert!(spec.nodes.iter().all(|n| match n.underlay_ip {
            Some(IpAddr::V4(a)) => a.octets()[3] < 252,
            _ => true,
        }));
    }

    #[test]
    fn generated_nodes_spread_over_locations_in_blocks_and_default_to_location_mode() {
        let spec = plan(&opts(Source::Generated {
            nodes: 5,
            locations: 2,
        }))
        .unwrap();
        let locs: Vec<&str> = spec.nodes.iter().map(|n| n.location.as_str()).collect();
        assert_eq!(locs, ["loc1", "loc1", "loc1", "loc2", "loc2"]);
        assert_eq!(spec.granularity, Granularity::Location);
        // loc2 (the last) is behind NAT: its nodes have no underlay address, keepalive 25.
        assert!(spec.nodes[3].behind_nat() && spec.nodes[4].behind_nat());
        assert_eq!(spec.nodes[4].persistent_keepalive, NAT_KEEPALIVE);
        assert_eq!(spec.nodes[4].lan_ip, IpAddr::from([10, 210, 2, 12]));
        assert_eq!(spec.nodes[0].persistent_keepalive, 0);
        assert_eq!(
            spec.nodes[2].pod_cidrs,
            vec!["10.201.3.0/24".parse::<IpNetwork>().unwrap()]
        );
        // Public nodes 1..3, then the router of loc2: 10.200.0.1..4.
        assert_eq!(
            spec.nodes[2].underlay_ip,
            Some(IpAddr::from([10, 200, 0, 3]))
        );
        assert_eq!(
            spec.lans[1].nat.map(|r| r.underlay_ip),
            Some(Ipv4Addr::new(10, 200, 0, 4))
        );
    }

    #[test]
    fn one_node_per_location_defaults_to_full_and_nat_can_be_turned_off() {
        let mut o = opts(Source::Generated {
            nodes: 3,
            locations: 3,
        });
        o.nat = Some(0);
        let spec = plan(&o).unwrap();
        assert_eq!(spec.granularity, Granularity::Full);
        assert!(spec.nodes.iter().all(|n| !n.behind_nat()));
    }

    #[test]
    fn from_locations_example_puts_the_home_lan_behind_nat_and_keeps_leaders() {
        let text = include_str!("../../examples/locations.yaml");
        let spec = plan(&opts(from_example(text, "locations.yaml"))).unwrap();
        assert_eq!(spec.granularity, Granularity::Location);
        let home: Vec<&NodeSpec> = spec.nodes.iter().filter(|n| n.location == "home").collect();
        assert_eq!(home.len(), 3);
        assert!(home.iter().all(|n| n.behind_nat()));
        assert!(home.iter().any(|n| n.name == "home-b" && n.leader));
        // Oracle's location comes from the region label.
        assert!(
            spec.nodes
                .iter()
                .any(|n| n.name == "oracle-1" && n.location == "eu-amsterdam-1")
        );
        assert!(spec.nodes.iter().filter(|n| n.behind_nat()).count() == 3);
    }

    #[test]
    fn impossible_requests_are_refused_with_a_reason() {
        let cases = [
            (
                Source::Generated {
                    nodes: 2,
                    locations: 3,
                },
                None,
                "--locations",
            ),
            (
                Source::Generated {
                    nodes: 3,
                    locations: 3,
                },
                Some(3),
                "--nat 3",
            ),
            (
                Source::Generated {
                    nodes: 0,
                    locations: 0,
                },
                None,
                "--locations",
            ),
            (
                Source::Generated {
                    nodes: 101,
                    locations: 1,
                },
                None,
                "1 to 100",
            ),
        ];
        for (source, nat, needle) in cases {
            let mut o = opts(source);
            o.nat = nat;
            let err = plan(&o).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn overlapping_pod_cidrs_are_refused() {
        let mut a = MeshNode::new("a");
        a.pod_cidrs = vec!["10.200.0.0/16".parse().unwrap()];
        let err = plan(&opts(Source::File {
            name: "f".into(),
            nodes: vec![a],
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("overlaps the underlay"), "{err}");
    }

    #[test]
    fn nodes_file_round_trips_through_the_registry_with_lab_addresses() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&opts(from_example(THREE_CLOUDS, THREE_CLOUDS_NAME))).unwrap();
        let text = render_nodes_file(&spec, &name, &keys(3)).unwrap();
        let back = decode_nodes(&text, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert!(back.diagnostics.is_empty(), "{:?}", back.diagnostics);
        assert_eq!(back.items.len(), 3);
        for (n, (s, k)) in back.items.iter().zip(spec.nodes.iter().zip(keys(3))) {
            assert_eq!(n.name.as_str(), s.name);
            assert_eq!(n.key, Some(k));
            assert_eq!(n.location, s.location);
            assert_eq!(n.pod_cidrs, s.pod_cidrs);
            assert_eq!(n.granularity, Some(Granularity::Full));
            assert_eq!(n.persistent_keepalive, s.persistent_keepalive);
            assert_eq!(
                n.endpoint.as_ref().map(ToString::to_string),
                Some(s.endpoint(51820).to_string())
            );
            assert_eq!(
                n.internal_ip,
                Some(format!("{}/24", s.lan_ip).parse().unwrap())
            );
        }
        assert!(text.contains("Behind NAT: par-1"));
    }

    #[test]
    fn nodes_file_keeps_leader_flags() {
        let name: LabName = "wm".parse().unwrap();
        let text = include_str!("../../examples/locations.yaml");
        let spec = plan(&opts(from_example(text, "locations.yaml"))).unwrap();
        let out = render_nodes_file(&spec, &name, &keys(spec.nodes.len())).unwrap();
        let back = decode_nodes(&out, DEFAULT_TOPOLOGY_LABEL).unwrap();
        let leaders: Vec<&str> = back
            .items
            .iter()
            .filter(|n| n.leader)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(leaders, ["home-b"]);
        assert!(render_nodes_file(&spec, &name, &keys(1)).is_err());
    }

    #[test]
    fn added_nodes_take_free_addresses_and_a_new_location_gets_its_own_lan_without_nat() {
        let mut spec = plan(&opts(Source::Generated {
            nodes: 3,
            locations: 2,
        }))
        .unwrap();
        // Into loc1 (public LAN): next LAN host, first free underlay address after the
        // router of loc2 (10.200.0.3).
        let n4 = add_node(&mut spec, "node4", "loc1", None).unwrap();
        assert_eq!(n4.index, 4);
        assert_eq!(n4.lan, 0);
        assert_eq!(n4.lan_ip, IpAddr::from([10, 210, 1, 13]));
        assert_eq!(n4.underlay_ip, Some(IpAddr::from([10, 200, 0, 4])));
        assert_eq!(n4.pod_cidrs, vec!["10.201.4.0/24".parse().unwrap()]);
        // Into loc2, behind NAT: no underlay address, the NAT keepalive.
        let n5 = add_node(&mut spec, "node5", "loc2", None).unwrap();
        assert!(n5.behind_nat());
        assert_eq!(n5.persistent_keepalive, NAT_KEEPALIVE);
        // A new location: LAN 3, public.
        let n6 = add_node(&mut spec, "node6", "far", None).unwrap();
        assert_eq!(spec.lans.len(), 3);
        assert_eq!(spec.lans[2].location, "far");
        assert!(spec.lans[2].nat.is_none());
        assert_eq!(n6.lan_ip, IpAddr::from([10, 210, 3, 11]));
        // Removing frees the underlay address for the next one; indexes never repeat.
        assert_eq!(remove_node(&mut spec, "node4").unwrap().name, "node4");
        let n7 = add_node(&mut spec, "node7", "loc1", None).unwrap();
        assert_eq!(n7.underlay_ip, Some(IpAddr::from([10, 200, 0, 4])));
        assert_eq!(n7.index, 7);
        for bad in ["node7", "Node8", "-x", "a..b", "a/b", ""] {
            assert!(add_node(&mut spec, bad, "loc1", None).is_err(), "{bad:?}");
        }
        assert!(remove_node(&mut spec, "nope").is_err());
    }

    #[test]
    fn kube_node_is_what_a_kubelet_registers_plus_user_annotations_and_nothing_published() {
        let mut o = opts(from_example(
            include_str!("../../examples/locations.yaml"),
            "locations.yaml",
        ));
        o.registry = Registry::Kube;
        let spec = plan(&o).unwrap();
        assert_eq!(spec.registry, Registry::Kube);
        assert_eq!(spec.api_ip(), Ipv4Addr::new(10, 200, 0, 253));
        for n in &spec.nodes {
            let v = kube_node(n);
            let ann = v["metadata"]["annotations"].as_object().unwrap();
            for k in crate::registry::cluster::publish::PUBLISHED_KEYS {
                assert!(
                    !crate::registry::cluster::publish::PREFIXES
                        .iter()
                        .any(|p| ann.contains_key(&format!("{p}{k}"))),
                    "{k} on {}",
                    n.name
                );
            }
            assert!(!ann.contains_key("kilo.squat.ai/force-endpoint"));
            assert_eq!(ann["kilo.squat.ai/location"], n.location.as_str());
            assert_eq!(
                v["metadata"]["labels"][DEFAULT_TOPOLOGY_LABEL],
                n.location.as_str()
            );
            assert_eq!(v["spec"]["podCIDR"], n.pod_cidrs[0].to_string());
            let addrs = v["status"]["addresses"].as_array().unwrap();
            assert_eq!(addrs[0]["type"], "InternalIP");
            assert_eq!(addrs[0]["address"], n.lan_ip.to_string());
            let external = addrs.iter().find(|a| a["type"] == "ExternalIP");
            assert_eq!(
                external.map(|a| a["address"].as_str().unwrap().to_owned()),
                n.underlay_ip.map(|ip| ip.to_string()),
                "{}",
                n.name
            );
            assert_eq!(
                ann.get("kilo.squat.ai/persistent-keepalive").is_some(),
                n.persistent_keepalive > 0
            );
            assert_eq!(ann.get("kilo.squat.ai/leader").is_some(), n.leader);
            // What the agents will read back from it.
            let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(v).unwrap();
            let m = crate::registry::annotations::parse_node(&node, DEFAULT_TOPOLOGY_LABEL)
                .unwrap()
                .value;
            assert_eq!(m.location, n.location);
            assert_eq!(m.key, None);
            assert_eq!(m.endpoint, None);
            assert_eq!(m.internal_ip.map(|i| i.ip()), Some(n.lan_ip));
        }
    }

    fn family_opts(family: Family) -> SpecOptions {
        let mut o = opts(from_example(THREE_CLOUDS, THREE_CLOUDS_NAME));
        o.family = family;
        o
    }

    #[test]
    fn an_ipv6_lab_has_ipv6_endpoints_internal_ips_pod_cidrs_and_mesh_subnet_and_no_nat() {
        let name: LabName = "wm".parse().unwrap();
        let spec = plan(&family_opts(Family::Ipv6)).unwrap();
        assert_eq!(spec.family, Family::Ipv6);
        assert_eq!(spec.underlay, "fd00:200::/64".parse().unwrap());
        assert_eq!(spec.underlay6, None);
        assert_eq!(spec.mesh_subnet, MESH_SUBNET6.parse().unwrap());
        assert!(spec.nodes.iter().all(|n| !n.behind_nat()), "no NAT");
        assert!(spec.lans.iter().all(|l| l.nat.is_none()));
        let par = &spec.nodes[2];
        assert_eq!(par.underlay_ip, Some("fd00:200::3".parse().unwrap()));
        assert_eq!(par.lan_ip, "fd00:210:0:3::b".parse::<IpAddr>().unwrap());
        assert_eq!(par.endpoint(51820).to_string(), "[fd00:200::3]:51820");
        assert_eq!(
            par.pod_cidrs,
            vec!["fd00:201:0:3::/64".parse::<IpNetwork>().unwrap()],
            "the file's IPv4 pod CIDR is left out"
        );
        assert_eq!((par.lan_ip6, par.underlay_ip6), (None, None));
        // What the agents read back.
        let text = render_nodes_file(&spec, &name, &keys(3)).unwrap();
        let back = decode_nodes(&text, DEFAULT_TOPOLOGY_LABEL).unwrap();
        assert!(back.diagnostics.is_empty(), "{:?}", back.diagnostics);
        let n = &back.items[2];
        assert_eq!(
            n.endpoint.as_ref().map(ToString::to_string),
            Some("[fd00:200::3]:51820".to_owned())
        );
        assert_eq!(n.internal_ip, Some("fd00:210:0:3::b/64".parse().unwrap()));
        assert_eq!(n.pod_cidrs, par.pod_cidrs);
    }

    #[test]
    fn a_dual_stack_lab_meshes_over_ipv4_and_gives_links_and_pods_both_families() {
        let mut spec = plan(&family_opts(Family::DualStack)).unwrap();
        assert_eq!(spec.mesh_subnet, DEFAULT_SUBNET.parse().unwrap());
        assert_eq!(
            spec.underlays(),
            vec![
                "10.200.0.0/24".parse::<IpNetwork>().unwrap(),
                "fd00:200::/64".parse().unwrap()
            ]
        );
        assert!(spec.nodes.iter().all(|n| !n.behind_nat()), "no NAT");
        let fra = &spec.nodes[0];
        assert_eq!(fra.endpoint(51820).to_string(), "10.200.0.1:51820");
        assert_eq!(fra.lan_ip, IpAddr::from([10, 210, 1, 11]));
        assert_eq!(fra.lan_ip6, Some("fd00:210:0:1::b".parse().unwrap()));
        assert_eq!(fra.underlay_ip6, Some("fd00:200::1".parse().unwrap()));
        assert_eq!(
            spec.lans[0].subnet6,
            Some("fd00:210:0:1::/64".parse().unwrap())
        );
        let cidrs =
            |s: &[&str]| -> Vec<IpNetwork> { s.iter().map(|c| c.parse().unwrap()).collect() };
        assert_eq!(
            fra.pod_cidrs,
            cidrs(&["10.42.0.0/24", "fd00:201:0:1::/64"]),
            "the file's IPv4 CIDR, then a generated IPv6 one"
        );
        // A node added later gets both families too, in a new LAN of both.
        let n4 = add_node(&mut spec, "node4", "far", None).unwrap();
        assert_eq!(n4.pod_cidrs, cidrs(&["10.201.4.0/24", "fd00:201:0:4::/64"]));
        assert_eq!(n4.underlay_ip, Some(IpAddr::from([10, 200, 0, 4])));
        assert_eq!(n4.underlay_ip6, Some("fd00:200::4".parse().unwrap()));
        assert_eq!(n4.lan_ip6, Some("fd00:210:0:4::b".parse().unwrap()));
        assert_eq!(
            spec.lans[3].subnet6,
            Some("fd00:210:0:4::/64".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_and_dual_stack_labs_refuse_nat_and_the_kube_registry_with_a_reason() {
        for family in [Family::Ipv6, Family::DualStack] {
            let mut o = family_opts(family);
            o.nat = Some(1);
            let err = plan(&o).unwrap_err().to_string();
            assert!(err.contains("has no NAT routers"), "{err}");
            o.nat = Some(0);
            assert!(plan(&o).is_ok(), "--nat 0 is what it does anyway");
            o.registry = Registry::Kube;
            let err = plan(&o).unwrap_err().to_string();
            assert!(
                err.contains("--registry kube runs on an IPv4 lab only"),
                "{err}"
            );
        }
    }

    #[test]
    fn dual_stack_refuses_locations_of_several_nodes_in_location_granularity_only() {
        let mut o = opts(Source::Generated {
            nodes: 4,
            locations: 2,
        });
        o.family = Family::DualStack;
        let err = plan(&o).unwrap_err().to_string();
        assert!(err.contains("pass --granularity full"), "{err}");
        o.granularity = Some(Granularity::Full);
        let mut spec = plan(&o).unwrap();
        assert!(
            add_node(&mut spec, "node5", "loc1", None).is_ok(),
            "full mesh"
        );
        o.family = Family::Ipv6;
        o.granularity = None;
        assert_eq!(plan(&o).unwrap().granularity, Granularity::Location);
        // One node per location: location granularity is fine until a location gets two.
        let mut o = opts(Source::Generated {
            nodes: 2,
            locations: 2,
        });
        o.family = Family::DualStack;
        o.granularity = Some(Granularity::Location);
        let mut spec = plan(&o).unwrap();
        assert!(add_node(&mut spec, "node3", "far", None).is_ok());
        let err = add_node(&mut spec, "node4", "loc1", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pass --granularity full"), "{err}");
    }

    #[test]
    fn a_pod_cidr_on_the_ipv6_lab_ranges_is_refused() {
        let mut a = MeshNode::new("a");
        a.pod_cidrs = vec!["fd00:210::/48".parse().unwrap()];
        let mut o = opts(Source::File {
            name: "f".into(),
            nodes: vec![a],
        });
        o.family = Family::Ipv6;
        let err = plan(&o).unwrap_err().to_string();
        assert!(err.contains("overlaps the IPv6 LANs"), "{err}");
    }
}
