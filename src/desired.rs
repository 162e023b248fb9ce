//! The desired state of one node: its WireGuard interface and peers, routes, rules, CNI bridge
//! and masquerade ranges. A plain, comparable value; the only thing the reconciler sees.
//!
//! Pure data plus the change type between two states. Depends on the model, `ipnetwork` and
//! serde; never on netlink, Kubernetes or async code. Holds no secret (the private key stays
//! with the agent).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::model::{Endpoint, WgKey};

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// The table Kilo uses for routes into the IPIP tunnel (rules send traffic there).
pub const ENCAP_TABLE: u32 = 1107;

/// The WireGuard interface's own settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WgInterface {
    /// Interface name, e.g. `wiremesh0`.
    pub name: String,
    /// UDP listen port (the local node's endpoint port).
    pub listen_port: u16,
    /// The mesh address with the mesh subnet's prefix; `None` on a non-leader.
    pub address: Option<IpNetwork>,
    /// MTU; `None` means automatic: the underlay's MTU minus [`WgInterface::overhead`], found by
    /// the reconciler.
    pub mtu: Option<u32>,
    /// The local node's endpoint address, when it is an IP address: the automatic MTU is that of
    /// the interface traffic to it leaves by, and its family decides WireGuard's overhead.
    pub underlay: Option<IpAddr>,
    /// Whether the MSS of TCP SYNs forwarded into or out of the interface is clamped to the
    /// route's MTU, so a path smaller than the tunnel expects never blackholes TCP.
    pub mss_clamp: bool,
}

/// Bytes WireGuard adds to a packet sent over IPv4: outer IPv4 header (20) + UDP (8) + data
/// message header (type and reserved 4, receiver index 4, counter 8) + Poly1305 tag (16).
pub const WG_OVERHEAD_IPV4: u32 = 60;
/// Bytes WireGuard adds to a packet sent over IPv6: the same with a 40-byte outer header.
pub const WG_OVERHEAD_IPV6: u32 = 80;

impl WgInterface {
    /// WireGuard's per-packet overhead on this node's underlay: [`WG_OVERHEAD_IPV4`] when the
    /// node's endpoint is an IPv4 address, else [`WG_OVERHEAD_IPV6`] (an IPv6 endpoint, or none
    /// known: a DNS name may resolve to either family, so the larger is safe).
    pub fn overhead(&self) -> u32 {
        match self.underlay {
            Some(IpAddr::V4(_)) => WG_OVERHEAD_IPV4,
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => WG_OVERHEAD_IPV4,
            _ => WG_OVERHEAD_IPV6,
        }
    }
}

/// One WireGuard peer of the local interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WgPeer {
    /// The peer's public key: its identity.
    pub public_key: WgKey,
    /// Where to send packets, if known (a peer behind NAT may have none).
    pub endpoint: Option<Endpoint>,
    /// CIDRs routed to this peer, in a stable order.
    pub allowed_ips: Vec<IpNetwork>,
    /// Keepalive in seconds (0 = off): the *local* node's setting, as in Kilo.
    pub persistent_keepalive: u16,
    /// Preshared key, for external peers that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<WgKey>,
    /// What the peer stands for: the nodes of a segment, or an external peer's name.
    pub name: String,
}

/// The device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteDev {
    /// The WireGuard interface.
    WireGuard,
    /// The underlay interface that holds the node's internal IP.
    Private,
    /// The IPIP tunnel interface (encapsulation inside a location).
    Tunnel,
    /// No device: the packet is dropped. Only guard routes ([`Route::guard`]) have it.
    Blackhole,
}

/// The metric of guard routes: the lowest priority a route can have, so every other route to
/// the same destination wins while it exists.
pub const GUARD_METRIC: u32 = u32::MAX;

/// One route wiremesh owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    /// Routing table (254 = main).
    pub table: u32,
    /// Destination network.
    pub dst: IpNetwork,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Outgoing device.
    pub dev: RouteDev,
    /// Preferred source address.
    pub src: Option<IpAddr>,
    /// Whether the gateway is on-link even if no prefix covers it.
    pub onlink: bool,
}

