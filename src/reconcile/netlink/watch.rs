//! Route events: a separate netlink socket subscribed to route, rule and link notifications,
//! turned into a "reconcile now" signal when something of ours changed behind our back.

use futures::StreamExt;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NLM_F_REPLACE, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::rule::RuleAttribute;
use rtnetlink::sys::AsyncSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Netlink, RTPROT_WIREMESH, grow_rcvbuf};
use crate::reconcile::KernelError;

/// Receive buffer for notifications: installing 10 000 routes sends 10 000 of them at once.
const WATCH_RCVBUF: usize = 4 << 20;

/// Why `msg` should trigger a reconciliation, or `None` if it should not.
///
/// `own_ports` are the ports of our own sockets: a notification carries the port of the request
/// that caused it, so our own changes are not reported back to us. `names` are the interfaces we
/// manage.
pub(super) fn reason(
    msg: &NetlinkMessage<RouteNetlinkMessage>,
    own_ports: &[u32],
    names: &[&str],
) -> Option<&'static str> {
    let foreign = !own_ports.contains(&msg.header.port_number);
    let ours = |protocol: u8| protocol == RTPROT_WIREMESH;
    match &msg.payload {
        // The socket overflowed and events were lost: assume the worst.
        NetlinkPayload::Overrun(_) => Some("notifications lost (overrun)"),
        NetlinkPayload::InnerMessage(inner) => match inner {
            RouteNetlinkMessage::DelRoute(r) if foreign && ours(r.header.protocol.into()) => {
                Some("route of ours deleted")
            }
            RouteNetlinkMessage::NewRoute(r) if foreign && ours(r.header.protocol.into()) => {
                Some("route of ours added or changed")
            }
            // `ip route replace` of a route of ours by a foreign one announces only the new
            // route (no RTM_DELROUTE for ours), whatever its protocol.
            RouteNetlinkMessage::NewRoute(_)
                if foreign && msg.header.flags & NLM_F_REPLACE != 0 =>
            {
                Some("route replaced (maybe one of ours)")
            }
            RouteNetlinkMessage::NewRule(r) | RouteNetlinkMessage::DelRule(r)
                if foreign
                    && r.attributes
                        .iter()
                        .any(|a| matches!(a, RuleAttribute::Protocol(p) if ours((*p).into()))) =>
            {
                Some("rule of ours changed")
            }
            // IPv4 removes the routes of a link that goes down or away without any RTM_DELROUTE,
            // so a link of ours going away or down counts too, whoever did it (the kernel
            // reports link changes with port 0). Other link changes (a link created down, set
            // up, its MTU, a bridge port joining) remove nothing.
            RouteNetlinkMessage::DelLink(l) if link_is_one_of(l, names) => {
                Some("link of ours removed")
            }
            RouteNetlinkMessage::NewLink(l) if link_is_one_of(l, names) && went_down(l) => {
                Some("link of ours went down")
            }
            _ => None,
        },
        _ => None,
    }
}

/// Whether a link notification says the link went down: the up flag changed and is now clear.
/// A link created down (the kernel marks every flag as changed then) did not go down.
fn went_down(l: &LinkMessage) -> bool {
    let changed = l.header.change_mask;
    changed.contains(LinkFlags::Up)
        && changed.bits() != u32::MAX
        && !l.header.flags.contains(LinkFlags::Up)
}

fn link_is_one_of(l: &LinkMessage, names: &[&str]) -> bool {
    l.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if names.contains(&n.as_str())))
}

