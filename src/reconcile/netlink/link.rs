//! Links and addresses: the WireGuard link's state, addresses and MTU, the underlay's MTU (for
//! the automatic MTU), the CNI bridge, and which interface holds an address.
//!
//! Only interfaces named in [`super::Devices`] are ever changed. IPv6 link-local addresses
//! (`fe80::/10`) are left out of everything read and never removed: the kernel assigns them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{
    AfSpecInet, AfSpecUnspec, InetDevConf, InfoKind, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, LinkBridge, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};

use super::{Answer, BRIDGE_ALIAS, Netlink, WG_ALIAS, errno, nl_err, request};
use crate::desired::{Bridge, MAIN_TABLE};
use crate::reconcile::{KernelError, LinkState};

/// IPv4 link-local (169.254/16): never a node's reachable address. (IPv6 link-local addresses
/// are already left out by [`parse_address`].)
fn is_link_local_v4(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if a.is_link_local())
}

fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(n) => Some(*n),
        _ => None,
    })
}

fn link_alias(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_kind(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn is_bridge(m: &LinkMessage) -> bool {
    matches!(link_kind(m), Some(InfoKind::Bridge))
}

/// Whose a link named as wiremesh's WireGuard interface is (see [`wireguard_owner`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOwner {
    /// A WireGuard (kernel) or TUN (userspace) link carrying [`WG_ALIAS`].
    Ours,
    /// A WireGuard or TUN link without any alias: made by a wiremesh that did not mark its
    /// links yet, or by someone else under the name wiremesh was given.
    Unmarked,
    /// Not wiremesh's; the text says why.
    Foreign(String),
}

/// Whose a link of kind `kind` (`None`: the kernel reported none, as for a physical device)
/// and alias `alias` is, when it has the name of wiremesh's WireGuard interface. Pure.
///
/// Kernel WireGuard links have kind `wireguard`; the userspace daemon's device is a TUN device
/// (kind `tun`). Any other kind is foreign whatever its alias; a WireGuard or TUN link is ours
/// with [`WG_ALIAS`], unmarked without alias, and foreign with another alias.
pub fn wireguard_owner(kind: Option<&InfoKind>, alias: Option<&str>) -> LinkOwner {
    link_owner(
        kind,
        alias,
        &[InfoKind::Wireguard, InfoKind::Tun],
        "a WireGuard (wireguard or tun) interface",
        WG_ALIAS,
    )
}

/// Whose a link with the name of wiremesh's CNI bridge is, by the same rule as
/// [`wireguard_owner`]: kind `bridge`, marked with [`BRIDGE_ALIAS`]. Pure.
pub fn bridge_owner(kind: Option<&InfoKind>, alias: Option<&str>) -> LinkOwner {
    link_owner(kind, alias, &[InfoKind::Bridge], "a bridge", BRIDGE_ALIAS)
}

fn link_owner(
    kind: Option<&InfoKind>,
    alias: Option<&str>,
    kinds: &[InfoKind],
    what: &str,
    mark: &str,
) -> LinkOwner {
    match kind {
        Some(k) if kinds.contains(k) => {}
        Some(k) => {
            let k = match k {
                InfoKind::Other(o) => o.clone(),
                k => format!("{k:?}").to_lowercase(),
            };
            return LinkOwner::Foreign(format!("it is a {k} link, not {what}"));
        }
        None => {
            return LinkOwner::Foreign(format!(
                "it is a device without a link kind (physical or loopback), not {what}"
            ));
        }
    }
    match alias {
        Some(a) if a == mark => LinkOwner::Ours,
        None | Some("") => LinkOwner::Unmarked,
        Some(other) => LinkOwner::Foreign(format!(
            "it carries the alias {other:?}, not wiremesh's {mark:?}"
        )),
    }
}

/// The address an address message carries, with its prefix; `None` for IPv6 link-local ones.
fn parse_address(m: &AddressMessage) -> Option<IpNetwork> {
    // On point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL our own address; elsewhere
    // both are the same (IPv6 sends IFA_LOCAL only with a peer).
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or(address)?;
    if is_link_local_v6(ip) {
        return None;
    }
    IpNetwork::new(ip, m.header.prefix_len).ok()
}

/// The request that adds (or deletes) `addr` on interface `index`.
fn address_message(index: u32, addr: IpNetwork) -> AddressMessage {
    match addr.ip() {
        IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, addr.prefix())
            .build(),
        IpAddr::V6(ip) => {
            let mut m = AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(ip, addr.prefix())
                .build();
            // No duplicate address detection: the address is ours by allocation, and DAD would
            // leave it "tentative" (unusable as a source) for a second or two.
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            m
        }
    }
}

