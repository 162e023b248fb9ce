//! What each segment and each external peer contributes to the local node's desired state
//! (Kilo's `Conf()` and `Routes()`), and how contributions are merged into one state.
//!
//! Pure. Both the full computation and the incremental engine build the state from these same
//! functions, so they cannot disagree on semantics.

use std::collections::BTreeMap;

use rustc_hash::FxHashSet;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use super::{Encapsulate, MeshOptions, Segment, Topology};
use crate::desired::{
    Bridge, DesiredState, ENCAP_TABLE, MAIN_TABLE, Masquerade, Route, RouteDev, Rule, WgInterface,
    WgPeer,
};
use crate::diagnostic::Diagnostic;
use crate::model::{Endpoint, MeshNode, MeshPeer, NodeName, WgKey, host_net};

/// Where contributions are written (a [`Contribution`]); a trait so the writers stay generic.
pub(crate) trait Sink {
    fn peer(&mut self, p: WgPeer);
    fn route(&mut self, r: Route);
    fn rule(&mut self, r: Rule);
    fn nat_sources(&mut self, n: &[IpNetwork]);
    fn nat_destinations(&mut self, n: &[IpNetwork]);
    fn nat_exempt(&mut self, n: &[IpNetwork]);
}

/// What one segment, one peer or the local node adds to the desired state — or, in a full
/// computation, all of them in order (one set of vectors instead of small ones per segment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Contribution {
    pub peers: Vec<WgPeer>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub nat_sources: Vec<IpNetwork>,
    pub nat_destinations: Vec<IpNetwork>,
    pub nat_exempt: Vec<IpNetwork>,
}

impl Contribution {
    /// An empty contribution sized for `segments` segments.
    pub fn with_capacity(segments: usize) -> Self {
        Contribution {
            peers: Vec::with_capacity(segments),
            routes: Vec::with_capacity(segments * 2),
            rules: Vec::new(),
            nat_sources: Vec::new(),
            nat_destinations: Vec::new(),
            nat_exempt: Vec::with_capacity(segments * 2),
        }
    }

    /// The WireGuard peer of a single segment's or peer's contribution, if it has one.
    pub fn peer(&self) -> Option<&WgPeer> {
        self.peers.first()
    }

    /// Drop the spare capacity of its vectors. The incremental engine keeps one contribution per
    /// segment: thousands of vectors of one to three items, which growth leaves at capacity
    /// four (a lone peer took 640 bytes instead of 160).
    pub fn shrink_to_fit(&mut self) {
        self.peers.shrink_to_fit();
        for p in &mut self.peers {
            p.allowed_ips.shrink_to_fit();
        }
        self.routes.shrink_to_fit();
        self.rules.shrink_to_fit();
        self.nat_sources.shrink_to_fit();
        self.nat_destinations.shrink_to_fit();
        self.nat_exempt.shrink_to_fit();
    }

    /// Append another contribution.
    pub fn absorb(&mut self, c: &Contribution) {
        self.peers.extend_from_slice(&c.peers);
        self.routes.extend_from_slice(&c.routes);
        self.rules.extend_from_slice(&c.rules);
        self.nat_sources.extend_from_slice(&c.nat_sources);
        self.nat_destinations.extend_from_slice(&c.nat_destinations);
        self.nat_exempt.extend_from_slice(&c.nat_exempt);
    }
}

