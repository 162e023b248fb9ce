//! The reconciler's pure core: compare the desired state with what the kernel holds *that
//! wiremesh owns*, and list the operations that close the gap.
//!
//! Pure: no I/O. Depends on the desired state and model only. `OwnedState` never contains
//! anything wiremesh did not create (foreign routes, rules, interfaces and tables are filtered
//! out when the kernel is read), so the plan can never touch them.

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::desired::{
    Bridge, DesiredDelta, DesiredState, Masquerade, Route, Rule, WgPeer, guards_of, guards_of_state,
};
use crate::model::WgKey;

/// The WireGuard device as the kernel (or the userspace daemon) reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WgDeviceState {
    /// UDP listen port.
    pub listen_port: u16,
    /// Public key of the device's private key, if one is set.
    pub public_key: Option<WgKey>,
    /// Peers by public key. `name` is empty: the kernel does not know names.
    pub peers: Vec<WgPeer>,
    /// Peers with a handshake in the last three minutes, sorted: their endpoint is where they
    /// really are (they may have roamed behind NAT), so it is not overwritten.
    pub recent_handshakes: Vec<WgKey>,
}

/// The WireGuard link's own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LinkState {
    /// Whether the link is administratively up.
    pub up: bool,
    /// Current MTU.
    pub mtu: u32,
    /// Addresses on the link.
    pub addresses: Vec<IpNetwork>,
}

/// Everything wiremesh owns in the kernel, as read back from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OwnedState {
    /// The WireGuard device, if it exists.
    pub wireguard: Option<WgDeviceState>,
    /// The WireGuard link, if it exists.
    pub link: Option<LinkState>,
    /// Routes carrying wiremesh's route protocol, sorted.
    pub routes: Vec<Route>,
    /// Rules carrying wiremesh's rule protocol, sorted.
    pub rules: Vec<Rule>,
    /// The CNI bridge, if it exists.
    pub bridge: Option<Bridge>,
    /// The masquerade configuration in wiremesh's own firewall table, if the table exists.
    pub masquerade: Option<Masquerade>,
    /// Pod CIDRs in wiremesh's CNI config file, if the file exists.
    pub cni: Option<Vec<IpNetwork>>,
    /// The pods' MTU in wiremesh's CNI config file, if the file exists and names one.
    pub cni_mtu: Option<u32>,
    /// The MTU of the underlay the WireGuard packets leave by, as read for the automatic MTU
    /// ([`super::Kernel::underlay_mtu`]); `None` when none was found or none was asked for.
    pub underlay_mtu: Option<u32>,
    /// The WireGuard interface named by wiremesh's MSS clamp rules, if they exist.
    pub mss_clamp: Option<String>,
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create the WireGuard interface.
    CreateInterface,
    /// Set the private key and listen port.
    ConfigureDevice {
        /// The listen port.
        listen_port: u16,
    },
    /// Set the link's MTU.
    SetMtu {
        /// The MTU.
        mtu: u32,
    },
    /// Add an address to the WireGuard link.
    AddAddress {
        /// The address.
        address: IpNetwork,
    },
    /// Remove an address from the WireGuard link.
    DelAddress {
        /// The address.
        address: IpNetwork,
    },
    /// Bring the WireGuard link up.
    LinkUp,
    /// Add or change one peer (its allowed IPs are replaced, other peers are left alone).
    UpsertPeer(Box<WgPeer>),
    /// Replace the allowed IPs of a peer the device has, and change nothing else of it: a
    /// renumbered mesh IP (a join or leave in full granularity renumbers half the mesh) goes to
    /// the device as the peer's key and allowed IPs only.
    SetAllowedIps {
        /// The peer's public key.
        public_key: WgKey,
        /// Its allowed IPs, all of them.
        allowed_ips: Vec<IpNetwork>,
    },
    /// Remove one peer.
    RemovePeer {
        /// The peer's public key.
        public_key: WgKey,
    },
    /// Create the CNI bridge or set its addresses.
    SetBridge(Bridge),
    /// Write the CNI config file for these pod CIDRs.
    WriteCni {
        /// The node's pod CIDRs.
        pod_cidrs: Vec<IpNetwork>,
        /// The pods' MTU: the WireGuard link's, so a full-size pod packet fits the tunnel.
        mtu: u32,
    },
    /// Replace wiremesh's masquerade table.
    SetMasquerade(Box<Masquerade>),
    /// Remove wiremesh's masquerade table.
    DelMasquerade,
    /// Clamp the MSS of TCP SYNs forwarded into or out of this WireGuard interface to the
    /// route's MTU (replacing wiremesh's clamp rules).
    SetMssClamp {
        /// The WireGuard interface.
        interface: String,
    },
    /// Remove wiremesh's MSS clamp rules.
    DelMssClamp,
    /// Remove a rule.
    DelRule(Rule),
    /// Remove a route.
    DelRoute(Route),
    /// Add a route.
    AddRoute(Route),
    /// Add a rule.
    AddRule(Rule),
}

impl Op {
    /// The kind of the operation, as logs and metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::CreateInterface => "create-interface",
            Op::ConfigureDevice { .. } => "configure-device",
            Op::SetMtu { .. } => "set-mtu",
            Op::AddAddress { .. } | Op::DelAddress { .. } => "address",
            Op::LinkUp => "link-up",
            Op::UpsertPeer(_) | Op::SetAllowedIps { .. } | Op::RemovePeer { .. } => "peer",
            Op::SetBridge(_) => "bridge",
            Op::WriteCni { .. } => "cni-config",
            Op::SetMasquerade(_) | Op::DelMasquerade => "masquerade",
            Op::SetMssClamp { .. } | Op::DelMssClamp => "mss-clamp",
            Op::AddRoute(_) | Op::DelRoute(_) => "route",
            Op::AddRule(_) | Op::DelRule(_) => "rule",
        }
    }
}

