//! The agent loop's decisions as a plain state machine, in the manner of boringtun's `Tunn`:
//! the async loop ([`super::run_with`]) feeds it what happened (an engine update, the kernel
//! changed behind our back, a deadline reached, what a reconciliation did) and asks it what to
//! do next ([`Machine::poll`]: the one engine delta, the whole desired state, or nothing) and
//! until when it may sleep ([`Machine::deadline`]). Time is an argument: the rules are tested
//! without tokio, a kernel or a clock.
//!
//! The rules:
//! - **Delta or full.** One engine change since the last reconciliation is applied as its delta;
//!   from a second one on, or after anything that makes the cached kernel picture doubtful
//!   (kernel event, failure, retry, resync, a held listen port), the whole desired state is
//!   planned, against a fresh read of the kernel when [`Work::reread`] says so.
//! - **Backoff.** Every failure (an operation refused, the kernel unreadable, the listen port
//!   held) schedules one retry after the next backoff delay; a retry or resync deadline is
//!   consumed when reached, so a deadline in the past can never turn the loop twice. A
//!   success resets the backoff. After an address of the interface went, the kernel is read
//!   again at once (Linux may have dropped routes with it).
//! - **This node out of the mesh.** When the engine cannot compute this node's state (the
//!   registry lost it, or left it out), the kernel is kept as it is, nothing is retried until
//!   the registry changes, readiness is false and the reason is said once per change — like an
//!   API-server outage.
//! - **Readiness** is false whenever the kernel is known not to match the desired state (a
//!   partial or failed reconciliation, until one succeeds) and while this node is out.
//!
//! What is worth a log line comes back as [`Note`]s; the loop writes them. Depends on the
//! desired state's delta, the reconciler's report, the engine's update type and the backoff;
//! no I/O, no tokio.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::desired::DesiredDelta;
use crate::reconcile::Report;
use crate::topology::incremental::Update;

/// Delays between retries of a failed reconciliation: 1 s doubling to 30 s, with jitter.
pub(crate) fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
}

/// What to reconcile now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Apply just this change of the desired state, against the cached kernel picture (the loop
    /// falls back to the whole state when it has none, or the delta does not apply to it).
    Delta(Box<DesiredDelta>),
    /// Plan the whole desired state.
    Full,
}

/// One reconciliation to run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Work {
    /// What to plan.
    pub plan: Plan,
    /// Whether to read the kernel again first instead of trusting the cached picture.
    pub reread: bool,
}

/// What a reconciliation came to.
#[derive(Debug)]
pub(crate) enum Outcome<'a> {
    /// Operations were applied (some may have failed). `port_held`: something else holds the
    /// listen port, as probed after it.
    Applied {
        /// The reconciler's report.
        report: &'a Report,
        /// Whether the listen port is held by something else.
        port_held: bool,
    },
    /// The kernel could not be read; why.
    ReadFailed(String),
    /// The engine has no desired state for this node; why (its explained `LocalError`).
    Unavailable(String),
}

/// A change worth a log line (the loop writes it, at the level the variant's doc says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    /// info: the first successful reconciliation, with how many operations it applied.
    FirstReconciliation {
        /// Operations applied.
        ops: usize,
    },
    /// info (debug when `ops` is 0): a later successful reconciliation.
    Reconciled {
        /// Operations applied.
        ops: usize,
    },
    /// info: a reconciliation was partial; retried after `retry_in`.
    Partial {
        /// Operations applied.
        applied: usize,
        /// Operations that failed.
        failed: usize,
        /// When the rest is tried again.
        retry_in: Duration,
    },
    /// info: everything was applied but the listen port is still held; probed again after
    /// `retry_in`.
    PortHeld {
        /// When the port is probed and the device configured again.
        retry_in: Duration,
    },
    /// warn: the kernel could not be read.
    ReadFailed {
        /// Why.
        error: String,
        /// When it is read again.
        retry_in: Duration,
    },
    /// warn: this node cannot take part (said once per reason); the kernel is kept as it is.
    Unavailable(String),
    /// info: this node can take part again (or for the first time).
    Available,
}

