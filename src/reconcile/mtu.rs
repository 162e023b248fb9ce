//! The automatic MTU: the WireGuard interface's MTU from the underlay's, and the pods' MTU from
//! the tunnel's.
//!
//! ```text
//! underlay MTU (Kernel::underlay_mtu) ─┐
//! WgInterface::overhead (60 / 80) ─────┼─ tunnel_mtu() ─→ the link's MTU, the pods' MTU
//! IPv6 inside the tunnel? ─────────────┘
//! ```
//!
//! Pure arithmetic; the planner calls it with what the kernel reported. Depends on the desired
//! state only.

use ipnetwork::IpNetwork;

use crate::desired::DesiredState;

/// The automatic MTU when no underlay interface is found: WireGuard's own default (a 1500-byte
/// underlay minus the IPv6 overhead).
pub const FALLBACK_MTU: u32 = 1420;
/// The smallest MTU IPv6 allows: Linux removes IPv6 from a link below it, so a tunnel that
/// carries IPv6 never goes lower.
pub const MIN_MTU_IPV6: u32 = 1280;
/// The smallest MTU every IPv4 host must handle: the floor of a tunnel that carries IPv4 only.
pub const MIN_MTU_IPV4: u32 = 576;

/// The WireGuard MTU for an underlay whose MTU is `underlay` (`None`: none found, then
/// [`FALLBACK_MTU`]), with `overhead` bytes per packet (see
/// [`WgInterface::overhead`](crate::desired::WgInterface::overhead)): the underlay minus the
/// overhead, but never below the smallest MTU of what the tunnel carries ([`MIN_MTU_IPV6`] when
/// `carries_ipv6`, else [`MIN_MTU_IPV4`]). Below that floor the outer packets are fragmented
/// (slow, but they arrive); the floor wins because IPv6 on a smaller link stops working at all.
pub fn tunnel_mtu(underlay: Option<u32>, overhead: u32, carries_ipv6: bool) -> u32 {
    let Some(base) = underlay else {
        return FALLBACK_MTU;
    };
    base.saturating_sub(overhead).max(floor(carries_ipv6))
}

/// The smallest MTU the tunnel may have: [`MIN_MTU_IPV6`] when it carries IPv6, else
/// [`MIN_MTU_IPV4`].
pub fn floor(carries_ipv6: bool) -> u32 {
    if carries_ipv6 {
        MIN_MTU_IPV6
    } else {
        MIN_MTU_IPV4
    }
}

/// Whether an underlay of `underlay` bytes is too small for `d`'s automatic MTU: the underlay
/// minus the overhead lies below the [`floor`], so the outer packets get fragmented. `false`
/// for a fixed MTU or no underlay. For a warning where the underlay is read, not in the planner.
pub fn underlay_too_small(d: &DesiredState, underlay: Option<u32>) -> bool {
    match (d.interface.mtu, underlay) {
        (None, Some(u)) => u.saturating_sub(d.interface.overhead()) < floor(carries_ipv6(d)),
        _ => false,
    }
}

/// Whether the tunnel carries IPv6 traffic: the interface address, a peer's allowed IPs or a
/// pod CIDR is IPv6.
pub fn carries_ipv6(d: &DesiredState) -> bool {
    let v6 = |n: &IpNetwork| n.is_ipv6();
    d.interface.address.as_ref().is_some_and(v6)
        || d.peers.iter().any(|p| p.allowed_ips.iter().any(v6))
        || d.bridge
            .as_ref()
            .is_some_and(|b| b.addresses.iter().any(v6))
}