/// Peers that differ: the desired value for each added or changed peer (by reference: the
/// plan of a whole mesh copies each once, into its operation), and keys to remove.
///
/// The name is for people only and is ignored: the kernel does not store it. `recent` lists
/// peers with a recent handshake (see [`same_peer`]), sorted.
pub fn peer_diff<'a>(
    desired: &'a [WgPeer],
    actual: &'a [WgPeer],
    recent: &[WgKey],
) -> (Vec<&'a WgPeer>, Vec<WgKey>) {
    // Both sides are usually sorted by key already (the engine's state, the kernel as read):
    // then this only checks that and merges, with no map of either side.
    let (mut upsert, mut remove) = (Vec::new(), Vec::new());
    merge(
        &by_key(desired),
        &by_key(actual),
        |a, b| a.public_key.cmp(&b.public_key),
        |m| match m {
            Merged::Both(w, h) if same_peer(w, h, recent.binary_search(&w.public_key).is_ok()) => {}
            Merged::Both(w, _) | Merged::Want(w) => upsert.push(w),
            Merged::Have(h) => remove.push(h.public_key),
        },
    );
    (upsert, remove)
}

/// One item of a merge of two sorted lists: in both, or in one of them.
enum Merged<'a, T> {
    Both(&'a T, &'a T),
    Want(&'a T),
    Have(&'a T),
}

/// Walk two lists sorted by `cmp` (without repeats) side by side.
fn merge<'a, T>(
    want: &[&'a T],
    have: &[&'a T],
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
    mut f: impl FnMut(Merged<'a, T>),
) {
    use std::cmp::Ordering;
    let (mut i, mut j) = (0, 0);
    loop {
        match (want.get(i), have.get(j)) {
            (Some(w), Some(h)) => match cmp(w, h) {
                Ordering::Equal => {
                    f(Merged::Both(w, h));
                    i += 1;
                    j += 1;
                }
                Ordering::Less => {
                    f(Merged::Want(w));
                    i += 1;
                }
                Ordering::Greater => {
                    f(Merged::Have(h));
                    j += 1;
                }
            },
            (Some(w), None) => {
                f(Merged::Want(w));
                i += 1;
            }
            (None, Some(h)) => {
                f(Merged::Have(h));
                j += 1;
            }
            (None, None) => break,
        }
    }
}

/// The peers sorted by key, the last of equal keys kept (as a map would).
fn by_key(peers: &[WgPeer]) -> Vec<&WgPeer> {
    let mut v: Vec<&WgPeer> = peers.iter().collect();
    if !v.is_sorted_by(|a, b| a.public_key < b.public_key) {
        v.reverse();
        v.sort_by_key(|p| p.public_key);
        v.dedup_by_key(|p| p.public_key);
    }
    v
}

/// Whether the kernel's peer already matches the desired one. Allowed IPs are compared as sets.
/// The endpoint matches when it is equal, and also when:
/// - none is desired (WireGuard cannot clear an endpoint; the peer's packets set it);
/// - a DNS name is desired and the device holds an address with that port (the resolved name);
/// - the peer had a recent handshake (`recent`): it reached us from where it really is, e.g.
///   behind NAT, and overwriting that with the published address would cut it off.
pub fn same_peer(want: &WgPeer, have: &WgPeer, recent: bool) -> bool {
    let mut a = want.allowed_ips.clone();
    let mut b = have.allowed_ips.clone();
    a.sort();
    b.sort();
    a == b && same_but_allowed_ips(want, have, recent)
}

/// Whether the kernel's peer matches the desired one in everything but its allowed IPs
/// (endpoint as [`same_peer`] takes it, keepalive, preshared key).
fn same_but_allowed_ips(want: &WgPeer, have: &WgPeer, recent: bool) -> bool {
    use crate::model::Endpoint;
    let endpoint_ok = match (&want.endpoint, &have.endpoint) {
        (None, _) => true,
        (Some(w), Some(h)) if w == h => true,
        (Some(Endpoint::Dns { port, .. }), Some(Endpoint::Addr(a))) => a.port() == *port,
        (Some(_), Some(_)) => recent,
        (Some(_), None) => false,
    };
    endpoint_ok
        && want.persistent_keepalive == have.persistent_keepalive
        && want.preshared_key == have.preshared_key
}

/// `want` as it goes to the device: with the device's endpoint instead of the desired address
/// when the peer had a recent handshake from there (see [`same_peer`]). A change of anything
/// else (allowed IPs, keepalive) must not undo the roaming of a peer behind NAT: sent to its
/// published address, which it cannot be reached at, it would stay cut off until its next
/// keepalive.
/// The operation that makes the device's peer `have` (if any) the desired `want`: its allowed
/// IPs alone when nothing else differs, else the whole peer (see [`upsert_of`]).
fn peer_op(want: &WgPeer, have: Option<&WgPeer>, recent: bool) -> Op {
    match have {
        Some(h) if same_but_allowed_ips(want, h, recent) => Op::SetAllowedIps {
            public_key: want.public_key,
            allowed_ips: want.allowed_ips.clone(),
        },
        _ => Op::UpsertPeer(Box::new(upsert_of(want, have, recent))),
    }
}

fn upsert_of(want: &WgPeer, have: Option<&WgPeer>, recent: bool) -> WgPeer {
    use crate::model::Endpoint;
    let mut p = want.clone();
    if recent
        && matches!(want.endpoint, Some(Endpoint::Addr(_)))
        && let Some(h) = have
        && h.endpoint.is_some()
    {
        p.endpoint.clone_from(&h.endpoint);
    }
    p
}

/// Items of `want` not in `have`, and items of `have` not in `want`, each sorted and once, by
/// reference (copied once, into their operations).
fn sorted_diff<'a, T: Ord>(want: &'a [T], have: &'a [T]) -> (Vec<&'a T>, Vec<&'a T>) {
    diff_refs(&sorted_set(want), have)
}

/// [`sorted_diff`] of items already sorted and deduplicated, by reference, against `have`.
fn diff_refs<'a, T: Ord>(want: &[&'a T], have: &'a [T]) -> (Vec<&'a T>, Vec<&'a T>) {
    let (mut add, mut del) = (Vec::new(), Vec::new());
    merge(want, &sorted_set(have), T::cmp, |m| match m {
        Merged::Both(..) => {}
        Merged::Want(w) => add.push(w),
        Merged::Have(h) => del.push(h),
    });
    (add, del)
}

/// The items, by reference, sorted and deduplicated (a check when they already are).
fn sorted_set<T: Ord>(items: &[T]) -> Vec<&T> {
    let mut v: Vec<&T> = items.iter().collect();
    if !v.is_sorted_by(|a, b| a < b) {
        v.sort();
        v.dedup();
    }
    v
}