impl Netlink {
    /// Watch for changes to what wiremesh owns that wiremesh did not make: a route or rule with
    /// protocol 104 deleted, added or changed by someone else (e.g. `ip route del`), a route
    /// replaced, a managed link removed or taken down, or lost notifications. Each fires the
    /// returned channel with its reason; events coalesce while one is pending, so one `recv()`
    /// means "reconcile now", however many changes were seen.
    ///
    /// Opens its own socket in the calling thread's namespace and spawns its reader on the
    /// current Tokio runtime; the reader stops when the receiver is dropped. `recv()` returning
    /// `None` means the watch itself ended (socket error): reconcile and watch again. Address
    /// changes are not watched (kube-proxy's IPVS mode changes addresses constantly); the
    /// periodic reconciliation restores those.
    pub fn watch_routes(&self) -> Result<mpsc::Receiver<&'static str>, KernelError> {
        let (mut conn, _handle, mut events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Ipv4Rule,
            MulticastGroup::Ipv6Rule,
            MulticastGroup::Link,
        ])
        .map_err(|source| KernelError::Io {
            op: "open netlink event socket".into(),
            source,
        })?;
        let rcvbuf = grow_rcvbuf(conn.socket_mut().socket_mut(), WATCH_RCVBUF);
        let conn = tokio::spawn(conn);
        let ports = self.ports;
        let names: Vec<String> = [
            &self.devices.wireguard,
            &self.devices.private,
            &self.devices.tunnel,
            &self.devices.bridge,
        ]
        .into_iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
        let (tx, rx) = mpsc::channel(1);
        debug!(rcvbuf, ?names, "watching route events");
        tokio::spawn(async move {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    event = events.next() => {
                        let Some((msg, _)) = event else {
                            warn!("route event socket closed");
                            break;
                        };
                        if let Some(why) = reason(&msg, &ports, &names) {
                            debug!(why, "route event");
                            // Full means an event is already pending: coalesce.
                            let _ = tx.try_send(why);
                        }
                    }
                }
            }
            conn.abort();
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
    use rtnetlink::packet_route::rule::RuleMessage;

    const OWN: u32 = 77;

    fn route_event(
        del: bool,
        protocol: u8,
        port: u32,
        flags: u16,
    ) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut r = RouteMessage::default();
        r.header.protocol = RouteProtocol::from(protocol);
        let inner = if del {
            RouteNetlinkMessage::DelRoute(r)
        } else {
            RouteNetlinkMessage::NewRoute(r)
        };
        let mut m = NetlinkMessage::from(inner);
        m.header.port_number = port;
        m.header.flags = flags;
        m
    }

    #[test]
    fn someone_else_deleting_a_route_of_ours_fires() {
        let m = route_event(true, RTPROT_WIREMESH, 5, 0);
        assert!(reason(&m, &[OWN], &[]).is_some());
    }

    #[test]
    fn our_own_route_changes_do_not_fire() {
        for del in [true, false] {
            let m = route_event(del, RTPROT_WIREMESH, OWN, 0);
            assert_eq!(reason(&m, &[OWN], &[]), None);
        }
    }

    #[test]
    fn foreign_routes_do_not_fire_unless_they_replace_one() {
        assert_eq!(reason(&route_event(true, 4, 5, 0), &[OWN], &[]), None);
        assert_eq!(reason(&route_event(false, 4, 5, 0), &[OWN], &[]), None);
        assert!(reason(&route_event(false, 4, 5, NLM_F_REPLACE), &[OWN], &[]).is_some());
    }

    #[test]
    fn rules_of_ours_fire_and_others_do_not() {
        let mut r = RuleMessage::default();
        let m = NetlinkMessage::from(RouteNetlinkMessage::DelRule(r.clone()));
        assert_eq!(reason(&m, &[OWN], &[]), None);
        r.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::from(
                RTPROT_WIREMESH,
            )));
        let m = NetlinkMessage::from(RouteNetlinkMessage::DelRule(r));
        assert!(reason(&m, &[OWN], &[]).is_some());
    }

    #[test]
    fn only_managed_links_fire() {
        let mut l = LinkMessage::default();
        l.attributes.push(LinkAttribute::IfName("wg0".into()));
        let m = NetlinkMessage::from(RouteNetlinkMessage::DelLink(l));
        assert!(reason(&m, &[OWN], &["wg0"]).is_some());
        assert_eq!(reason(&m, &[OWN], &["eth0"]), None);
    }

    fn link_event(up: bool, changed: LinkFlags) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut l = LinkMessage::default();
        l.attributes.push(LinkAttribute::IfName("wg0".into()));
        if up {
            l.header.flags = LinkFlags::Up;
        }
        l.header.change_mask = changed;
        NetlinkMessage::from(RouteNetlinkMessage::NewLink(l))
    }

    #[test]
    fn a_managed_link_going_down_fires_and_other_link_changes_do_not() {
        let down = link_event(false, LinkFlags::Up);
        assert_eq!(
            reason(&down, &[OWN], &["wg0"]),
            Some("link of ours went down")
        );
        assert_eq!(reason(&down, &[OWN], &["eth0"]), None);
        // Created down: the kernel marks every flag as changed.
        let created = link_event(false, LinkFlags::from_bits_retain(u32::MAX));
        assert_eq!(reason(&created, &[OWN], &["wg0"]), None);
        // Set up, or something else changed (MTU, a bridge port) while down or up.
        assert_eq!(
            reason(&link_event(true, LinkFlags::Up), &[OWN], &["wg0"]),
            None
        );
        assert_eq!(
            reason(&link_event(false, LinkFlags::empty()), &[OWN], &["wg0"]),
            None
        );
        assert_eq!(
            reason(&link_event(true, LinkFlags::empty()), &[OWN], &["wg0"]),
            None
        );
    }

    #[test]
    fn lost_notifications_fire() {
        let m = NetlinkMessage::new(Default::default(), NetlinkPayload::Overrun(Vec::new()));
        assert!(reason(&m, &[OWN], &[]).is_some());
    }
}
