//! Who owns which address: the check that lets a node claim only addresses nothing else in the
//! cluster owns, before the mesh is built from its claims.
//!
//! A node claims its pod CIDRs (`spec.podCIDR(s)`, assigned by the control plane), its endpoint
//! (a literal IP), its internal IP and its allowed-location-ips. A claim is refused when it lies
//! in a reserved range (the mesh subnet, the service ranges, link-local, loopback, multicast,
//! unspecified), in an IP family the mesh does not use, or (allowed-location-ips only) outside
//! [`MeshOptions::allowed_location_ips_within`]. Between nodes, the more authoritative kind of
//! claim wins — pod CIDR, then endpoint, then internal IP, then allowed-location-ips. Between
//! two nodes' pod CIDRs (or two segments' allowed-location-ips) the one that overlaps fewer
//! others wins, then the one of the Node object created first; when neither comes first,
//! neither is accepted. Then, among the nodes still in, a key several publish goes to the Node
//! created first, or to none. Names never decide. Equal internal IPs in different locations
//! are allowed (sites may share private addressing, as in Kilo's own tests); the merge reports
//! them. A refused claim drops that claim only; a node left without an endpoint, a pod CIDR or
//! a key it may use is left out. Every refusal is a [`Diagnostic`] naming node, key, value and
//! the owner it collides with.
//!
//! Pure. Depends on the model, diagnostics and the topology module's options and indexes.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use rustc_hash::FxHashMap;

use super::{CidrIndex, MeshOptions, SegmentKey, segment_key, span};
use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, NodeName, WgKey, host_net};

/// The ranges allowed-location-ips must lie in by default: the private and shared address
/// ranges (RFC 1918, RFC 6598, RFC 4193), where a location's own networks live.
pub const DEFAULT_ALLOWED_LOCATION_IPS_WITHIN: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// [`DEFAULT_ALLOWED_LOCATION_IPS_WITHIN`] as networks.
pub fn default_allowed_location_ips_within() -> Vec<IpNetwork> {
    DEFAULT_ALLOWED_LOCATION_IPS_WITHIN
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// The ready nodes that take part, with the claims they may not make removed, and why.
#[derive(Debug, Clone, Default)]
pub struct Checked<'a> {
    /// The nodes, sorted by name; a node is borrowed unless a claim of it was dropped.
    pub nodes: Vec<Cow<'a, MeshNode>>,
    /// Nodes not ready, left out, or with a claim dropped.
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked<'_> {
    /// The checked nodes, as the engine's builder takes them.
    pub fn iter(&self) -> impl Iterator<Item = &MeshNode> {
        self.nodes.iter().map(|n| &**n)
    }
}

/// The ranges no node may claim whatever the options, and what they are. Built from constants:
/// the incremental engine checks them on every event.
fn fixed_reserved() -> [(IpNetwork, &'static str); 8] {
    use ipnetwork::{Ipv4Network, Ipv6Network};
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v4 = |a: [u8; 4], p: u8| {
        Ipv4Network::new(Ipv4Addr::from(a), p).map_or(
            IpNetwork::V4(Ipv4Network::from(Ipv4Addr::from(a))),
            IpNetwork::V4,
        )
    };
    let v6 = |a: u128, p: u8| {
        Ipv6Network::new(Ipv6Addr::from(a), p).map_or(
            IpNetwork::V6(Ipv6Network::from(Ipv6Addr::from(a))),
            IpNetwork::V6,
        )
    };
    [
        (v4([169, 254, 0, 0], 16), "the link-local range"),
        (v6(0xfe80 << 112, 10), "the link-local range"),
        (v4([127, 0, 0, 0], 8), "the loopback range"),
        (v6(1, 128), "the loopback address"),
        (v4([224, 0, 0, 0], 4), "the multicast range"),
        (v6(0xff00 << 112, 8), "the multicast range"),
        (v4([0, 0, 0, 0], 32), "the unspecified address"),
        (v6(0, 128), "the unspecified address"),
    ]
}

/// A range no node may claim, and what it is.
fn reserved(opts: &MeshOptions) -> Vec<(IpNetwork, String)> {
    let mut out: Vec<(IpNetwork, String)> = fixed_reserved()
        .into_iter()
        .map(|(c, what)| (c, what.to_owned()))
        .collect();
    out.push((opts.subnet, "the mesh subnet".to_owned()));
    for s in &opts.service_cidrs {
        out.push((*s, "the service range".to_owned()));
    }
    out
}

/// Whether `net` overlaps a reserved range, without building the list (the fast path).
fn is_reserved(net: &IpNetwork, opts: &MeshOptions) -> bool {
    fixed_reserved().iter().any(|(r, _)| overlaps(net, r))
        || overlaps(net, &opts.subnet)
        || opts.service_cidrs.iter().any(|s| overlaps(net, s))
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// The reserved range `net` overlaps, in words.
fn reserved_hit<'r>(net: &IpNetwork, reserved: &'r [(IpNetwork, String)]) -> Option<&'r str> {
    reserved
        .iter()
        .find(|(r, _)| overlaps(net, r))
        .map(|(_, what)| what.as_str())
}