/// The operations that turn `actual` into `desired`, in the order they must run: interface
/// first (a new address before the old one goes), then peers, bridge and firewall, then rule and
/// route removals, then additions, and the CNI config last. Every route of the main table comes
/// with its guard ([`Route::guard`]). An automatic MTU is computed from `actual.underlay_mtu`
/// ([`super::mtu::wanted_mtu`]), and the CNI config gives pods the same MTU.
///
/// `public_key` is the public key of the private key the agent holds: when the device reports
/// another one (or none), the device is configured again.
pub fn plan(desired: &DesiredState, actual: &OwnedState, public_key: WgKey) -> Vec<Op> {
    let mut ops = Vec::new();
    let iface = &desired.interface;
    let device = actual.wireguard.as_ref();
    if actual.link.is_none() {
        ops.push(Op::CreateInterface);
    }
    if device.is_none_or(|d| d.listen_port != iface.listen_port || d.public_key != Some(public_key))
    {
        ops.push(Op::ConfigureDevice {
            listen_port: iface.listen_port,
        });
    }
    let link = actual.link.clone().unwrap_or_default();
    let mtu = super::mtu::wanted_mtu(desired, actual.underlay_mtu);
    if link.mtu != mtu {
        ops.push(Op::SetMtu { mtu });
    }
    let want_addrs: Vec<IpNetwork> = iface.address.into_iter().collect();
    // The new address before the old one goes: an interface left without an IPv4 address for
    // a moment loses every route through it, silently (see `Netlink::add_address`).
    let (add, del) = sorted_diff(&want_addrs, &link.addresses);
    ops.extend(add.into_iter().map(|&address| Op::AddAddress { address }));
    ops.extend(del.into_iter().map(|&address| Op::DelAddress { address }));
    if !link.up {
        ops.push(Op::LinkUp);
    }
    let (upsert, remove) = peer_diff(
        &desired.peers,
        device.map_or(&[][..], |d| &d.peers),
        device.map_or(&[][..], |d| &d.recent_handshakes),
    );
    let (add_rules, del_rules) = sorted_diff(&desired.rules, &actual.rules);
    // Every route of the main table with its guard (see `Route::guard`), and the mesh subnet's
    // on a leader, by reference: only the guards are new values, the routes are not copied.
    let guards = guards_of_state(desired);
    let mut want_routes: Vec<&Route> = desired.routes.iter().chain(&guards).collect();
    want_routes.sort();
    want_routes.dedup();
    let (add_routes, del_routes) = diff_refs(&want_routes, &actual.routes);
    // Sized once: a whole mesh renumbered is tens of thousands of operations, and growing by
    // doubling would hold up to twice their size at the worst moment. The differences above are
    // references, so each changed peer and route is copied once, here.
    ops.reserve_exact(
        upsert.len()
            + remove.len()
            + add_rules.len()
            + del_rules.len()
            + add_routes.len()
            + del_routes.len()
            + 3,
    );
    ops.extend(
        remove
            .into_iter()
            .map(|public_key| Op::RemovePeer { public_key }),
    );
    let have_of = |k: &WgKey| {
        device.and_then(|d| {
            d.peers
                .binary_search_by_key(k, |q| q.public_key)
                .ok()
                .map(|i| &d.peers[i])
        })
    };
    let recent_of =
        |k: &WgKey| device.is_some_and(|d| d.recent_handshakes.binary_search(k).is_ok());
    ops.extend(
        upsert
            .into_iter()
            .map(|p| peer_op(p, have_of(&p.public_key), recent_of(&p.public_key))),
    );
    if let Some(b) = &desired.bridge
        && actual.bridge.as_ref() != Some(b)
    {
        ops.push(Op::SetBridge(b.clone()));
    }
    let want_nat =
        !desired.masquerade.sources.is_empty() || !desired.masquerade.destinations.is_empty();
    // The firewall holds (and reports) the canonical form: sorted, overlaps merged.
    let want = super::nft::canonical(&desired.masquerade);
    match (&actual.masquerade, want_nat) {
        (Some(m), true) if *m == want => {}
        (_, true) => ops.push(Op::SetMasquerade(Box::new(want))),
        (Some(_), false) => ops.push(Op::DelMasquerade),
        (None, false) => {}
    }
    let clamp = iface.mss_clamp.then_some(&iface.name);
    match (&actual.mss_clamp, clamp) {
        (Some(have), Some(want)) if have == want => {}
        (_, Some(want)) => ops.push(Op::SetMssClamp {
            interface: want.clone(),
        }),
        (Some(_), None) => ops.push(Op::DelMssClamp),
        (None, None) => {}
    }
    ops.extend(del_rules.into_iter().cloned().map(Op::DelRule));
    ops.extend(del_routes.into_iter().cloned().map(Op::DelRoute));
    ops.extend(add_routes.into_iter().cloned().map(Op::AddRoute));
    ops.extend(add_rules.into_iter().cloned().map(Op::AddRule));
    // The CNI config last: pods can start once it exists, and their packets must find every
    // route (and guard) of the mesh already there.
    if let Some(b) = &desired.bridge {
        let cidrs: Vec<IpNetwork> = b
            .addresses
            .iter()
            .map(|a| crate::model::network_of(*a))
            .collect();
        if actual.cni.as_ref() != Some(&cidrs) || actual.cni_mtu != Some(mtu) {
            ops.push(Op::WriteCni {
                pod_cidrs: cidrs,
                mtu,
            });
        }
    }
    ops
}

/// The guards ([`Route::guard`]) that `added` and `removed` routes bring and take: a guard
/// depends only on its route's table and destination, so a route that changes (removed and
/// added again with another gateway) keeps its guard untouched.
fn guard_delta(added: &[Route], removed: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let (add, del) = (guards_of(added), guards_of(removed));
    let keep = |g: &[Route], other: &[Route]| -> Vec<Route> {
        g.iter()
            .filter(|r| other.binary_search(r).is_err())
            .cloned()
            .collect()
    };
    (keep(&add, &del), keep(&del, &add))
}

