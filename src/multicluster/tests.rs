use super::*;
use crate::model::{Granularity, WgKey};

fn key(i: u8) -> WgKey {
    let mut k = [0u8; 32];
    k[31] = i;
    WgKey(k)
}

/// A node ready for the mesh: key `i`, endpoint `10.200.0.i:51820`, internal IP `10.210.0.i/24`,
/// pod CIDR `pod`, in `location`.
fn node(name: &str, i: u8, location: &str, pod: &str) -> MeshNode {
    let mut n = MeshNode::new(name);
    n.key = Some(key(i));
    n.location = location.to_owned();
    n.endpoint = Some(format!("10.200.0.{i}:51820").parse().unwrap());
    n.internal_ip = Some(format!("10.210.0.{i}/24").parse().unwrap());
    n.pod_cidrs = vec![pod.parse().unwrap()];
    n
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn view<'a>(name: &'a str, nodes: &'a [MeshNode], subnet: &str) -> ClusterView<'a> {
    ClusterView {
        name,
        nodes,
        subnet: net(subnet),
        service_cidrs: &[],
    }
}

fn opts(granularity: Granularity, subnet: &str) -> MeshOptions {
    MeshOptions {
        granularity,
        subnet: net(subnet),
        ..MeshOptions::default()
    }
}

#[test]
fn names_must_be_distinct_dns_labels() {
    assert!(check_names("east", "west-2").is_ok());
    assert_eq!(
        check_names("east", "east"),
        Err(LinkError::SameName("east".into()))
    );
    for bad in ["", "East", "-a", "a-", "a.b", &"x".repeat(41)] {
        assert_eq!(
            check_name(bad),
            Err(LinkError::Name(bad.to_owned())),
            "{bad}"
        );
    }
}

#[test]
fn published_subnet_is_the_network_most_mesh_ips_are_in() {
    let mut nodes = vec![MeshNode::new("a"), MeshNode::new("b"), MeshNode::new("c")];
    assert_eq!(published_subnet(&nodes), None);
    nodes[0].wireguard_ip = Some(net("10.5.0.1/16"));
    nodes[1].wireguard_ip = Some(net("10.5.0.2/16"));
    nodes[2].wireguard_ip = Some(net("10.4.0.1/16"));
    assert_eq!(published_subnet(&nodes), Some(net("10.5.0.0/16")));
}

#[test]
fn disjoint_clusters_pass_the_check() {
    let a = [node("a1", 1, "", "10.201.1.0/24")];
    let b = [node("b1", 2, "", "10.201.2.0/24")];
    assert_eq!(
        check(&view("a", &a, "10.4.0.0/16"), &view("b", &b, "10.5.0.0/16")),
        Ok(())
    );
}

#[test]
fn overlapping_pod_cidrs_are_refused_naming_both_nodes() {
    let a = [node("a1", 1, "", "10.201.0.0/16")];
    let b = [node("b1", 2, "", "10.201.7.0/24")];
    let err = check(&view("a", &a, "10.4.0.0/16"), &view("b", &b, "10.5.0.0/16")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pod CIDR of node a1 10.201.0.0/16 of cluster a overlaps pod CIDR of node b1 10.201.7.0/24 of cluster b"),
        "{msg}"
    );
}

#[test]
fn equal_mesh_subnets_are_refused() {
    let a = [node("a1", 1, "", "10.201.1.0/24")];
    let b = [node("b1", 2, "", "10.201.2.0/24")];
    let err = check(&view("a", &a, "10.4.0.0/16"), &view("b", &b, "10.4.0.0/16")).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "mesh subnet 10.4.0.0/16 of cluster a overlaps mesh subnet 10.4.0.0/16 of cluster b"
        ),
        "{err}"
    );
}

