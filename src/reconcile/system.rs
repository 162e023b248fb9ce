//! [`SystemKernel`]: the whole machine as one [`Kernel`]: netlink (links, addresses, routes,
//! rules, bridge, the underlay's MTU), the WireGuard device, the masquerade and MSS clamp
//! tables and the CNI config file.
//!
//! Composes `netlink`, `wg`, `nft`, `forwarding` and `crate::cni`; dispatches each op to its
//! owner and sends runs of WireGuard ops and of route/rule ops as batches. May depend on the
//! reconcile modules and the CNI module.
//!
//! **Ownership.** Before an op reaches the WireGuard link, the link of that name is checked
//! ([`super::netlink::wireguard_owner`]): another kind of link, or one with another alias, is
//! refused and every op on it fails; a WireGuard link wiremesh creates or adopts is marked with
//! [`WG_ALIAS`]. The CNI config file is overwritten or deleted only when its content is
//! wiremesh's ([`cni::is_ours`]). [`SystemKernel::cleanup`] first checks everything it was
//! named, and refuses to touch anything when one of them is not wiremesh's.
//!
//! **Forwarding.** Turned on per family, only when an op (or the installed state) routes or
//! bridges that family, and never written when already on (see [`super::forwarding`]). When it
//! cannot be turned on, the ops that need it fail with the host setting to make, and the rest
//! is applied.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tracing::{debug, error, info, warn};

use super::forwarding::{self, Families, Sysctls};
use super::netlink::{Devices, LinkOwner, Netlink, NetlinkKernel, WG_ALIAS};
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
    /// The node's internal IP: its interface is the private device of routes.
    pub internal_ip: Option<IpAddr>,
    /// The private device when no internal IP is given (`wiremesh cleanup`: the one the agent
    /// recorded, see [`load_private_interface`]).
    pub private_interface: Option<String>,
    /// The agent's state directory (that of the private key): where the record of changed
    /// sysctls and the private interface are kept. `None`: nothing is recorded or restored.
    pub state_dir: Option<PathBuf>,
}

/// The default WireGuard interface name (`--interface`), which only wiremesh uses: an unmarked
/// WireGuard link of this name is taken as one an older wiremesh created (see
/// [`SystemKernel::cleanup`]).
pub const DEFAULT_WG_NAME: &str = "wiremesh0";
/// The file, in the state directory, naming the private interface the agent routes through.
pub const PRIVATE_RECORD: &str = "private-interface";

/// Record `name` as the private interface in `dir` (one line, replaced in one rename).
pub fn save_private_interface(dir: &Path, name: &str) -> std::io::Result<()> {
    let path = dir.join(PRIVATE_RECORD);
    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == name) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    crate::state_file::replace(&path, &format!("{name}\n"))
}

/// The private interface recorded in `dir`, if any and if it is a plausible interface name
/// (1 to 15 bytes, no `/`, whitespace or `:`).
pub fn load_private_interface(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(PRIVATE_RECORD)).ok()?;
    let name = text.trim();
    let plausible = (1..=15).contains(&name.len())
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    plausible.then(|| name.to_owned())
}

/// The machine's kernel, as wiremesh owns parts of it.
#[derive(Debug)]
pub struct SystemKernel {
    netlink: NetlinkKernel,
    wg: WgDevice,
    firewall: Firewall,
    opts: SystemOptions,
    sysctls: Sysctls,
    /// Families whose forwarding is known to be on.
    forwarding: Families,
    /// Families the state read last routes or bridges.
    in_use: Families,
}

/// Whether `op` acts on the WireGuard link or device, or on traffic through it (the MSS clamp:
/// clamping a foreign interface such as a mistyped `--interface eth0` would rewrite the SYNs of
/// everything that crosses it).
pub(crate) fn on_wireguard_link(op: &Op) -> bool {
    is_wireguard(op)
        || matches!(
            op,
            Op::SetMtu { .. }
                | Op::AddAddress { .. }
                | Op::DelAddress { .. }
                | Op::LinkUp
                | Op::SetMssClamp { .. }
        )
}

fn is_wireguard(op: &Op) -> bool {
    matches!(
        op,
        Op::CreateInterface
            | Op::ConfigureDevice { .. }
            | Op::UpsertPeer(_)
            | Op::SetAllowedIps { .. }
            | Op::RemovePeer { .. }
    )
}

fn is_route_or_rule(op: &Op) -> bool {
    matches!(
        op,
        Op::AddRoute(_) | Op::DelRoute(_) | Op::AddRule(_) | Op::DelRule(_)
    )
}

