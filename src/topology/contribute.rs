//! What each segment and each external peer contributes to the local node's desired state
//! (Kilo's `Conf()` and `Routes()`), and how contributions are merged into one state.
//!
//! Pure. Both the full computation and the incremental engine build the state from these same
//! functions, so they cannot disagree on semantics.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use super::{Encapsulate, MeshOptions, Segment, Topology};
use crate::desired::{
    Bridge, DesiredState, ENCAP_TABLE, MAIN_TABLE, Masquerade, Route, RouteDev, Rule, WgInterface,
    WgPeer,
};
use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, MeshNode, MeshPeer, NodeName, WgKey, host_net};

/// The part of the desired state that one segment, one peer or the local node itself adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Contribution {
    pub peer: Option<WgPeer>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub nat_sources: Vec<IpNetwork>,
    pub nat_destinations: Vec<IpNetwork>,
    pub nat_exempt: Vec<IpNetwork>,
}

/// What the local node's view depends on besides the segment being looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalContext {
    pub name: NodeName,
    pub leader: bool,
    pub private_ip: Option<IpNetwork>,
    pub pod_cidrs: Vec<IpNetwork>,
    pub keepalive: u16,
    pub listen_port: u16,
    /// Gateway to the local segment's leader (non-leaders only): the leader's internal IP.
    pub gateway: Option<IpAddr>,
    /// The local segment's mesh IP, with the subnet's prefix (leaders only).
    pub address: Option<IpNetwork>,
    pub discovered: BTreeMap<WgKey, SocketAddr>,
    pub encapsulate: Encapsulate,
    pub local_routes: bool,
    pub cni: bool,
    pub interface: String,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub service_cidrs: Vec<IpNetwork>,
}

impl LocalContext {
    /// The context of node `local`, which sits in segment `idx` of `topo`.
    pub fn new(topo: &Topology<'_>, idx: usize, local: &NodeName, opts: &MeshOptions) -> Self {
        let seg = &topo.segments[idx];
        let me: &MeshNode = seg
            .nodes
            .iter()
            .find(|n| &n.name == local)
            .copied()
            .unwrap_or(seg.leader_node());
        let discovered = topo.discovered_endpoints(me);
        Self::from_parts(seg, me, discovered, opts, topo.subnet)
    }

    /// The context from the local segment and node, without a whole topology.
    pub fn from_parts(
        seg: &Segment<'_>,
        me: &MeshNode,
        discovered: BTreeMap<WgKey, SocketAddr>,
        opts: &MeshOptions,
        subnet: IpNetwork,
    ) -> Self {
        let leader = seg.leader_node().name == me.name;
        let leader_node = seg.leader_node();
        LocalContext {
            name: me.name.clone(),
            leader,
            private_ip: me.internal_ip,
            pod_cidrs: me.pod_cidrs.clone(),
            keepalive: me.persistent_keepalive,
            listen_port: me.endpoint.as_ref().map_or(opts.port, Endpoint::port),
            gateway: if leader {
                None
            } else {
                leader_node.internal_ip.map(|i| i.ip())
            },
            address: if leader {
                IpNetwork::new(seg.mesh_ip, subnet.prefix()).ok()
            } else {
                None
            },
            discovered,
            encapsulate: opts.encapsulate,
            local_routes: opts.local_routes,
            cni: opts.cni,
            interface: opts.interface.clone(),
            bridge: opts.bridge.clone(),
            mtu: opts.mtu,
            service_cidrs: opts.service_cidrs.clone(),
        }
    }

    /// Kilo's `updateEndpoint`: a peer with keepalive (behind NAT) is reached at the endpoint
    /// the mesh discovered for it, when there is one.
    fn endpoint(&self, ep: Option<&Endpoint>, key: WgKey, keepalive: u16) -> Option<Endpoint> {
        if keepalive != 0
            && let Some(d) = self.discovered.get(&key)
        {
            return Some(Endpoint::Addr(*d));
        }
        ep.cloned()
    }

    /// Kilo's `encapsulateRoute`: send through the IPIP tunnel when the strategy says so.
    fn encap(&self, mut r: Route) -> Route {
        let cross = match (self.private_ip, r.gateway) {
            (Some(p), Some(gw)) => !p.contains(gw),
            _ => true,
        };
        let tunnel = match self.encapsulate {
            Encapsulate::Always => true,
            Encapsulate::CrossSubnet => self.private_ip.is_some() && cross,
            Encapsulate::Never => false,
        };
        if tunnel {
            r.dev = RouteDev::Tunnel;
            if r.src.is_none() {
                r.src = self.private_ip.map(|p| p.ip());
            }
        }
        r
    }