/// The operations for one engine delta, planned against `actual` (the state the previous
/// desired state left): work proportional to the change instead of to the mesh. Returns `None`
/// when the delta touches the interface, leadership or bridge; then [`plan`] must run.
///
/// Takes the delta to move its peers and routes into the operations: a node leaving a full
/// mesh renumbers thousands of them, which need not be held twice.
pub fn plan_delta(delta: DesiredDelta, actual: &OwnedState) -> Option<Vec<Op>> {
    if delta.interface.is_some() || delta.leader.is_some() || delta.bridge.is_some() {
        return None;
    }
    let device = actual.wireguard.as_ref()?;
    let find = |k: &WgKey| {
        device
            .peers
            .binary_search_by_key(k, |p| p.public_key)
            .ok()
            .map(|i| &device.peers[i])
    };
    let mut ops = Vec::new();
    for k in delta.peers_removed {
        if find(&k).is_some() {
            ops.push(Op::RemovePeer { public_key: k });
        }
    }
    for p in delta.peers_upserted {
        let have = find(&p.public_key);
        let recent = device
            .recent_handshakes
            .binary_search(&p.public_key)
            .is_ok();
        if !have.is_some_and(|h| same_peer(&p, h, recent)) {
            ops.push(peer_op(&p, have, recent));
        }
    }
    if let Some(m) = &delta.masquerade {
        let want = super::nft::canonical(m);
        if actual.masquerade.as_ref() != Some(&want) {
            ops.push(Op::SetMasquerade(Box::new(want)));
        }
    }
    let (guards_added, guards_removed) = guard_delta(&delta.routes_added, &delta.routes_removed);
    let mut routes_removed = delta.routes_removed;
    routes_removed.extend(guards_removed);
    let mut routes_added = delta.routes_added;
    routes_added.extend(guards_added);
    ops.extend(moved_where(
        delta.rules_removed,
        &actual.rules,
        true,
        Op::DelRule,
    ));
    ops.extend(moved_where(
        routes_removed,
        &actual.routes,
        true,
        Op::DelRoute,
    ));
    ops.extend(moved_where(
        routes_added,
        &actual.routes,
        false,
        Op::AddRoute,
    ));
    ops.extend(moved_where(
        delta.rules_added,
        &actual.rules,
        false,
        Op::AddRule,
    ));
    Some(ops)
}

/// The operations `op(item)` for the items whose presence in `have` (sorted) is `present`.
fn moved_where<T: Ord>(
    items: Vec<T>,
    have: &[T],
    present: bool,
    op: fn(T) -> Op,
) -> impl Iterator<Item = Op> {
    items
        .into_iter()
        .filter(move |i| have.binary_search(i).is_ok() == present)
        .map(op)
}

/// Apply `ops` to an in-memory [`OwnedState`], as a correct kernel would. Used by tests of the
/// planner and by the agent to know the kernel's state after a reconciliation without reading
/// it back; `public_key` is what a configured device reports. Peers, routes and rules stay
/// sorted (as the kernel is read), so each operation is a binary search: thousands of them on
/// a mesh of thousands of peers cost milliseconds, not seconds.
pub fn simulate(state: &mut OwnedState, ops: &[Op], public_key: WgKey) {
    for op in ops {
        apply_op(state, op.clone(), public_key);
    }
}

/// Apply one operation to an in-memory [`OwnedState`], as [`simulate`] does, keeping what the
/// operation carries instead of copying it: after a whole mesh's reconciliation the applied
/// peers and routes move into the state the agent keeps, so they are never held twice.
pub fn apply_op(state: &mut OwnedState, op: Op, public_key: WgKey) {
    match op {
        Op::CreateInterface => {
            state.link = Some(LinkState {
                up: false,
                mtu: 1420,
                addresses: Vec::new(),
            });
            state.wireguard.get_or_insert_with(WgDeviceState::default);
        }
        Op::ConfigureDevice { listen_port } => {
            let d = state.wireguard.get_or_insert_with(WgDeviceState::default);
            d.listen_port = listen_port;
            d.public_key = Some(public_key);
        }
        Op::SetMtu { mtu } => {
            if let Some(l) = &mut state.link {
                l.mtu = mtu;
            }
        }
        Op::AddAddress { address } => {
            if let Some(l) = &mut state.link {
                l.addresses.push(address);
                l.addresses.sort();
            }
        }
        Op::DelAddress { address } => {
            if let Some(l) = &mut state.link {
                l.addresses.retain(|a| *a != address);
            }
        }
        Op::LinkUp => {
            if let Some(l) = &mut state.link {
                l.up = true;
            }
        }
        Op::UpsertPeer(p) => {
            let d = state.wireguard.get_or_insert_with(WgDeviceState::default);
            let mut p = *p;
            // The kernel does not store names; an empty String holds no memory.
            p.name = String::new();
            match d
                .peers
                .binary_search_by_key(&p.public_key, |q| q.public_key)
            {
                Ok(i) => d.peers[i] = p,
                Err(i) => d.peers.insert(i, p),
            }
        }
        Op::SetAllowedIps {
            public_key,
            allowed_ips,
        } => {
            if let Some(d) = &mut state.wireguard
                && let Ok(i) = d.peers.binary_search_by_key(&public_key, |q| q.public_key)
            {
                d.peers[i].allowed_ips = allowed_ips;
            }
        }
        Op::RemovePeer { public_key } => {
            if let Some(d) = &mut state.wireguard
                && let Ok(i) = d.peers.binary_search_by_key(&public_key, |q| q.public_key)
            {
                d.peers.remove(i);
            }
        }
        Op::SetBridge(b) => state.bridge = Some(b),
        Op::WriteCni { pod_cidrs, mtu } => {
            state.cni = Some(pod_cidrs);
            state.cni_mtu = Some(mtu);
        }
        Op::SetMasquerade(m) => state.masquerade = Some(*m),
        Op::DelMasquerade => state.masquerade = None,
        Op::SetMssClamp { interface } => state.mss_clamp = Some(interface),
        Op::DelMssClamp => state.mss_clamp = None,
        Op::DelRule(r) => sorted_remove(&mut state.rules, &r),
        Op::AddRule(r) => sorted_insert(&mut state.rules, r),
        Op::DelRoute(r) => sorted_remove(&mut state.routes, &r),
        Op::AddRoute(r) => sorted_insert(&mut state.routes, r),
    }
}

