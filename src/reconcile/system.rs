//! [`SystemKernel`]: the whole machine as one [`Kernel`]: netlink (links, addresses, routes,
//! rules, bridge), the WireGuard device, the masquerade table and the CNI config file.
//!
//! Composes `netlink`, `wg`, `nft` and `crate::cni`; dispatches each op to its owner and sends
//! runs of WireGuard ops and of route/rule ops as batches. May depend on the reconcile modules
//! and the CNI module.

use std::net::IpAddr;
use std::path::PathBuf;

use tracing::{debug, info, warn};

use super::netlink::{Devices, Netlink, NetlinkKernel};
use super::nft::{Firewall, FirewallMode};
use super::plan::WgDeviceState;
use super::wg::{PrivateKey, WgDevice, WgMode, WgOptions};
use super::{Kernel, KernelError, Op, OwnedState};
use crate::cni;

/// Name of the IPIP tunnel device Kilo's encapsulation uses.
pub const TUNNEL_DEVICE: &str = "tunl0";

/// What the system kernel is set up with.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// WireGuard interface name.
    pub interface: String,
    /// CNI bridge name.
    pub bridge: String,
    /// WireGuard implementation.
    pub wireguard: WgMode,
    /// Userspace WireGuard program.
    pub wireguard_userspace: PathBuf,
    /// Firewall used for masquerading.
    pub firewall: FirewallMode,
    /// CNI config file path.
    pub cni_config: PathBuf,
    /// Fixed MTU, or `None` for automatic.
    pub mtu: Option<u32>,
    /// The node's internal IP: its interface is the private device of routes.
    pub internal_ip: Option<IpAddr>,
}

/// The machine's kernel, as wiremesh owns parts of it.
#[derive(Debug)]
pub struct SystemKernel {
    netlink: NetlinkKernel,
    wg: WgDevice,
    firewall: Firewall,
    opts: SystemOptions,
}

fn is_wireguard(op: &Op) -> bool {
    matches!(
        op,
        Op::CreateInterface
            | Op::ConfigureDevice { .. }
            | Op::UpsertPeer(_)
            | Op::RemovePeer { .. }
    )
}

fn is_route_or_rule(op: &Op) -> bool {
    matches!(
        op,
        Op::AddRoute(_) | Op::DelRoute(_) | Op::AddRule(_) | Op::DelRule(_)
    )
}

impl SystemKernel {
    /// Open netlink, the WireGuard device handle and the firewall. Must run inside a tokio
    /// runtime on a thread in the node's network namespace.
    pub async fn new(opts: SystemOptions, key: PrivateKey) -> Result<SystemKernel, KernelError> {
        let mut devices = Devices {
            wireguard: opts.interface.clone(),
            private: String::new(),
            tunnel: TUNNEL_DEVICE.to_owned(),
            bridge: opts.bridge.clone(),
        };
        let netlink = Netlink::new(devices.clone())?;
        if let Some(ip) = opts.internal_ip {
            match netlink.private_interface_for(ip).await? {
                Some(name) => {
                    info!(interface = %name, %ip, "private interface found");
                    devices.private = name;
                }
                None => {
                    warn!(%ip, "no interface holds the internal IP; routes via the private network will fail")
                }
            }
        }
        let mut netlink = netlink;
        netlink.set_devices(devices);
        netlink.enable_forwarding(true)?;
        let mut wg_opts = WgOptions::new(opts.wireguard);
        wg_opts.userspace_binary = opts.wireguard_userspace.clone();
        let wg = WgDevice::new(&opts.interface, key, &wg_opts)?;
        info!(backend = %wg.backend(), interface = %opts.interface, "WireGuard device");
        let firewall = Firewall::new(opts.firewall).await;
        info!(mode = %firewall.mode(), "firewall");
        Ok(SystemKernel {
            netlink: NetlinkKernel::new(netlink),
            wg,
            firewall,
            opts,
        })
    }

    /// The netlink handle (for the route watcher and cleanup).
    pub fn netlink(&self) -> &Netlink {
        &self.netlink.netlink
    }

    /// The WireGuard device.
    pub fn wireguard(&self) -> &WgDevice {
        &self.wg
    }

