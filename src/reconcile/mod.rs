//! The reconciler: makes the kernel hold exactly the desired state, touching only what
//! wiremesh owns.
//!
//! ```text
//! DesiredState ──┐
//!                ├─ plan::plan() (pure) ─→ Vec<Op> ─→ Kernel::apply ─→ kernel
//! Kernel::read_owned() ─→ OwnedState ──┘
//! ```
//!
//! `plan` is pure; the [`Kernel`] trait is the only door to the system. Its implementations live
//! in `netlink` (routes, rules, links, bridge), `wg` (WireGuard device and peers), `nft`
//! (masquerade, and the MSS clamp rendered by `mss`) and `cni` (CNI config file); `port` finds
//! what else holds the WireGuard listen port, `mtu` computes the automatic MTU. May depend on
//! the desired state and the model; never on the topology engine or Kubernetes.

pub mod forwarding;
pub mod mss;
pub mod mtu;
pub mod netlink;
pub mod nft;
pub mod plan;
pub mod port;
pub mod system;
pub mod wg;

use std::collections::BTreeMap;

use crate::model::WgKey;
pub use plan::{LinkState, Op, OwnedState, WgDeviceState};

/// The route protocol number that marks routes (and rules) as wiremesh's own
/// (`ip route show proto 104`). Nothing without it is ever changed or removed.
pub const RTPROT_WIREMESH: u8 = 104;
/// Priority of wiremesh's policy rules.
pub const RULE_PRIORITY: u32 = 1107;

/// Why a kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A netlink request was refused.
    #[error("{op}: netlink: {message}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        message: String,
    },
    /// The WireGuard device could not be read or configured.
    #[error("{op}: wireguard: {message}")]
    WireGuard {
        /// What was being done.
        op: String,
        /// What failed.
        message: String,
    },
    /// The firewall could not be read or changed.
    #[error("{op}: firewall: {message}")]
    Firewall {
        /// What was being done.
        op: String,
        /// What failed.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks a feature the desired state needs (e.g. the IPIP tunnel), or a setting
    /// it needs (forwarding) cannot be made here.
    #[error("{0}")]
    Unsupported(String),
    /// Something wiremesh was asked to change or remove does not carry wiremesh's mark; it was
    /// left alone. The text names it and says why.
    #[error("{0}")]
    NotOwned(String),
}

/// The door to the system: read what wiremesh owns, apply one operation.
#[allow(async_fn_in_trait)]
pub trait Kernel {
    /// Everything wiremesh owns, as the kernel has it now.
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError>;
    /// The WireGuard device alone (`None` when there is none); by default read with the rest.
    async fn read_wireguard(&mut self) -> Result<Option<plan::WgDeviceState>, KernelError> {
        Ok(self.read_owned().await?.wireguard)
    }
    /// What holds UDP `port` besides wiremesh's own WireGuard interface (see [`port`]); `None`
    /// when it is free or ours. By default nothing: only the system kernel has other holders.
    async fn port_holder(&mut self, _port: u16) -> Option<port::PortHolder> {
        None
    }
    /// The MTU of the underlay interface WireGuard's packets to `towards` (the local node's
    /// endpoint address, when known) leave by, for the automatic MTU; `None` when there is
    /// none. By default `None`: only the system kernel has an underlay.
    async fn underlay_mtu(
        &mut self,
        _towards: Option<std::net::IpAddr>,
    ) -> Result<Option<u32>, KernelError> {
        Ok(None)
    }
    /// Hold `key` as the WireGuard interface's private key from now on (key rotation): the
    /// next reconciliation configures the device with it. By default unsupported.
    fn set_private_key(&mut self, _key: wg::PrivateKey) -> Result<(), KernelError> {
        Err(KernelError::Unsupported("key rotation".into()))
    }
    /// Apply one operation.
    async fn apply(&mut self, op: &Op) -> Result<(), KernelError>;
    /// Apply many operations; implementations may pipeline them. Returns one result per op.
    async fn apply_all(&mut self, ops: &[Op]) -> Vec<Result<(), KernelError>> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(self.apply(op).await);
        }
        out
    }
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct Report {
    /// How many operations of each kind ([`Op::kind`]) were applied successfully. Counts, not
    /// the operations: [`apply_planned`] moves what they carried into its picture of the kernel.
    pub applied: BTreeMap<&'static str, usize>,
    /// Operations that failed, with the error.
    pub failed: Vec<(Op, KernelError)>,
    /// Whether an address was removed from the WireGuard link: the kernel may then have dropped
    /// routes through it without a word, so the caller should read the kernel again.
    pub removed_address: bool,
}

impl Report {
    /// Pair each op with its result, in order; each op that succeeded is handed to `done`.
    pub fn from_results(
        ops: Vec<Op>,
        results: Vec<Result<(), KernelError>>,
        mut done: impl FnMut(Op),
    ) -> Report {
        let mut report = Report::default();
        for (op, r) in ops.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    *report.applied.entry(op.kind()).or_default() += 1;
                    report.removed_address |= matches!(op, Op::DelAddress { .. });
                    done(op);
                }
                Err(e) => report.failed.push((op, e)),
            }
        }
        report
    }

    /// How many operations were applied successfully.
    pub fn applied_count(&self) -> usize {
        self.applied.values().sum()
    }

    /// Whether the kernel already matched: nothing to do.
    pub fn is_noop(&self) -> bool {
        self.applied.is_empty() && self.failed.is_empty()
    }
}