/// Insert `item` into the sorted set `v` unless it is there.
fn sorted_insert<T: Ord>(v: &mut Vec<T>, item: T) {
    if let Err(i) = v.binary_search(&item) {
        v.insert(i, item);
    }
}

/// Remove `item` from the sorted set `v` if it is there.
fn sorted_remove<T: Ord>(v: &mut Vec<T>, item: &T) {
    if let Ok(i) = v.binary_search(item) {
        v.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{guards_of_state, with_guards};

    /// The routes the kernel holds once `d` is programmed: its routes, their guards and the
    /// mesh subnet's guard on a leader.
    fn kernel_routes(d: &DesiredState) -> Vec<Route> {
        let mut all = with_guards(&d.routes);
        all.extend(guards_of_state(d));
        all.sort();
        all.dedup();
        all
    }
    use crate::model::{MeshNode, NodeName};
    use crate::topology::{Encapsulate, MeshOptions, compute};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn desired(n: u8, local: u8) -> DesiredState {
        let nodes: Vec<MeshNode> = (0..n)
            .map(|i| {
                let mut m = MeshNode::new(format!("n{i}"));
                m.key = Some(WgKey([i + 1; 32]));
                m.endpoint = Some(format!("203.0.113.{i}:51820").parse().unwrap());
                m.pod_cidrs = vec![format!("10.42.{i}.0/24").parse().unwrap()];
                m.internal_ip = Some(format!("192.168.0.{}/24", i + 1).parse().unwrap());
                m.location = format!("l{}", i % 2);
                m
            })
            .collect();
        let o = MeshOptions {
            encapsulate: Encapsulate::Always,
            ..MeshOptions::default()
        };
        compute(&nodes, &[], &NodeName(format!("n{local}")), &o)
            .unwrap()
            .desired
    }

    const ME: WgKey = WgKey([200; 32]);

    #[test]
    fn empty_kernel_gets_everything_in_dependency_order() {
        let d = desired(4, 0);
        let ops = plan(&d, &OwnedState::default(), ME);
        assert_eq!(ops[0], Op::CreateInterface);
        assert_eq!(ops[1], Op::ConfigureDevice { listen_port: 51820 });
        assert!(ops.contains(&Op::WriteCni {
            pod_cidrs: vec!["10.42.0.0/24".parse().unwrap()],
            mtu: super::super::mtu::FALLBACK_MTU,
        }));
        assert!(ops.contains(&Op::SetMtu {
            mtu: super::super::mtu::FALLBACK_MTU
        }));
        assert!(ops.contains(&Op::SetMssClamp {
            interface: "wiremesh0".into()
        }));
        let first_route = ops
            .iter()
            .position(|o| matches!(o, Op::AddRoute(_)))
            .unwrap();
        let last_peer = ops
            .iter()
            .rposition(|o| matches!(o, Op::UpsertPeer(_)))
            .unwrap();
        assert!(last_peer < first_route, "routes come after peers");
        assert_eq!(
            ops.iter().filter(|o| matches!(o, Op::AddRoute(_))).count(),
            kernel_routes(&d).len()
        );
    }

    #[test]
    fn an_automatic_mtu_follows_the_underlay_and_pods_get_the_same() {
        let d = desired(3, 0);
        assert_eq!(d.interface.underlay, "203.0.113.0".parse().ok());
        let mut k = OwnedState::default();
        let first = plan(&d, &k, ME);
        simulate(&mut k, &first, ME);
        assert_eq!(
            k.link.as_ref().map(|l| l.mtu),
            Some(1420),
            "no underlay read"
        );
        // The underlay turns out to be 1280 bytes (IPv4 endpoint: 60 bytes of overhead).
        k.underlay_mtu = Some(1280);
        let ops = plan(&d, &k, ME);
        assert_eq!(
            ops,
            vec![
                Op::SetMtu { mtu: 1220 },
                Op::WriteCni {
                    pod_cidrs: vec!["10.42.0.0/24".parse().unwrap()],
                    mtu: 1220
                }
            ]
        );
        simulate(&mut k, &ops, ME);
        assert_eq!(plan(&d, &k, ME), vec![], "in place: nothing to do");
        // A fixed MTU wins over the underlay, for the link and the pods alike.
        let mut fixed = d.clone();
        fixed.interface.mtu = Some(1300);
        let ops = plan(&fixed, &k, ME);
        assert_eq!(ops.first(), Some(&Op::SetMtu { mtu: 1300 }));
        assert!(matches!(ops.last(), Some(Op::WriteCni { mtu: 1300, .. })));
    }

    #[test]
    fn the_mss_clamp_is_set_once_repaired_when_changed_and_removed_when_off() {
        let d = desired(3, 0);
        let clamp_ops = |d: &DesiredState, have: Option<&str>| -> Vec<Op> {
            let actual = OwnedState {
                mss_clamp: have.map(str::to_owned),
                ..OwnedState::default()
            };
            plan(d, &actual, ME)
                .into_iter()
                .filter(|o| o.kind() == "mss-clamp")
                .collect()
        };
        let set = vec![Op::SetMssClamp {
            interface: "wiremesh0".into(),
        }];
        assert_eq!(clamp_ops(&d, None), set);
        assert_eq!(clamp_ops(&d, Some("wiremesh0")), vec![], "read back: no-op");
        assert_eq!(clamp_ops(&d, Some("")), set, "changed by hand: replaced");
        assert_eq!(clamp_ops(&d, Some("wg9")), set, "another interface");
        let mut off = d.clone();
        off.interface.mss_clamp = false;
        assert_eq!(clamp_ops(&off, Some("wiremesh0")), vec![Op::DelMssClamp]);
        assert_eq!(clamp_ops(&off, None), vec![]);
    }

    #[test]
    fn the_cni_config_is_written_after_every_route_and_rule() {
        // Pods start once the config exists: their packets must find the mesh in place.
        let d = desired(4, 0);
        let ops = plan(&d, &OwnedState::default(), ME);
        let cni = ops
            .iter()
            .position(|o| matches!(o, Op::WriteCni { .. }))
            .unwrap();
        let last_route_or_rule = ops
            .iter()
            .rposition(|o| matches!(o, Op::AddRoute(_) | Op::AddRule(_)))
            .unwrap();
        assert!(last_route_or_rule < cni, "{ops:?}");
        assert_eq!(cni, ops.len() - 1);
    }

    #[test]
    fn a_new_address_is_added_before_the_old_one_is_removed() {
        // Removing the last IPv4 address first would drop every route through the link.
        let d = desired(4, 0);
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        let mut d2 = d.clone();
        d2.interface.address = Some("10.4.0.9/16".parse().unwrap());
        let ops = plan(&d2, &k, ME);
        assert_eq!(
            ops,
            vec![
                Op::AddAddress {
                    address: "10.4.0.9/16".parse().unwrap()
                },
                Op::DelAddress {
                    address: d.interface.address.unwrap()
                },
            ]
        );
    }

    #[test]
    fn every_main_table_route_gets_a_blackhole_guard_and_other_tables_none() {
        let d = desired(6, 1);
        assert!(
            d.routes
                .iter()
                .any(|r| r.table != crate::desired::MAIN_TABLE),
            "the sample needs routes of another table too"
        );
        let ops = plan(&d, &OwnedState::default(), ME);
        let added: Vec<&Route> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        for r in &d.routes {
            let guarded = added.iter().any(|g| {
                g.dev == crate::desired::RouteDev::Blackhole && g.dst == r.dst && g.table == r.table
            });
            assert_eq!(guarded, r.table == crate::desired::MAIN_TABLE, "{r:?}");
            assert!(added.contains(&r), "{r:?}");
        }
        let guards = added
            .iter()
            .filter(|g| g.dev == crate::desired::RouteDev::Blackhole)
            .count();
        let mut main: std::collections::BTreeSet<_> = d
            .routes
            .iter()
            .filter(|r| r.table == crate::desired::MAIN_TABLE)
            .map(|r| r.dst)
            .collect();
        // A leader's mesh subnet (its address's connected route) is guarded too.
        main.extend(d.interface.address.map(crate::model::network_of));
        assert_eq!(guards, main.len(), "one guard per destination");
    }

    #[test]
    fn a_delta_brings_and_takes_guards_with_destinations_and_leaves_a_changed_routes_guard() {
        let route = |dst: &str, gw: Option<&str>| Route {
            table: crate::desired::MAIN_TABLE,
            dst: dst.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            dev: crate::desired::RouteDev::Private,
            src: None,
            onlink: gw.is_some(),
        };
        let (kept, moved_old, gone) = (
            route("10.42.1.0/24", None),
            route("10.42.2.0/24", Some("192.168.0.2")),
            route("10.42.3.0/24", None),
        );
        let state = OwnedState {
            wireguard: Some(WgDeviceState::default()),
            routes: with_guards(&[kept.clone(), moved_old.clone(), gone.clone()]),
            ..OwnedState::default()
        };
        let moved_new = route("10.42.2.0/24", Some("192.168.0.3"));
        let new = route("10.42.4.0/24", None);
        let delta = DesiredDelta {
            routes_added: vec![moved_new.clone(), new.clone()],
            routes_removed: vec![moved_old.clone(), gone.clone()],
            ..DesiredDelta::default()
        };
        let ops = plan_delta(delta, &state).unwrap();
        let mut dels: Vec<Route> = ops
            .iter()
            .filter_map(|o| match o {
                Op::DelRoute(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let mut adds: Vec<Route> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddRoute(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        dels.sort();
        adds.sort();
        let mut want_dels = vec![moved_old, gone.clone(), gone.guard().unwrap()];
        want_dels.sort();
        let mut want_adds = vec![moved_new, new.clone(), new.guard().unwrap()];
        want_adds.sort();
        assert_eq!(dels, want_dels);
        assert_eq!(adds, want_adds);
        // The changed route's guard stays put the whole time (no window without one), and a
        // route the delta does not name is not touched.
        let moved_dst: IpNetwork = "10.42.2.0/24".parse().unwrap();
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::DelRoute(r) | Op::AddRoute(r)
            if (r.dev == crate::desired::RouteDev::Blackhole && r.dst == moved_dst)
                || r.dst == kept.dst))
        );
    }

    #[test]
    fn second_plan_after_applying_is_empty() {
        let d = desired(4, 0);
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        assert_eq!(plan(&d, &k, ME), Vec::<Op>::new());
    }

    #[test]
    fn one_changed_peer_is_the_only_peer_op() {
        let d = desired(5, 0);
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        let mut d2 = d.clone();
        d2.peers[0].endpoint = Some("198.51.100.9:4000".parse().unwrap());
        let ops = plan(&d2, &k, ME);
        assert_eq!(ops, vec![Op::UpsertPeer(Box::new(d2.peers[0].clone()))]);
    }

    #[test]
    fn peer_names_and_allowed_ip_order_do_not_cause_rewrites() {
        let d = desired(3, 0);
        let mut have = d.peers.clone();
        for p in &mut have {
            p.name.clear();
            p.allowed_ips.reverse();
        }
        assert_eq!(peer_diff(&d.peers, &have, &[]), (vec![], vec![]));
    }

    #[test]
    fn roamed_endpoint_of_a_recent_peer_is_kept_and_a_stale_one_is_fixed() {
        let d = desired(3, 0);
        let mut have = d.peers.clone();
        have[0].endpoint = Some("198.51.100.77:40000".parse().unwrap());
        let key = have[0].public_key;
        assert_eq!(peer_diff(&d.peers, &have, &[key]), (vec![], vec![]));
        assert_eq!(peer_diff(&d.peers, &have, &[]).0, vec![&d.peers[0]]);
    }

    /// The peers a plan upserts, as sent.
    fn upserts(ops: Vec<Op>) -> Vec<WgPeer> {
        ops.into_iter()
            .filter_map(|o| match o {
                Op::UpsertPeer(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_recent_peer_changed_for_another_reason_keeps_its_roamed_endpoint() {
        let d = desired(3, 0);
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        // The peer roamed (behind NAT) and shook hands from there.
        let roamed: crate::model::Endpoint = "198.51.100.77:40000".parse().unwrap();
        let dev = k.wireguard.as_mut().unwrap();
        dev.peers[0].endpoint = Some(roamed.clone());
        let key = dev.peers[0].public_key;
        dev.recent_handshakes = vec![key];
        // Its allowed IPs change (a renumbering): only they go to the device, which keeps the
        // roamed endpoint.
        let mut d2 = d.clone();
        let i = d2.peers.iter().position(|p| p.public_key == key).unwrap();
        d2.peers[i]
            .allowed_ips
            .push("10.99.0.0/24".parse().unwrap());
        let peer_ops: Vec<Op> = plan(&d2, &k, ME)
            .into_iter()
            .filter(|o| o.kind() == "peer")
            .collect();
        assert_eq!(
            peer_ops,
            vec![Op::SetAllowedIps {
                public_key: key,
                allowed_ips: d2.peers[i].allowed_ips.clone()
            }]
        );
        // Its keepalive changes too: the whole peer goes, with the roamed endpoint.
        let mut d3 = d2.clone();
        d3.peers[i].persistent_keepalive += 7;
        let ups = upserts(plan(&d3, &k, ME));
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].endpoint, Some(roamed.clone()));
        assert!(
            ups[0]
                .allowed_ips
                .contains(&"10.99.0.0/24".parse().unwrap())
        );
        // Without a recent handshake the desired (published) endpoint is sent.
        k.wireguard.as_mut().unwrap().recent_handshakes.clear();
        let ups = upserts(plan(&d2, &k, ME));
        assert_eq!(ups[0].endpoint, d2.peers[i].endpoint);
    }

    #[test]
    fn no_desired_endpoint_and_resolved_dns_names_match_what_the_device_has() {
        let d = desired(2, 0);
        let mut want = d.peers.clone();
        let mut have = d.peers.clone();
        want[0].endpoint = None;
        have[0].endpoint = Some("198.51.100.77:40000".parse().unwrap());
        assert_eq!(peer_diff(&want, &have, &[]), (vec![], vec![]));
        want[0].endpoint = Some("node.example.com:51820".parse().unwrap());
        have[0].endpoint = Some("198.51.100.7:51820".parse().unwrap());
        assert_eq!(peer_diff(&want, &have, &[]), (vec![], vec![]));
    }

    #[test]
    fn device_with_another_key_is_configured_again() {
        let d = desired(3, 0);
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        let other = WgKey([9; 32]);
        assert_eq!(
            plan(&d, &k, other),
            vec![Op::ConfigureDevice { listen_port: 51820 }]
        );
    }

    proptest! {
        /// The merge in `peer_diff` and `sorted_diff` gives what maps and sets of both sides
        /// give, whether the inputs come sorted or not, with repeated keys or not.
        #[test]
        fn diffs_equal_the_set_difference_for_any_order(
            want in proptest::collection::vec((0..8u8, 0..3u8), 0..10),
            have in proptest::collection::vec((0..8u8, 0..3u8), 0..10),
            sort_want: bool,
            sort_have: bool,
        ) {
            let peer = |&(k, ip): &(u8, u8)| WgPeer {
                public_key: WgKey([k; 32]),
                endpoint: None,
                allowed_ips: vec![format!("10.9.{ip}.0/24").parse().unwrap()],
                persistent_keepalive: 0,
                preshared_key: None,
                name: String::new(),
            };
            let mut w: Vec<WgPeer> = want.iter().map(peer).collect();
            let mut h: Vec<WgPeer> = have.iter().map(peer).collect();
            if sort_want {
                w.sort_by_key(|p| p.public_key);
            }
            if sort_have {
                h.sort_by_key(|p| p.public_key);
            }
            let wm: BTreeMap<WgKey, &WgPeer> = w.iter().map(|p| (p.public_key, p)).collect();
            let hm: BTreeMap<WgKey, &WgPeer> = h.iter().map(|p| (p.public_key, p)).collect();
            let (upsert, remove) = peer_diff(&w, &h, &[]);
            let want_upsert: Vec<&WgPeer> = wm
                .iter()
                .filter(|(k, p)| hm.get(*k).is_none_or(|q| !same_peer(p, q, false)))
                .map(|(_, p)| *p)
                .collect();
            let want_remove: Vec<WgKey> =
                hm.keys().filter(|k| !wm.contains_key(*k)).copied().collect();
            prop_assert_eq!(upsert, want_upsert);
            prop_assert_eq!(remove, want_remove);

            let ws: std::collections::BTreeSet<(u8, u8)> = want.iter().copied().collect();
            let hs: std::collections::BTreeSet<(u8, u8)> = have.iter().copied().collect();
            let (add, del) = sorted_diff(&want, &have);
            prop_assert_eq!(add, ws.difference(&hs).collect::<Vec<_>>());
            prop_assert_eq!(del, hs.difference(&ws).collect::<Vec<_>>());
        }
    }

    fn renumbered() -> (WgPeer, WgPeer) {
        let old = WgPeer {
            public_key: WgKey([3; 32]),
            endpoint: Some(crate::model::Endpoint::Addr(
                "203.0.113.3:51820".parse().unwrap(),
            )),
            allowed_ips: vec![
                "10.9.3.0/24".parse().unwrap(),
                "10.4.0.4/32".parse().unwrap(),
            ],
            persistent_keepalive: 25,
            preshared_key: None,
            name: "n3".into(),
        };
        let mut new = old.clone();
        new.allowed_ips[1] = "10.4.0.3/32".parse().unwrap();
        (old, new)
    }

    /// The state a plan of `peers` alone leaves.
    fn with_peers(peers: &[WgPeer]) -> (DesiredState, OwnedState) {
        let mut d = desired(2, 0);
        d.peers = peers.to_vec();
        let mut k = OwnedState::default();
        let ops = plan(&d, &k, ME);
        simulate(&mut k, &ops, ME);
        (d, k)
    }

    #[test]
    fn a_renumbered_peer_gets_its_allowed_ips_and_nothing_else() {
        let (old, new) = renumbered();
        let (mut d, k) = with_peers(std::slice::from_ref(&old));
        d.peers = vec![new.clone()];
        let want = vec![Op::SetAllowedIps {
            public_key: new.public_key,
            allowed_ips: new.allowed_ips.clone(),
        }];
        assert_eq!(plan(&d, &k, ME), want);
        // The engine's delta plans the same.
        let delta = DesiredDelta {
            peers_upserted: vec![new.clone()],
            ..DesiredDelta::default()
        };
        assert_eq!(plan_delta(delta, &k), Some(want.clone()));
        let mut after = k.clone();
        simulate(&mut after, &want, ME);
        assert_eq!(plan(&d, &after, ME), Vec::<Op>::new());
        let held = &after.wireguard.as_ref().unwrap().peers[0];
        assert_eq!(held.endpoint, old.endpoint);
        assert_eq!(held.persistent_keepalive, 25);
    }

    #[test]
    fn a_peer_whose_endpoint_or_keepalive_changes_too_is_upserted_whole() {
        let (old, new) = renumbered();
        let (mut d, k) = with_peers(std::slice::from_ref(&old));
        let mut moved = new.clone();
        moved.endpoint = Some(crate::model::Endpoint::Addr(
            "203.0.113.9:51820".parse().unwrap(),
        ));
        let mut slower = new;
        slower.persistent_keepalive = 0;
        for p in [moved, slower] {
            d.peers = vec![p.clone()];
            assert_eq!(plan(&d, &k, ME), vec![Op::UpsertPeer(Box::new(p))]);
        }
        // A peer the device does not have is never changed in part.
        let (_, fresh) = with_peers(&[]);
        d.peers = vec![old.clone()];
        assert_eq!(
            plan(&d, &fresh, ME)
                .into_iter()
                .filter(|o| o.kind() == "peer")
                .collect::<Vec<_>>(),
            vec![Op::UpsertPeer(Box::new(old))]
        );
    }

    /// One operation on a small universe of peers (by key byte) and routes (by /24).
    fn peer_or_route_op() -> impl Strategy<Value = Op> {
        let peer = |k: u8, ip: u8| WgPeer {
            public_key: WgKey([k; 32]),
            endpoint: None,
            allowed_ips: vec![format!("10.9.{ip}.0/24").parse().unwrap()],
            persistent_keepalive: 0,
            preshared_key: None,
            name: "n".into(),
        };
        let route = |i: u8| Route {
            table: crate::desired::MAIN_TABLE,
            dst: format!("10.8.{i}.0/24").parse().unwrap(),
            gateway: None,
            dev: crate::desired::RouteDev::WireGuard,
            src: None,
            onlink: false,
        };
        prop_oneof![
            (0..12u8, 0..4u8).prop_map(move |(k, ip)| Op::UpsertPeer(Box::new(peer(k, ip)))),
            (0..12u8).prop_map(|k| Op::RemovePeer {
                public_key: WgKey([k; 32])
            }),
            (0..12u8, 0..4u8).prop_map(|(k, ip)| Op::SetAllowedIps {
                public_key: WgKey([k; 32]),
                allowed_ips: vec![format!("10.7.{ip}.0/24").parse().unwrap()],
            }),
            (0..12u8).prop_map(move |i| Op::AddRoute(route(i))),
            (0..12u8).prop_map(move |i| Op::DelRoute(route(i))),
        ]
    }

    fn state_strategy() -> impl Strategy<Value = (u8, u8, u8)> {
        (2..8u8, 2..8u8, 0..8u8)
    }

    proptest! {
        /// Property: planning the engine's delta against the state the old desired state left
        /// reaches the same kernel state as a full plan of the new desired state.
        #[test]
        fn delta_plan_reaches_the_full_plan_state((a, b, local) in state_strategy()) {
            let first = desired(a, local % a);
            let second = desired(b, local % b);
            let mut k = OwnedState::default();
            let ops = plan(&first, &k, ME);
            simulate(&mut k, &ops, ME);
            let delta = DesiredDelta::between(&first, &second);
            let needs_full =
                delta.interface.is_some() || delta.leader.is_some() || delta.bridge.is_some();
            if let Some(ops) = plan_delta(delta, &k) {
                simulate(&mut k, &ops, ME);
                prop_assert_eq!(plan(&second, &k, ME), Vec::<Op>::new());
            } else {
                prop_assert!(needs_full);
            }
        }

        /// Property: simulating operations one by one (binary searches on sorted peers and
        /// routes) holds exactly the last value of each peer and each route added and not
        /// deleted since, still sorted and without the peers' names.
        #[test]
        fn simulate_keeps_the_state_sorted_and_holds_the_last_values(
            ops in proptest::collection::vec(peer_or_route_op(), 0..60)
        ) {
            let mut k = OwnedState::default();
            let mut peers = BTreeMap::new();
            let mut routes = std::collections::BTreeSet::new();
            for op in &ops {
                simulate(&mut k, std::slice::from_ref(op), ME);
                match op {
                    Op::UpsertPeer(p) => {
                        let mut p = (**p).clone();
                        p.name.clear();
                        peers.insert(p.public_key, p);
                    }
                    Op::RemovePeer { public_key } => { peers.remove(public_key); }
                    // Only a peer the device has changes; nothing else of it does.
                    Op::SetAllowedIps { public_key, allowed_ips } => {
                        if let Some(p) = peers.get_mut(public_key) {
                            p.allowed_ips.clone_from(allowed_ips);
                        }
                    }
                    Op::AddRoute(r) => { routes.insert(r.clone()); }
                    Op::DelRoute(r) => { routes.remove(r); }
                    _ => unreachable!(),
                }
            }
            let have = k.wireguard.map(|d| d.peers).unwrap_or_default();
            prop_assert_eq!(have, peers.into_values().collect::<Vec<_>>());
            prop_assert_eq!(k.routes, routes.into_iter().collect::<Vec<_>>());
        }

        /// Property: from any state that an earlier desired state left, one plan reaches the new
        /// desired state, and the plan after it is empty.
        #[test]
        fn plan_converges_from_any_earlier_state((a, b, local) in state_strategy()) {
            let first = desired(a, local % a);
            let second = desired(b, local % b);
            let mut k = OwnedState::default();
            let ops = plan(&first, &k, ME);
        simulate(&mut k, &ops, ME);
            let ops = plan(&second, &k, ME);
        simulate(&mut k, &ops, ME);
            prop_assert_eq!(plan(&second, &k, ME), Vec::<Op>::new());
            prop_assert_eq!(&k.routes, &kernel_routes(&second));
            prop_assert_eq!(&k.rules, &second.rules);
        }
    }
}