/// How a run of operations goes to the kernel (see [`runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Consecutive WireGuard operations: one device update.
    WireGuard,
    /// Consecutive routes and rules: one netlink batch.
    RoutesAndRules,
    /// Anything else, alone.
    One,
}

/// `ops` cut into runs, in order: consecutive WireGuard operations, consecutive routes and
/// rules, anything else one by one.
pub(crate) fn runs(ops: &[Op]) -> Vec<(Run, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let (run, len) = if is_wireguard(&ops[i]) {
            (
                Run::WireGuard,
                ops[i..].iter().take_while(|o| is_wireguard(o)).count(),
            )
        } else if is_route_or_rule(&ops[i]) {
            (
                Run::RoutesAndRules,
                ops[i..].iter().take_while(|o| is_route_or_rule(o)).count(),
            )
        } else {
            (Run::One, 1)
        };
        out.push((run, i..i + len));
        i += len;
    }
    out
}

/// The results of a WireGuard device update, one per operation sent (an operation the device
/// does not take is an error).
pub(crate) fn device_results(
    results: Vec<Option<Result<(), KernelError>>>,
) -> impl Iterator<Item = Result<(), KernelError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(KernelError::Unsupported("not a WireGuard op".into()))))
}

/// Why the operations of `ops` that act on the WireGuard link must not run (a link of that
/// name that is not wiremesh's); `None` when they may, or when there are none.
pub(crate) async fn wireguard_link_refusal(nl: &Netlink, ops: &[Op]) -> Option<String> {
    if !ops.iter().any(on_wireguard_link) {
        return None;
    }
    nl.claim_wireguard_link().await.err().map(|e| e.to_string())
}

