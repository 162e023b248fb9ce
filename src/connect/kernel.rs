//! [`ConnectKernel`]: the share of the machine `meshctl connect` owns: one WireGuard interface
//! (kernel module where present, else the userspace daemon, chosen as the agent chooses) and the
//! routes of wiremesh's protocol through it, with their guards. No bridge, rules, firewall, CNI
//! file or sysctl: an outside machine forwards nothing.
//!
//! Composes the agent's [`NetlinkKernel`] and [`WgDevice`]; may depend on the reconciler only.

use tracing::{info, warn};

use crate::desired::{DesiredState, MAIN_TABLE, Route, RouteDev, guards_of, guards_of_state};
use crate::reconcile::netlink::{Devices, Netlink, NetlinkKernel};
use crate::reconcile::system::{
    Run, TUNNEL_DEVICE, device_results, mark_if_created, on_wireguard_link, runs,
    wireguard_link_refusal,
};
use crate::reconcile::wg::{PrivateKey, WgDevice, WgOptions};
use crate::reconcile::{Kernel, KernelError, Op, OwnedState};

/// The WireGuard interface of `meshctl connect` and the routes of ours through it.
#[derive(Debug)]
pub struct ConnectKernel {
    netlink: NetlinkKernel,
    wg: WgDevice,
}

/// What [`ConnectKernel::remove`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Routes through the interface.
    pub routes: usize,
    /// Their guards.
    pub guards: usize,
}

impl ConnectKernel {
    /// Handles on interface `interface` (holding `key`) and on netlink. Must run inside a tokio
    /// runtime, in the machine's network namespace.
    ///
    /// Refuses a machine that holds routes or rules of wiremesh's protocol other than through
    /// `interface` (and blackhole guards): a node's agent owns them, and the reconciler would
    /// remove what no desired state of an outside machine names.
    pub async fn new(
        interface: &str,
        key: PrivateKey,
        wg: &WgOptions,
    ) -> Result<ConnectKernel, KernelError> {
        let netlink = Netlink::new(Devices {
            wireguard: interface.to_owned(),
            private: String::new(),
            tunnel: TUNNEL_DEVICE.to_owned(),
            bridge: String::new(),
        })?;
        let routes = netlink.read_route_dump().await?;
        let rules = netlink.read_rule_dump().await?;
        let foreign: Vec<String> = routes
            .routes
            .iter()
            .filter(|r| !matches!(r.dev, RouteDev::WireGuard | RouteDev::Blackhole))
            .map(|r| r.dst.to_string())
            .chain(routes.strays.iter().map(ToString::to_string))
            .chain(
                rules
                    .rules
                    .iter()
                    .map(|r| format!("a rule to table {}", r.table)),
            )
            .chain(rules.strays.iter().map(|_| "a rule".to_owned()))
            .collect();
        if !foreign.is_empty() {
            return Err(KernelError::NotOwned(format!(
                "this machine holds routes or rules of a wiremesh agent (protocol {}: {}{}); \
                 meshctl connect is for machines outside the mesh, not for its nodes",
                crate::reconcile::RTPROT_WIREMESH,
                foreign[..foreign.len().min(3)].join(", "),
                if foreign.len() > 3 { ", …" } else { "" }
            )));
        }
        let wg = WgDevice::new(interface, key, wg)?;
        info!(backend = %wg.backend(), interface, "WireGuard device");
        Ok(ConnectKernel {
            netlink: NetlinkKernel::new(netlink),
            wg,
        })
    }

    /// The WireGuard device.
    pub fn wireguard(&self) -> &WgDevice {
        &self.wg
    }

    /// Remove what `connect` made: the routes of ours through the interface, the guards of
    /// those, of the interface's addresses and of `last` (the last state applied, whose routes
    /// the kernel may have dropped already), then the interface itself (the kernel link, or the
    /// userspace daemon). Nothing else.
    pub async fn remove(&mut self, last: Option<&DesiredState>) -> Result<Removed, KernelError> {
        let nl = &self.netlink.netlink;
        let dump = nl.read_route_dump().await?;
        let through: Vec<Route> = dump
            .routes
            .iter()
            .filter(|r| r.dev == RouteDev::WireGuard)
            .cloned()
            .collect();
        let mut guards = guards_of(&through);
        if let Some(d) = last {
            guards.extend(guards_of_state(d));
        }
        if let Some(link) = nl.read_link(&nl.devices().wireguard).await? {
            guards.extend(
                link.addresses
                    .iter()
                    .map(|a| Route::blackhole(MAIN_TABLE, crate::model::network_of(*a))),
            );
        }
        guards.sort();
        guards.dedup();
        let guards: Vec<Route> = guards
            .into_iter()
            .filter(|g| dump.routes.binary_search(g).is_ok())
            .collect();
        let ops: Vec<Op> = through
            .iter()
            .chain(&guards)
            .cloned()
            .map(Op::DelRoute)
            .collect();
        let mut removed = Removed::default();
        for (op, r) in ops.iter().zip(self.netlink.apply_all(&ops).await) {
            match r {
                Ok(()) if matches!(op, Op::DelRoute(r) if r.dev == RouteDev::Blackhole) => {
                    removed.guards += 1
                }
                Ok(()) => removed.routes += 1,
                Err(e) => warn!(error = %e, "cannot remove a route"),
            }
        }
        if self.netlink.netlink.claim_wireguard_link().await.is_ok() {
            let wg = self.wg.clone();
            tokio::task::spawn_blocking(move || wg.delete())
                .await
                .map_err(|e| KernelError::WireGuard {
                    op: "delete interface".into(),
                    message: e.to_string(),
                })??;
        }
        Ok(removed)
    }
}

impl Kernel for ConnectKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        let mut s = self.netlink.read_owned().await?;
        s.wireguard = self.wg.read_state().await?;
        Ok(s)
    }

    async fn underlay_mtu(
        &mut self,
        towards: Option<std::net::IpAddr>,
    ) -> Result<Option<u32>, KernelError> {
        self.netlink.underlay_mtu(towards).await
    }

    async fn apply(&mut self, op: &Op) -> Result<(), KernelError> {
        self.apply_all(std::slice::from_ref(op))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// In order: runs of WireGuard operations to the device, runs of routes to netlink as one
    /// batch, the rest one by one. Operations on a WireGuard link that is not wiremesh's fail,
    /// the others still run; a link created here is marked as wiremesh's.
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let nl = &self.netlink.netlink;
        let link_why = wireguard_link_refusal(nl, ops).await;
        let mut out = Vec::with_capacity(ops.len());
        for (run, r) in runs(ops) {
            // A run acts on the WireGuard link as a whole or not at all.
            if let Some(why) = link_why.as_deref()
                && on_wireguard_link(&ops[r.start])
            {
                out.extend(r.map(|_| Err(KernelError::NotOwned(why.to_owned()))));
                continue;
            }
            match run {
                Run::WireGuard => {
                    out.extend(device_results(self.wg.apply_ops(&ops[r]).await));
                }
                Run::RoutesAndRules => out.extend(self.netlink.apply_all(&ops[r]).await),
                Run::One => out.push(self.netlink.apply(&ops[r.start]).await),
            }
        }
        mark_if_created(&self.netlink.netlink, self.wg.name(), ops, &out).await;
        out
    }
}
