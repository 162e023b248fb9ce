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
//! (masquerade) and `cni` (CNI config file). May depend on the desired state and the model;
//! never on the topology engine or Kubernetes.

pub mod netlink;
pub mod nft;
pub mod plan;
pub mod system;
pub mod wg;

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
    /// The kernel lacks a feature the desired state needs (e.g. the IPIP tunnel).
    #[error("{0}")]
    Unsupported(String),
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
    /// Operations applied successfully.
    pub applied: Vec<Op>,
    /// Operations that failed, with the error.
    pub failed: Vec<(Op, KernelError)>,
}

impl Report {
    /// Pair each op with its result.
    pub fn from_results(ops: Vec<Op>, results: Vec<Result<(), KernelError>>) -> Report {
        let mut report = Report::default();
        for (op, r) in ops.into_iter().zip(results) {
            match r {
                Ok(()) => report.applied.push(op),
                Err(e) => report.failed.push((op, e)),
            }
        }
        report
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
    Report::from_results(ops, results)
}

/// Read the kernel, plan, apply. A failed operation does not stop the others.
pub async fn reconcile<K: Kernel>(
    kernel: &mut K,
    desired: &crate::desired::DesiredState,
    public_key: WgKey,
) -> Result<Report, KernelError> {
    let actual = kernel.read_owned().await?;
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
        None => kernel.read_owned().await?,
    };
    let ops = plan::plan(&desired, &actual, public_key);
    drop(desired);
    let report = apply_ops(kernel, ops).await;
    if report.failed.is_empty() {
        let mut next = actual;
        plan::simulate(&mut next, &report.applied, public_key);
        *known = Some(next);
    }
    Ok(report)
}