/// The loop's scheduling state. See the module documentation for the rules.
#[derive(Debug)]
pub(crate) struct Machine {
    resync_period: Duration,
    backoff: Backoff,
    /// Whether the registry has listed everything once (nothing is planned before).
    listed: bool,
    /// Whether a reconciliation is due.
    dirty: bool,
    /// The one engine delta since the last reconciliation.
    pending: Option<DesiredDelta>,
    /// Whether the whole state must be planned.
    full_needed: bool,
    /// Whether the kernel must be read again before planning.
    reread: bool,
    retry_at: Option<Instant>,
    next_resync: Instant,
    reconciled_once: bool,
    /// Why the kernel is known not to match the desired state.
    out_of_sync: Option<String>,
    /// Why this node cannot take part (kernel kept).
    unavailable: Option<String>,
}

impl Machine {
    /// A machine started at `now`, resyncing every `resync_period` (at least 1 ms).
    pub(crate) fn new(now: Instant, resync_period: Duration) -> Machine {
        let resync_period = resync_period.max(Duration::from_millis(1));
        Machine {
            resync_period,
            backoff: retry_backoff(),
            listed: false,
            dirty: false,
            pending: None,
            full_needed: true,
            reread: true,
            retry_at: None,
            next_resync: now + resync_period,
            reconciled_once: false,
            out_of_sync: None,
            unavailable: None,
        }
    }

    /// The registry listed everything once and the engine exists: reconcile the whole state.
    pub(crate) fn listed(&mut self) {
        self.listed = true;
        self.dirty = true;
        self.full_needed = true;
    }

    /// Whether the next engine event should be applied on its own with its update (`true`), or
    /// folded in without one because the whole state will be planned anyway.
    pub(crate) fn wants_deltas(&self) -> bool {
        self.pending.is_none() && !self.full_needed
    }

    /// An engine update. One change keeps its delta; from a second change on (a burst), the
    /// deltas are dropped and the whole state is planned: that nets them out and bounds the
    /// work by the mesh's size, not the burst's.
    pub(crate) fn update(&mut self, u: Update) -> Option<Note> {
        match u {
            Update::Delta(d) => {
                let back = self.back();
                if !d.is_empty() {
                    if self.wants_deltas() {
                        self.pending = Some(d);
                    } else {
                        self.pending = None;
                        self.full_needed = true;
                    }
                    self.dirty = true;
                }
                back
            }
            Update::Full(_) => {
                self.dirty = true;
                self.full_needed = true;
                self.unavailable = None;
                Some(Note::Available)
            }
            Update::Unavailable(e) => {
                // A delta kept from before would be applied to a state the engine no longer has.
                if self.pending.take().is_some() {
                    self.full_needed = true;
                }
                self.unavailable(e.to_string())
            }
        }
    }

    /// Events were folded into the engine without updates: plan the whole state.
    pub(crate) fn folded(&mut self) {
        self.pending = None;
        self.full_needed = true;
        self.dirty = true;
    }

    /// Something of ours changed in the kernel behind our back: read it again and restore it.
    pub(crate) fn kernel_changed(&mut self) {
        self.doubt();
    }

