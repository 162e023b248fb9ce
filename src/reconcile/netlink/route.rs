//! Routes: `desired::Route` ⇄ `RouteMessage`, reading ours back, and pipelined adds/deletes.
//!
//! A route is ours when its protocol is [`RTPROT_WIREMESH`], its table one of [`OWN_TABLES`]
//! (main and 1107), and it is a blackhole (a guard) or leaves through the WireGuard, private or
//! tunnel interface; a protocol-104 route anywhere else is someone else's. Adds use `NLM_F_EXCL`, so the kernel
//! never replaces, prepends to, or merges into (IPv6 multipath) a foreign route; deletes name the
//! protocol, so the kernel never matches a foreign route. Guards (`RouteDev::Blackhole`) are
//! blackhole routes at [`GUARD_METRIC`]: the metric is part of their key, so adding or deleting
//! one never touches the route it guards, and the reverse.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::{debug, info};

use super::{Answer, Devices, Netlink, OWN_TABLES, RTPROT_WIREMESH, nl_err, request};
use crate::desired::{GUARD_METRIC, Route, RouteDev};
use crate::reconcile::KernelError;

/// `RT_TABLE_UNSPEC`: the header's table byte when the table id needs the 32-bit attribute.
const RT_TABLE_UNSPEC: u8 = 0;

/// Routes of ours as read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDump {
    /// Routes a `desired::Route` describes exactly, sorted.
    pub routes: Vec<Route>,
    /// Routes of ours that no `desired::Route` can describe; they can only be deleted.
    pub strays: Vec<StrayRoute>,
}

impl RouteDump {
    /// Whether a route of ours (described or stray) holds destination `dst` in `table`.
    fn holds(&self, table: u32, dst: IpNetwork) -> bool {
        self.routes.iter().any(|r| r.table == table && r.dst == dst)
            || self.strays.iter().any(|s| s.table == table && s.dst == dst)
    }
}

/// A route with wiremesh's protocol that no `desired::Route` describes: its device is none of
/// the three known interfaces, or it is multipath, typed (blackhole…), source-specific or
/// encapsulated. Reporting it as a `desired::Route` with a guessed device would be wrong: if the
/// guess equalled a desired route, the planner would believe that route installed and never fix
/// it (e.g. after the private interface changed names). So it is kept apart, exactly enough to
/// delete it ([`Netlink::del_stray_routes`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StrayRoute {
    /// Routing table.
    pub table: u32,
    /// Destination.
    pub dst: IpNetwork,
    /// Type of service (IPv4), part of the route's key.
    pub tos: u8,
    /// Metric, part of the route's key.
    pub metric: Option<u32>,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index, if any.
    pub oif: Option<u32>,
}

impl fmt::Display for StrayRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(i) = self.oif {
            write!(f, " dev #{i}")?;
        }
        write!(f, " table {}", self.table)?;
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

/// Per-route results of [`Netlink::apply_routes`], index-aligned with its inputs.
#[derive(Debug, Default)]
pub struct RouteResults {
    /// One result per added route.
    pub adds: Vec<Result<(), KernelError>>,
    /// One result per deleted route.
    pub dels: Vec<Result<(), KernelError>>,
}

impl RouteResults {
    /// How many routes failed, adds and deletes together.
    pub fn failures(&self) -> usize {
        self.adds
            .iter()
            .chain(&self.dels)
            .filter(|r| r.is_err())
            .count()
    }
}

/// One route of ours as the kernel reports it, its device still an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KernelRoute {
    table: u32,
    dst: IpNetwork,
    tos: u8,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    src: Option<IpAddr>,
    onlink: bool,
    metric: Option<u32>,
    /// A blackhole route (a guard, when its metric is [`GUARD_METRIC`]).
    blackhole: bool,
    /// Multipath, typed (other than blackhole), source-specific, encapsulated or
    /// nexthop-object routes.
    unusual: bool,
}