#[test]
fn a_service_cidr_inside_the_other_clusters_pods_is_refused_and_all_overlaps_are_counted() {
    let a = [node("a1", 1, "", "10.201.1.0/24")];
    let b = [node("b1", 2, "", "10.201.2.0/24")];
    let services = [net("10.201.0.0/16")];
    let mut va = view("a", &a, "10.4.0.0/16");
    va.service_cidrs = &services;
    match check(&va, &view("b", &b, "10.5.0.0/16")) {
        // Its own pod CIDR is no concern of the link; the other's is.
        Err(LinkError::Overlap(o)) => {
            assert_eq!(o.a_claim.what, "service CIDR");
            assert_eq!(o.b_claim.what, "pod CIDR of node b1");
        }
        other => panic!("expected one overlap, got {other:?}"),
    }
    let b2 = [
        node("b1", 2, "", "10.201.2.0/24"),
        node("b2", 3, "", "10.201.3.0/24"),
    ];
    let err = check(&va, &view("b", &b2, "10.5.0.0/16")).unwrap_err();
    assert!(
        matches!(&err, LinkError::Overlaps(v) if v.len() == 2),
        "{err:?}"
    );
    assert!(err.to_string().ends_with("(and 1 more overlaps)"), "{err}");
}

#[test]
fn ipv4_and_ipv6_ranges_never_overlap() {
    assert!(!nets_overlap(net("0.0.0.0/0"), net("::/0")));
    assert!(nets_overlap(net("10.0.0.0/8"), net("10.1.2.0/24")));
    assert!(nets_overlap(net("10.1.2.0/24"), net("10.0.0.0/8")));
    assert!(!nets_overlap(net("10.1.2.0/24"), net("10.1.3.0/24")));
}

fn allowed(p: &PeerResource) -> Vec<&str> {
    p.spec.allowed_ips.iter().map(String::as_str).collect()
}

#[test]
fn full_granularity_links_one_peer_per_node_without_internal_ips() {
    let b = [
        node("n2", 2, "eu", "10.201.2.0/24"),
        node("n1", 1, "eu", "10.201.1.0/24"),
    ];
    let w = wanted(
        &view("b", &b, "10.5.0.0/16"),
        &opts(Granularity::Full, "10.5.0.0/16"),
        &[],
    );
    assert!(w.diagnostics.is_empty(), "{:?}", w.diagnostics);
    let names: Vec<_> = w
        .peers
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["b-n1", "b-n2"]);
    let p1 = &w.peers[0];
    // Kilo's order gives n1 the first mesh IP of the remote's subnet.
    assert_eq!(allowed(p1), ["10.201.1.0/24", "10.5.0.1/32"]);
    assert_eq!(p1.spec.public_key, key(1).to_string());
    let ep = p1.spec.endpoint.as_ref().unwrap();
    assert_eq!((ep.dns_or_ip.ip.as_str(), ep.port), ("10.200.0.1", 51820));
    assert_eq!(linked_cluster(p1), Some("b"));
    assert_eq!(
        p1.metadata.annotations.as_ref().unwrap()[SEGMENT_ANNOTATION],
        "node:n1"
    );
    assert_eq!(allowed(&w.peers[1]), ["10.201.2.0/24", "10.5.0.2/32"]);
}

#[test]
fn location_granularity_links_the_leader_with_every_pod_cidr_of_its_location() {
    let mut b = vec![
        node("n1", 1, "eu", "10.201.1.0/24"),
        node("n2", 2, "eu", "10.201.2.0/24"),
        node("n3", 3, "us west", "10.201.3.0/24"),
    ];
    b[1].leader = true;
    b[2].persistent_keepalive = 25;
    let services = [net("10.96.0.0/12")];
    let mut vb = view("b", &b, "10.5.0.0/16");
    vb.service_cidrs = &services;
    let w = wanted(&vb, &opts(Granularity::Location, "10.5.0.0/16"), &[]);
    assert_eq!(w.peers.len(), 2, "{:?}", w.peers);
    let eu = &w.peers[0];
    assert_eq!(eu.metadata.name.as_deref(), Some("b-location-eu"));
    assert_eq!(
        eu.spec.public_key,
        key(2).to_string(),
        "the volunteer leads"
    );
    // The service CIDR goes on the first segment only.
    assert_eq!(
        allowed(eu),
        [
            "10.201.1.0/24",
            "10.201.2.0/24",
            "10.5.0.1/32",
            "10.96.0.0/12"
        ]
    );
    let us = &w.peers[1];
    let name = us.metadata.name.as_deref().unwrap();
    assert!(name.starts_with("b-location-us-west-"), "{name}");
    assert!(crate::model::is_dns1123_subdomain(name), "{name}");
    assert_eq!(allowed(us), ["10.201.3.0/24", "10.5.0.2/32"]);
    assert_eq!(
        us.spec.persistent_keepalive, 25,
        "a NATed leader keeps its roamed endpoint"
    );
}