    /// Time passed: a retry or resync deadline reached at `now` is consumed and makes a
    /// reconciliation of the whole state, read afresh, due.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.doubt();
        }
        if self.next_resync <= now {
            self.next_resync = now + self.resync_period;
            self.doubt();
        }
    }

    /// The earliest deadline to wake up for (a retry or the resync).
    pub(crate) fn deadline(&self) -> Instant {
        match self.retry_at {
            Some(t) => t.min(self.next_resync),
            None => self.next_resync,
        }
    }

    /// The reconciliation to run now, if any; taking it clears what it covers.
    pub(crate) fn poll(&mut self) -> Option<Work> {
        if !self.dirty || !self.listed {
            return None;
        }
        self.dirty = false;
        let reread = std::mem::take(&mut self.reread);
        let pending = self.pending.take();
        let full = std::mem::take(&mut self.full_needed);
        let plan = match pending {
            Some(d) if !full && !reread => Plan::Delta(Box::new(d)),
            _ => Plan::Full,
        };
        Some(Work { plan, reread })
    }

    /// What the reconciliation taken from [`Machine::poll`] came to, at `now`.
    pub(crate) fn reconciled(&mut self, now: Instant, outcome: Outcome<'_>) -> Option<Note> {
        match outcome {
            Outcome::Unavailable(why) => {
                // Nothing to retry until the registry changes: the engine says when it can.
                self.retry_at = None;
                self.unavailable(why)
            }
            Outcome::ReadFailed(error) => {
                let retry_in = self.fail(now, format!("reading the kernel: {error}"));
                Some(Note::ReadFailed { error, retry_in })
            }
            Outcome::Applied { report, port_held } => {
                let back = self.back();
                let note = if let Some((op, e)) = report.failed.first() {
                    let retry_in = self.fail(
                        now,
                        format!(
                            "the kernel refused {} operation(s) (first: {}: {e})",
                            report.failed.len(),
                            op.kind()
                        ),
                    );
                    Some(Note::Partial {
                        applied: report.applied_count(),
                        failed: report.failed.len(),
                        retry_in,
                    })
                } else if port_held {
                    // Applied, but the device may claim the port without holding it.
                    let retry_in = self.fail(now, "the listen port is held".to_owned());
                    Some(Note::PortHeld { retry_in })
                } else {
                    self.backoff.reset();
                    self.retry_at = None;
                    self.out_of_sync = None;
                    let ops = report.applied_count();
                    if self.reconciled_once {
                        Some(Note::Reconciled { ops })
                    } else {
                        self.reconciled_once = true;
                        Some(Note::FirstReconciliation { ops })
                    }
                };
                if report.removed_address {
                    // The kernel drops routes without a word when an address goes: read it
                    // back at once and restore what went.
                    self.retry_at = Some(now);
                    self.full_needed = true;
                    self.reread = true;
                }
                back.or(note)
            }
        }
    }

    /// Why the node is not ready as far as the loop knows (the listen port and the first list
    /// and reconciliation are the observer's), or `None`.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if let Some(why) = &self.unavailable {
            return Some(format!(
                "this node cannot take part in the mesh: {why}; the kernel is kept as it is"
            ));
        }
        if self.reconciled_once
            && let Some(why) = &self.out_of_sync
        {
            return Some(format!(
                "the kernel does not match the desired state: {why}; retrying"
            ));
        }
        None
    }

    fn unavailable(&mut self, why: String) -> Option<Note> {
        if self.unavailable.as_ref() == Some(&why) {
            return None;
        }
        self.unavailable = Some(why.clone());
        Some(Note::Unavailable(why))
    }

    /// This node takes part again (the engine computed its state).
    fn back(&mut self) -> Option<Note> {
        self.unavailable.take().map(|_| Note::Available)
    }

    fn doubt(&mut self) {
        self.dirty = true;
        self.full_needed = true;
        self.reread = true;
    }

    /// A failure: out of sync for `why`, the whole state planned again after the next backoff
    /// delay; that delay.
    fn fail(&mut self, now: Instant, why: String) -> Duration {
        self.out_of_sync = Some(why);
        let wait = self.backoff.next_delay();
        self.retry_at = Some(now + wait);
        self.full_needed = true;
        self.reread = true;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WgKey;
    use crate::reconcile::{KernelError, Op};
    use crate::topology::LocalError;

    fn t0() -> Instant {
        Instant::now()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn change(k: u8) -> Update {
        Update::Delta(DesiredDelta {
            peers_removed: vec![WgKey([k; 32])],
            ..DesiredDelta::default()
        })
    }

    fn lost() -> Update {
        Update::Unavailable(LocalError::Unknown("fra-1".into()))
    }

    fn full() -> Update {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-clouds.yaml");
        let nodes = crate::registry::file::load_nodes(
            &path,
            crate::registry::annotations::DEFAULT_TOPOLOGY_LABEL,
        )
        .unwrap()
        .items;
        let engine = crate::topology::incremental::Engine::new(
            nodes,
            Vec::<crate::model::MeshPeer>::new(),
            crate::model::NodeName("fra-1".into()),
            crate::topology::MeshOptions::default(),
        );
        Update::Full(engine.desired().unwrap())
    }

    fn ok() -> Report {
        let mut r = Report::default();
        r.applied.insert("route", 1);
        r
    }

    fn partial() -> Report {
        let mut r = ok();
        r.failed.push((
            Op::DelMasquerade,
            KernelError::Unsupported("refused by the test".into()),
        ));
        r
    }

    fn applied(report: &Report) -> Outcome<'_> {
        Outcome::Applied {
            report,
            port_held: false,
        }
    }

    /// A machine that listed and reconciled once, successfully, at `now`.
    fn running(now: Instant) -> Machine {
        let mut m = Machine::new(now, secs(3600));
        m.listed();
        let w = m.poll().unwrap();
        assert_eq!(
            w,
            Work {
                plan: Plan::Full,
                reread: true
            }
        );
        assert_eq!(
            m.reconciled(now, applied(&ok())),
            Some(Note::FirstReconciliation { ops: 1 })
        );
        m
    }

    #[test]
    fn nothing_is_planned_before_the_first_list() {
        let now = t0();
        let mut m = Machine::new(now, secs(3600));
        m.kernel_changed();
        m.tick(now + secs(7200));
        assert_eq!(m.poll(), None);
        m.listed();
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: true
            })
        );
        assert_eq!(m.poll(), None, "taken once");
    }

    #[test]
    fn one_change_is_applied_as_its_delta_and_a_burst_as_the_whole_state() {
        let now = t0();
        let mut m = running(now);
        assert!(m.wants_deltas());
        assert_eq!(m.update(change(1)), None);
        assert!(!m.wants_deltas(), "the second change is folded");
        let Some(Work {
            plan: Plan::Delta(d),
            reread: false,
        }) = m.poll()
        else {
            panic!("one change is applied as its delta, against the cached kernel picture")
        };
        assert_eq!(d.peers_removed, vec![WgKey([1; 32])]);
        m.reconciled(now, applied(&ok()));
        m.update(change(2));
        m.update(change(3));
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: false
            })
        );
        m.reconciled(now, applied(&ok()));
        m.update(change(4));
        m.folded();
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: false
            })
        );
        assert_eq!(m.update(Update::Delta(DesiredDelta::default())), None);
        assert_eq!(m.poll(), None, "an empty delta is no work");
    }

    #[test]
    fn the_kernel_changing_behind_our_back_and_the_resync_read_it_again() {
        let now = t0();
        let mut m = running(now);
        m.kernel_changed();
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: true
            })
        );
        m.reconciled(now, applied(&ok()));
        assert_eq!(m.deadline(), now + secs(3600));
        m.tick(now + secs(3599));
        assert_eq!(m.poll(), None);
        m.tick(now + secs(3600));
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: true
            })
        );
        assert_eq!(
            m.deadline(),
            now + secs(7200),
            "the next resync a period later"
        );
    }

    /// Drive `m` from `now` for `span` in steps of `step`, as the loop would: tick, poll, and
    /// report `outcome` for every reconciliation. Returns the reconciliations and notes.
    fn drive(
        m: &mut Machine,
        now: Instant,
        span: Duration,
        step: Duration,
        outcome: impl Fn() -> OutcomeKind,
    ) -> (usize, Vec<Note>) {
        let (mut works, mut notes) = (0, Vec::new());
        let mut t = now;
        let report = partial();
        while t < now + span {
            m.tick(t);
            while let Some(_w) = m.poll() {
                works += 1;
                assert!(works < 10_000, "the loop spins");
                let o = match outcome() {
                    OutcomeKind::Partial => applied(&report),
                    OutcomeKind::ReadFailed => Outcome::ReadFailed("no netlink".into()),
                    OutcomeKind::Unavailable => {
                        Outcome::Unavailable("node fra-1 is not in the cluster".into())
                    }
                };
                notes.extend(m.reconciled(t, o));
            }
            t += step;
        }
        (works, notes)
    }

    #[derive(Clone, Copy)]
    enum OutcomeKind {
        Partial,
        ReadFailed,
        Unavailable,
    }

    #[test]
    fn every_failure_backs_off_and_a_reached_deadline_is_consumed() {
        for kind in [OutcomeKind::Partial, OutcomeKind::ReadFailed] {
            let now = t0();
            let mut m = running(now);
            m.kernel_changed();
            // Two minutes of 1 ms turns: retries after 1, 2, 4, 8, 16, 30, 30, … s (+ jitter).
            let (works, notes) = drive(&mut m, now, secs(120), Duration::from_millis(1), || kind);
            assert!(
                (4..=10).contains(&works),
                "{works} reconciliations in 2 min"
            );
            assert_eq!(notes.len(), works, "one note per backoff step: {notes:?}");
            assert!(m.deadline() > now + secs(120), "the next retry is ahead");
        }
    }

    #[test]
    fn a_pending_retry_and_this_node_leaving_the_registry_neither_spin_nor_repeat_the_log() {
        let now = t0();
        let mut m = running(now);
        // A failing kernel: a retry is pending.
        m.kernel_changed();
        m.poll().unwrap();
        assert!(matches!(
            m.reconciled(now, applied(&partial())),
            Some(Note::Partial { .. })
        ));
        // This node leaves the registry: said once.
        let note = m.update(lost());
        assert_eq!(
            note,
            Some(Note::Unavailable("node fra-1 is not in the cluster".into()))
        );
        assert_eq!(m.update(lost()), None, "the same reason is said once");
        // Many turns over ten minutes: the due retry finds no state to program and is not
        // scheduled again; nothing else happens until the registry changes.
        let (works, notes) = drive(&mut m, now, secs(600), Duration::from_millis(1), || {
            OutcomeKind::Unavailable
        });
        assert!(
            works <= 2,
            "{works} reconciliations without a state to program"
        );
        assert!(notes.is_empty(), "{notes:?}");
        assert!(m.not_ready().unwrap().contains("not in the cluster"));
        // It comes back: the whole state, ready again once reconciled.
        assert_eq!(m.update(full()), Some(Note::Available));
        assert_eq!(m.poll().map(|w| w.plan), Some(Plan::Full));
        m.reconciled(now + secs(600), applied(&ok()));
        assert_eq!(m.not_ready(), None);
    }

    #[test]
    fn readiness_is_false_while_the_kernel_is_known_not_to_match() {
        let now = t0();
        let mut m = Machine::new(now, secs(3600));
        m.listed();
        m.poll();
        m.reconciled(now, applied(&partial()));
        assert_eq!(
            m.not_ready(),
            None,
            "before the first success the observer says it (with the failure)"
        );
        m.tick(now + secs(2));
        m.poll().unwrap();
        m.reconciled(now + secs(2), applied(&ok()));
        assert_eq!(m.not_ready(), None);
        m.kernel_changed();
        m.poll();
        m.reconciled(now + secs(3), Outcome::ReadFailed("no netlink".into()));
        let why = m.not_ready().unwrap();
        assert!(why.contains("reading the kernel: no netlink"), "{why}");
        m.tick(now + secs(10));
        m.poll().unwrap();
        m.reconciled(now + secs(10), applied(&partial()));
        let why = m.not_ready().unwrap();
        assert!(why.contains("masquerade"), "{why}");
        let held = ok();
        m.tick(now + secs(20));
        m.poll().unwrap();
        m.reconciled(
            now + secs(20),
            Outcome::Applied {
                report: &held,
                port_held: true,
            },
        );
        assert!(
            m.not_ready().is_some(),
            "a held port: the device is not serving"
        );
        m.tick(now + secs(60));
        assert_eq!(
            m.poll().map(|w| w.reread),
            Some(true),
            "the port is probed again"
        );
        m.reconciled(now + secs(60), applied(&ok()));
        assert_eq!(m.not_ready(), None);
    }

    #[test]
    fn a_removed_address_has_the_kernel_read_again_at_once() {
        let now = t0();
        let mut m = running(now);
        m.update(change(1));
        m.poll().unwrap();
        let mut r = ok();
        r.removed_address = true;
        m.reconciled(now, applied(&r));
        assert_eq!(m.deadline(), now);
        m.tick(now);
        assert_eq!(
            m.poll(),
            Some(Work {
                plan: Plan::Full,
                reread: true
            })
        );
        m.reconciled(now, applied(&ok()));
        assert_eq!(m.poll(), None);
        assert_eq!(m.deadline(), now + secs(3600), "once");
    }

    #[test]
    fn a_success_resets_the_backoff() {
        let now = t0();
        let mut m = running(now);
        let mut t = now;
        for _ in 0..5 {
            m.kernel_changed();
            m.poll().unwrap();
            m.reconciled(t, applied(&partial()));
            t = m.deadline();
            m.tick(t);
        }
        assert!(m.deadline() - t >= secs(16));
        m.poll().unwrap();
        m.reconciled(t, applied(&ok()));
        m.kernel_changed();
        m.poll().unwrap();
        m.reconciled(t, applied(&partial()));
        assert!(m.deadline() - t <= Duration::from_millis(1500));
    }
}
