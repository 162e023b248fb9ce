//! Multi-cluster link (`meshctl multicluster link|unlink`): the Kilo `Peer` objects that make the
//! segments of one cluster reachable from another, the overlap check that comes before anything
//! is written, and the difference between the Peers a link wants in a cluster and those there.
//!
//! ```text
//! remote Nodes ─ topology (remote's granularity, subnet) ─ one Peer per segment ─┐
//! local Peers (all) ────────────────────────────────────────────────────────────┴─ diff → Changes
//! ```
//!
//! A linked Peer carries the segment leader's key and endpoint (and keepalive, so a NATed leader's
//! roamed endpoint is kept), the pod CIDRs of every node of the segment and the segment's mesh IP.
//! Unlike Kilo's `showconf --as-peer` it leaves out the nodes' internal IPs: two clusters'
//! internal networks usually overlap or hold the very endpoints the tunnel runs over. Every Peer
//! the link writes is labelled [`LINK_LABEL`]` = <remote cluster name>`; the link changes and
//! deletes only Peers with that label, and never one whose name another writer holds.
//!
//! Pure: depends on the model, the topology engine, the registry's Peer type and diagnostics.
//! The API requests and the loop that keeps two clusters in sync are in `cli::link`.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::desired::WgPeer;
use crate::diagnostic::Diagnostic;
use crate::model::{MeshNode, host_net, network_of};
use crate::registry::peer::PeerResource;
use crate::showconf::peer_resource;
use crate::topology::{self, MeshOptions, SegmentKey};

/// The label on every Peer a link writes: the name of the cluster whose segment it is.
pub const LINK_LABEL: &str = "wiremesh.io/linked-cluster";
/// The annotation on a linked Peer naming the remote segment (`location:eu`, `node:a`).
pub const SEGMENT_ANNOTATION: &str = "wiremesh.io/linked-segment";

/// Why a link cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A cluster name is not usable in Peer names and label values.
    #[error(
        "cluster name {0:?} is not a DNS label (lower-case letters, digits and '-', at most 40 \
         characters, starting and ending with a letter or digit)"
    )]
    Name(String),
    /// Both clusters have the same name.
    #[error("both clusters are named {0:?}: give each its own --name / --remote-name")]
    SameName(String),
    /// An address range of one cluster overlaps one of the other.
    #[error("{0}")]
    Overlap(Box<Overlap>),
    /// More than one overlap; the first few are named.
    #[error("{} (and {} more overlaps)", .0[0], .0.len() - 1)]
    Overlaps(Vec<Overlap>),
}

/// One cluster as the link sees it.
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    /// The cluster's name in the link (the label value on the Peers written for it).
    pub name: &'a str,
    /// Its nodes, parsed as the agents parse them.
    pub nodes: &'a [MeshNode],
    /// The mesh subnet its agents allocate mesh IPs from.
    pub subnet: IpNetwork,
    /// Service CIDRs to make reachable from the other cluster (may be empty).
    pub service_cidrs: &'a [IpNetwork],
}

/// An address range a cluster uses, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The range.
    pub net: IpNetwork,
    /// What it is, in words: `pod CIDR of node a`, `mesh subnet`, `service CIDR`.
    pub what: String,
}

/// Two ranges, one in each cluster, that overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The first cluster's name.
    pub a: String,
    /// Its range.
    pub a_claim: Claim,
    /// The second cluster's name.
    pub b: String,
    /// Its range.
    pub b_claim: Claim,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} of cluster {} overlaps {} {} of cluster {}: linked clusters need disjoint pod \
             CIDRs, mesh subnets (agent --subnet) and service CIDRs",
            self.a_claim.what,
            self.a_claim.net,
            self.a,
            self.b_claim.what,
            self.b_claim.net,
            self.b
        )
    }
}

/// Check a cluster name: a DNS label short enough to prefix node names in Peer names.
pub fn check_name(name: &str) -> Result<(), LinkError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 40
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(LinkError::Name(name.to_owned()))
    }
}

/// Check both names: each valid, and different.
pub fn check_names(a: &str, b: &str) -> Result<(), LinkError> {
    check_name(a)?;
    check_name(b)?;
    if a == b {
        return Err(LinkError::SameName(a.to_owned()));
    }
    Ok(())
}

/// The mesh subnet a cluster's agents use, read from the mesh IPs they published (the network
/// most of them are in; ties go to the smaller network), or `None` when none published one.
pub fn published_subnet(nodes: &[MeshNode]) -> Option<IpNetwork> {
    let mut counts: BTreeMap<IpNetwork, usize> = BTreeMap::new();
    for n in nodes {
        if let Some(ip) = n.wireguard_ip {
            *counts.entry(network_of(ip)).or_default() += 1;
        }
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, c)| *c == best).map(|(n, _)| n)
}