impl Route {
    /// The fail-closed guard of a route in the main table: a blackhole to the same destination
    /// at [`GUARD_METRIC`]. The kernel uses it only while the route itself is missing (deleted
    /// behind the agent's back, flushed with the last address of its device, or between the
    /// removal and the addition of a changed route), so a packet meant for the mesh is dropped
    /// instead of following the default route out of the node unencrypted. Guards are derived
    /// by the reconciler, not the engine; `None` for routes of other tables and for guards.
    pub fn guard(&self) -> Option<Route> {
        (self.table == MAIN_TABLE && self.dev != RouteDev::Blackhole)
            .then(|| Route::blackhole(self.table, self.dst))
    }

    /// A guard route: a blackhole to `dst` in `table` (at [`GUARD_METRIC`] in the kernel).
    pub fn blackhole(table: u32, dst: IpNetwork) -> Route {
        Route {
            table,
            dst,
            gateway: None,
            dev: RouteDev::Blackhole,
            src: None,
            onlink: false,
        }
    }
}

/// The guards of `routes` ([`Route::guard`]), sorted and each once.
pub fn guards_of(routes: &[Route]) -> Vec<Route> {
    let mut out: Vec<Route> = routes.iter().filter_map(Route::guard).collect();
    out.sort();
    out.dedup();
    out
}

/// Every guard a desired state needs, sorted and each once: those of its routes, and one for
/// the subnet of the interface's address (a leader's mesh subnet, routed by the kernel's
/// connected route rather than one of ours). When leadership moves, the address goes before
/// the member's route to the leader is added (and comes before that route goes): the mesh
/// subnet stays guarded through both.
pub fn guards_of_state(d: &DesiredState) -> Vec<Route> {
    let mut out = guards_of(&d.routes);
    if let Some(a) = d.interface.address {
        let g = Route::blackhole(MAIN_TABLE, crate::model::network_of(a));
        if let Err(at) = out.binary_search(&g) {
            out.insert(at, g);
        }
    }
    out
}

/// The routes with their guards, sorted and each once: what the kernel holds when `routes` are
/// programmed.
pub fn with_guards(routes: &[Route]) -> Vec<Route> {
    let mut out = guards_of(routes);
    out.extend(routes.iter().cloned());
    out.sort();
    out.dedup();
    out
}

/// One policy-routing rule wiremesh owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Rule {
    /// Source network to match.
    pub src: Option<IpNetwork>,
    /// Destination network to match.
    pub dst: Option<IpNetwork>,
    /// Incoming interface to match.
    pub iif: Option<String>,
    /// Table to look up.
    pub table: u32,
}

/// The CNI bridge: where local pods attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bridge {
    /// Bridge name.
    pub name: String,
    /// Gateway addresses: the first host of each local pod CIDR, with the CIDR's prefix.
    pub addresses: Vec<IpNetwork>,
}

/// Which traffic is masqueraded: from `sources`, or to `destinations`, unless to `exempt`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Masquerade {
    /// Source networks whose outgoing traffic is considered (local pods, external peers).
    pub sources: Vec<IpNetwork>,
    /// Destinations whose traffic is considered whatever its source (local allowed-location-ips).
    pub destinations: Vec<IpNetwork>,
    /// Destinations never masqueraded: everything inside the mesh.
    pub exempt: Vec<IpNetwork>,
}

/// Everything one node should have programmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    /// The local node's name.
    pub node: String,
    /// Whether the local node leads its segment (only leaders hold WireGuard peers).
    pub leader: bool,
    /// The WireGuard interface.
    pub interface: WgInterface,
    /// WireGuard peers, sorted by public key.
    pub peers: Vec<WgPeer>,
    /// Routes, sorted by table and destination.
    pub routes: Vec<Route>,
    /// Policy rules, sorted.
    pub rules: Vec<Rule>,
    /// The CNI bridge, when the node has pod CIDRs.
    pub bridge: Option<Bridge>,
    /// Masquerade ranges.
    pub masquerade: Masquerade,
}