impl KernelRoute {
    /// Whether this route (already known to carry protocol 104) is wiremesh's: in one of
    /// [`OWN_TABLES`], and a blackhole or through one of `devs`.
    pub(super) fn is_owned(&self, devs: &[(u32, RouteDev)]) -> bool {
        OWN_TABLES.contains(&self.table)
            && (self.blackhole || self.oif.is_some_and(|i| devs.iter().any(|(d, _)| *d == i)))
    }

    /// What deleting exactly this route needs.
    pub(super) fn identity(&self) -> StrayRoute {
        StrayRoute {
            table: self.table,
            dst: self.dst,
            tos: self.tos,
            metric: self.metric,
            gateway: self.gateway,
            oif: self.oif,
        }
    }

    /// The `desired::Route` this is, when its device is one of `devs` (index, device) and it
    /// has nothing a `desired::Route` cannot say.
    fn classify(self, devs: &[(u32, RouteDev)]) -> Result<Route, StrayRoute> {
        if self.blackhole {
            // A guard: no gateway or source; IPv6 reports blackholes on `lo`, so the device is
            // not looked at.
            let guard = !self.unusual
                && self.tos == 0
                && self.metric == Some(GUARD_METRIC)
                && self.gateway.is_none()
                && self.src.is_none()
                && !self.onlink;
            return if guard {
                Ok(Route::blackhole(self.table, self.dst))
            } else {
                Err(self.identity())
            };
        }
        let dev = self
            .oif
            .and_then(|i| devs.iter().find(|(idx, _)| *idx == i).map(|(_, d)| *d));
        match dev {
            Some(dev) if !self.unusual && self.tos == 0 => Ok(Route {
                table: self.table,
                dst: self.dst,
                gateway: self.gateway,
                dev,
                src: self.src,
                onlink: self.onlink,
            }),
            _ => Err(self.identity()),
        }
    }
}