/// The MTU the WireGuard link must have for `d`: the fixed one when set, else
/// [`tunnel_mtu`] of the underlay the kernel reported (`underlay`). Pods get the same MTU, so
/// a pod's full-size packet fits the tunnel without fragmentation.
pub fn wanted_mtu(d: &DesiredState, underlay: Option<u32>) -> u32 {
    match d.interface.mtu {
        Some(m) => m,
        None => tunnel_mtu(underlay, d.interface.overhead(), carries_ipv6(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Bridge, Masquerade, WG_OVERHEAD_IPV4, WG_OVERHEAD_IPV6, WgInterface};

    fn state(underlay: Option<&str>, mtu: Option<u32>, addr: &str) -> DesiredState {
        DesiredState {
            node: "a".into(),
            leader: true,
            interface: WgInterface {
                name: "wiremesh0".into(),
                listen_port: 51820,
                address: Some(addr.parse().unwrap()),
                mtu,
                underlay: underlay.map(|u| u.parse().unwrap()),
                mss_clamp: true,
            },
            peers: vec![],
            routes: vec![],
            rules: vec![],
            bridge: None,
            masquerade: Masquerade::default(),
        }
    }

    #[test]
    fn the_overhead_follows_the_family_of_the_nodes_endpoint() {
        let i = |u: Option<&str>| state(u, None, "10.4.0.1/16").interface.overhead();
        assert_eq!(i(Some("192.0.2.1")), WG_OVERHEAD_IPV4);
        assert_eq!(i(Some("::ffff:192.0.2.1")), WG_OVERHEAD_IPV4);
        assert_eq!(i(Some("2001:db8::1")), WG_OVERHEAD_IPV6);
        assert_eq!(i(None), WG_OVERHEAD_IPV6, "unknown family: the larger");
        assert_eq!((WG_OVERHEAD_IPV4, WG_OVERHEAD_IPV6), (60, 80));
    }

    #[test]
    fn the_tunnel_mtu_is_the_underlay_minus_the_overhead() {
        assert_eq!(tunnel_mtu(Some(1500), 60, false), 1440);
        assert_eq!(tunnel_mtu(Some(1500), 80, true), 1420);
        assert_eq!(tunnel_mtu(Some(1280), 60, false), 1220);
        assert_eq!(tunnel_mtu(Some(1492), 60, false), 1432, "PPPoE");
        assert_eq!(tunnel_mtu(Some(9001), 60, false), 8941, "jumbo frames");
        assert_eq!(tunnel_mtu(None, 60, false), FALLBACK_MTU);
    }

    #[test]
    fn the_tunnel_mtu_never_drops_below_what_it_carries_needs() {
        assert_eq!(tunnel_mtu(Some(1280), 60, true), MIN_MTU_IPV6);
        assert_eq!(tunnel_mtu(Some(1280), 80, true), MIN_MTU_IPV6);
        assert_eq!(tunnel_mtu(Some(600), 60, false), MIN_MTU_IPV4);
        assert_eq!(
            tunnel_mtu(Some(10), 80, false),
            MIN_MTU_IPV4,
            "no underflow"
        );
    }

    #[test]
    fn a_fixed_mtu_wins_and_ipv6_anywhere_inside_sets_the_floor() {
        let d = state(Some("10.200.0.1"), Some(1300), "10.4.0.1/16");
        assert_eq!(wanted_mtu(&d, Some(1280)), 1300);
        let d = state(Some("10.200.0.1"), None, "10.4.0.1/16");
        assert!(!carries_ipv6(&d));
        assert_eq!(wanted_mtu(&d, Some(1280)), 1220);
        let mut v6 = d.clone();
        v6.bridge = Some(Bridge {
            name: "wm0".into(),
            addresses: vec!["fd00:42::1/64".parse().unwrap()],
        });
        assert!(carries_ipv6(&v6));
        assert_eq!(wanted_mtu(&v6, Some(1280)), 1280);
        let v6 = state(Some("10.200.0.1"), None, "fd00:4::1/64");
        assert!(carries_ipv6(&v6));
    }

    #[test]
    fn an_underlay_below_the_floor_is_reported_only_for_an_automatic_mtu() {
        let v4 = state(Some("10.200.0.1"), None, "10.4.0.1/16");
        assert!(!underlay_too_small(&v4, Some(1280)), "1220 is above 576");
        assert!(underlay_too_small(&v4, Some(600)));
        let v6 = state(Some("10.200.0.1"), None, "fd00:4::1/64");
        assert!(underlay_too_small(&v6, Some(1280)), "1220 is below 1280");
        assert!(!underlay_too_small(&v6, Some(1340)), "1280 exactly");
        assert!(!underlay_too_small(&v6, None), "no underlay: the fallback");
        let fixed = state(Some("10.200.0.1"), Some(1300), "fd00:4::1/64");
        assert!(!underlay_too_small(&fixed, Some(1280)));
    }
}