    async fn write_cni(&self, pod_cidrs: &[ipnetwork::IpNetwork]) -> Result<(), KernelError> {
        let mtu = match self.opts.mtu {
            Some(m) => m,
            None => self.netlink.netlink.auto_mtu().await?,
        };
        let text =
            cni::render_conflist(&self.opts.bridge, pod_cidrs, mtu, cni::DEFAULT_NETWORK_NAME);
        let changed =
            cni::write_conflist(&self.opts.cni_config, &text).map_err(|e| KernelError::Io {
                op: format!("write CNI config {}", self.opts.cni_config.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
        if changed {
            info!(path = %self.opts.cni_config.display(), "CNI config written");
        }
        Ok(())
    }

    /// Remove everything wiremesh created: routes and rules of ours, the bridge if ours, the
    /// WireGuard interface, the firewall table, the CNI config file. Nothing else.
    pub async fn cleanup(&mut self) -> Result<(), KernelError> {
        let c = self.netlink.netlink.cleanup().await?;
        info!(
            routes = c.routes,
            rules = c.rules,
            bridge = c.bridge,
            "routes, rules and bridge removed"
        );
        self.firewall.delete().await?;
        let wg = self.wg.clone();
        tokio::task::spawn_blocking(move || wg.delete())
            .await
            .map_err(|e| KernelError::WireGuard {
                op: "delete interface".into(),
                message: e.to_string(),
            })??;
        match std::fs::remove_file(&self.opts.cni_config) {
            Ok(()) => info!(path = %self.opts.cni_config.display(), "CNI config removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KernelError::Io {
                    op: format!("remove {}", self.opts.cni_config.display()),
                    source,
                });
            }
        }
        Ok(())
    }
}

impl Kernel for SystemKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        let mut s = self.netlink.read_owned().await?;
        s.wireguard = self.wg.read_state().await?;
        s.masquerade = self.firewall.read().await?;
        s.cni = cni::read_conflist_cidrs(&self.opts.cni_config).map_err(|e| KernelError::Io {
            op: format!("read CNI config {}", self.opts.cni_config.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(s)
    }

    /// Only the device: the periodic check-in needs its peers, not a dump of every route.
    async fn read_wireguard(&mut self) -> Result<Option<WgDeviceState>, KernelError> {
        self.wg.read_state().await
    }

    async fn port_holder(&mut self, port: u16) -> Option<super::port::PortHolder> {
        let ours = self.opts.interface.clone();
        tokio::task::spawn_blocking(move || super::port::find_port_holder(port, &ours))
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "looking for the holder of the listen port failed");
                None
            })
    }

    async fn apply(&mut self, op: &Op) -> Result<(), KernelError> {
        if is_wireguard(op) {
            return self
                .wg
                .apply_op(op)
                .await
                .unwrap_or_else(|| Err(KernelError::Unsupported(format!("{op:?}"))));
        }
        match op {
            Op::SetMasquerade(m) => self.firewall.apply(m).await,
            Op::DelMasquerade => self.firewall.delete().await,
            Op::WriteCni { pod_cidrs } => self.write_cni(pod_cidrs).await,
            other => self.netlink.apply(other).await,
        }
    }

    /// In order, except the masquerade operation (at most one per plan): it runs beside the
    /// others, as nothing else depends on it and `nft` is a process of its own, so a plan takes as
    /// long as the slower of the two rather than their sum (at 5,000 nodes, with the WireGuard
    /// daemon busy with thousands of renumbered peers, that is most of a reconciliation).
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let masquerade = ops
            .iter()
            .position(|o| matches!(o, Op::SetMasquerade(_) | Op::DelMasquerade));
        let Some(at) = masquerade else {
            return self.apply_in_order(ops).await;
        };
        // A clone stands for the same table (it shares what the table is known to hold).
        let mut firewall = self.firewall.clone();
        let nat = async {
            match &ops[at] {
                Op::SetMasquerade(m) => firewall.apply(m).await,
                _ => firewall.delete().await,
            }
        };
        let rest = async {
            let mut out = self.apply_in_order(&ops[..at]).await;
            out.extend(self.apply_in_order(&ops[at + 1..]).await);
            out
        };
        let (mut out, nat) = tokio::join!(rest, nat);
        out.insert(at, nat);
        out
    }
}

impl SystemKernel {
    /// Apply `ops` one group after the other: consecutive WireGuard operations in one device
    /// update, consecutive routes and rules in one netlink batch, anything else alone.
    async fn apply_in_order(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            if is_wireguard(&ops[i]) {
                let end = i + ops[i..].iter().take_while(|o| is_wireguard(o)).count();
                let started = std::time::Instant::now();
                let results = self.wg.apply_ops(&ops[i..end]).await;
                info!(
                    ops = end - i,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "wireguard applied"
                );
                for r in results {
                    out.push(r.unwrap_or_else(|| {
                        Err(KernelError::Unsupported("not a WireGuard op".into()))
                    }));
                }
                i = end;
            } else if is_route_or_rule(&ops[i]) {
                let end = i + ops[i..].iter().take_while(|o| is_route_or_rule(o)).count();
                out.extend(self.netlink.apply_all(&ops[i..end]).await);
                i = end;
            } else {
                let started = std::time::Instant::now();
                out.push(self.apply(&ops[i]).await);
                debug!(
                    op = ops[i].kind(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "applied"
                );
                i += 1;
            }
        }
        out
    }
}