impl Netlink {
    /// The link named `name`, if it exists.
    pub(super) async fn link_by_name(
        &self,
        name: &str,
    ) -> Result<Option<LinkMessage>, KernelError> {
        if name.is_empty() {
            return Ok(None);
        }
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {name}"), e)),
        }
    }

    /// The addresses on interface `index`, sorted, without IPv6 link-local ones.
    async fn addresses_of(&self, index: u32) -> Result<Vec<IpNetwork>, KernelError> {
        let mut req = self.handle.address().get().set_link_index_filter(index);
        // With strict checking the kernel filters by index itself.
        req.message_mut().header.index = index;
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err(format!("dump addresses of link #{index}"), e))?;
        let mut out: Vec<IpNetwork> = msgs.iter().filter_map(parse_address).collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The index of `name`, or an error naming the missing interface.
    async fn require_index(&self, name: &str, op: &str) -> Result<u32, KernelError> {
        self.index_of(name)
            .await?
            .ok_or_else(|| KernelError::Netlink {
                op: op.to_owned(),
                message: format!("no interface named {name:?}"),
            })
    }

    /// The link `name`: up or not, MTU, addresses (sorted, without IPv6 link-local ones);
    /// `None` if it does not exist.
    pub async fn read_link(&self, name: &str) -> Result<Option<LinkState>, KernelError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(None);
        };
        Ok(Some(LinkState {
            up: link.header.flags.contains(LinkFlags::Up),
            mtu: link_mtu(&link).unwrap_or(0),
            addresses: self.addresses_of(link.header.index).await?,
        }))
    }

    /// Add `addr` to interface `name` (`ip addr add`); already there is not an error. IPv6
    /// addresses skip duplicate address detection.
    ///
    /// Before an IPv4 address is added, the link's `promote_secondaries` is turned on (over
    /// netlink, not /proc/sys, which is read-only in unprivileged containers). Why: a renumbered
    /// interface holds the new address next to the old one for a moment; without promotion,
    /// removing the old (primary) address also removes the new (secondary) one in the same
    /// subnet, and removing the last IPv4 address makes the kernel drop every route through the
    /// link, without a netlink notification.
    pub async fn add_address(&self, name: &str, addr: IpNetwork) -> Result<(), KernelError> {
        let op = format!("add address {addr} dev {name}");
        let index = self.require_index(name, &op).await?;
        if addr.is_ipv4() {
            self.promote_secondaries(index, name).await?;
        }
        let msg = RouteNetlinkMessage::NewAddress(address_message(index, addr));
        let a = self.send_one(request(msg, NLM_F_CREATE | NLM_F_EXCL)).await;
        debug!(op = "add address", name, %addr, ?a);
        a.into_result(&[libc::EEXIST], || op)
    }

    /// Set `net.ipv4.conf.NAME.promote_secondaries = 1` on link `index` through
    /// `IFLA_AF_SPEC` (`RTM_NEWLINK` carrying only that one setting).
    async fn promote_secondaries(&self, index: u32, name: &str) -> Result<(), KernelError> {
        let mut conf = InetDevConf::default();
        conf.promote_secondaries = 1;
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(conf),
            ])]));
        let a = self
            .send_one(request(RouteNetlinkMessage::NewLink(msg), 0))
            .await;
        debug!(op = "promote secondaries", name, ?a);
        a.into_result(&[], || format!("set link {name} promote_secondaries 1"))
    }

    /// Whether link `name` has `promote_secondaries` on (`None`: no such link).
    pub async fn promotes_secondaries(&self, name: &str) -> Result<Option<bool>, KernelError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(None);
        };
        Ok(Some(link.attributes.iter().any(|a| match a {
            LinkAttribute::AfSpecUnspec(specs) => specs.iter().any(|s| {
                match s {
                    AfSpecUnspec::Inet(inet) => inet
                        .iter()
                        .any(|i| matches!(i, AfSpecInet::DevConf(c) if c.promote_secondaries != 0)),
                    _ => false,
                }
            }),
            _ => false,
        })))
    }

    /// Remove `addr` from interface `name` (`ip addr del`); not there (or no such interface) is
    /// not an error.
    pub async fn del_address(&self, name: &str, addr: IpNetwork) -> Result<(), KernelError> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(());
        };
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, addr));
        let a = self.send_one(request(msg, 0)).await;
        debug!(op = "del address", name, %addr, ?a);
        a.into_result(&[libc::EADDRNOTAVAIL, libc::ENODEV], || {
            format!("del address {addr} dev {name}")
        })
    }

    /// Set the MTU of interface `name` (`ip link set NAME mtu MTU`).
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), KernelError> {
        let op = format!("set link {name} mtu {mtu}");
        let index = self.require_index(name, &op).await?;
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        let a = self
            .send_one(request(RouteNetlinkMessage::NewLink(msg), 0))
            .await;
        debug!(op = "set mtu", name, mtu, ?a);
        a.into_result(&[], || op)
    }

    /// Bring interface `name` up (`ip link set NAME up`).
    pub async fn set_up(&self, name: &str) -> Result<(), KernelError> {
        let op = format!("set link {name} up");
        let index = self.require_index(name, &op).await?;
        let msg = LinkUnspec::new_with_index(index).up().build();
        let a = self
            .send_one(request(RouteNetlinkMessage::NewLink(msg), 0))
            .await;
        debug!(op = "set up", name, ?a);
        a.into_result(&[], || op)
    }

    /// The MTU of the underlay WireGuard's packets leave by, for the automatic MTU
    /// ([`crate::reconcile::mtu`]): with the node's endpoint address `towards`, the interface
    /// holding it, else the route to it (`ip route get`: its interface, and the route's own
    /// `mtu` when smaller, as set for PPPoE or learnt by path MTU discovery). Without one, or
    /// when neither is found, the private interface, else the interface of the default route
    /// (IPv4 first). `None` (logged as a warning) when there is no underlay at all.
    pub async fn underlay_mtu(&self, towards: Option<IpAddr>) -> Result<Option<u32>, KernelError> {
        if let Some(ip) = towards {
            if let Some(name) = self.private_interface_for(ip).await?
                && let Some(link) = self.link_by_name(&name).await?
                && let Some(mtu) = link_mtu(&link)
            {
                debug!(underlay = name, %ip, mtu, "underlay: the interface holding the endpoint");
                return Ok(Some(mtu));
            }
            if let Some(mtu) = self.route_mtu(ip).await? {
                return Ok(Some(mtu));
            }
        }
        let mut underlay = self.link_by_name(&self.devices.private).await?;
        if underlay.is_none() {
            underlay = self.default_route_link().await?;
        }
        let Some(mtu) = underlay.as_ref().and_then(link_mtu) else {
            warn!(
                "no underlay interface (endpoint, private interface or default route) to take the automatic MTU from"
            );
            return Ok(None);
        };
        debug!(
            underlay = underlay.as_ref().and_then(link_name),
            mtu, "underlay: the private or default-route interface"
        );
        Ok(Some(mtu))
    }

    /// The MTU of the path to `ip` as the kernel routes it (`ip route get IP`): the outgoing
    /// interface's, or the route's `mtu` metric when smaller; `None` when it has no route.
    async fn route_mtu(&self, ip: IpAddr) -> Result<Option<u32>, KernelError> {
        let mut msg = match ip {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        // The builder fills in a route to add (main table, protocol static, unicast); with strict
        // checking on, the kernel refuses a lookup whose header names any of them (EINVAL).
        msg.header.table = 0;
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unspec;
        let route = match self.handle.route().get(msg).execute().try_next().await {
            Ok(r) => r,
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                return Ok(None);
            }
            Err(e) => return Err(nl_err(format!("get route to {ip}"), e)),
        };
        let Some(route) = route else {
            return Ok(None);
        };
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let metric = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Metrics(m) => m.iter().find_map(|x| match x {
                RouteMetric::Mtu(n) if *n > 0 => Some(*n),
                _ => None,
            }),
            _ => None,
        });
        let link = match oif {
            Some(i) => self.link_by_index(i).await?,
            None => None,
        };
        let dev = link.as_ref().and_then(link_mtu);
        let mtu = match (dev, metric) {
            (Some(d), Some(m)) => Some(d.min(m)),
            (d, m) => d.or(m),
        };
        debug!(%ip, underlay = link.as_ref().and_then(link_name), ?dev, ?metric, "underlay: the route to the endpoint");
        Ok(mtu)
    }

    /// The link of the main table's default route, IPv4 first.
    async fn default_route_link(&self) -> Result<Option<LinkMessage>, KernelError> {
        for v4 in [true, false] {
            let routes = self.dump_routes(v4, MAIN_TABLE, 0).await?;
            let oif = routes
                .iter()
                .filter(|r| r.header.destination_prefix_length == 0)
                .find_map(|r| {
                    r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })
                });
            if let Some(i) = oif {
                return self.link_by_index(i).await;
            }
        }
        Ok(None)
    }

    /// Every address of this network namespace, link-local ones left out.
    pub async fn all_addresses(&self) -> Result<Vec<IpNetwork>, KernelError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", e))?;
        Ok(msgs
            .iter()
            .filter_map(parse_address)
            .filter(|n| !is_link_local_v4(n.ip()))
            .collect())
    }

    /// The addresses on the interface of the main table's default route (IPv4 route first),
    /// link-local ones left out: where this node is reached from outside when nothing better is
    /// known.
    pub async fn default_route_addresses(&self) -> Result<Vec<IpNetwork>, KernelError> {
        let Some(link) = self.default_route_link().await? else {
            return Ok(Vec::new());
        };
        let index = link.header.index;
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(parse_address)
            .filter(|n| !is_link_local_v4(n.ip()))
            .collect())
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>, KernelError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("get link #{index}"), e)),
        }
    }

    /// The name of the interface holding `ip` (for `RouteDev::Private`), if any.
    pub async fn private_interface_for(&self, ip: IpAddr) -> Result<Option<String>, KernelError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", e))?;
        let Some(index) = msgs
            .iter()
            .find(|m| parse_address(m).is_some_and(|n| n.ip() == ip))
            .map(|m| m.header.index)
        else {
            return Ok(None);
        };
        Ok(self
            .link_by_index(index)
            .await?
            .and_then(|l| link_name(&l).map(str::to_owned)))
    }

    /// Whose the configured WireGuard interface is ([`wireguard_owner`]); `None` when no link
    /// has its name.
    pub async fn wireguard_owner(&self) -> Result<Option<LinkOwner>, KernelError> {
        Ok(self
            .link_by_name(&self.devices.wireguard)
            .await?
            .map(|l| wireguard_owner(link_kind(&l), link_alias(&l))))
    }

    /// `Err` when operations must not reach the configured WireGuard link (another kind of
    /// link, or another alias: [`LinkOwner::Foreign`]); marks an unmarked WireGuard link as
    /// wiremesh's ([`WG_ALIAS`]: adoption). No link of that name is `Ok`: it will be created.
    pub async fn claim_wireguard_link(&self) -> Result<(), KernelError> {
        let name = &self.devices.wireguard;
        match self.wireguard_owner().await? {
            Some(LinkOwner::Foreign(reason)) => Err(KernelError::NotOwned(format!(
                "interface {name}: not wiremesh's WireGuard interface ({reason}); left alone"
            ))),
            Some(LinkOwner::Unmarked) => {
                if let Err(e) = self.mark_link(name, WG_ALIAS).await {
                    warn!(error = %e, "cannot mark the WireGuard interface as wiremesh's");
                } else {
                    info!(interface = %name, "WireGuard interface adopted and marked");
                }
                Ok(())
            }
            Some(LinkOwner::Ours) | None => Ok(()),
        }
    }

    /// Whose the configured CNI bridge is ([`bridge_owner`]); `None` when no link has its name.
    pub async fn bridge_owner(&self) -> Result<Option<LinkOwner>, KernelError> {
        Ok(self
            .link_by_name(&self.devices.bridge)
            .await?
            .map(|l| bridge_owner(link_kind(&l), link_alias(&l))))
    }

    /// Set the alias of link `name` to `alias` (`ip link set NAME alias ALIAS`) unless it
    /// already has it. wiremesh marks the links it creates or adopts this way.
    pub async fn mark_link(&self, name: &str, alias: &str) -> Result<(), KernelError> {
        let op = format!("set link {name} alias {alias:?}");
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| KernelError::Netlink {
                op: op.clone(),
                message: format!("no interface named {name:?}"),
            })?;
        if link_alias(&link) == Some(alias) {
            return Ok(());
        }
        let msg = LinkUnspec::new_with_index(link.header.index)
            .alias(alias)
            .build();
        let a = self
            .send_one(request(RouteNetlinkMessage::NewLink(msg), 0))
            .await;
        debug!(op = "mark link", name, alias, ?a);
        a.into_result(&[], || op)
    }

    /// Make the CNI bridge exist, be up, and hold exactly `bridge.addresses` (IPv6 link-local
    /// ones aside). Creates it (`ip link add NAME type bridge`, marked with [`BRIDGE_ALIAS`]) if
    /// missing. Refuses a name other than the configured bridge, and an existing interface of
    /// that name that is not a bridge.
    pub async fn ensure_bridge(&self, bridge: &Bridge) -> Result<(), KernelError> {
        let name = bridge.name.as_str();
        let op = format!("set bridge {name}");
        let refuse = |message: String| KernelError::Netlink {
            op: op.clone(),
            message,
        };
        if name != self.devices.bridge {
            return Err(refuse(format!(
                "not the configured CNI bridge {:?}; left alone",
                self.devices.bridge
            )));
        }
        let link = match self.link_by_name(name).await? {
            Some(l) => l,
            None => {
                self.create_bridge(name).await?;
                self.link_by_name(name)
                    .await?
                    .ok_or_else(|| refuse("the bridge vanished right after creation".into()))?
            }
        };
        if let LinkOwner::Foreign(why) = bridge_owner(link_kind(&link), link_alias(&link)) {
            return Err(refuse(format!(
                "an interface of that name exists and is not wiremesh's: {why}; left alone"
            )));
        }
        let index = link.header.index;
        let have: BTreeSet<IpNetwork> = self.addresses_of(index).await?.into_iter().collect();
        let want: BTreeSet<IpNetwork> = bridge
            .addresses
            .iter()
            .copied()
            .filter(|a| !is_link_local_v6(a.ip()))
            .collect();
        let dels: Vec<IpNetwork> = have.difference(&want).copied().collect();
        let adds: Vec<IpNetwork> = want.difference(&have).copied().collect();
        // One batch, deletes first: the kernel handles a datagram's requests in order.
        let msgs: Vec<_> = dels
            .iter()
            .map(|a| {
                request(
                    RouteNetlinkMessage::DelAddress(address_message(index, *a)),
                    0,
                )
            })
            .chain(adds.iter().map(|a| {
                request(
                    RouteNetlinkMessage::NewAddress(address_message(index, *a)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
            }))
            .collect();
        let answers = self.send_acked(msgs).await;
        let (del_answers, add_answers) = answers.split_at(dels.len());
        for (a, ans) in dels.iter().zip(del_answers) {
            ans.into_result(&[libc::EADDRNOTAVAIL], || {
                format!("del address {a} dev {name}")
            })?;
        }
        for (a, ans) in adds.iter().zip(add_answers) {
            ans.into_result(&[libc::EEXIST], || format!("add address {a} dev {name}"))?;
        }
        if !link.header.flags.contains(LinkFlags::Up) {
            self.set_up(name).await?;
        }
        info!(
            bridge = name,
            added = adds.len(),
            removed = dels.len(),
            "CNI bridge set"
        );
        Ok(())
    }

    async fn create_bridge(&self, name: &str) -> Result<(), KernelError> {
        let op = format!("add link {name} type bridge");
        let msg = LinkBridge::new(name).build();
        let a = self
            .send_one(request(
                RouteNetlinkMessage::NewLink(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            ))
            .await;
        debug!(op = "add bridge", name, ?a);
        if a == Answer::Errno(libc::EEXIST) {
            // Created meanwhile by someone else (e.g. the CNI plugin): not ours to mark.
            return Ok(());
        }
        a.into_result(&[], || op)?;
        // The alias cannot ride on the creating request (the kernel applies IFLA_IFALIAS only
        // when changing an existing link), so it is set right after.
        let index = self.require_index(name, "mark bridge").await?;
        let msg = LinkUnspec::new_with_index(index)
            .alias(BRIDGE_ALIAS)
            .build();
        self.send_one(request(RouteNetlinkMessage::NewLink(msg), 0))
            .await
            .into_result(&[], || format!("set link {name} alias"))?;
        info!(bridge = name, "CNI bridge created");
        Ok(())
    }

    /// The configured CNI bridge with its addresses (sorted, IPv6 link-local ones aside), if it
    /// exists and is a bridge.
    pub async fn read_bridge(&self) -> Result<Option<Bridge>, KernelError> {
        let name = &self.devices.bridge;
        match self.link_by_name(name).await? {
            Some(l) if is_bridge(&l) => Ok(Some(Bridge {
                name: name.clone(),
                addresses: self.addresses_of(l.header.index).await?,
            })),
            _ => Ok(None),
        }
    }

    /// Delete the configured CNI bridge if wiremesh created it (it is a bridge and carries
    /// [`BRIDGE_ALIAS`]); returns whether it did.
    pub(super) async fn del_own_bridge(&self) -> Result<bool, KernelError> {
        let name = &self.devices.bridge;
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        if bridge_owner(link_kind(&link), link_alias(&link)) != LinkOwner::Ours {
            info!(
                bridge = %name,
                "CNI bridge not created by wiremesh; left in place"
            );
            return Ok(false);
        }
        let mut msg = LinkMessage::default();
        msg.header.index = link.header.index;
        self.send_one(request(RouteNetlinkMessage::DelLink(msg), 0))
            .await
            .into_result(&[libc::ENODEV], || format!("del link {name}"))?;
        Ok(true)
    }

    /// Send one request and wait for its answer.
    pub(super) async fn send_one(
        &self,
        msg: rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    ) -> Answer {
        self.send_acked(vec![msg])
            .await
            .first()
            .copied()
            .unwrap_or(Answer::Lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_survive_the_trip_through_a_message() {
        for a in ["10.42.0.1/24", "192.168.1.7/32", "fd00:42::1/64"] {
            let a: IpNetwork = a.parse().unwrap();
            assert_eq!(parse_address(&address_message(3, a)), Some(a));
        }
    }

    #[test]
    fn only_marked_wireguard_or_tun_links_are_ours_and_other_kinds_never() {
        for kind in [InfoKind::Wireguard, InfoKind::Tun] {
            assert_eq!(
                wireguard_owner(Some(&kind), Some(WG_ALIAS)),
                LinkOwner::Ours
            );
            assert_eq!(wireguard_owner(Some(&kind), None), LinkOwner::Unmarked);
            assert_eq!(wireguard_owner(Some(&kind), Some("")), LinkOwner::Unmarked);
            assert!(matches!(
                wireguard_owner(Some(&kind), Some("corp vpn")),
                LinkOwner::Foreign(_)
            ));
        }
        // A veth, a bridge, a physical device: foreign even with wiremesh's alias.
        for kind in [Some(InfoKind::Veth), Some(InfoKind::Bridge), None] {
            let LinkOwner::Foreign(why) = wireguard_owner(kind.as_ref(), Some(WG_ALIAS)) else {
                panic!("{kind:?} taken as ours");
            };
            assert!(why.contains("not a WireGuard"), "{why}");
        }
        let LinkOwner::Foreign(why) = wireguard_owner(Some(&InfoKind::Veth), None) else {
            panic!("a veth taken as ours");
        };
        assert!(why.contains("veth"), "{why}");
    }

    #[test]
    fn only_bridges_are_wiremesh_bridges_and_a_foreign_alias_is_refused() {
        assert_eq!(
            bridge_owner(Some(&InfoKind::Bridge), Some(BRIDGE_ALIAS)),
            LinkOwner::Ours
        );
        assert_eq!(
            bridge_owner(Some(&InfoKind::Bridge), None),
            LinkOwner::Unmarked
        );
        assert!(matches!(
            bridge_owner(Some(&InfoKind::Bridge), Some("docker")),
            LinkOwner::Foreign(_)
        ));
        assert!(matches!(
            bridge_owner(Some(&InfoKind::Veth), Some(BRIDGE_ALIAS)),
            LinkOwner::Foreign(_)
        ));
    }

    #[test]
    fn ipv6_link_local_addresses_are_never_reported() {
        let ll: IpNetwork = "fe80::1/64".parse().unwrap();
        assert_eq!(parse_address(&address_message(3, ll)), None);
        assert!(!is_link_local_v6("fec0::1".parse().unwrap()));
    }
}