    fn via_leader(&self, dst: IpNetwork) -> Route {
        self.encap(Route {
            table: MAIN_TABLE,
            dst,
            gateway: self.gateway,
            dev: RouteDev::Private,
            src: None,
            onlink: true,
        })
    }

    fn via_wireguard(&self, dst: IpNetwork, gateway: Option<IpAddr>) -> Route {
        Route {
            table: MAIN_TABLE,
            dst,
            gateway,
            dev: RouteDev::WireGuard,
            src: self.private_ip.map(|p| p.ip()),
            onlink: gateway.is_some(),
        }
    }

    /// Routes (and rules) between nodes of the local segment (Kilo's `local` routes).
    fn local_segment_routes(&self, seg: &Segment<'_>, c: &mut Contribution) {
        let Some(me) = self.private_ip else { return };
        if !self.local_routes {
            return;
        }
        for n in &seg.nodes {
            let Some(their) = n.internal_ip else { continue };
            if their.ip() == me.ip() {
                continue;
            }
            for cidr in &n.pod_cidrs {
                c.routes.push(self.encap(Route {
                    table: MAIN_TABLE,
                    dst: *cidr,
                    gateway: Some(their.ip()),
                    dev: RouteDev::Private,
                    src: None,
                    onlink: true,
                }));
            }
            let encapsulated = match self.encapsulate {
                Encapsulate::Always => true,
                Encapsulate::CrossSubnet => !me.contains(their.ip()),
                Encapsulate::Never => false,
            };
            if encapsulated {
                let dst = host_net(their.ip());
                c.routes.push(Route {
                    table: ENCAP_TABLE,
                    dst,
                    gateway: Some(their.ip()),
                    dev: RouteDev::Tunnel,
                    src: Some(me.ip()),
                    onlink: true,
                });
                for cidr in &self.pod_cidrs {
                    c.rules.push(Rule {
                        src: Some(*cidr),
                        dst: Some(dst),
                        iif: None,
                        table: ENCAP_TABLE,
                    });
                }
                if self.leader {
                    c.rules.push(Rule {
                        src: None,
                        dst: Some(dst),
                        iif: Some(self.interface.clone()),
                        table: ENCAP_TABLE,
                    });
                }
            }
        }
    }

    /// The contribution of segment `seg`; `is_local` when it is the local node's own segment.
    pub fn segment(&self, seg: &Segment<'_>, is_local: bool) -> Contribution {
        let mut c = Contribution::default();
        c.nat_exempt.push(host_net(seg.mesh_ip));
        c.nat_exempt.extend(seg.allowed_ips.iter().copied());
        if is_local && self.cni {
            c.nat_destinations
                .extend(seg.allowed_location_ips.iter().copied());
        }
        let leader = seg.leader_node();
        let seg_endpoint = leader
            .key
            .and_then(|k| self.endpoint(leader.endpoint.as_ref(), k, leader.persistent_keepalive));
        if self.leader {
            if is_local {
                self.local_segment_routes(seg, &mut c);
                return c;
            }
            let Some(key) = leader.key else { return c };
            let mut allowed = seg.allowed_ips.clone();
            allowed.extend(seg.allowed_location_ips.iter().copied());
            c.peer = Some(WgPeer {
                public_key: key,
                endpoint: seg_endpoint.clone(),
                allowed_ips: allowed,
                persistent_keepalive: self.keepalive,
                preshared_key: None,
                name: seg.label(),
            });
            let gw = Some(seg.mesh_ip);
            let endpoint_ip = seg_endpoint.as_ref().and_then(Endpoint::ip);
            for n in &seg.nodes {
                for cidr in &n.pod_cidrs {
                    c.routes.push(self.via_wireguard(*cidr, gw));
                }
                if let Some(ip) = n.internal_ip
                    && Some(ip.ip()) != endpoint_ip
                {
                    c.routes.push(self.via_wireguard(host_net(ip.ip()), gw));
                }
            }
            for a in &seg.allowed_location_ips {
                c.routes.push(self.via_wireguard(*a, gw));
            }
            return c;
        }
        // A non-leader sends everything remote to its leader over the private network.
        c.routes.push(self.via_leader(host_net(seg.mesh_ip)));
        if is_local {
            self.local_segment_routes(seg, &mut c);
            return c;
        }
        for n in &seg.nodes {
            for cidr in &n.pod_cidrs {
                c.routes.push(self.via_leader(*cidr));
            }
        }
        for n in &seg.nodes {
            if let Some(ip) = n.internal_ip {
                c.routes.push(self.via_leader(host_net(ip.ip())));
            }
        }
        for a in &seg.allowed_location_ips {
            c.routes.push(self.via_leader(*a));
        }
        c
    }