/// Every range `view` uses: its nodes' pod CIDRs, its mesh subnet and its service CIDRs.
pub fn claims(view: &ClusterView<'_>) -> Vec<Claim> {
    let mut out: Vec<Claim> = view
        .nodes
        .iter()
        .flat_map(|n| {
            n.pod_cidrs.iter().map(move |c| Claim {
                net: network_of(*c),
                what: format!("pod CIDR of node {}", n.name),
            })
        })
        .collect();
    out.push(Claim {
        net: network_of(view.subnet),
        what: "mesh subnet".into(),
    });
    out.extend(view.service_cidrs.iter().map(|c| Claim {
        net: network_of(*c),
        what: "service CIDR".into(),
    }));
    out
}

/// Whether two networks share an address.
pub fn nets_overlap(a: IpNetwork, b: IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Every pair of ranges, one of `a` and one of `b`, that overlap, in `a`'s order.
pub fn overlaps(a: &ClusterView<'_>, b: &ClusterView<'_>) -> Vec<Overlap> {
    let bc = claims(b);
    let mut out = Vec::new();
    for x in claims(a) {
        for y in &bc {
            if nets_overlap(x.net, y.net) {
                out.push(Overlap {
                    a: a.name.to_owned(),
                    a_claim: x.clone(),
                    b: b.name.to_owned(),
                    b_claim: y.clone(),
                });
            }
        }
    }
    out
}

/// The overlap check a link makes before it writes anything: names, then every range.
pub fn check(a: &ClusterView<'_>, b: &ClusterView<'_>) -> Result<(), LinkError> {
    check_names(a.name, b.name)?;
    let mut found = overlaps(a, b);
    match found.len() {
        0 => Ok(()),
        1 => Err(LinkError::Overlap(Box::new(found.remove(0)))),
        _ => Err(LinkError::Overlaps(found)),
    }
}

/// The Peer name of a remote segment: `<cluster>-<node>` for a node of its own,
/// `<cluster>-location-<location>` for a location; a location that is not a DNS label is made
/// one and given a hash of its real name, so two locations never share a name.
pub fn peer_name(cluster: &str, key: &SegmentKey) -> String {
    match key {
        SegmentKey::Node(n) => format!("{cluster}-{n}"),
        SegmentKey::Location(l) => format!("{cluster}-location-{}", dns_label(l)),
    }
}

/// `s` as a DNS label: kept when it is one (up to 63 characters), else lower-cased, every other
/// character made `-`, trimmed, cut, and suffixed with a hash of `s`.
fn dns_label(s: &str) -> String {
    let valid = !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if valid {
        return s.to_owned();
    }
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut base: String = mapped.trim_matches('-').chars().take(40).collect();
    base.truncate(base.trim_end_matches('-').len());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    if base.is_empty() {
        format!("x{:08x}", hash as u32)
    } else {
        format!("{base}-{:08x}", hash as u32)
    }
}

/// What the link wants in the local cluster for the remote one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    /// One Peer per remote segment that can take part, sorted by name.
    pub peers: Vec<PeerResource>,
    /// Remote nodes left out by the engine, and segments left out by the link (an overlap
    /// with a local range that appeared after the link started).
    pub diagnostics: Vec<Diagnostic>,
}