/// Families in use: `[IPv4, IPv6]`. The mesh subnet's family and every family of a pod CIDR.
fn families<'n>(opts: &MeshOptions, pod_cidrs: impl Iterator<Item = &'n IpNetwork>) -> [bool; 2] {
    let mut f = [false; 2];
    f[usize::from(opts.subnet.is_ipv6())] = true;
    for c in pod_cidrs {
        f[usize::from(c.is_ipv6())] = true;
    }
    f
}

fn family_name(net: &IpNetwork) -> &'static str {
    if net.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Why a claim of node-independent validity is refused, or `None`.
fn local_refusal(
    net: &IpNetwork,
    reserved: &[(IpNetwork, String)],
    fams: [bool; 2],
) -> Option<String> {
    if let Some(what) = reserved_hit(net, reserved) {
        return Some(format!("overlaps {what}"));
    }
    if !fams[usize::from(net.is_ipv6())] {
        return Some(format!(
            "is {}, a family the mesh does not use (no pod CIDR and no mesh subnet of it)",
            family_name(net)
        ));
    }
    None
}

/// The allow list refusal of an allowed-location-ip, or `None`.
fn outside_allow_list(net: &IpNetwork, opts: &MeshOptions) -> Option<String> {
    let inside = opts.allowed_location_ips_within.iter().any(|w| {
        w.is_ipv4() == net.is_ipv4() && w.prefix() <= net.prefix() && w.contains(net.network())
    });
    (!inside).then(|| {
        let list: Vec<String> = opts
            .allowed_location_ips_within
            .iter()
            .map(ToString::to_string)
            .collect();
        format!(
            "lies outside the ranges allowed-location-ips may use ({}; --allowed-location-ips-within)",
            if list.is_empty() { "none".to_owned() } else { list.join(", ") }
        )
    })
}

/// One claim of a network, by an owner (a node index, or a segment's first node index).
#[derive(Debug, Clone, Copy)]
struct Claim {
    net: IpNetwork,
    owner: usize,
    created: Option<i64>,
}

/// Why a claim lost, for its diagnostic.
enum Lost {
    /// It overlaps a claim of `other` that won.
    To(usize, IpNetwork),
    /// It overlaps a claim of `other` with the same standing; neither wins.
    Tie(usize, IpNetwork),
}

