//! [`NetlinkKernel`]: the [`Kernel`] trait for the netlink share of the work (link, addresses,
//! MTU, routes, rules, bridge). The WireGuard device and the firewall belong to other
//! implementations; an agent composes them.

use tracing::info;

use super::Netlink;
use super::route::RouteDump;
use super::rule::RuleDump;
use crate::reconcile::{Kernel, KernelError, Op, OwnedState};

/// The netlink share of [`Kernel`]: reads the WireGuard link, routes, rules and the bridge;
/// applies the route, rule, address, MTU, link-up and bridge operations, and refuses the others
/// (`KernelError::Unsupported`).
///
/// `read_owned` leaves `wireguard` and `masquerade` empty (other implementations fill them), and
/// deletes stray routes and rules first: they are ours but no desired state can name them, so the
/// planner could never remove them.
#[derive(Debug)]
pub struct NetlinkKernel {
    /// The netlink handle used.
    pub netlink: Netlink,
}

impl NetlinkKernel {
    /// Wrap a [`Netlink`] handle.
    pub fn new(netlink: Netlink) -> NetlinkKernel {
        NetlinkKernel { netlink }
    }

    /// Delete routes and rules of ours that no desired state can describe; returns how many.
    pub async fn purge_strays(&self) -> Result<usize, KernelError> {
        let routes = self.netlink.read_route_dump().await?;
        let rules = self.netlink.read_rule_dump().await?;
        self.delete_strays(&routes, &rules).await
    }

    /// Delete the strays of dumps already read.
    async fn delete_strays(
        &self,
        routes: &RouteDump,
        rules: &RuleDump,
    ) -> Result<usize, KernelError> {
        let (routes, rules) = (&routes.strays, &rules.strays);
        let mut n = 0;
        for r in self.netlink.del_stray_routes(routes).await {
            r?;
            n += 1;
        }
        for r in self.netlink.del_stray_rules(rules).await {
            r?;
            n += 1;
        }
        if n > 0 {
            info!(
                routes = routes.len(),
                rules = rules.len(),
                "stray routes and rules removed"
            );
        }
        Ok(n)
    }
}

impl Kernel for NetlinkKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        // One dump of each: the strays go, the rest is what we own.
        let nl = &self.netlink;
        let routes = nl.read_route_dump().await?;
        let rules = nl.read_rule_dump().await?;
        self.delete_strays(&routes, &rules).await?;
        Ok(OwnedState {
            wireguard: None,
            link: nl.read_link(&nl.devices().wireguard).await?,
            routes: routes.routes,
            rules: rules.rules,
            bridge: nl.read_bridge().await?,
            masquerade: None,
            cni: None,
            cni_mtu: None,
            underlay_mtu: None,
            mss_clamp: None,
        })
    }

    async fn underlay_mtu(
        &mut self,
        towards: Option<std::net::IpAddr>,
    ) -> Result<Option<u32>, KernelError> {
        self.netlink.underlay_mtu(towards).await
    }

    async fn apply(&mut self, op: &Op) -> Result<(), KernelError> {
        let nl = &self.netlink;
        let wg = nl.devices().wireguard.as_str();
        match op {
            Op::SetMtu { mtu } => nl.set_mtu(wg, *mtu).await,
            Op::AddAddress { address } => nl.add_address(wg, *address).await,
            Op::DelAddress { address } => nl.del_address(wg, *address).await,
            Op::LinkUp => nl.set_up(wg).await,
            Op::SetBridge(b) => nl.ensure_bridge(b).await,
            Op::AddRoute(r) => nl.add_route(r).await,
            Op::DelRoute(r) => nl.del_route(r).await,
            Op::AddRule(r) => nl.add_rule(r).await,
            Op::DelRule(r) => nl.del_rule(r).await,
            other => Err(KernelError::Unsupported(format!(
                "{other:?} is not a netlink operation"
            ))),
        }
    }

    /// Runs the operations in order, except that each run of consecutive `AddRoute` (or
    /// `DelRoute`) operations goes to the kernel pipelined, as one [`Netlink::apply_routes`].
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let add = matches!(ops[i], Op::AddRoute(_));
            let run: Vec<_> = ops[i..]
                .iter()
                .map_while(|o| match o {
                    Op::AddRoute(r) if add => Some(r.clone()),
                    Op::DelRoute(r) if !add => Some(r.clone()),
                    _ => None,
                })
                .collect();
            if run.len() > 1 {
                let res = if add {
                    self.netlink.apply_routes(&run, &[]).await.adds
                } else {
                    self.netlink.apply_routes(&[], &run).await.dels
                };
                i += run.len();
                out.extend(res);
            } else {
                out.push(self.apply(&ops[i]).await);
                i += 1;
            }
        }
        out
    }
}