/// The Peers the local cluster should hold for the segments of `remote`, computed as the
/// remote's agents compute their mesh (`opts`: its granularity, subnet and clock). The remote's
/// service CIDRs go on its first segment (Kilo's order): one peer per range, as WireGuard needs.
/// A segment with an allowed IP overlapping one of `local` (a range that appeared after the
/// link's first check) is left out with a diagnostic rather than written.
pub fn wanted(remote: &ClusterView<'_>, opts: &MeshOptions, local: &[Claim]) -> Wanted {
    let checked = topology::claims::check(remote.nodes, opts);
    let topo = topology::build_checked(&checked, &[], opts);
    let mut out = Wanted {
        diagnostics: topo.diagnostics.clone(),
        ..Wanted::default()
    };
    let mut services_placed = false;
    for seg in &topo.segments {
        let leader = seg.leader_node();
        let name = peer_name(remote.name, &seg.key);
        let Some(key) = leader.key else { continue };
        let mut allowed: Vec<IpNetwork> = seg
            .nodes
            .iter()
            .flat_map(|n| n.pod_cidrs.iter().map(|c| network_of(*c)))
            .collect();
        allowed.push(host_net(seg.mesh_ip));
        if !services_placed {
            allowed.extend(remote.service_cidrs.iter().map(|c| network_of(*c)));
        }
        let mut seen = BTreeSet::new();
        allowed.retain(|a| seen.insert(*a));
        if let Some((a, c)) = allowed.iter().find_map(|a| {
            local
                .iter()
                .find(|c| nets_overlap(*a, c.net))
                .map(|c| (a, c))
        }) {
            out.diagnostics.push(Diagnostic::peer(
                &name,
                Some("spec.allowedIPs"),
                format!(
                    "{a} of segment {} of cluster {} overlaps the local {} {}: not linked",
                    seg.key, remote.name, c.what, c.net
                ),
            ));
            continue;
        }
        services_placed = true;
        let mut peer = peer_resource(&WgPeer {
            public_key: key,
            endpoint: leader.endpoint.clone(),
            allowed_ips: allowed,
            persistent_keepalive: leader.persistent_keepalive,
            preshared_key: None,
            name: name.clone(),
        });
        peer.metadata = ObjectMeta {
            name: Some(name),
            labels: Some(BTreeMap::from([(
                LINK_LABEL.to_owned(),
                remote.name.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                SEGMENT_ANNOTATION.to_owned(),
                seg.key.to_string(),
            )])),
            ..ObjectMeta::default()
        };
        out.peers.push(peer);
    }
    out.peers
        .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

/// The ranges the local cluster's own Peers hold (those not written by a link for `remote`):
/// a remote segment may not take them either.
pub fn peer_claims(existing: &[PeerResource], remote: &str) -> Vec<Claim> {
    existing
        .iter()
        .filter(|p| linked_cluster(p) != Some(remote))
        .flat_map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            p.spec.allowed_ips.iter().filter_map(move |a| {
                a.parse::<IpNetwork>().ok().map(|net| Claim {
                    net: network_of(net),
                    what: format!("allowed IP of Peer {name}"),
                })
            })
        })
        .collect()
}

/// The cluster a Peer was linked for, if a link wrote it.
pub fn linked_cluster(p: &PeerResource) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LINK_LABEL))
        .map(String::as_str)
}

/// What a sync must send to make one cluster's Peers for `remote` what the link wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// Peers to create.
    pub create: Vec<PeerResource>,
    /// Peers to update (spec and annotations): the wanted object, with the stored one's
    /// `resourceVersion` and the labels and annotations others added kept.
    pub update: Vec<PeerResource>,
    /// Names of the link's Peers no longer wanted.
    pub delete: Vec<String>,
    /// Names wanted but held by a Peer the link did not write (or wrote for another cluster):
    /// left alone.
    pub foreign: Vec<String>,
}

impl Changes {
    /// Whether nothing needs sending.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// The difference between the Peers wanted for `remote` and every Peer of the local cluster.
pub fn diff(wanted: &[PeerResource], existing: &[PeerResource], remote: &str) -> Changes {
    let by_name: BTreeMap<&str, &PeerResource> = existing
        .iter()
        .filter_map(|p| p.metadata.name.as_deref().map(|n| (n, p)))
        .collect();
    let mut out = Changes::default();
    let mut wanted_names = BTreeSet::new();
    for w in wanted {
        let Some(name) = w.metadata.name.as_deref() else {
            continue;
        };
        wanted_names.insert(name);
        match by_name.get(name) {
            None => out.create.push(w.clone()),
            Some(e) if linked_cluster(e) != Some(remote) => out.foreign.push(name.to_owned()),
            Some(e) => {
                if e.spec != w.spec
                    || e.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(SEGMENT_ANNOTATION))
                        != w.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(SEGMENT_ANNOTATION))
                {
                    let mut u = w.clone();
                    u.metadata.resource_version = e.metadata.resource_version.clone();
                    // Keep what others added to the object's metadata.
                    let mut labels = e.metadata.labels.clone().unwrap_or_default();
                    labels.extend(w.metadata.labels.clone().unwrap_or_default());
                    u.metadata.labels = Some(labels);
                    let mut ann = e.metadata.annotations.clone().unwrap_or_default();
                    ann.extend(w.metadata.annotations.clone().unwrap_or_default());
                    u.metadata.annotations = Some(ann);
                    out.update.push(u);
                }
            }
        }
    }
    for e in existing {
        if linked_cluster(e) == Some(remote)
            && let Some(n) = e.metadata.name.as_deref()
            && !wanted_names.contains(n)
        {
            out.delete.push(n.to_owned());
        }
    }
    out
}

/// The names of the Peers a link wrote for `remote`: what `unlink` deletes.
pub fn linked_names(existing: &[PeerResource], remote: &str) -> Vec<String> {
    existing
        .iter()
        .filter(|p| linked_cluster(p) == Some(remote))
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[cfg(test)]
mod tests;