    /// The contribution of an external peer.
    pub fn peer(&self, p: &MeshPeer) -> Contribution {
        let mut c = Contribution {
            nat_exempt: p.allowed_ips.clone(),
            nat_sources: p.allowed_ips.clone(),
            ..Contribution::default()
        };
        if self.leader {
            c.peer = Some(WgPeer {
                public_key: p.key,
                endpoint: self.endpoint(p.endpoint.as_ref(), p.key, p.persistent_keepalive),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: self.keepalive,
                preshared_key: p.preshared_key,
                name: p.name.to_string(),
            });
            for a in &p.allowed_ips {
                c.routes.push(self.via_wireguard(*a, None));
            }
        } else {
            for a in &p.allowed_ips {
                c.routes.push(self.via_leader(*a));
            }
        }
        c
    }

    /// The local node's own contribution: pod masquerading and service CIDR exemptions.
    pub fn own(&self) -> Contribution {
        let mut c = Contribution::default();
        if self.cni {
            c.nat_sources.extend(self.pod_cidrs.iter().copied());
        }
        c.nat_exempt.extend(self.service_cidrs.iter().copied());
        c
    }

    /// Interface settings.
    pub fn interface(&self) -> WgInterface {
        WgInterface {
            name: self.interface.clone(),
            listen_port: self.listen_port,
            address: self.address,
            mtu: self.mtu,
        }
    }

    /// The CNI bridge with the first host address of each local pod CIDR.
    pub fn bridge(&self) -> Option<Bridge> {
        if !self.cni || self.pod_cidrs.is_empty() {
            return None;
        }
        let addresses = self
            .pod_cidrs
            .iter()
            .filter_map(|c| {
                let first = match c.network() {
                    IpAddr::V4(v4) => {
                        IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4).wrapping_add(1)))
                    }
                    IpAddr::V6(v6) => {
                        IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6).wrapping_add(1)))
                    }
                };
                IpNetwork::new(first, c.prefix()).ok()
            })
            .collect();
        Some(Bridge {
            name: self.bridge.clone(),
            addresses,
        })
    }
}

fn sorted_unique(mut v: Vec<IpNetwork>) -> Vec<IpNetwork> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Merge contributions, in order, into a desired state. Where two contributions claim the same
/// allowed IP or route destination the first keeps it; each such conflict is returned as a
/// diagnostic (an empty list means the contributions were disjoint).
pub(crate) fn assemble(
    ctx: &LocalContext,
    contributions: Vec<Contribution>,
) -> (DesiredState, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let mut peers = Vec::new();
    let mut routes = Vec::new();
    let mut rules = Vec::new();
    let (mut sources, mut destinations, mut exempt) = (Vec::new(), Vec::new(), Vec::new());
    let mut claimed: HashMap<IpNetwork, usize> = HashMap::new();
    for c in contributions {
        if let Some(mut p) = c.peer {
            p.allowed_ips.retain(|ip| match claimed.get(ip) {
                None => {
                    claimed.insert(*ip, peers.len());
                    true
                }
                Some(_) => {
                    diagnostics.push(
                        Diagnostic::node(
                            &p.name,
                            None,
                            format!(
                                "allowed IP {ip} is already routed to another peer; not added here"
                            ),
                        )
                        .kept(),
                    );
                    false
                }
            });
            peers.push(p);
        }
        routes.extend(c.routes);
        rules.extend(c.rules);
        sources.extend(c.nat_sources);
        destinations.extend(c.nat_destinations);
        exempt.extend(c.nat_exempt);
    }
    peers.sort_unstable_by(|a, b| a.public_key.cmp(&b.public_key));
    // Stable sort keeps contribution order among equal destinations: the first one wins.
    routes.sort_by(|a: &Route, b: &Route| (a.table, a.dst).cmp(&(b.table, b.dst)));
    routes.dedup_by(|b, a| {
        let dup = a.table == b.table && a.dst == b.dst;
        if dup && a != b {
            diagnostics.push(
                Diagnostic::node(
                    &ctx.name.0,
                    None,
                    format!(
                        "two routes to {} in table {}; the first is used",
                        a.dst, a.table
                    ),
                )
                .kept(),
            );
        }
        dup
    });
    rules.sort_unstable();
    rules.dedup();
    let desired = DesiredState {
        node: ctx.name.to_string(),
        leader: ctx.leader,
        interface: ctx.interface(),
        peers,
        routes,
        rules,
        bridge: ctx.bridge(),
        masquerade: Masquerade {
            sources: sorted_unique(sources),
            destinations: sorted_unique(destinations),
            exempt: sorted_unique(exempt),
        },
    };
    (desired, diagnostics)
}