fn family(v4: bool) -> AddressFamily {
    if v4 {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The header's table byte: the id itself when it fits, else `RT_TABLE_UNSPEC` with the
/// `RTA_TABLE` attribute carrying it (as iproute2 does).
pub(super) fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC)
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

/// The request that adds (`add`) or deletes `route` through interface `oif`.
///
/// Refuses what the kernel would refuse or silently change: a destination with host bits (IPv6
/// would mask them, so the route read back would never equal the desired one), a gateway or
/// source of the other family, and `onlink` without a gateway (EINVAL).
pub(super) fn route_message(route: &Route, oif: u32, add: bool) -> Result<RouteMessage, String> {
    let dst = route.dst;
    if dst.ip() != dst.network() {
        return Err(format!("destination {dst} has host bits set"));
    }
    let v4 = dst.is_ipv4();
    if let Some(a) = route
        .gateway
        .iter()
        .chain(&route.src)
        .find(|a| a.is_ipv4() != v4)
    {
        return Err(format!("{a} is not of the same family as {dst}"));
    }
    if route.onlink && route.gateway.is_none() {
        return Err("onlink needs a gateway".into());
    }
    let blackhole = route.dev == RouteDev::Blackhole;
    if blackhole && (route.gateway.is_some() || route.src.is_some() || route.onlink) {
        return Err("a blackhole route has no gateway, source or onlink".into());
    }
    let mut m = RouteMessage::default();
    let h = &mut m.header;
    h.address_family = family(v4);
    h.destination_prefix_length = dst.prefix();
    h.table = table_byte(route.table);
    h.protocol = RouteProtocol::from(RTPROT_WIREMESH);
    if add && blackhole {
        h.kind = RouteType::BlackHole;
        h.scope = RouteScope::Universe;
    } else if add {
        h.kind = RouteType::Unicast;
        // As `ip route add` does: a route without gateway reaches its destination directly.
        h.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
    } else {
        // "Any type, any scope" (as `ip route del`); the protocol still has to match.
        h.kind = RouteType::Unspec;
        h.scope = RouteScope::NoWhere;
    }
    if route.onlink {
        h.flags |= RouteFlags::Onlink;
    }
    m.attributes.push(RouteAttribute::Table(route.table));
    m.attributes
        .push(RouteAttribute::Destination(dst.network().into()));
    if blackhole {
        // The metric is part of the key: the delete matches the guard, never the route it
        // guards (metric 0, or 1024 for IPv6).
        m.attributes.push(RouteAttribute::Priority(GUARD_METRIC));
    } else {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(g) = route.gateway {
        m.attributes.push(RouteAttribute::Gateway(g.into()));
    }
    if let Some(s) = route.src {
        m.attributes.push(RouteAttribute::PrefSource(s.into()));
    }
    Ok(m)
}

/// The request that deletes exactly the route `s` (protocol included).
fn stray_message(s: &StrayRoute) -> RouteMessage {
    let mut m = RouteMessage::default();
    let h = &mut m.header;
    h.address_family = family(s.dst.is_ipv4());
    h.destination_prefix_length = s.dst.prefix();
    h.tos = s.tos;
    h.table = table_byte(s.table);
    h.protocol = RouteProtocol::from(RTPROT_WIREMESH);
    h.kind = RouteType::Unspec;
    h.scope = RouteScope::NoWhere;
    m.attributes.push(RouteAttribute::Table(s.table));
    m.attributes
        .push(RouteAttribute::Destination(s.dst.network().into()));
    if let Some(i) = s.oif {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    if let Some(g) = s.gateway {
        m.attributes.push(RouteAttribute::Gateway(g.into()));
    }
    if let Some(p) = s.metric {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    m
}

/// Read a route message; `None` unless it is an IPv4 or IPv6 route with a valid destination.
pub(super) fn parse_route(m: &RouteMessage) -> Option<KernelRoute> {
    let h = &m.header;
    let v4 = match h.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return None,
    };
    let mut table = u32::from(h.table);
    let mut dst = None;
    let mut r = KernelRoute {
        table,
        dst: IpNetwork::new(unspecified(v4), 0).ok()?,
        tos: h.tos,
        gateway: None,
        oif: None,
        src: None,
        onlink: h.flags.contains(RouteFlags::Onlink),
        metric: None,
        blackhole: h.kind == RouteType::BlackHole,
        unusual: !matches!(h.kind, RouteType::Unicast | RouteType::BlackHole)
            || h.source_prefix_length != 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = ip_of(a),
            RouteAttribute::Gateway(a) => r.gateway = ip_of(a),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::PrefSource(a) => r.src = ip_of(a),
            RouteAttribute::Priority(p) => r.metric = Some(*p),
            RouteAttribute::MultiPath(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::Encap(_)
            | RouteAttribute::EncapType(_)
            | RouteAttribute::NhId(_) => r.unusual = true,
            _ => {}
        }
    }
    r.table = table;
    r.dst = IpNetwork::new(dst.unwrap_or(unspecified(v4)), h.destination_prefix_length).ok()?;
    Some(r)
}

/// `ip route`-like text for logs and errors.
fn route_text(verb: &str, r: &Route, devs: &Devices) -> String {
    if r.dev == RouteDev::Blackhole {
        return format!(
            "{verb} route blackhole {} metric {GUARD_METRIC} table {}",
            r.dst, r.table
        );
    }
    let mut s = format!("{verb} route {}", r.dst);
    if let Some(g) = r.gateway {
        s += &format!(" via {g}");
    }
    s += &format!(" dev {}", devs.name(r.dev));
    if let Some(src) = r.src {
        s += &format!(" src {src}");
    }
    if r.onlink {
        s += " onlink";
    }
    s + &format!(" table {}", r.table)
}

impl Netlink {
    /// Dump the routes of `family` in `table` (0: all tables) with protocol `protocol` (0: any),
    /// filtered by the kernel (strict checking is on).
    pub(super) async fn dump_routes(
        &self,
        v4: bool,
        table: u32,
        protocol: u8,
    ) -> Result<Vec<RouteMessage>, KernelError> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(v4);
        m.header.protocol = RouteProtocol::from(protocol);
        m.header.table = table_byte(table);
        if table > 255 {
            m.attributes.push(RouteAttribute::Table(table));
        }
        let mut msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(m)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump routes", e))?;
        // Kernels before 4.20 ignore the dump filter: filter again here.
        msgs.retain(|m| {
            (protocol == 0 || u8::from(m.header.protocol) == protocol)
                && (table == 0 || parse_route(m).is_some_and(|r| r.table == table))
        });
        Ok(msgs)
    }

    /// Every IPv4 and IPv6 route of wiremesh's: protocol 104, in one of [`OWN_TABLES`], and
    /// either a blackhole (guards have no device; IPv6 reports them on `lo`) or through one of
    /// the devices `devs` (the WireGuard, private and tunnel interfaces that exist now). Routes
    /// with protocol 104 elsewhere are someone else's: they are counted in a debug line, never
    /// returned.
    pub(super) async fn read_kernel_routes(
        &self,
        devs: &[(u32, RouteDev)],
    ) -> Result<Vec<KernelRoute>, KernelError> {
        let mut out = Vec::new();
        let mut foreign = 0usize;
        for v4 in [true, false] {
            for table in OWN_TABLES {
                let msgs = self.dump_routes(v4, table, RTPROT_WIREMESH).await?;
                for r in msgs.iter().filter_map(parse_route) {
                    if r.is_owned(devs) {
                        out.push(r);
                    } else {
                        foreign += 1;
                    }
                }
            }
        }
        if foreign > 0 {
            debug!(
                foreign,
                "routes with protocol 104 on devices wiremesh does not use: left alone"
            );
        }
        Ok(out)
    }

    /// The indices of the three route devices that exist now.
    pub(super) async fn device_indices(&self) -> Result<Vec<(u32, RouteDev)>, KernelError> {
        let mut out = Vec::new();
        for dev in [RouteDev::WireGuard, RouteDev::Private, RouteDev::Tunnel] {
            if let Some(i) = self.index_of(self.devices.name(dev)).await? {
                out.push((i, dev));
            }
        }
        Ok(out)
    }

    /// Every route of ours (see [`Netlink::read_kernel_routes`]), split into those a
    /// `desired::Route` describes and the strays (see [`StrayRoute`]).
    pub async fn read_route_dump(&self) -> Result<RouteDump, KernelError> {
        let devs = self.device_indices().await?;
        let mut dump = RouteDump::default();
        for r in self.read_kernel_routes(&devs).await? {
            match r.classify(&devs) {
                Ok(route) => dump.routes.push(route),
                Err(stray) => dump.strays.push(stray),
            }
        }
        dump.routes.sort();
        dump.strays.sort();
        debug!(
            routes = dump.routes.len(),
            strays = dump.strays.len(),
            "read routes"
        );
        Ok(dump)
    }

    /// Every route of ours that a `desired::Route` describes, sorted. Routes of ours on other
    /// devices (or multipath, typed…) are left out: see [`StrayRoute`] and
    /// [`Netlink::read_route_dump`]; [`Netlink::cleanup`] and [`super::NetlinkKernel`] remove them.
    pub async fn read_routes(&self) -> Result<Vec<Route>, KernelError> {
        Ok(self.read_route_dump().await?.routes)
    }

    /// Add one route (protocol 104). Adding a route that is already ours is not an error;
    /// a foreign route on the same destination, table and metric is (and is left alone).
    pub async fn add_route(&self, route: &Route) -> Result<(), KernelError> {
        let mut r = self.apply_routes(std::slice::from_ref(route), &[]).await;
        r.adds.pop().unwrap_or(Ok(()))
    }

    /// Delete one route of ours. Deleting a route that is not there is not an error.
    pub async fn del_route(&self, route: &Route) -> Result<(), KernelError> {
        let mut r = self.apply_routes(&[], std::slice::from_ref(route)).await;
        r.dels.pop().unwrap_or(Ok(()))
    }

    /// Delete `dels`, then add `adds`, many requests in flight; one result per route.
    ///
    /// Idempotent: deleting a missing route (ESRCH) and adding a route of ours that is already
    /// there (EEXIST, checked against one dump) succeed. A delete whose device is gone succeeds
    /// too (the kernel removed the route with the device).
    pub async fn apply_routes(&self, adds: &[Route], dels: &[Route]) -> RouteResults {
        let start = Instant::now();
        let devs = match self.device_indices().await {
            Ok(d) => d,
            Err(e) => {
                let fail = |verb: &str, routes: &[Route]| {
                    let fail = |r| Err(copy_err(route_text(verb, r, &self.devices), &e));
                    routes.iter().map(fail).collect()
                };
                return RouteResults {
                    adds: fail("add", adds),
                    dels: fail("del", dels),
                };
            }
        };
        let dels_out = self.send_routes(dels, false, &devs).await;
        let adds_out = self.send_routes(adds, true, &devs).await;
        // EEXIST: either ours is already there (fine) or a foreign route holds the key.
        let have = if adds_out
            .iter()
            .any(|o| matches!(o, Outcome::Kernel(Answer::Errno(libc::EEXIST))))
        {
            self.read_route_dump().await
        } else {
            Ok(RouteDump::default())
        };
        let mut out = RouteResults::default();
        for (r, o) in dels.iter().zip(dels_out) {
            let res = match o {
                Outcome::Done => Ok(()),
                Outcome::Refused(e) => Err(e),
                Outcome::Kernel(a) => a.into_result(&[libc::ESRCH, libc::ENOENT], || {
                    route_text("del", r, &self.devices)
                }),
            };
            debug!(op = "del route", ?r, ok = res.is_ok());
            out.dels.push(res);
        }
        for (r, o) in adds.iter().zip(adds_out) {
            let res = match o {
                Outcome::Done => Ok(()),
                Outcome::Refused(e) => Err(e),
                Outcome::Kernel(Answer::Errno(libc::EEXIST)) => match &have {
                    Ok(h) if h.routes.binary_search(r).is_ok() => Ok(()),
                    Ok(h) => Err(KernelError::Netlink {
                        op: route_text("add", r, &self.devices),
                        message: if h.holds(r.table, r.dst) {
                            "another route of wiremesh holds this destination in this table; \
                             delete it first"
                        } else {
                            "a route not owned by wiremesh holds this destination in this \
                             table; left alone"
                        }
                        .into(),
                    }),
                    Err(e) => Err(copy_err(route_text("add", r, &self.devices), e)),
                },
                Outcome::Kernel(a) => a.into_result(&[], || route_text("add", r, &self.devices)),
            };
            debug!(op = "add route", ?r, ok = res.is_ok());
            out.adds.push(res);
        }
        if adds.len() + dels.len() > 1 {
            info!(
                added = adds.len(),
                deleted = dels.len(),
                failed = out.failures(),
                elapsed_ms = start.elapsed().as_millis() as u64,
                "routes applied"
            );
        }
        out
    }

    /// Build and send the add (or delete) requests for `routes`, one outcome per route.
    async fn send_routes(
        &self,
        routes: &[Route],
        add: bool,
        devs: &[(u32, RouteDev)],
    ) -> Vec<Outcome> {
        let verb = if add { "add" } else { "del" };
        let message = |r: &Route, oif: u32| {
            route_message(r, oif, add).map(|m| {
                if add {
                    request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
                } else {
                    request(RouteNetlinkMessage::DelRoute(m), 0)
                }
            })
        };
        let mut out = Vec::with_capacity(routes.len());
        // (route index, output interface) of each request to send; the messages themselves are
        // built again as they are sent, a window at a time (see `send_acked`).
        let mut sent: Vec<(usize, u32)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            // A blackhole has no device (0 is no interface index; it is not sent).
            let oif = if r.dev == RouteDev::Blackhole {
                Some(0)
            } else {
                devs.iter().find(|(_, d)| *d == r.dev).map(|(idx, _)| *idx)
            };
            let Some(oif) = oif else {
                // A delete is done: the route died with its device.
                out.push(if add {
                    Outcome::Refused(missing_device(r.dev, &self.devices, r))
                } else {
                    Outcome::Done
                });
                continue;
            };
            match route_message(r, oif, add) {
                Ok(_) => {
                    sent.push((i, oif));
                    out.push(Outcome::Done);
                }
                Err(message) => out.push(Outcome::Refused(KernelError::Netlink {
                    op: route_text(verb, r, &self.devices),
                    message,
                })),
            }
        }
        let msgs = sent
            .iter()
            .filter_map(|&(i, oif)| message(&routes[i], oif).ok());
        let answers = self.send_acked(msgs).await;
        for ((i, _), a) in sent.into_iter().zip(answers) {
            if a != Answer::Ok {
                out[i] = Outcome::Kernel(a);
            }
        }
        out
    }

    /// Delete exactly these routes of ours (e.g. the strays of [`Netlink::read_route_dump`]);
    /// one result per route, a missing route is not an error.
    pub async fn del_stray_routes(&self, strays: &[StrayRoute]) -> Vec<Result<(), KernelError>> {
        let msgs: Vec<_> = strays
            .iter()
            .map(|s| request(RouteNetlinkMessage::DelRoute(stray_message(s)), 0))
            .collect();
        let answers = self.send_acked(msgs).await;
        strays
            .iter()
            .zip(answers)
            .map(|(s, a)| {
                debug!(op = "del stray route", %s, ?a);
                a.into_result(&[libc::ESRCH, libc::ENOENT], || format!("del route {s}"))
            })
            .collect()
    }
}

/// How one route request went, before it becomes a `Result`.
#[derive(Debug)]
enum Outcome {
    /// Acknowledged, or nothing to do.
    Done,
    /// The kernel refused it (or never answered).
    Kernel(Answer),
    /// Refused before sending.
    Refused(KernelError),
}

/// `e`, which stopped `op` (`KernelError` is not `Clone`: its I/O variant holds an `io::Error`).
fn copy_err(op: String, e: &KernelError) -> KernelError {
    match e {
        KernelError::Unsupported(s) => KernelError::Unsupported(s.clone()),
        other => KernelError::Netlink {
            op,
            message: other.to_string(),
        },
    }
}

/// The error for adding `r` through a device that does not exist.
fn missing_device(dev: RouteDev, devs: &Devices, r: &Route) -> KernelError {
    let name = devs.name(dev);
    match dev {
        RouteDev::Tunnel => KernelError::Unsupported(format!(
            "{}: the IPIP tunnel interface {name:?} does not exist (is the ipip module loaded?)",
            route_text("add", r, devs)
        )),
        _ => KernelError::Netlink {
            op: route_text("add", r, devs),
            message: format!("no interface named {name:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{ENCAP_TABLE, MAIN_TABLE};

    fn r(table: u32, dst: &str, gw: Option<&str>, src: Option<&str>) -> Route {
        Route {
            table,
            dst: dst.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            dev: RouteDev::WireGuard,
            src: src.map(|s| s.parse().unwrap()),
            onlink: gw.is_some(),
        }
    }

    const DEVS: &[(u32, RouteDev)] = &[(7, RouteDev::WireGuard), (8, RouteDev::Private)];

    #[test]
    fn routes_survive_the_trip_through_a_message() {
        for route in [
            r(MAIN_TABLE, "10.42.1.0/24", None, None),
            r(
                ENCAP_TABLE,
                "192.168.0.2/32",
                Some("192.168.0.2"),
                Some("192.168.0.1"),
            ),
            r(MAIN_TABLE, "0.0.0.0/0", Some("10.4.0.1"), None),
            r(100_000, "fd00:42::/64", Some("fd00::1"), None),
        ] {
            let m = route_message(&route, 7, true).unwrap();
            assert_eq!(u8::from(m.header.protocol), RTPROT_WIREMESH);
            let back = parse_route(&m).unwrap().classify(DEVS);
            assert_eq!(back, Ok(route));
        }
    }

    #[test]
    fn deletes_match_any_scope_and_type_but_only_our_protocol() {
        let m = route_message(&r(MAIN_TABLE, "10.42.1.0/24", None, None), 7, false).unwrap();
        assert_eq!(m.header.scope, RouteScope::NoWhere);
        assert_eq!(m.header.kind, RouteType::Unspec);
        assert_eq!(u8::from(m.header.protocol), RTPROT_WIREMESH);
    }

    #[test]
    fn routes_the_kernel_would_refuse_or_alter_are_refused() {
        let mut bad = vec![
            r(MAIN_TABLE, "10.42.1.1/24", None, None),
            r(MAIN_TABLE, "10.42.1.0/24", Some("fd00::1"), None),
            r(MAIN_TABLE, "fd00:42::/64", None, Some("10.0.0.1")),
        ];
        let mut no_gw = r(MAIN_TABLE, "10.42.1.0/24", None, None);
        no_gw.onlink = true;
        bad.push(no_gw);
        for route in bad {
            assert!(route_message(&route, 7, true).is_err(), "{route:?}");
        }
    }

    #[test]
    fn routes_on_other_devices_or_of_other_kinds_are_strays() {
        let route = r(MAIN_TABLE, "10.42.1.0/24", None, None);
        let elsewhere = parse_route(&route_message(&route, 99, true).unwrap()).unwrap();
        assert_eq!(elsewhere.clone().classify(DEVS), Err(elsewhere.identity()));
        let mut m = route_message(&route, 7, true).unwrap();
        m.header.kind = RouteType::BlackHole;
        assert!(parse_route(&m).unwrap().classify(DEVS).is_err());
        let mut m = route_message(&route, 7, true).unwrap();
        m.attributes.push(RouteAttribute::MultiPath(Vec::new()));
        assert!(parse_route(&m).unwrap().classify(DEVS).is_err());
    }

    #[test]
    fn only_routes_in_wiremesh_tables_through_its_devices_or_blackholes_are_owned() {
        let on = |table, oif| {
            parse_route(&route_message(&r(table, "10.42.1.0/24", None, None), oif, true).unwrap())
                .unwrap()
        };
        assert!(on(MAIN_TABLE, 7).is_owned(DEVS));
        assert!(on(ENCAP_TABLE, 8).is_owned(DEVS));
        assert!(!on(MAIN_TABLE, 99).is_owned(DEVS), "another device");
        assert!(!on(200, 7).is_owned(DEVS), "another table");
        let guard = |table| {
            parse_route(
                &route_message(
                    &Route::blackhole(table, "10.42.1.0/24".parse().unwrap()),
                    0,
                    true,
                )
                .unwrap(),
            )
            .unwrap()
        };
        assert!(guard(MAIN_TABLE).is_owned(DEVS));
        assert!(!guard(200).is_owned(DEVS));
    }

    #[test]
    fn large_table_ids_travel_in_the_attribute() {
        assert_eq!(table_byte(MAIN_TABLE), 254);
        assert_eq!(table_byte(ENCAP_TABLE), RT_TABLE_UNSPEC);
    }
}