/// Resolve overlapping claims of different owners, names aside: a claim overlapping fewer
/// others' claims wins, then the one with the earlier creation time (unknown counts as
/// latest); claims equal in both that overlap each other all lose. CIDRs are either nested or
/// disjoint, so overlaps are counted with one sweep over a stack of enclosing claims.
fn resolve(claims: &[Claim]) -> Vec<Option<Lost>> {
    let mut order: Vec<usize> = (0..claims.len()).collect();
    // By family, first address, then wider first: enclosing claims come before enclosed ones.
    order.sort_by_key(|&i| {
        let (v6, first, last) = span(&claims[i].net);
        (v6, first, std::cmp::Reverse(last))
    });
    let mut conflicts = vec![0usize; claims.len()];
    let mut stack: Vec<usize> = Vec::new();
    for &i in &order {
        let (v6, first, _) = span(&claims[i].net);
        stack.retain(|&a| {
            let (av6, _, alast) = span(&claims[a].net);
            av6 == v6 && alast >= first
        });
        for &a in &stack {
            if claims[a].owner != claims[i].owner {
                conflicts[a] += 1;
                conflicts[i] += 1;
            }
        }
        stack.push(i);
    }
    let rank = |i: usize| (conflicts[i], claims[i].created.unwrap_or(i64::MAX));
    let mut by_rank: Vec<usize> = (0..claims.len()).filter(|&i| conflicts[i] > 0).collect();
    by_rank.sort_by_key(|&i| rank(i));
    let mut out: Vec<Option<Lost>> = (0..claims.len()).map(|_| None).collect();
    // Accepted claims that overlap others, indexed by span; owners as names of indexes.
    let mut accepted = CidrIndex::default();
    let owner_name = |o: usize| NodeName(o.to_string());
    let mut g = 0;
    while g < by_rank.len() {
        let r = rank(by_rank[g]);
        let end = by_rank[g..]
            .iter()
            .position(|&i| rank(i) != r)
            .map_or(by_rank.len(), |p| g + p);
        let group = &by_rank[g..end];
        let mut survivors = Vec::with_capacity(group.len());
        for &i in group {
            let c = &claims[i];
            match accepted.conflict(&c.net, &owner_name(c.owner)) {
                Some((net, o)) => {
                    let o: usize = o.0.parse().unwrap_or(usize::MAX);
                    out[i] = Some(Lost::To(o, *net));
                }
                None => survivors.push(i),
            }
        }
        // Survivors of equal standing that overlap each other all lose (a sweep as above).
        survivors.sort_by_key(|&i| {
            let (v6, first, last) = span(&claims[i].net);
            (v6, first, std::cmp::Reverse(last))
        });
        let mut enclosing: Vec<usize> = Vec::new();
        for &i in &survivors {
            let (v6, first, _) = span(&claims[i].net);
            enclosing.retain(|&a| {
                let (av6, _, alast) = span(&claims[a].net);
                av6 == v6 && alast >= first
            });
            for &a in &enclosing {
                if claims[a].owner != claims[i].owner {
                    if out[i].is_none() {
                        out[i] = Some(Lost::Tie(claims[a].owner, claims[a].net));
                    }
                    if out[a].is_none() {
                        out[a] = Some(Lost::Tie(claims[i].owner, claims[i].net));
                    }
                }
            }
            enclosing.push(i);
        }
        for &i in &survivors {
            if out[i].is_none() {
                accepted.insert(&claims[i].net, &owner_name(claims[i].owner));
            }
        }
        g = end;
    }
    out
}