#[test]
fn location_names_that_are_not_labels_get_distinct_hashed_names() {
    let a = peer_name("b", &SegmentKey::Location("Eu West".into()));
    let c = peer_name("b", &SegmentKey::Location("eu-west".into()));
    let d = peer_name("b", &SegmentKey::Location("eu_west".into()));
    assert_eq!(c, "b-location-eu-west");
    assert!(a != c && a != d && c != d, "{a} {c} {d}");
    let e = peer_name("b", &SegmentKey::Location(String::new()));
    assert!(crate::model::is_dns1123_subdomain(&e), "{e}");
    let long = peer_name("b", &SegmentKey::Location("Ü".repeat(80)));
    assert!(crate::model::is_dns1123_subdomain(&long), "{long}");
}

#[test]
fn nodes_the_engine_leaves_out_are_not_linked_and_are_reported() {
    let mut b = vec![
        node("n1", 1, "", "10.201.1.0/24"),
        node("n2", 2, "", "10.201.2.0/24"),
    ];
    b[1].key = None;
    let w = wanted(
        &view("b", &b, "10.5.0.0/16"),
        &opts(Granularity::Full, "10.5.0.0/16"),
        &[],
    );
    assert_eq!(w.peers.len(), 1);
    assert!(
        w.diagnostics.iter().any(|d| d.name == "n2" && d.skipped),
        "{:?}",
        w.diagnostics
    );
}

#[test]
fn a_segment_overlapping_a_local_range_is_left_out_with_a_diagnostic() {
    let b = [
        node("n1", 1, "", "10.201.1.0/24"),
        node("n2", 2, "", "10.201.2.0/24"),
    ];
    let local = [Claim {
        net: net("10.201.2.0/23"),
        what: "pod CIDR of node a9".into(),
    }];
    let w = wanted(
        &view("b", &b, "10.5.0.0/16"),
        &opts(Granularity::Full, "10.5.0.0/16"),
        &local,
    );
    assert_eq!(w.peers.len(), 1);
    assert_eq!(w.peers[0].metadata.name.as_deref(), Some("b-n1"));
    let d = w.diagnostics.iter().find(|d| d.name == "b-n2").unwrap();
    assert!(
        d.problem
            .contains("10.201.2.0/24 of segment node:n2 of cluster b overlaps the local pod CIDR of node a9 10.201.2.0/23"),
        "{}",
        d.problem
    );
}

fn stored(mut p: PeerResource, version: &str) -> PeerResource {
    p.metadata.resource_version = Some(version.into());
    p
}

