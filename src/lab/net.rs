//! Builds the lab's network with `ip`, `sysctl` and `nft`: the underlay bridge, one LAN bridge
//! per location (with its NAT router when the location is behind NAT), and each node's
//! namespace wired to them.
//!
//! ```text
//!            wml-<lab>-ul: br0 10.200.0.254 (the "internet" edge; forwards nothing)
//!     ┌───────────┬──────┴───────────────┐
//!  n1 eth0     n2 eth0              l3 up0 10.200.0.3  NAT router: masquerade, no inbound
//!  10.200.0.1  10.200.0.2           l3 br0 10.210.3.1
//!  n1 eth1     n2 eth1                  │
//!  wml-<lab>-l1  wml-<lab>-l2       n3 eth0 10.210.3.11, default via 10.210.3.1
//! ```
//!
//! An IPv6 or dual-stack lab ([`Family`]) has the same shape, without NAT routers: every
//! address and default route is there once per family, IPv6 addresses without duplicate
//! address detection (nothing else claims them, and DAD would hold them back a second or two).
//!
//! Public nodes route by default to the underlay edge, so a pod packet that missed the tunnel
//! would show up on the underlay (where `lab check` looks for it) instead of vanishing.
//! Every link is created directly inside its namespaces, so nothing appears in the host's
//! namespace. Depends on the spec, the state (names) and `sys` (commands).

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::LabError;
use super::spec::{Family, LabSpec, LanSpec, NatRouter, NodeSpec, host};
use super::state::LabState;
use super::sys::{ip, ip_n, ns_exec, run_with};

/// Name of the bridge in the underlay and in every LAN namespace.
pub const BRIDGE: &str = "br0";
/// The NAT router's uplink interface.
pub const UPLINK: &str = "up0";
/// Host number of the underlay's edge address (default gateway of public nodes and routers).
pub const EDGE_HOST: u8 = 254;
/// The nftables table of the NAT routers.
pub const NAT_TABLE: &str = "wiremesh_lab";

/// The underlay's edge address, `10.200.0.254` (`fd00:200::fe` in an IPv6-only lab).
pub fn edge_ip(spec: &LabSpec) -> IpAddr {
    host(spec.underlay, EDGE_HOST)
}

/// The underlay's edge addresses with their subnets' prefixes, one per family.
pub fn edge_addrs(spec: &LabSpec) -> Vec<IpNetwork> {
    spec.underlays()
        .into_iter()
        .filter_map(|n| IpNetwork::new(host(n, EDGE_HOST), n.prefix()).ok())
        .collect()
}

/// Port name of node `i` on a bridge.
pub fn node_port(i: usize) -> String {
    format!("n{i}")
}

/// Port name of LAN `k`'s router on the underlay bridge.
pub fn router_port(k: usize) -> String {
    format!("l{k}")
}

/// The interfaces of a node: (underlay, LAN). Public nodes have `eth0` on the underlay and
/// `eth1` on the LAN; a node behind NAT has only `eth0`, on the LAN.
pub fn node_ifaces(node: &NodeSpec) -> (Option<&'static str>, &'static str) {
    if node.behind_nat() {
        (None, "eth0")
    } else {
        (Some("eth0"), "eth1")
    }
}

fn add_netns(netns: &str) -> Result<(), LabError> {
    ip(&["netns", "add", netns])?;
    ip_n(netns, &["link", "set", "lo", "up"])?;
    Ok(())
}