/// Check the claims of `nodes` (see the module header): readiness, unique names, then keys,
/// pod CIDRs, endpoints, internal IPs and allowed-location-ips. O(n log n).
pub fn check<'a>(nodes: impl IntoIterator<Item = &'a MeshNode>, opts: &MeshOptions) -> Checked<'a> {
    let mut diagnostics = Vec::new();
    let ready = super::ready_unique(nodes, opts.now, &mut diagnostics);
    let mut out: Vec<Cow<'a, MeshNode>> = ready.into_iter().map(Cow::Borrowed).collect();
    let mut gone = vec![false; out.len()];

    let fams = families(
        opts,
        out.iter()
            .zip(&gone)
            .filter(|(_, g)| !**g)
            .flat_map(|(n, _)| n.pod_cidrs.iter()),
    );
    let reserved = reserved(opts);

    // Pod CIDRs: reserved ranges and families, then between nodes.
    let mut claims = Vec::new();
    for (i, n) in out.iter_mut().enumerate() {
        if gone[i] {
            continue;
        }
        let refused: Vec<(IpNetwork, String)> = n
            .pod_cidrs
            .iter()
            .filter_map(|c| local_refusal(c, &reserved, fams).map(|why| (*c, why)))
            .collect();
        for (c, why) in refused {
            n.to_mut().pod_cidrs.retain(|x| *x != c);
            diagnostics.push(claim_diag(n, "podCIDR", c, why, None));
        }
        for c in &n.pod_cidrs {
            claims.push(Claim {
                net: *c,
                owner: i,
                created: n.created,
            });
        }
    }
    let lost = resolve(&claims);
    for (c, l) in claims.iter().zip(lost) {
        let Some(l) = l else { continue };
        let (why, other) = lost_words(&l, "pod CIDR", &out);
        let n = &mut out[c.owner];
        n.to_mut().pod_cidrs.retain(|x| *x != c.net);
        diagnostics.push(claim_diag(n, "podCIDR", c.net, why, Some(&other)));
    }
    for (i, n) in out.iter().enumerate() {
        if !gone[i] && n.pod_cidrs.is_empty() {
            gone[i] = true;
            // The claim diagnostics above say why; mark the node's last one as leaving it out.
            if let Some(d) = diagnostics
                .iter_mut()
                .rev()
                .find(|d| d.name == n.name.as_str() && d.key.as_deref() == Some("podCIDR"))
            {
                d.skipped = true;
            }
        }
    }
    let mut pods = CidrIndex::default();
    for (i, n) in out.iter().enumerate() {
        if !gone[i] {
            for c in &n.pod_cidrs {
                pods.insert(c, &n.name);
            }
        }
    }

    // Endpoints: only a pod CIDR or a reserved range outranks a node's endpoint.
    for (i, n) in out.iter_mut().enumerate() {
        if gone[i] {
            continue;
        }
        let Some(ip) = n.endpoint.as_ref().and_then(|e| e.ip()) else {
            continue;
        };
        let host = host_net(ip);
        let why = match reserved_hit(&host, &reserved) {
            Some(what) => Some((format!("lies in {what}"), None)),
            None => pods.conflict(&host, &n.name).map(|(c, o)| {
                (
                    format!("lies in pod CIDR {c} of node {o}"),
                    Some(o.to_string()),
                )
            }),
        };
        if let Some((why, other)) = why {
            gone[i] = true;
            let mut d = claim_diag(n, "endpoint", host, why, other.as_deref());
            d.skipped = true;
            diagnostics.push(d);
        }
    }
    // Keys, among the nodes not left out already: the Node created first keeps a key several
    // publish; without a first, nobody does.
    let mut by_key: FxHashMap<WgKey, Vec<usize>> = FxHashMap::default();
    by_key.reserve(out.len());
    for (i, n) in out.iter().enumerate() {
        if gone[i] {
            continue;
        }
        if let Some(k) = n.key {
            by_key.entry(k).or_default().push(i);
        }
    }
    let mut dup_keys: Vec<(&WgKey, &Vec<usize>)> =
        by_key.iter().filter(|(_, v)| v.len() > 1).collect();
    dup_keys.sort();
    for (key, holders) in dup_keys {
        let first = holders
            .iter()
            .map(|&i| out[i].created.unwrap_or(i64::MAX))
            .min()
            .unwrap_or(i64::MAX);
        let firsts: Vec<usize> = holders
            .iter()
            .copied()
            .filter(|&i| out[i].created.unwrap_or(i64::MAX) == first)
            .collect();
        let winner = (firsts.len() == 1 && first != i64::MAX).then(|| firsts[0]);
        for &i in holders {
            if Some(i) == winner {
                continue;
            }
            gone[i] = true;
            let (other, why) = match winner {
                Some(w) => (w, "whose Node object was created first; it keeps the key"),
                None => (
                    *holders.iter().find(|&&j| j != i).unwrap_or(&i),
                    "and neither Node object is known to be older; neither takes part",
                ),
            };
            let other = out[other].name.to_string();
            diagnostics.push(
                Diagnostic::node(
                    out[i].name.as_str(),
                    Some("key"),
                    format!("public key {key} is also published by node {other}, {why}"),
                )
                .with_other(&other),
            );
        }
    }

    // Several nodes may share an endpoint address (behind one NAT).
    let mut endpoints: FxHashMap<IpAddr, Vec<usize>> = FxHashMap::default();
    for (i, n) in out.iter().enumerate() {
        if let Some(ip) = n.endpoint.as_ref().and_then(|e| e.ip())
            && !gone[i]
        {
            endpoints.entry(ip).or_default().push(i);
        }
    }

    // Internal IPs: reserved, family, another node's pod CIDR or endpoint, then equal ones.
    let names: Vec<NodeName> = out.iter().map(|n| n.name.clone()).collect();
    for (i, n) in out.iter_mut().enumerate() {
        if gone[i] {
            continue;
        }
        let Some(ip) = n.internal_ip else { continue };
        let host = host_net(ip.ip());
        let why = local_refusal(&host, &reserved, fams)
            .map(|w| (w, None))
            .or_else(|| {
                pods.conflict(&host, &n.name).map(|(c, o)| {
                    (
                        format!("lies in pod CIDR {c} of node {o}"),
                        Some(o.to_string()),
                    )
                })
            })
            .or_else(|| {
                endpoints
                    .get(&ip.ip())
                    .and_then(|v| v.iter().find(|&&o| o != i))
                    .map(|&o| {
                        (
                            format!("is the endpoint address of node {}", names[o]),
                            Some(names[o].to_string()),
                        )
                    })
            });
        if let Some((why, other)) = why {
            n.to_mut().internal_ip = None;
            diagnostics.push(claim_diag(n, "internal-ip", ip, why, other.as_deref()));
        }
    }
    // Allowed-location-ips: reserved, family, allow list, what other segments own, then
    // between segments.
    let seg_of: Vec<SegmentKey> = out
        .iter()
        .map(|n| segment_key(n, opts.granularity))
        .collect();
    let index_of: FxHashMap<&NodeName, usize> =
        names.iter().enumerate().map(|(i, n)| (n, i)).collect();
    let mut hosts: Vec<(IpAddr, usize, &'static str)> = Vec::new();
    for (i, n) in out.iter().enumerate() {
        if gone[i] {
            continue;
        }
        if let Some(ip) = n.endpoint.as_ref().and_then(|e| e.ip()) {
            hosts.push((ip, i, "endpoint"));
        }
        if let Some(ip) = n.internal_ip {
            hosts.push((ip.ip(), i, "internal IP"));
        }
    }
    hosts.sort_unstable();
    let mut alip_claims = Vec::new();
    let mut seg_owner: FxHashMap<&SegmentKey, usize> = FxHashMap::default();
    for i in 0..out.len() {
        if gone[i] || out[i].allowed_location_ips.is_empty() {
            continue;
        }
        let owner = *seg_owner.entry(&seg_of[i]).or_insert(i);
        let mut refused = Vec::new();
        for a in &out[i].allowed_location_ips {
            let why = outside_allow_list(a, opts)
                .or_else(|| local_refusal(a, &reserved, fams))
                .map(|w| (w, None))
                .or_else(|| {
                    other_segment_pod_cidr(&pods, a, &index_of, &seg_of, i).map(|(c, o)| {
                        (
                            format!("overlaps pod CIDR {c} of node {}", names[o]),
                            Some(names[o].to_string()),
                        )
                    })
                })
                .or_else(|| {
                    let (_, first, last) = span(a);
                    hosts
                        .iter()
                        .skip(hosts.partition_point(|(ip, _, _)| {
                            ip.is_ipv4() && a.is_ipv6() || same_family_below(ip, a, first)
                        }))
                        .take_while(|(ip, _, _)| same_family_at_most(ip, a, last))
                        .find(|(_, o, _)| seg_of[*o] != seg_of[i])
                        .map(|(ip, o, what)| {
                            (
                                format!("contains {ip}, the {what} of node {}", names[*o]),
                                Some(names[*o].to_string()),
                            )
                        })
                });
            match why {
                Some((why, other)) => refused.push((*a, why, other)),
                None => alip_claims.push(Claim {
                    net: *a,
                    owner,
                    created: out[i].created,
                }),
            }
        }
        for (a, why, other) in refused {
            let n = &mut out[i];
            n.to_mut().allowed_location_ips.retain(|x| *x != a);
            diagnostics.push(claim_diag(
                n,
                "allowed-location-ips",
                a,
                why,
                other.as_deref(),
            ));
        }
    }
    // A segment's claims carry its oldest member's creation time.
    let mut seg_created: FxHashMap<usize, Option<i64>> = FxHashMap::default();
    for (i, n) in out.iter().enumerate() {
        if let Some(&o) = seg_owner.get(&seg_of[i]) {
            let e = seg_created.entry(o).or_insert(n.created);
            *e = match (*e, n.created) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    for c in &mut alip_claims {
        c.created = seg_created.get(&c.owner).copied().flatten();
    }
    let lost = resolve(&alip_claims);
    for (c, l) in alip_claims.iter().zip(lost) {
        let Some(l) = l else { continue };
        let (why, other) = lost_words(&l, "allowed-location-ip", &out);
        // Every member of the segment that claims it loses it.
        for i in 0..out.len() {
            if seg_of[i] == seg_of[c.owner] && out[i].allowed_location_ips.contains(&c.net) {
                let n = &mut out[i];
                n.to_mut().allowed_location_ips.retain(|x| *x != c.net);
                diagnostics.push(claim_diag(
                    n,
                    "allowed-location-ips",
                    c.net,
                    why.clone(),
                    Some(&other),
                ));
            }
        }
    }
    Checked {
        nodes: out
            .into_iter()
            .zip(gone)
            .filter(|(_, g)| !*g)
            .map(|(n, _)| n)
            .collect(),
        diagnostics,
    }
}

/// A pod CIDR of a node in another segment than node `me`'s that overlaps `net`.
fn other_segment_pod_cidr(
    pods: &CidrIndex,
    net: &IpNetwork,
    index_of: &FxHashMap<&NodeName, usize>,
    seg_of: &[SegmentKey],
    me: usize,
) -> Option<(IpNetwork, usize)> {
    pods.overlapping(net)
        .filter_map(|(c, o)| index_of.get(o).map(|&o| (*c, o)))
        .find(|(_, o)| seg_of[*o] != seg_of[me])
}

fn addr_u128(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    }
}

/// In the sorted host list, whether `ip` comes before the first address `first` of `net`.
fn same_family_below(ip: &IpAddr, net: &IpNetwork, first: u128) -> bool {
    ip.is_ipv4() == net.is_ipv4() && addr_u128(ip) < first
}

/// Whether `ip` is of `net`'s family and at most its last address `last`.
fn same_family_at_most(ip: &IpAddr, net: &IpNetwork, last: u128) -> bool {
    ip.is_ipv4() == net.is_ipv4() && addr_u128(ip) <= last
}

/// The words and the other node of a lost claim.
fn lost_words(l: &Lost, what: &str, nodes: &[Cow<'_, MeshNode>]) -> (String, String) {
    let name = |o: &usize| {
        nodes
            .get(*o)
            .map(|n| n.name.to_string())
            .unwrap_or_default()
    };
    match l {
        Lost::To(o, net) => {
            let o = name(o);
            (
                format!(
                    "overlaps {what} {net} of node {o}, which overlaps fewer claims or whose Node object was created first"
                ),
                o,
            )
        }
        Lost::Tie(o, net) => {
            let o = name(o);
            (
                format!(
                    "overlaps {what} {net} of node {o}, and neither claim comes first; neither is used"
                ),
                o,
            )
        }
    }
}

/// A dropped claim: kept (the node stays) unless the caller marks it otherwise.
fn claim_diag(
    n: &MeshNode,
    key: &str,
    value: IpNetwork,
    why: String,
    other: Option<&str>,
) -> Diagnostic {
    let d = Diagnostic::node(
        n.name.as_str(),
        Some(key),
        format!("{value} is refused: it {why}"),
    )
    .kept();
    match other {
        Some(o) => d.with_other(o),
        None => d,
    }
}

/// The host addresses (endpoints and internal IPs) and pod CIDR families of the nodes that take
/// part, kept by the incremental engine so that one changed node's claims are checked in
/// O(k log n) instead of a whole [`check`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Hosts {
    /// (address, whether it is an endpoint, node).
    set: BTreeSet<(IpAddr, bool, NodeName)>,
    /// How many pod CIDRs of each family (`[IPv4, IPv6]`) the nodes hold.
    pod_families: [usize; 2],
}

impl Hosts {
    fn entries(n: &MeshNode) -> impl Iterator<Item = (IpAddr, bool, NodeName)> + '_ {
        let ep = n
            .endpoint
            .as_ref()
            .and_then(|e| e.ip())
            .map(|ip| (ip, true));
        let int = n.internal_ip.map(|ip| (ip.ip(), false));
        ep.into_iter()
            .chain(int)
            .map(move |(ip, e)| (ip, e, n.name.clone()))
    }

    /// Record the addresses of node `n`, which takes part.
    pub fn insert(&mut self, n: &MeshNode) {
        self.set.extend(Self::entries(n));
        for c in &n.pod_cidrs {
            self.pod_families[usize::from(c.is_ipv6())] += 1;
        }
    }

    /// Forget the addresses of node `n`.
    pub fn remove(&mut self, n: &MeshNode) {
        for e in Self::entries(n) {
            self.set.remove(&e);
        }
        for c in &n.pod_cidrs {
            let f = &mut self.pod_families[usize::from(c.is_ipv6())];
            *f = f.saturating_sub(1);
        }
    }

    /// Whether a node other than `me` holds an address in `net` (endpoints only when
    /// `endpoints`, internal IPs only when `internal`).
    fn other_in(&self, net: &IpNetwork, me: &NodeName, endpoints: bool, internal: bool) -> bool {
        let (first, last) = match net {
            IpNetwork::V4(n) => (IpAddr::V4(n.network()), IpAddr::V4(n.broadcast())),
            IpNetwork::V6(_) => {
                let (_, f, l) = span(net);
                (
                    IpAddr::V6(std::net::Ipv6Addr::from(f)),
                    IpAddr::V6(std::net::Ipv6Addr::from(l)),
                )
            }
        };
        self.set
            .range((first, false, NodeName(String::new()))..)
            .take_while(|(ip, _, _)| *ip <= last)
            .any(|(_, ep, o)| o != me && if *ep { endpoints } else { internal })
    }

    /// Whether node `new`, replacing `old` among the nodes that take part, makes only claims
    /// that [`check`] accepts as they are and that leave every other node's claims as they
    /// are. `false` means: run the whole check. `pods` holds the other nodes' pod CIDRs.
    pub fn accepts(
        &self,
        new: &MeshNode,
        old: Option<&MeshNode>,
        pods: &CidrIndex,
        opts: &MeshOptions,
    ) -> bool {
        let mut counts = self.pod_families;
        for c in old.iter().flat_map(|o| &o.pod_cidrs) {
            counts[usize::from(c.is_ipv6())] = counts[usize::from(c.is_ipv6())].saturating_sub(1);
        }
        for c in &new.pod_cidrs {
            counts[usize::from(c.is_ipv6())] += 1;
        }
        let fam = |c: [usize; 2]| {
            let mut f = [c[0] > 0, c[1] > 0];
            f[usize::from(opts.subnet.is_ipv6())] = true;
            f
        };
        let fams = fam(counts);
        if fams != fam(self.pod_families) || !new.allowed_location_ips.is_empty() {
            return false;
        }
        let me = &new.name;
        let refused = |c: &IpNetwork| is_reserved(c, opts) || !fams[usize::from(c.is_ipv6())];
        for c in &new.pod_cidrs {
            if refused(c) || pods.conflict(c, me).is_some() || self.other_in(c, me, true, true) {
                return false;
            }
        }
        if let Some(ip) = new.endpoint.as_ref().and_then(|e| e.ip()) {
            let host = host_net(ip);
            if is_reserved(&host, opts)
                || pods.conflict(&host, me).is_some()
                || self.other_in(&host, me, false, true)
            {
                return false;
            }
        }
        if let Some(ip) = new.internal_ip {
            let host = host_net(ip.ip());
            if refused(&host)
                || pods.conflict(&host, me).is_some()
                || self.other_in(&host, me, true, false)
            {
                return false;
            }
        }
        true
    }
}