#[test]
fn diff_creates_updates_and_deletes_only_the_links_own_peers() {
    let b = [
        node("n1", 1, "", "10.201.1.0/24"),
        node("n2", 2, "", "10.201.2.0/24"),
    ];
    let o = opts(Granularity::Full, "10.5.0.0/16");
    let w = wanted(&view("b", &b, "10.5.0.0/16"), &o, &[]).peers;
    // In the cluster: b-n1 as wanted, b-n2 with an old key, b-gone (linked, no longer a node),
    // a Peer of the user's own, and one another link wrote for cluster c.
    let mut old_n2 = w[1].clone();
    old_n2.spec.public_key = key(9).to_string();
    let mut gone = w[0].clone();
    gone.metadata.name = Some("b-gone".into());
    let mut users = w[0].clone();
    users.metadata.name = Some("laptop".into());
    users.metadata.labels = None;
    let mut other_link = w[0].clone();
    other_link.metadata.name = Some("c-n1".into());
    other_link.metadata.labels = Some(BTreeMap::from([(LINK_LABEL.into(), "c".into())]));
    let existing = vec![
        stored(w[0].clone(), "1"),
        stored(old_n2, "2"),
        stored(gone, "3"),
        stored(users, "4"),
        stored(other_link, "5"),
    ];
    let c = diff(&w, &existing, "b");
    assert!(c.create.is_empty(), "{:?}", c.create);
    assert_eq!(c.update.len(), 1);
    assert_eq!(c.update[0].metadata.name.as_deref(), Some("b-n2"));
    assert_eq!(c.update[0].metadata.resource_version.as_deref(), Some("2"));
    assert_eq!(c.update[0].spec.public_key, key(2).to_string());
    assert_eq!(c.delete, ["b-gone"]);
    assert!(c.foreign.is_empty());
    // Once applied, nothing is left to send.
    let applied = vec![stored(w[0].clone(), "1"), stored(w[1].clone(), "6")];
    assert!(diff(&w, &applied, "b").is_empty());
}

#[test]
fn a_name_held_by_someone_elses_peer_is_never_taken() {
    let b = [node("n1", 1, "", "10.201.1.0/24")];
    let w = wanted(
        &view("b", &b, "10.5.0.0/16"),
        &opts(Granularity::Full, "10.5.0.0/16"),
        &[],
    )
    .peers;
    let mut users = w[0].clone();
    users.metadata.labels = None;
    users.spec.public_key = key(7).to_string();
    let c = diff(&w, &[stored(users, "1")], "b");
    assert!(c.is_empty(), "{c:?}");
    assert_eq!(c.foreign, ["b-n1"]);
    // Unlink would delete nothing of it either.
    assert!(linked_names(&[w[0].clone()], "c").is_empty());
    assert_eq!(linked_names(&w, "b"), ["b-n1"]);
}

#[test]
fn an_update_keeps_labels_and_annotations_others_added() {
    let b = [node("n1", 1, "", "10.201.1.0/24")];
    let o = opts(Granularity::Full, "10.5.0.0/16");
    let w = wanted(&view("b", &b, "10.5.0.0/16"), &o, &[]).peers;
    let mut e = w[0].clone();
    e.spec.allowed_ips.push("10.9.9.0/24".into());
    e.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "net".into());
    let c = diff(&w, &[stored(e, "3")], "b");
    assert_eq!(c.update.len(), 1);
    let labels = c.update[0].metadata.labels.as_ref().unwrap();
    assert_eq!(labels.get("team").map(String::as_str), Some("net"));
    assert_eq!(labels.get(LINK_LABEL).map(String::as_str), Some("b"));
    assert_eq!(allowed(&c.update[0]), ["10.201.1.0/24", "10.5.0.1/32"]);
}

#[test]
fn the_local_clusters_own_peers_are_claims_the_links_are_not() {
    let b = [node("n1", 1, "", "10.201.1.0/24")];
    let w = wanted(
        &view("b", &b, "10.5.0.0/16"),
        &opts(Granularity::Full, "10.5.0.0/16"),
        &[],
    )
    .peers;
    let mut users = w[0].clone();
    users.metadata.name = Some("laptop".into());
    users.metadata.labels = None;
    users.spec.allowed_ips = vec!["10.10.10.10/32".into()];
    let claims = peer_claims(&[w[0].clone(), users], "b");
    assert_eq!(
        claims,
        [Claim {
            net: net("10.10.10.10/32"),
            what: "allowed IP of Peer laptop".into()
        }]
    );
}
