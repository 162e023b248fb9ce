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
//!
//! Pure: depends on the model, the annotation key names, `ipnetwork` and `serde`; no I/O.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::{IpNetwork, Ipv4Network};
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
    /// The LAN's subnet.
    pub subnet: Ipv4Network,
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
    /// Its address on its location's LAN: the internal IP.
    pub lan_ip: Ipv4Addr,
    /// Its underlay address; `None` behind NAT.
    pub underlay_ip: Option<Ipv4Addr>,
    /// Persistent keepalive in seconds (0 = off).
    pub persistent_keepalive: u16,
}

impl NodeSpec {
    /// Whether the node sits behind its LAN's NAT router.
    pub fn behind_nat(&self) -> bool {
        self.underlay_ip.is_none()
    }

    /// The endpoint written into the nodes file: the underlay address, or behind NAT the
    /// private LAN address (the others learn the router's address when the node's packets
    /// arrive: WireGuard roaming).
    pub fn endpoint(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.underlay_ip.unwrap_or(self.lan_ip), port)
    }
}

/// The whole lab, decided up front; stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Where the nodes came from (`generated` or the file name).
    pub source: String,
    /// Mesh granularity the agents run with.
    pub granularity: Granularity,
    /// Pod namespaces per node.
    pub pods_per_node: usize,
    /// The underlay subnet.
    pub underlay: Ipv4Network,
    /// The mesh subnet the agents allocate from.
    pub mesh_subnet: IpNetwork,
    /// The WireGuard listen port of every node.
    pub port: u16,
    /// One LAN per location, in order of first appearance.
    pub lans: Vec<LanSpec>,
    /// The nodes, in source order.
    pub nodes: Vec<NodeSpec>,
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

    let nat_count = opts.nat.unwrap_or(if locations.len() >= 2 { 1 } else { 0 });
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

    let mut next_underlay = 1u32;
    let mut take_underlay = || -> Result<Ipv4Addr, LabError> {
        let ip = UNDERLAY.nth(next_underlay).filter(|_| next_underlay < 255);
        next_underlay += 1;
        ip.ok_or_else(|| LabError::Options("the underlay /24 is full".to_owned()))
    };
    let mut lans = Vec::with_capacity(locations.len());
    let mut nodes: Vec<Option<NodeSpec>> = vec![None; protos.len()];
    for (k, (location, members)) in locations.iter().enumerate() {
        let index = k + 1;
        let third = u8::try_from(index)
            .ok()
            .filter(|&t| t < 255)
            .ok_or_else(|| LabError::Options("more than 254 locations".to_owned()))?;
        let base = Ipv4Addr::new(LAN_BASE[0], LAN_BASE[1], third, 0);
        let subnet = Ipv4Network::new_checked(base, 24)
            .ok_or_else(|| LabError::Options("bad LAN subnet".to_owned()))?;
        let nat = if natted[k] {
            Some(NatRouter {
                lan_ip: Ipv4Addr::new(LAN_BASE[0], LAN_BASE[1], third, 1),
                underlay_ip: take_underlay()?,
            })
        } else {
            None
        };
        for (j, &i) in members.iter().enumerate() {
            let p = &protos[i];
            let host = u8::try_from(usize::from(LAN_FIRST_NODE) + j)
                .map_err(|_| LabError::Options("LAN full".to_owned()))?;
            let pod_cidrs = if p.pod_cidrs.is_empty() {
                let third = u8::try_from(i + 1)
                    .ok()
                    .filter(|&t| t < 255)
                    .ok_or_else(|| LabError::Options("too many nodes".to_owned()))?;
                vec![IpNetwork::V4(
                    Ipv4Network::new_checked(Ipv4Addr::new(POD_BASE[0], POD_BASE[1], third, 0), 24)
                        .ok_or_else(|| LabError::Options("bad pod CIDR".to_owned()))?,
                )]
            } else {
                p.pod_cidrs.clone()
            };
            nodes[i] = Some(NodeSpec {
                index: i + 1,
                name: p.name.clone(),
                location: location.clone(),
                lan: k,
                leader: p.leader,
                pod_cidrs,
                lan_ip: Ipv4Addr::new(LAN_BASE[0], LAN_BASE[1], third, host),
                underlay_ip: if nat.is_some() {
                    None
                } else {
                    Some(take_underlay()?)
                },
                persistent_keepalive: if nat.is_some() && p.keepalive == 0 {
                    NAT_KEEPALIVE
                } else {
                    p.keepalive
                },
            });
        }
        lans.push(LanSpec {
            index,
            location: location.clone(),
            subnet,
            nat,
        });
    }
    let nodes: Vec<NodeSpec> = nodes.into_iter().flatten().collect();
    let mesh_subnet: IpNetwork = DEFAULT_SUBNET
        .parse()
        .map_err(|_| LabError::Options("bad default mesh subnet".to_owned()))?;
    check_overlaps(&nodes, mesh_subnet)?;
    Ok(LabSpec {
        source: match &opts.source {
            Source::Generated { .. } => "generated".to_owned(),
            Source::File { name, .. } => name.clone(),
        },
        granularity,
        pods_per_node: opts.pods_per_node,
        underlay: UNDERLAY,
        mesh_subnet,
        port: DEFAULT_PORT,
        lans,
        nodes,
    })
}

/// Pod CIDRs must not overlap each other or the lab's own ranges, or routing would be ambiguous.
fn check_overlaps(nodes: &[NodeSpec], mesh: IpNetwork) -> Result<(), LabError> {
    let lab_ranges = [
        ("the underlay", IpNetwork::V4(UNDERLAY)),
        (
            "the LANs",
            IpNetwork::V4(
                Ipv4Network::new_checked(Ipv4Addr::new(LAN_BASE[0], LAN_BASE[1], 0, 0), 16)
                    .ok_or_else(|| LabError::Options("bad LAN range".to_owned()))?,
            ),
        ),
        ("the mesh subnet", mesh),
    ];
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
    let body = serde_yaml::to_string(&NodeListDoc {
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
        assert_eq!(par.lan_ip, Ipv4Addr::new(10, 210, 3, 11));
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
            Some(Ipv4Addr::new(10, 200, 0, 1))
        );
        assert_eq!(
            spec.nodes[1].underlay_ip,
            Some(Ipv4Addr::new(10, 200, 0, 2))
        );
        assert_eq!(
            spec.nodes[0].pod_cidrs,
            vec!["10.42.0.0/24".parse::<IpNetwork>().unwrap()]
        );
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
        assert_eq!(spec.nodes[4].lan_ip, Ipv4Addr::new(10, 210, 2, 12));
        assert_eq!(spec.nodes[0].persistent_keepalive, 0);
        assert_eq!(
            spec.nodes[2].pod_cidrs,
            vec!["10.201.3.0/24".parse::<IpNetwork>().unwrap()]
        );
        // Public nodes 1..3, then the router of loc2: 10.200.0.1..4.
        assert_eq!(
            spec.nodes[2].underlay_ip,
            Some(Ipv4Addr::new(10, 200, 0, 3))
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
}
