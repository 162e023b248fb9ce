//! The desired state of a machine outside the cluster that joins the mesh as an external peer
//! (`meshctl connect`): what [`crate::showconf::peer_conf`] prints for it, as a
//! [`DesiredState`] the agent's reconciler can apply.
//!
//! Pure: no I/O. Depends on the topology, the showconf renderer of a peer's configuration and
//! the desired state; never on netlink, Kubernetes or async code.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::desired::{DesiredState, MAIN_TABLE, Masquerade, Route, RouteDev, WgInterface};
use crate::model::{Endpoint, NodeName};
use crate::showconf::{ShowconfError, peer_conf};
use crate::topology::{MeshOptions, Topology};

/// How the outside machine's own interface is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideOptions {
    /// The local WireGuard interface.
    pub interface: String,
    /// Its UDP listen port.
    pub listen_port: u16,
    /// A fixed MTU; `None`: the path towards the cluster's MTU minus WireGuard's overhead.
    pub mtu: Option<u32>,
    /// The cluster's service CIDRs to reach too: routed to the first segment of the mesh.
    pub service_cidrs: Vec<IpNetwork>,
}

/// The state external peer `peer` programs on its own machine to take part in the mesh.
///
/// - The interface: `opts.interface` with the Peer's first allowed IP as its address.
/// - Its WireGuard peers: those of [`peer_conf`] (one per segment, one per other external peer,
///   with the Peer's keepalive and preshared key); the service CIDRs are added to the allowed
///   IPs of the first segment's peer (in the mesh's order), whose leader hands them to the
///   cluster's service proxy, as `kgctl connect --allowed-ips` adds them to one node's segment.
/// - One route through the interface per allowed IP of every peer (pod CIDRs, internal IPs,
///   mesh IPs, allowed location IPs, other peers), except a destination that holds the endpoint
///   a peer is reached at: WireGuard's own packets to it would go into the tunnel.
/// - Nothing else: no bridge, rules, masquerading or MSS clamp (the machine forwards nothing).
pub fn outside_state(
    topo: &Topology<'_>,
    peer: &NodeName,
    mesh: &MeshOptions,
    opts: &OutsideOptions,
) -> Result<DesiredState, ShowconfError> {
    let conf = peer_conf(topo, peer, mesh)?;
    let mut peers = conf.peers;
    let segment_keys: BTreeSet<_> = topo
        .segments
        .iter()
        .filter_map(|s| s.public_key())
        .collect();
    // `peer_conf` lists the segments first, in the mesh's order.
    if let Some(first) = peers
        .iter_mut()
        .find(|p| segment_keys.contains(&p.public_key))
    {
        for c in &opts.service_cidrs {
            let c = crate::model::network_of(*c);
            if !first.allowed_ips.contains(&c) {
                first.allowed_ips.push(c);
            }
        }
    }
    peers.sort_by_key(|p| p.public_key);
    let endpoints: Vec<IpAddr> = peers
        .iter()
        .filter_map(|p| p.endpoint.as_ref().and_then(Endpoint::ip))
        .collect();
    let mut routes: Vec<Route> = peers
        .iter()
        .flat_map(|p| &p.allowed_ips)
        .filter(|dst| !endpoints.iter().any(|ip| dst.contains(*ip)))
        .map(|&dst| Route {
            table: MAIN_TABLE,
            dst,
            gateway: None,
            dev: RouteDev::WireGuard,
            src: None,
            onlink: false,
        })
        .collect();
    routes.sort();
    routes.dedup();
    Ok(DesiredState {
        node: peer.to_string(),
        leader: true,
        interface: WgInterface {
            name: opts.interface.clone(),
            listen_port: opts.listen_port,
            address: conf.interface.addresses.first().copied(),
            mtu: opts.mtu,
            // The automatic MTU follows the path to the first endpoint known.
            underlay: endpoints.first().copied(),
            mss_clamp: false,
        },
        peers,
        routes,
        rules: Vec::new(),
        bridge: None,
        masquerade: Masquerade::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{Granularity, MeshNode, MeshPeer, WgKey};
    use crate::reconcile::plan::{OwnedState, apply_op, plan};
    use crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL;
    use crate::registry::file::{load_nodes, load_peers};
    use crate::topology::{build_checked, claims};

    const LAPTOP_KEY: &str = "uN6GxGhVSEBwdGc3biyYBmAKCFyywS0JuWcOHUm9RHk=";

    fn example(file: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(file)
    }

    fn inputs() -> (Vec<MeshNode>, Vec<MeshPeer>) {
        let nodes = load_nodes(&example("locations.yaml"), DEFAULT_TOPOLOGY_LABEL)
            .unwrap()
            .items;
        let peers = load_peers(&example("peers.yaml")).unwrap().items;
        (nodes, peers)
    }

    fn opts() -> OutsideOptions {
        OutsideOptions {
            interface: "wm-connect0".into(),
            listen_port: 51820,
            mtu: None,
            service_cidrs: Vec::new(),
        }
    }

    fn mesh() -> MeshOptions {
        MeshOptions {
            granularity: Granularity::Location,
            ..MeshOptions::default()
        }
    }

    fn state_of(peers: &[MeshPeer], o: &OutsideOptions) -> Result<DesiredState, ShowconfError> {
        let (nodes, _) = inputs();
        let m = mesh();
        let checked = claims::check(&nodes, &m);
        let topo = build_checked(&checked, peers, &m);
        outside_state(&topo, &NodeName("laptop".into()), &m, o)
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_outside_machine_holds_the_peers_showconf_prints_and_a_route_per_allowed_ip() {
        let (nodes, peers) = inputs();
        let d = state_of(&peers, &opts()).unwrap();
        let m = mesh();
        let checked = claims::check(&nodes, &m);
        let topo = build_checked(&checked, &peers, &m);
        let mut conf = peer_conf(&topo, &NodeName("laptop".into()), &m)
            .unwrap()
            .peers;
        conf.sort_by_key(|p| p.public_key);
        assert_eq!(d.peers, conf, "the same peers as `showconf peer laptop`");
        assert_eq!(d.peers.len(), 3, "one per location: {:?}", d.peers);
        assert!(
            d.peers
                .iter()
                .all(|p| p.public_key != LAPTOP_KEY.parse::<WgKey>().unwrap())
        );
        assert_eq!(d.interface.name, "wm-connect0");
        assert_eq!(d.interface.address, Some(net("10.5.0.1/32")));
        assert_eq!(d.interface.listen_port, 51820);
        assert!(!d.interface.mss_clamp);
        assert!(d.bridge.is_none() && d.rules.is_empty());
        assert_eq!(d.masquerade, Masquerade::default());
        let mut want: Vec<IpNetwork> = d
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        want.sort();
        let got: Vec<IpNetwork> = d.routes.iter().map(|r| r.dst).collect();
        assert_eq!(got, want, "a route per allowed IP, sorted");
        for r in &d.routes {
            assert_eq!(
                (r.table, r.dev, r.gateway, r.src, r.onlink),
                (MAIN_TABLE, RouteDev::WireGuard, None, None, false),
                "{r:?}"
            );
        }
        for dst in [
            "10.42.10.0/24",
            "10.42.21.0/24",
            "10.42.31.0/24",
            "10.1.9.0/24",
        ] {
            assert!(got.contains(&net(dst)), "{dst} not routed: {got:?}");
        }
        // The mesh IPs are routed too: a leader has its subnet by its own address, this
        // machine has none.
        assert!(
            got.iter()
                .filter(|n| net("10.4.0.0/16").contains(n.ip()) && n.prefix() == 32)
                .count()
                == 3,
            "{got:?}"
        );
        assert_eq!(
            d.interface.underlay,
            d.peers
                .iter()
                .find_map(|p| p.endpoint.as_ref().and_then(Endpoint::ip))
        );
    }

    #[test]
    fn service_cidrs_go_to_the_first_segment_only_and_are_routed() {
        let (_, peers) = inputs();
        let mut o = opts();
        o.service_cidrs = vec![net("10.96.0.1/12")];
        let d = state_of(&peers, &o).unwrap();
        let holders: Vec<&str> = d
            .peers
            .iter()
            .filter(|p| p.allowed_ips.contains(&net("10.96.0.0/12")))
            .map(|p| p.name.as_str())
            .collect();
        let plain = state_of(&peers, &opts()).unwrap();
        let (nodes, _) = inputs();
        let m = mesh();
        let checked = claims::check(&nodes, &m);
        let topo = build_checked(&checked, &peers, &m);
        let first_key = topo.segments[0].public_key();
        let first = plain.peers.iter().find(|p| Some(p.public_key) == first_key);
        assert_eq!(holders, [first.map(|p| p.name.as_str()).unwrap()]);
        assert!(d.routes.iter().any(|r| r.dst == net("10.96.0.0/12")));
        assert_eq!(d.routes.len(), plain.routes.len() + 1);
    }

    #[test]
    fn no_route_swallows_the_endpoint_a_peer_is_reached_at() {
        let (_, mut peers) = inputs();
        peers.push(MeshPeer {
            name: "office".into(),
            key: "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
                .parse()
                .unwrap(),
            allowed_ips: vec![net("192.0.2.0/24"), net("10.6.0.0/24")],
            endpoint: Some("192.0.2.7:51820".parse().unwrap()),
            persistent_keepalive: 0,
            preshared_key: None,
        });
        let d = state_of(&peers, &opts()).unwrap();
        let office = d.peers.iter().find(|p| p.name == "office").unwrap();
        assert!(office.allowed_ips.contains(&net("192.0.2.0/24")));
        assert!(d.routes.iter().any(|r| r.dst == net("10.6.0.0/24")));
        assert!(
            !d.routes.iter().any(|r| r.dst == net("192.0.2.0/24")),
            "WireGuard's packets to 192.0.2.7 would loop into the tunnel"
        );
    }

    #[test]
    fn a_peer_not_in_the_cluster_is_an_error_not_an_empty_state() {
        assert_eq!(
            state_of(&[], &opts()),
            Err(ShowconfError::UnknownPeer("laptop".into()))
        );
    }

    #[test]
    fn the_reconciler_converges_on_it_from_nothing() {
        let (_, peers) = inputs();
        let d = state_of(&peers, &opts()).unwrap();
        let key: WgKey = LAPTOP_KEY.parse().unwrap();
        let mut state = OwnedState::default();
        let ops = plan(&d, &state, key);
        assert!(ops.iter().all(|op| !matches!(
            op,
            crate::reconcile::Op::SetMasquerade(_)
                | crate::reconcile::Op::SetBridge(_)
                | crate::reconcile::Op::SetMssClamp { .. }
                | crate::reconcile::Op::AddRule(_)
                | crate::reconcile::Op::WriteCni { .. }
        )));
        for op in ops {
            apply_op(&mut state, op, key);
        }
        assert_eq!(
            plan(&d, &state, key),
            vec![],
            "a second plan has nothing to do"
        );
    }
}
