//! Properties of the claim check (`topology::claims`): what one node may claim against what the
//! others own, and that names never decide.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use proptest::prelude::*;
use wiremesh::model::{MeshNode, NodeName};
use wiremesh::topology::claims::check;
use wiremesh::topology::incremental::{Engine, Event};
use wiremesh::topology::{MeshOptions, compute, segment_key};

use crate::util::strategy as gens;

fn opts(full: bool) -> MeshOptions {
    MeshOptions {
        encapsulate: MeshOptions::default().encapsulate,
        service_cidrs: vec!["10.96.0.0/12".parse().expect("cidr")],
        ..gens::opts(full)
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

fn host(ip: std::net::IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

/// A node's accepted claims: pod CIDRs, internal IP, allowed-location-ips.
type Claims = (Vec<IpNetwork>, Option<IpNetwork>, Vec<IpNetwork>);

/// The accepted nodes as (name, claims), names mapped through `rename`.
fn accepted(
    nodes: &[MeshNode],
    o: &MeshOptions,
    rename: &dyn Fn(&str) -> String,
) -> BTreeMap<String, Claims> {
    check(nodes, o)
        .iter()
        .map(|n| {
            let mut alips = n.allowed_location_ips.clone();
            alips.sort();
            (
                rename(n.name.as_str()),
                (n.pod_cidrs.clone(), n.internal_ip, alips),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Property: no claim the check accepts overlaps an address another owner holds: another
    /// node's pod CIDR, endpoint or internal IP, another segment's allowed-location-ips, the mesh
    /// subnet, the service range or a reserved range; and no key is used twice.
    #[test]
    fn no_accepted_claim_overlaps_another_owners_address(
        nodes in gens::hostile_cluster(8),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let checked = check(&nodes, &o);
        let accepted: Vec<&MeshNode> = checked.iter().collect();
        let reserved: Vec<IpNetwork> = [
            "169.254.0.0/16", "fe80::/10", "127.0.0.0/8", "::1/128", "224.0.0.0/4", "ff00::/8",
            "0.0.0.0/32", "::/128", "10.4.0.0/16", "10.96.0.0/12",
        ].iter().map(|c| c.parse().expect("cidr")).collect();
        let mut keys = BTreeSet::new();
        for a in &accepted {
            prop_assert!(keys.insert(a.key), "key twice: {}", a.name);
            let ep = a.endpoint.as_ref().and_then(|e| e.ip()).map(host);
            let routed: Vec<IpNetwork> = a.pod_cidrs.iter().copied()
                .chain(a.internal_ip.map(|i| host(i.ip())))
                .chain(a.allowed_location_ips.iter().copied())
                .collect();
            for c in routed.iter().chain(ep.iter()) {
                for r in &reserved {
                    prop_assert!(!overlaps(c, r), "{} claims {c} in {r}", a.name);
                }
            }
            for alip in &a.allowed_location_ips {
                prop_assert!(o.allowed_location_ips_within.iter().any(|w| overlaps(w, alip) && w.prefix() <= alip.prefix()));
            }
            for b in &accepted {
                if a.name == b.name {
                    continue;
                }
                let same_segment = segment_key(a, o.granularity) == segment_key(b, o.granularity);
                let b_ep = b.endpoint.as_ref().and_then(|e| e.ip()).map(host);
                for p in &b.pod_cidrs {
                    for c in routed.iter().chain(ep.iter()) {
                        prop_assert!(!overlaps(c, p), "{} claims {c} over pod CIDR {p} of {}", a.name, b.name);
                    }
                }
                if let (Some(i), Some(e)) = (a.internal_ip, b_ep) {
                    prop_assert!(host(i.ip()) != e, "{} internal IP is {}'s endpoint", a.name, b.name);
                }
                if !same_segment {
                    for alip in &a.allowed_location_ips {
                        for h in b_ep.iter().chain(b.internal_ip.map(|i| host(i.ip())).iter()) {
                            prop_assert!(!alip.contains(h.ip()), "{} claims {alip} over {h} of {}", a.name, b.name);
                        }
                        for other in &b.allowed_location_ips {
                            prop_assert!(!overlaps(alip, other), "{} and {} both claim {alip}/{other}", a.name, b.name);
                        }
                    }
                }
            }
        }
    }

    /// Property: renaming the nodes (a permutation of their names) changes neither which nodes
    /// take part nor which claims are accepted.
    #[test]
    fn the_node_set_and_accepted_claims_are_independent_of_names(
        nodes in gens::hostile_cluster(8),
        full in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let o = opts(full);
        let n = nodes.len();
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let mut renamed = nodes.clone();
        let mut back: BTreeMap<String, String> = BTreeMap::new();
        for (i, m) in renamed.iter_mut().enumerate() {
            let new = format!("r{:02}", perm[i]);
            back.insert(new.clone(), m.name.0.clone());
            m.name = NodeName(new);
        }
        let same = |s: &str| s.to_owned();
        let unname = |s: &str| back.get(s).cloned().unwrap_or_default();
        prop_assert_eq!(accepted(&nodes, &o, &same), accepted(&renamed, &o, &unname));
    }

    /// Property: with hostile claims, any sequence of node events applied to the incremental
    /// engine ends in the state of the full computation.
    #[test]
    fn hostile_events_end_in_the_full_recompute_state(
        start in gens::hostile_cluster(6),
        events in prop::collection::vec((0..6u8).prop_flat_map(gens::hostile_node), 1..20),
        full in any::<bool>(),
    ) {
        let o = opts(full);
        let local = start[0].name.clone();
        let mut engine = Engine::new(start.clone(), Vec::new(), local.clone(), o.clone());
        let mut nodes: BTreeMap<NodeName, MeshNode> =
            start.into_iter().map(|n| (n.name.clone(), n)).collect();
        for n in events {
            nodes.insert(n.name.clone(), n.clone());
            engine.apply(Event::node(n));
            let all: Vec<MeshNode> = nodes.values().cloned().collect();
            let want = compute(&all, &[], &local, &o).map(|p| p.desired);
            prop_assert_eq!(engine.desired(), want);
        }
    }
}