fn forward(netns: &str, family: Family) -> Result<(), LabError> {
    ns_exec(netns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    if family.has_ipv6() {
        ns_exec(netns, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    }
    Ok(())
}

/// `ip route add default via gateway`, in the gateway's family.
fn default_route(netns: &str, gateway: IpAddr) -> Result<(), LabError> {
    let family = if gateway.is_ipv6() { "-6" } else { "-4" };
    ip_n(
        netns,
        &[
            family,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ],
    )
    .map(drop)
}

fn add_bridge(netns: &str) -> Result<(), LabError> {
    ip_n(netns, &["link", "add", BRIDGE, "type", "bridge"])?;
    ip_n(netns, &["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// A veth pair: `inner` in `inner_ns`, `port` in `bridge_ns` enslaved to its bridge and up;
/// both ends with MTU `mtu` when given (the bridge takes the smallest MTU of its ports).
fn add_port(
    inner_ns: &str,
    inner: &str,
    bridge_ns: &str,
    port: &str,
    mtu: Option<u32>,
) -> Result<(), LabError> {
    ip(&[
        "link", "add", inner, "netns", inner_ns, "type", "veth", "peer", "name", port, "netns",
        bridge_ns,
    ])?;
    if let Some(m) = mtu {
        let m = m.to_string();
        ip_n(inner_ns, &["link", "set", inner, "mtu", &m])?;
        ip_n(bridge_ns, &["link", "set", port, "mtu", &m])?;
    }
    ip_n(bridge_ns, &["link", "set", port, "master", BRIDGE, "up"])?;
    Ok(())
}

fn add_addr(netns: &str, dev: &str, addr: IpAddr, prefix: u8) -> Result<(), LabError> {
    let cidr = format!("{addr}/{prefix}");
    let mut args = vec!["addr", "add", &cidr, "dev", dev];
    if addr.is_ipv6() {
        args.push("nodad");
    }
    ip_n(netns, &args)?;
    ip_n(netns, &["link", "set", dev, "up"])?;
    Ok(())
}

/// Create the underlay namespace and its bridge with the edge address.
pub fn create_underlay(state: &LabState) -> Result<(), LabError> {
    let ns = &state.underlay_ns;
    add_netns(ns)?;
    add_bridge(ns)?;
    for edge in edge_addrs(&state.spec) {
        add_addr(ns, BRIDGE, edge.ip(), edge.prefix())?;
    }
    Ok(())
}

/// The nftables ruleset of a NAT router: masquerade the LAN onto the uplink, and let in from
/// the uplink only what answers the LAN's own connections.
pub fn nat_ruleset(lan: &LanSpec) -> String {
    format!(
        "table ip {NAT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{UPLINK}\" ip saddr {subnet} counter masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{UPLINK}\" ct state established,related counter accept\n\
         \t\tiifname \"{UPLINK}\" counter drop\n\
         \t}}\n\
         }}\n",
        subnet = lan.subnet
    )
}

/// Create the namespace of a LAN, its bridge, and when it is behind NAT its router.
pub fn create_lan(state: &LabState, lan: &LanSpec) -> Result<(), LabError> {
    let ns = &state.lan_ns[lan.index - 1];
    add_netns(ns)?;
    add_bridge(ns)?;
    if let Some(NatRouter {
        lan_ip,
        underlay_ip,
    }) = lan.nat
    {
        ip_n(
            ns,
            &[
                "addr",
                "add",
                &format!("{lan_ip}/{}", lan.subnet.prefix()),
                "dev",
                BRIDGE,
            ],
        )?;
        add_port(
            ns,
            UPLINK,
            &state.underlay_ns,
            &router_port(lan.index),
            state.spec.underlay_mtu,
        )?;
        add_addr(
            ns,
            UPLINK,
            IpAddr::V4(underlay_ip),
            state.spec.underlay.prefix(),
        )?;
        default_route(ns, edge_ip(&state.spec))?;
        forward(ns, state.spec.family)?;
        let rules = nat_ruleset(lan);
        run_with(
            "ip",
            &["netns", "exec", ns, "nft", "-f", "-"].map(std::ffi::OsStr::new),
            Some(rules.as_bytes()),
            &[],
        )?;
    }
    Ok(())
}

/// Create a node's namespace and wire it to the underlay (public nodes) and its LAN.
pub fn create_node(state: &LabState, node: &NodeSpec) -> Result<(), LabError> {
    let ns = &state
        .node(&node.name)
        .ok_or_else(|| LabError::Options(format!("node {} is not in the state", node.name)))?
        .1
        .netns;
    let lan = state.spec.lan_of(node);
    let lan_ns = &state.lan_ns[lan.index - 1];
    add_netns(ns)?;
    let (ul_if, lan_if) = node_ifaces(node);
    if let (Some(ul_if), Some(addr)) = (ul_if, node.underlay_ip) {
        add_port(
            ns,
            ul_if,
            &state.underlay_ns,
            &node_port(node.index),
            state.spec.underlay_mtu,
        )?;
        add_addr(ns, ul_if, addr, state.spec.underlay.prefix())?;
        if let (Some(addr6), Some(net6)) = (node.underlay_ip6, state.spec.underlay6) {
            add_addr(ns, ul_if, IpAddr::V6(addr6), net6.prefix())?;
        }
    }
    add_port(
        ns,
        lan_if,
        lan_ns,
        &node_port(node.index),
        state.spec.underlay_mtu,
    )?;
    add_addr(ns, lan_if, node.lan_ip, lan.subnet.prefix())?;
    if let (Some(addr6), Some(net6)) = (node.lan_ip6, lan.subnet6) {
        add_addr(ns, lan_if, IpAddr::V6(addr6), net6.prefix())?;
    }
    match lan.nat {
        Some(r) => default_route(ns, IpAddr::V4(r.lan_ip))?,
        None => {
            for edge in edge_addrs(&state.spec) {
                default_route(ns, edge.ip())?;
            }
        }
    }
    forward(ns, state.spec.family)?;
    Ok(())
}

/// Create namespace `netns` holding one interface `iface` with `addr/prefix`, plugged into the
/// bridge of `bridge_ns` as port `port` (the API server's namespace on the underlay).
pub fn create_attached(
    netns: &str,
    iface: &str,
    bridge_ns: &str,
    port: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), LabError> {
    add_netns(netns)?;
    add_port(netns, iface, bridge_ns, port, None)?;
    add_addr(netns, iface, addr, prefix)
}

/// Create a pod's (empty) namespace; the CNI plugins wire it.
pub fn create_pod_ns(netns: &str) -> Result<(), LabError> {
    add_netns(netns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::spec::{SpecOptions, plan};

    #[test]
    fn nat_ruleset_masquerades_the_lan_and_drops_new_inbound() {
        let spec = plan(&SpecOptions {
            nat: Some(1),
            ..SpecOptions::generated(2, 2)
        })
        .unwrap();
        let rules = nat_ruleset(&spec.lans[1]);
        assert!(rules.contains("oifname \"up0\" ip saddr 10.210.2.0/24 counter masquerade"));
        assert!(rules.contains("iifname \"up0\" ct state established,related counter accept"));
        assert!(rules.contains("iifname \"up0\" counter drop"));
        assert_eq!(edge_ip(&spec), IpAddr::from([10, 200, 0, 254]));
        assert_eq!(node_ifaces(&spec.nodes[0]), (Some("eth0"), "eth1"));
        assert_eq!(node_ifaces(&spec.nodes[1]), (None, "eth0"));
    }
}