impl Sink for Contribution {
    fn peer(&mut self, p: WgPeer) {
        self.peers.push(p);
    }
    fn route(&mut self, r: Route) {
        self.routes.push(r);
    }
    fn rule(&mut self, r: Rule) {
        self.rules.push(r);
    }
    fn nat_sources(&mut self, n: &[IpNetwork]) {
        self.nat_sources.extend_from_slice(n);
    }
    fn nat_destinations(&mut self, n: &[IpNetwork]) {
        self.nat_destinations.extend_from_slice(n);
    }
    fn nat_exempt(&mut self, n: &[IpNetwork]) {
        self.nat_exempt.extend_from_slice(n);
    }
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
    /// Segments (by leader key) reached through a relay, with the relay's key (leaders only).
    pub relayed: BTreeMap<WgKey, WgKey>,
    pub encapsulate: Encapsulate,
    pub local_routes: bool,
    pub cni: bool,
    pub interface: String,
    pub bridge: String,
    pub mtu: Option<u32>,
    /// The local node's endpoint address (the automatic MTU's underlay), when it is an IP.
    pub underlay: Option<IpAddr>,
    pub mss_clamp: bool,
    pub service_cidrs: Vec<IpNetwork>,
    pub subnet: IpNetwork,
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
        let mut ctx = Self::from_parts(seg, me, discovered, opts, topo.subnet);
        if ctx.leader {
            ctx.relayed = topo.relayed_from(idx);
        }
        ctx
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
            relayed: BTreeMap::new(),
            encapsulate: opts.encapsulate,
            local_routes: opts.local_routes,
            cni: opts.cni,
            interface: opts.interface.clone(),
            bridge: opts.bridge.clone(),
            mtu: opts.mtu,
            underlay: match &me.endpoint {
                Some(Endpoint::Addr(a)) => Some(a.ip()),
                _ => None,
            },
            mss_clamp: opts.mss_clamp,
            service_cidrs: opts.service_cidrs.clone(),
            subnet: crate::model::network_of(subnet),
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
                r.src = self.src_for(&r.dst);
            }
        }
        r
    }

    /// The preferred source of a route to `dst`: the internal IP, when it is of `dst`'s
    /// family (the kernel refuses a source of the other family: a dual-stack pod CIDR's second
    /// family goes without one).
    fn src_for(&self, dst: &IpNetwork) -> Option<IpAddr> {
        self.private_ip
            .map(|p| p.ip())
            .filter(|ip| ip.is_ipv4() == dst.is_ipv4())
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
            src: self.src_for(&dst),
            onlink: gateway.is_some(),
        }
    }

    /// Routes (and rules) between nodes of the local segment (Kilo's `local` routes).
    fn local_segment_routes(&self, seg: &Segment<'_>, c: &mut impl Sink) {
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
                c.route(self.encap(Route {
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
                c.route(Route {
                    table: ENCAP_TABLE,
                    dst,
                    gateway: Some(their.ip()),
                    dev: RouteDev::Tunnel,
                    src: Some(me.ip()),
                    onlink: true,
                });
                for cidr in &self.pod_cidrs {
                    c.rule(Rule {
                        src: Some(*cidr),
                        dst: Some(dst),
                        iif: None,
                        table: ENCAP_TABLE,
                    });
                }
                if self.leader {
                    c.rule(Rule {
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
        self.segment_into(seg, is_local, &mut c);
        c.shrink_to_fit();
        c
    }

    /// Write the contribution of segment `seg` into `c`.
    pub fn segment_into(&self, seg: &Segment<'_>, is_local: bool, c: &mut impl Sink) {
        // The mesh IP (last allowed IP) is covered by the subnet exemption in `own`.
        c.nat_exempt(&seg.allowed_ips[..seg.allowed_ips.len().saturating_sub(1)]);
        if is_local && self.cni {
            c.nat_destinations(&seg.allowed_location_ips);
        }
        let leader = seg.leader_node();
        let seg_endpoint = leader
            .key
            .and_then(|k| self.endpoint(leader.endpoint.as_ref(), k, leader.persistent_keepalive));
        if self.leader {
            if is_local {
                self.local_segment_routes(seg, c);
                return;
            }
            let Some(key) = leader.key else { return };
            // No gateway (Kilo routes via the peer's mesh IP): WireGuard picks the peer by its
            // allowed IPs, so a renumbered segment changes that peer's allowed IPs and no route.
            let gw = None;
            // Kilo routes a node's internal IP through the tunnel unless it is the endpoint in
            // use. Here the published endpoint counts too: a NATed node publishes its internal
            // address, and until the device has the discovered one (or while a handshake keeps
            // the old endpoint) WireGuard would send to an address routed into itself.
            let endpoint_ips = [
                seg_endpoint.as_ref().and_then(Endpoint::ip),
                leader.endpoint.as_ref().and_then(Endpoint::ip),
            ];
            let mut allowed =
                Vec::with_capacity(seg.allowed_ips.len() + seg.allowed_location_ips.len());
            allowed.extend_from_slice(&seg.allowed_ips);
            allowed.extend_from_slice(&seg.allowed_location_ips);
            c.peer(WgPeer {
                public_key: key,
                endpoint: seg_endpoint,
                allowed_ips: allowed,
                persistent_keepalive: self.keepalive,
                preshared_key: None,
                name: seg.label(),
            });
            for n in &seg.nodes {
                for cidr in &n.pod_cidrs {
                    c.route(self.via_wireguard(*cidr, gw));
                }
                if let Some(ip) = n.internal_ip
                    && !endpoint_ips.contains(&Some(ip.ip()))
                {
                    c.route(self.via_wireguard(host_net(ip.ip()), gw));
                }
            }
            for a in &seg.allowed_location_ips {
                c.route(self.via_wireguard(*a, gw));
            }
            return;
        }
        // A non-leader sends everything remote to its leader over the private network; the mesh
        // IPs go there by one route for the whole mesh subnet (`own_into`), not one per segment,
        // so renumbering moves no route.
        if is_local {
            self.local_segment_routes(seg, c);
            return;
        }
        for n in &seg.nodes {
            for cidr in &n.pod_cidrs {
                c.route(self.via_leader(*cidr));
            }
        }
        for n in &seg.nodes {
            if let Some(ip) = n.internal_ip {
                c.route(self.via_leader(host_net(ip.ip())));
            }
        }
        for a in &seg.allowed_location_ips {
            c.route(self.via_leader(*a));
        }
    }

    /// The contribution of an external peer.
    pub fn peer(&self, p: &MeshPeer) -> Contribution {
        let mut c = Contribution::default();
        self.peer_into(p, &mut c);
        c.shrink_to_fit();
        c
    }

    /// Write the contribution of an external peer into `c`.
    pub fn peer_into(&self, p: &MeshPeer, c: &mut impl Sink) {
        c.nat_exempt(&p.allowed_ips);
        c.nat_sources(&p.allowed_ips);
        if self.leader {
            c.peer(WgPeer {
                public_key: p.key,
                endpoint: self.endpoint(p.endpoint.as_ref(), p.key, p.persistent_keepalive),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: self.keepalive,
                preshared_key: p.preshared_key,
                name: p.name.to_string(),
            });
            for a in &p.allowed_ips {
                c.route(self.via_wireguard(*a, None));
            }
        } else {
            for a in &p.allowed_ips {
                c.route(self.via_leader(*a));
            }
        }
    }

    /// The local node's own contribution: pod masquerading, and no masquerading towards the
    /// mesh subnet or the service CIDRs.
    pub fn own(&self) -> Contribution {
        let mut c = Contribution::default();
        self.own_into(&mut c);
        c
    }

    /// Write the local node's own contribution into `c`.
    pub fn own_into(&self, c: &mut impl Sink) {
        if self.cni {
            c.nat_sources(&self.pod_cidrs);
        }
        c.nat_exempt(&[self.subnet]);
        c.nat_exempt(&self.service_cidrs);
        if !self.leader {
            c.route(self.via_leader(self.subnet));
        }
    }

    /// Interface settings.
    pub fn interface(&self) -> WgInterface {
        WgInterface {
            name: self.interface.clone(),
            listen_port: self.listen_port,
            address: self.address,
            mtu: self.mtu,
            underlay: self.underlay,
            mss_clamp: self.mss_clamp,
        }
    }

    /// The CNI bridge with the first host address of each local pod CIDR.
    pub fn bridge(&self) -> Option<Bridge> {
        if !self.cni || self.pod_cidrs.is_empty() {
            return None;
        }
        let mut addresses: Vec<IpNetwork> = self
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
        // Sorted like the kernel reports them, so a dual-stack node compares equal.
        addresses.sort();
        Some(Bridge {
            name: self.bridge.clone(),
            addresses,
        })
    }
}

/// A cheap sort key with the same order as `IpNetwork`'s `Ord` (family, address, prefix).
pub(crate) fn net_key(n: &IpNetwork) -> (u8, u128, u8) {
    match n {
        IpNetwork::V4(v4) => (0, u128::from(u32::from(v4.ip())), v4.prefix()),
        IpNetwork::V6(v6) => (1, u128::from(v6.ip()), v6.prefix()),
    }
}

fn sorted_unique(mut v: Vec<IpNetwork>) -> Vec<IpNetwork> {
    v.sort_by_cached_key(net_key);
    v.dedup();
    v
}

/// Move the allowed IPs of each relayed segment's peer to its relay's peer. The direct peer
/// stays, without allowed IPs and with a keepalive, so the direct path keeps being tried.
fn relay(ctx: &LocalContext, peers: &mut [WgPeer]) {
    if ctx.relayed.is_empty() {
        return;
    }
    let mut moved: BTreeMap<WgKey, Vec<IpNetwork>> = BTreeMap::new();
    for p in peers.iter_mut() {
        if let Some(via) = ctx.relayed.get(&p.public_key) {
            moved.entry(*via).or_default().append(&mut p.allowed_ips);
            if p.persistent_keepalive == 0 {
                p.persistent_keepalive = super::RELAY_PROBE_KEEPALIVE;
            }
        }
    }
    for p in peers.iter_mut() {
        if let Some(ips) = moved.get_mut(&p.public_key) {
            p.allowed_ips.append(ips);
        }
    }
}

/// Merge the accumulated contributions, in order, into a desired state. Where two contributions
/// claim the same allowed IP or route destination the first keeps it; each such conflict is
/// returned as a diagnostic (an empty list means the contributions were disjoint).
pub(crate) fn assemble(ctx: &LocalContext, acc: Contribution) -> (DesiredState, Vec<Diagnostic>) {
    let Contribution {
        mut peers,
        mut routes,
        mut rules,
        nat_sources,
        nat_destinations,
        mut nat_exempt,
    } = acc;
    let mut diagnostics = Vec::new();
    relay(ctx, &mut peers);
    // Every allowed IP of a peer is in the exemption list once per claim, except mesh IPs (unique
    // by allocation) and allowed-location-ips (overlaps already filtered). So when the sorted
    // list has no repeat, no IP is claimed twice and the per-IP check can be skipped.
    nat_exempt.sort_by_cached_key(net_key);
    let repeats = nat_exempt.windows(2).any(|w| w[0] == w[1]);
    nat_exempt.dedup();
    if repeats {
        let mut claimed: FxHashSet<IpNetwork> = FxHashSet::default();
        claimed.reserve(peers.len() * 3);
        for p in &mut peers {
            let name = &p.name;
            p.allowed_ips.retain(|ip| {
                let fresh = claimed.insert(*ip);
                if !fresh {
                    diagnostics.push(
                        Diagnostic::node(
                            name,
                            None,
                            format!(
                                "allowed IP {ip} is already routed to another peer; not added here"
                            ),
                        )
                        .kept(),
                    );
                }
                fresh
            });
        }
    }
    // Sorting (key, index) pairs and permuting once beats moving large structs in the sort.
    peers.sort_by_cached_key(|p| p.public_key);
    // `sort_by_cached_key` is stable: among routes to one destination the first one stays first.
    routes.sort_by_cached_key(|r| (r.table, net_key(&r.dst)));
    routes.dedup_by(|later, first| {
        let same = later.table == first.table && later.dst == first.dst;
        if same && later != first {
            diagnostics.push(
                Diagnostic::node(
                    &ctx.name.0,
                    None,
                    format!(
                        "two routes to {} in table {}; the first is used",
                        first.dst, first.table
                    ),
                )
                .kept(),
            );
        }
        same
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
            sources: sorted_unique(nat_sources),
            destinations: sorted_unique(nat_destinations),
            exempt: nat_exempt,
        },
    };
    (desired, diagnostics)
}