/// Apply `ops` in order and pair each with its result. A failed operation does not stop the
/// others.
pub async fn apply_ops<K: Kernel>(kernel: &mut K, ops: Vec<Op>) -> Report {
    let results = kernel.apply_all(&ops).await;
    Report::from_results(ops, results, drop)
}

/// Read what wiremesh owns for `desired`: [`Kernel::read_owned`], and the underlay's MTU when
/// the MTU is automatic (with a warning when the underlay is too small for the tunnel's
/// packets, see [`mtu::underlay_too_small`]).
pub async fn read_for<K: Kernel>(
    kernel: &mut K,
    desired: &crate::desired::DesiredState,
) -> Result<OwnedState, KernelError> {
    let mut actual = kernel.read_owned().await?;
    if desired.interface.mtu.is_none() {
        actual.underlay_mtu = kernel.underlay_mtu(desired.interface.underlay).await?;
        if mtu::underlay_too_small(desired, actual.underlay_mtu) {
            tracing::warn!(
                underlay_mtu = actual.underlay_mtu,
                overhead = desired.interface.overhead(),
                mtu = mtu::wanted_mtu(desired, actual.underlay_mtu),
                "the underlay is too small for the tunnel's packets at the smallest MTU the \
                 tunnel may have: outer packets will be fragmented"
            );
        }
    }
    Ok(actual)
}

/// Read the kernel, plan, apply. A failed operation does not stop the others.
pub async fn reconcile<K: Kernel>(
    kernel: &mut K,
    desired: &crate::desired::DesiredState,
    public_key: WgKey,
) -> Result<Report, KernelError> {
    let actual = read_for(kernel, desired).await?;
    let ops = plan::plan(desired, &actual, public_key);
    Ok(apply_ops(kernel, ops).await)
}

/// Like [`reconcile`], but plans against `known` (the state the last reconciliation left) when
/// it is there, instead of reading the whole kernel again: a change in a big mesh then costs
/// only its own operations. `known` is refreshed from the kernel when it is `None`, and is
/// cleared when an operation fails so that the next call reads the kernel again. Callers clear
/// it themselves to verify the kernel (periodic resync, kernel events).
///
/// Takes the desired state to drop it once planned: the operations hold what the kernel lacks,
/// and a whole mesh's state need not stay alive through the kernel's I/O.
pub async fn reconcile_cached<K: Kernel>(
    kernel: &mut K,
    desired: crate::desired::DesiredState,
    public_key: WgKey,
    known: &mut Option<OwnedState>,
) -> Result<Report, KernelError> {
    let actual = match known.take() {
        Some(k) => k,
        None => read_for(kernel, &desired).await?,
    };
    let ops = plan::plan(&desired, &actual, public_key);
    drop(desired);
    Ok(apply_planned(kernel, ops, actual, public_key, known).await)
}

/// Apply `ops`, planned against `state`, and put the state they lead to in `known`: each applied
/// operation moves what it carries into `state` (a whole mesh's peers and routes are never held
/// twice). When one fails, `known` stays `None`, so the next reconciliation reads the kernel.
pub async fn apply_planned<K: Kernel>(
    kernel: &mut K,
    ops: Vec<Op>,
    mut state: OwnedState,
    public_key: WgKey,
    known: &mut Option<OwnedState>,
) -> Report {
    let results = kernel.apply_all(&ops).await;
    let report = Report::from_results(ops, results, |op| {
        plan::apply_op(&mut state, op, public_key)
    });
    if report.failed.is_empty() {
        *known = Some(state);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_applied_kinds_and_hands_over_only_successes_in_order() {
        let ops = vec![
            Op::LinkUp,
            Op::DelMasquerade,
            Op::CreateInterface,
            Op::DelMasquerade,
        ];
        let results = vec![
            Ok(()),
            Ok(()),
            Err(KernelError::Unsupported("no".into())),
            Ok(()),
        ];
        let mut handed = Vec::new();
        let report = Report::from_results(ops, results, |op| handed.push(op));
        assert_eq!(
            handed,
            vec![Op::LinkUp, Op::DelMasquerade, Op::DelMasquerade]
        );
        assert_eq!(
            report.applied,
            BTreeMap::from([("link-up", 1), ("masquerade", 2)])
        );
        assert_eq!(report.applied_count(), 3);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, Op::CreateInterface);
        assert!(!report.removed_address);
        assert!(!report.is_noop());
        let address = "10.4.0.1/16".parse().unwrap();
        let added = Report::from_results(vec![Op::AddAddress { address }], vec![Ok(())], drop);
        assert!(!added.removed_address, "adding drops no route");
        let removed = Report::from_results(vec![Op::DelAddress { address }], vec![Ok(())], drop);
        assert!(removed.removed_address);
        let refused = Report::from_results(
            vec![Op::DelAddress { address }],
            vec![Err(KernelError::Unsupported("no".into()))],
            drop,
        );
        assert!(!refused.removed_address);
        assert!(Report::default().is_noop());
    }
}