/// Mark the WireGuard link `name` as wiremesh's when `ops` created it (`results` in order).
pub(crate) async fn mark_if_created(
    nl: &Netlink,
    name: &str,
    ops: &[Op],
    results: &[Result<(), KernelError>],
) {
    let created = ops
        .iter()
        .zip(results)
        .any(|(op, r)| matches!(op, Op::CreateInterface) && r.is_ok());
    if created && let Err(e) = nl.mark_link(name, WG_ALIAS).await {
        warn!(error = %e, "cannot mark the WireGuard interface as wiremesh's");
    }
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
        if let Some(name) = &opts.private_interface {
            devices.private = name.clone();
        }
        if let Some(ip) = opts.internal_ip {
            match netlink.private_interface_for(ip).await? {
                Some(name) => {
                    info!(interface = %name, %ip, "private interface found");
                    if let Some(dir) = &opts.state_dir
                        && let Err(e) = save_private_interface(dir, &name)
                    {
                        warn!(error = %e, dir = %dir.display(), "cannot record the private interface for `wiremesh cleanup`");
                    }
                    devices.private = name;
                }
                None => {
                    warn!(%ip, "no interface holds the internal IP; routes via the private network will fail")
                }
            }
        }
        let mut netlink = netlink;
        netlink.set_devices(devices);
        let mut wg_opts = WgOptions::new(opts.wireguard);
        wg_opts.userspace_binary = opts.wireguard_userspace.clone();
        let wg = WgDevice::new(&opts.interface, key, &wg_opts)?;
        info!(backend = %wg.backend(), interface = %opts.interface, "WireGuard device");
        let firewall = Firewall::new(opts.firewall).await;
        info!(mode = %firewall.mode(), "firewall");
        let sysctls = Sysctls::new(
            forwarding::PROC_SYS,
            opts.state_dir
                .as_ref()
                .map(|d| d.join(forwarding::RECORD_FILE)),
        );
        Ok(SystemKernel {
            netlink: NetlinkKernel::new(netlink),
            wg,
            firewall,
            opts,
            sysctls,
            forwarding: Families::default(),
            in_use: Families::default(),
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

    async fn write_cni(
        &self,
        pod_cidrs: &[ipnetwork::IpNetwork],
        mtu: u32,
    ) -> Result<(), KernelError> {
        let path = &self.opts.cni_config;
        let cni_err = |e: cni::CniError| KernelError::Io {
            op: format!("write CNI config {}", path.display()),
            source: std::io::Error::other(e.to_string()),
        };
        if cni::file_is_ours(path).map_err(cni_err)? == Some(false) {
            return Err(KernelError::NotOwned(format!(
                "CNI config {}: the file there is not wiremesh's (its network name is not {:?} \
                 with the bridge plugin first), so it is not overwritten; move it away or give \
                 wiremesh another --cni-config path",
                path.display(),
                cni::DEFAULT_NETWORK_NAME
            )));
        }
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

    /// Why the things this kernel was named (WireGuard interface, bridge, CNI config file) are
    /// not all wiremesh's; empty when every one that exists is.
    ///
    /// The WireGuard interface must be a WireGuard or TUN link marked [`WG_ALIAS`]; an unmarked
    /// one is accepted only under [`DEFAULT_WG_NAME`] (links of wiremesh versions that did not
    /// mark them). The bridge must be a bridge without a foreign alias (an unmarked bridge is
    /// kept, not refused: the CNI plugin may have created it from wiremesh's file). The CNI
    /// file must be wiremesh's ([`cni::is_ours`]).
    pub async fn refusals(&self) -> Result<Vec<String>, KernelError> {
        let nl = &self.netlink.netlink;
        let mut why = Vec::new();
        let iface = &self.opts.interface;
        match nl.wireguard_owner().await? {
            Some(LinkOwner::Foreign(reason)) => why.push(format!(
                "--interface {iface}: not wiremesh's WireGuard interface: {reason}"
            )),
            Some(LinkOwner::Unmarked) if iface != DEFAULT_WG_NAME => why.push(format!(
                "--interface {iface}: a WireGuard interface without wiremesh's mark (alias \
                 {WG_ALIAS:?}), so possibly someone else's; if an older wiremesh created it, \
                 remove it with `ip link del {iface}`"
            )),
            _ => {}
        }
        if let Some(LinkOwner::Foreign(reason)) = nl.bridge_owner().await? {
            why.push(format!(
                "--bridge {}: not wiremesh's CNI bridge: {reason}",
                self.opts.bridge
            ));
        }
        let path = &self.opts.cni_config;
        match cni::file_is_ours(path) {
            Ok(Some(false)) => why.push(format!(
                "--cni-config {}: the file there is not wiremesh's (its network name is not \
                 {:?} with the bridge plugin first)",
                path.display(),
                cni::DEFAULT_NETWORK_NAME
            )),
            Ok(_) => {}
            Err(e) => why.push(format!("--cni-config {}: {e}", path.display())),
        }
        Ok(why)
    }

    /// Remove everything wiremesh created: routes and rules of ours, the bridge if ours, the
    /// WireGuard interface, the firewall tables (masquerade, MSS clamp), the CNI config file;
    /// then put back the sysctls the agent turned on (see [`forwarding::Sysctls::restore`]).
    /// Nothing else, and forwarding is never turned on.
    ///
    /// First checks what it was named ([`Self::refusals`]): if any of it is not wiremesh's,
    /// nothing at all is touched and the error says why for each.
    pub async fn cleanup(&mut self) -> Result<(), KernelError> {
        let refusals = self.refusals().await?;
        if !refusals.is_empty() {
            for r in &refusals {
                error!(refused = %r, "not wiremesh's; nothing removed");
            }
            return Err(KernelError::NotOwned(format!(
                "cleanup refused, nothing removed: {}",
                refusals.join("; ")
            )));
        }
        let c = self.netlink.netlink.cleanup().await?;
        info!(
            routes = c.routes,
            rules = c.rules,
            bridge = c.bridge,
            "routes, rules and bridge removed"
        );
        self.firewall.delete().await?;
        self.firewall.delete_clamp().await?;
        let wg = self.wg.clone();
        tokio::task::spawn_blocking(move || wg.delete())
            .await
            .map_err(|e| KernelError::WireGuard {
                op: "delete interface".into(),
                message: e.to_string(),
            })??;
        match std::fs::remove_file(&self.opts.cni_config) {
            Ok(()) => info!(path = %self.opts.cni_config.display(), "CNI config removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => warn!(
                path = %self.opts.cni_config.display(),
                "no CNI config there, nothing removed; if the agent wrote it elsewhere (k3s: \
                 /var/lib/rancher/k3s/agent/etc/cni/net.d/10-wiremesh.conflist), run again \
                 with that --cni-config"
            ),
            Err(source) => {
                return Err(KernelError::Io {
                    op: format!("remove {}", self.opts.cni_config.display()),
                    source,
                });
            }
        }
        self.sysctls
            .restore()
            .map_err(|e| KernelError::Unsupported(e.to_string()))?;
        if let Some(dir) = &self.opts.state_dir {
            let _ = std::fs::remove_file(dir.join(PRIVATE_RECORD));
        }
        Ok(())
    }

    /// Turn on forwarding for the families of `need` not known to be on; returns, per family
    /// (IPv4, IPv6), why it could not be.
    fn ensure_forwarding(&mut self, need: Families) -> Blocked {
        let mut blocked = Blocked::default();
        for (want, on, key, why) in [
            (
                need.v4,
                &mut self.forwarding.v4,
                forwarding::IPV4_FORWARD,
                &mut blocked.v4,
            ),
            (
                need.v6,
                &mut self.forwarding.v6,
                forwarding::IPV6_FORWARD,
                &mut blocked.v6,
            ),
        ] {
            if !want || *on {
                continue;
            }
            match self.sysctls.ensure(key) {
                Ok(_) => *on = true,
                Err(e) => {
                    error!(error = %e, "forwarding is off and cannot be turned on");
                    *why = Some(e.to_string());
                }
            }
        }
        blocked
    }

    /// [`Kernel::apply_all`] for the ops nothing blocks: in order, except the masquerade
    /// operation (at most one per plan), which runs beside the others, as nothing else depends on
    /// it and `nft` is a process of its own; a plan then takes as long as the slower of the two
    /// rather than their sum (at 5,000 nodes, with the WireGuard daemon busy with thousands of
    /// renumbered peers, that is most of a reconciliation).
    async fn apply_batched(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
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

    /// Apply `ops` one group after the other: consecutive WireGuard operations in one device
    /// update, consecutive routes and rules in one netlink batch, anything else alone.
    async fn apply_in_order(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let mut out = Vec::with_capacity(ops.len());
        for (run, r) in runs(ops) {
            let started = std::time::Instant::now();
            match run {
                Run::WireGuard => {
                    let results = self.wg.apply_ops(&ops[r.clone()]).await;
                    info!(
                        ops = r.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "wireguard applied"
                    );
                    out.extend(device_results(results));
                }
                Run::RoutesAndRules => out.extend(self.netlink.apply_all(&ops[r]).await),
                Run::One => {
                    out.push(self.apply_one(&ops[r.start]).await);
                    debug!(
                        op = ops[r.start].kind(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "applied"
                    );
                }
            }
        }
        out
    }

    async fn apply_one(&mut self, op: &Op) -> Result<(), KernelError> {
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
            Op::WriteCni { pod_cidrs, mtu } => self.write_cni(pod_cidrs, *mtu).await,
            Op::SetMssClamp { interface } => self.firewall.apply_clamp(interface).await,
            Op::DelMssClamp => self.firewall.delete_clamp().await,
            other => self.netlink.apply(other).await,
        }
    }
}

/// Per family, why its forwarding could not be turned on (`None`: it is on, or not needed).
#[derive(Debug, Default)]
struct Blocked {
    v4: Option<String>,
    v6: Option<String>,
}

/// Why `op` may not be applied: it needs forwarding of a `blocked` family, or acts on a
/// WireGuard link that is not ours (`link_why`). Pure.
fn blocked_reason(op: &Op, blocked: &Blocked, link_why: Option<&str>) -> Option<KernelError> {
    if let Some(why) = link_why
        && on_wireguard_link(op)
    {
        return Some(KernelError::NotOwned(why.to_owned()));
    }
    let need = forwarding::needed_by_op(op);
    let why = match (need.v4, &blocked.v4, need.v6, &blocked.v6) {
        (true, Some(w), _, _) | (_, _, true, Some(w)) => w,
        _ => return None,
    };
    Some(KernelError::Unsupported(why.clone()))
}

impl Kernel for SystemKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        let mut s = self.netlink.read_owned().await?;
        s.wireguard = self.wg.read_state().await?;
        s.masquerade = self.firewall.read().await?;
        s.mss_clamp = self.firewall.read_clamp().await?;
        let conflist = cni::read_conflist(&self.opts.cni_config).map_err(|e| KernelError::Io {
            op: format!("read CNI config {}", self.opts.cni_config.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        (s.cni, s.cni_mtu) = match conflist {
            Some(c) => (Some(c.pod_cidrs), c.mtu),
            None => (None, None),
        };
        self.in_use = forwarding::needed_by_state(&s);
        Ok(s)
    }

    async fn underlay_mtu(&mut self, towards: Option<IpAddr>) -> Result<Option<u32>, KernelError> {
        self.netlink.underlay_mtu(towards).await
    }

    fn set_private_key(&mut self, key: PrivateKey) -> Result<(), KernelError> {
        self.wg.set_private_key(key);
        Ok(())
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
        self.apply_all(std::slice::from_ref(op))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Checks first (forwarding for the families the ops and the installed state use; the
    /// WireGuard link's owner when an op acts on it), fails the ops a check blocks, applies
    /// the rest in batches, and marks a WireGuard link it created.
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let need = forwarding::needed_by_ops(ops).union(self.in_use);
        let blocked = self.ensure_forwarding(need);
        let link_why = wireguard_link_refusal(&self.netlink.netlink, ops).await;
        let reasons: Vec<Option<KernelError>> = ops
            .iter()
            .map(|op| blocked_reason(op, &blocked, link_why.as_deref()))
            .collect();
        let results = if reasons.iter().all(Option::is_none) {
            self.apply_batched(ops).await
        } else {
            let allowed: Vec<Op> = ops
                .iter()
                .zip(&reasons)
                .filter(|(_, r)| r.is_none())
                .map(|(op, _)| op.clone())
                .collect();
            let mut done = self.apply_batched(&allowed).await.into_iter();
            reasons
                .into_iter()
                .map(|r| match r {
                    Some(e) => Err(e),
                    None => done.next().unwrap_or(Ok(())),
                })
                .collect()
        };
        mark_if_created(&self.netlink.netlink, &self.opts.interface, ops, &results).await;
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{MAIN_TABLE, Route, RouteDev};

    #[test]
    fn runs_group_wireguard_ops_and_routes_and_leave_the_rest_alone() {
        let route = Op::AddRoute(Route::blackhole(
            MAIN_TABLE,
            "10.42.1.0/24".parse().unwrap(),
        ));
        let ops = [
            Op::CreateInterface,
            Op::RemovePeer {
                public_key: crate::model::WgKey([1; 32]),
            },
            route.clone(),
            route,
            Op::LinkUp,
            Op::LinkUp,
            Op::CreateInterface,
        ];
        assert_eq!(
            runs(&ops),
            [
                (Run::WireGuard, 0..2),
                (Run::RoutesAndRules, 2..4),
                (Run::One, 4..5),
                (Run::One, 5..6),
                (Run::WireGuard, 6..7),
            ]
        );
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn blocked_ops_are_those_needing_a_blocked_family_or_touching_a_foreign_link() {
        let v6 = Op::AddRoute(Route {
            dev: RouteDev::WireGuard,
            ..Route::blackhole(MAIN_TABLE, "fd00:42::/64".parse().unwrap())
        });
        let v4 = Op::AddRoute(Route {
            dev: RouteDev::WireGuard,
            ..Route::blackhole(MAIN_TABLE, "10.42.1.0/24".parse().unwrap())
        });
        let guard = Op::AddRoute(Route::blackhole(
            MAIN_TABLE,
            "fd00:42::/64".parse().unwrap(),
        ));
        let only_v6 = Blocked {
            v4: None,
            v6: Some("set v6".into()),
        };
        let e = blocked_reason(&v6, &only_v6, None).expect("blocked");
        assert_eq!(e.to_string(), "set v6");
        assert!(blocked_reason(&v4, &only_v6, None).is_none());
        assert!(blocked_reason(&guard, &only_v6, None).is_none());
        let both = Blocked {
            v4: Some("set v4".into()),
            v6: Some("set v6".into()),
        };
        let e = blocked_reason(&v4, &both, None).expect("blocked");
        assert_eq!(e.to_string(), "set v4", "each family its own reason");
        let foreign = Some("not ours");
        let clamp = Op::SetMssClamp {
            interface: "eth0".into(),
        };
        for op in [
            Op::LinkUp,
            Op::CreateInterface,
            Op::SetMtu { mtu: 1420 },
            clamp,
        ] {
            let e = blocked_reason(&op, &Blocked::default(), foreign);
            assert!(matches!(e, Some(KernelError::NotOwned(_))), "{op:?}");
        }
        assert!(blocked_reason(&v4, &Blocked::default(), foreign).is_none());
        assert!(
            blocked_reason(&Op::DelMssClamp, &Blocked::default(), foreign).is_none(),
            "removing our own clamp table touches no foreign interface"
        );
    }

    #[test]
    fn the_private_interface_record_round_trips_and_refuses_implausible_names() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_private_interface(dir.path()), None);
        save_private_interface(dir.path(), "eth0").unwrap();
        assert_eq!(load_private_interface(dir.path()).as_deref(), Some("eth0"));
        for bad in ["", "a/b", "x y", "sixteen-chars-xx"] {
            std::fs::write(dir.path().join(PRIVATE_RECORD), bad).unwrap();
            assert_eq!(load_private_interface(dir.path()), None, "{bad:?}");
        }
    }
}