/// The difference between two desired states, as the incremental engine reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DesiredDelta {
    /// Peers added or changed (the new value).
    pub peers_upserted: Vec<WgPeer>,
    /// Keys of peers removed.
    pub peers_removed: Vec<WgKey>,
    /// Routes added.
    pub routes_added: Vec<Route>,
    /// Routes removed.
    pub routes_removed: Vec<Route>,
    /// Rules added.
    pub rules_added: Vec<Rule>,
    /// Rules removed.
    pub rules_removed: Vec<Rule>,
    /// New interface settings, when they changed.
    pub interface: Option<WgInterface>,
    /// New leadership, when it changed.
    pub leader: Option<bool>,
    /// New bridge, when it changed (`Some(None)`: removed).
    pub bridge: Option<Option<Bridge>>,
    /// New masquerade ranges, when they changed.
    pub masquerade: Option<Masquerade>,
}

impl DesiredDelta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == DesiredDelta::default()
    }

    /// The delta that turns `old` into `new`.
    pub fn between(old: &DesiredState, new: &DesiredState) -> DesiredDelta {
        let mut d = DesiredDelta::default();
        let (mut i, mut j) = (0, 0);
        while i < old.peers.len() || j < new.peers.len() {
            match (old.peers.get(i), new.peers.get(j)) {
                (Some(a), Some(b)) if a.public_key == b.public_key => {
                    if a != b {
                        d.peers_upserted.push(b.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.public_key < b.public_key => {
                    d.peers_removed.push(a.public_key);
                    i += 1;
                }
                (Some(a), None) => {
                    d.peers_removed.push(a.public_key);
                    i += 1;
                }
                (_, Some(b)) => {
                    d.peers_upserted.push(b.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let (added, removed) = set_diff(&old.routes, &new.routes);
        d.routes_added = added;
        d.routes_removed = removed;
        let (added, removed) = set_diff(&old.rules, &new.rules);
        d.rules_added = added;
        d.rules_removed = removed;
        if old.interface != new.interface {
            d.interface = Some(new.interface.clone());
        }
        if old.leader != new.leader {
            d.leader = Some(new.leader);
        }
        if old.bridge != new.bridge {
            d.bridge = Some(new.bridge.clone());
        }
        if old.masquerade != new.masquerade {
            d.masquerade = Some(new.masquerade.clone());
        }
        d
    }

    /// Apply this delta to `state` in place.
    pub fn apply_to(&self, state: &mut DesiredState) {
        let removed: BTreeSet<_> = self.peers_removed.iter().collect();
        let upserted: BTreeSet<_> = self.peers_upserted.iter().map(|p| p.public_key).collect();
        state
            .peers
            .retain(|p| !removed.contains(&p.public_key) && !upserted.contains(&p.public_key));
        state.peers.extend(self.peers_upserted.iter().cloned());
        state.peers.sort_by_key(|p| p.public_key);
        apply_set(&mut state.routes, &self.routes_added, &self.routes_removed);
        apply_set(&mut state.rules, &self.rules_added, &self.rules_removed);
        if let Some(i) = &self.interface {
            state.interface = i.clone();
        }
        if let Some(l) = self.leader {
            state.leader = l;
        }
        if let Some(b) = &self.bridge {
            state.bridge = b.clone();
        }
        if let Some(m) = &self.masquerade {
            state.masquerade = m.clone();
        }
    }
}

/// Items in `new` not in `old`, and items in `old` not in `new`; both inputs sorted.
fn set_diff<T: Ord + Clone>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                removed.push(a.clone());
                i += 1;
            }
            (Some(a), None) => {
                removed.push(a.clone());
                i += 1;
            }
            (_, Some(b)) => {
                added.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (added, removed)
}

fn apply_set<T: Ord + Clone>(set: &mut Vec<T>, added: &[T], removed: &[T]) {
    let removed: BTreeSet<&T> = removed.iter().collect();
    set.retain(|x| !removed.contains(x));
    set.extend(added.iter().cloned());
    set.sort();
    set.dedup();
}
