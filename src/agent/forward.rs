//! Failover of a location's leader whose forwarding broke: a member of a location (not its
//! leader) sends an echo request every [`PROBE_EVERY`] through its leader to the mesh IPs of a
//! few other segments; when [`FAILURES`] rounds in a row get no answer from any of them, after
//! the path through this leader was answered once (or after [`UNPROVEN_GRACE`]), it reports
//! the leader (`wiremesh.io/forwarding-failed`) and the engine passes over a leader
//! that more than half of the location's other nodes report (`topology::elect_leader`).
//!
//! A report is held, not withdrawn when the next leader works: the reported node is not in the
//! path any more, so nothing tells that it forwards again. The hold starts at the configured
//! period and doubles each time the same node is reported again within [`REMEMBER`] of its last
//! report (at most [`MAX_HOLD_FACTOR`] times the period): a leader still broken when its hold
//! ends costs one more detection, then stays passed over for longer, instead of flapping.
//!
//! Pure: the caller passes the time and the rounds' results. Depends on the model and the
//! engine's [`LeaderProbe`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::model::NodeName;
use crate::topology::LeaderProbe;

/// How often a member probes its leader's forwarding (one round of echo requests, each round
/// waiting at most this long for an answer).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Rounds in a row without an answer before the leader is reported.
pub const FAILURES: u32 = 3;

/// Unanswered rounds count once a round through this leader was answered (the path worked and
/// stopped working), or after this long without any answer (a leader broken from the start).
/// A mesh that is still forming, or a new leader still shaking hands with the other segments
/// (behind NAT that takes seconds), is never reported.
pub const UNPROVEN_GRACE: Duration = Duration::from_secs(30);

/// How long a report is held by default (`--failover-hold`).
pub const DEFAULT_HOLD: Duration = Duration::from_secs(60);

/// A node reported again within this long of its last report has its hold doubled.
pub const REMEMBER: Duration = Duration::from_secs(15 * 60);

/// The longest hold, in multiples of the configured period.
pub const MAX_HOLD_FACTOR: u32 = 16;

/// What a member probes (the engine's [`LeaderProbe`]).
pub type Watch = LeaderProbe;

/// The failover state of one agent.
#[derive(Debug, Clone)]
pub struct Failover {
    hold: Duration,
    watching: Option<(Watch, Instant)>,
    /// Whether a round through the watched leader was answered since it is watched.
    proven: bool,
    failures: u32,
    /// Reported nodes and until when each report is held.
    held: BTreeMap<NodeName, Instant>,
    /// How often each node was reported in a row, and when last.
    strikes: BTreeMap<NodeName, (u32, Instant)>,
}

impl Failover {
    /// No report yet; reports are held for `hold` at first.
    pub fn new(hold: Duration) -> Self {
        Failover {
            hold,
            watching: None,
            proven: false,
            failures: 0,
            held: BTreeMap::new(),
            strikes: BTreeMap::new(),
        }
    }

    /// Hold `names` for one period from `now`: the reports this node carried before the agent
    /// restarted (a restart must not bring a broken leader back).
    pub fn resume(&mut self, names: impl IntoIterator<Item = NodeName>, now: Instant) {
        for n in names {
            self.held.entry(n.clone()).or_insert(now + self.hold);
            self.strikes.entry(n).or_insert((1, now));
        }
    }

    /// What to probe from now on (`None`: this node leads, is alone in its location, or the
    /// mesh is not by location). A change starts over: unproven, no failure counted.
    pub fn watch(&mut self, watch: Option<Watch>, now: Instant) {
        if self.watching.as_ref().map(|(w, _)| w) != watch.as_ref() {
            self.watching = watch.map(|w| (w, now));
            self.proven = false;
            self.failures = 0;
        }
    }

    /// What is being probed, if anything.
    pub fn watching(&self) -> Option<&Watch> {
        self.watching.as_ref().map(|(w, _)| w)
    }

    /// Whether an unanswered round counts at `now`: something is watched, and its path was
    /// answered once or has been watched for [`UNPROVEN_GRACE`].
    pub fn counting(&self, now: Instant) -> bool {
        self.watching
            .as_ref()
            .is_some_and(|(_, since)| self.proven || now.duration_since(*since) >= UNPROVEN_GRACE)
    }

    /// The result of one round at `now`. Returns whether the reported set changed.
    pub fn round(&mut self, answered: bool, now: Instant) -> bool {
        if self.watching.is_none() {
            return false;
        }
        if answered {
            self.proven = true;
            self.failures = 0;
            return false;
        }
        if !self.counting(now) {
            return false;
        }
        self.failures += 1;
        let Some((w, _)) = &self.watching else {
            return false;
        };
        if self.failures < FAILURES || self.held.contains_key(&w.leader) {
            return false;
        }
        let leader = w.leader.clone();
        self.failures = 0;
        let strikes = match self.strikes.get(&leader) {
            Some(&(n, last)) if now.duration_since(last) < REMEMBER => n + 1,
            _ => 1,
        };
        self.strikes.insert(leader.clone(), (strikes, now));
        let factor = 1u32
            .checked_shl(strikes - 1)
            .unwrap_or(MAX_HOLD_FACTOR)
            .min(MAX_HOLD_FACTOR);
        self.held.insert(leader, now + self.hold * factor);
        true
    }

    /// How long the report of `node` is held in all, if it is reported.
    pub fn hold_of(&self, node: &NodeName) -> Option<Duration> {
        let until = self.held.get(node)?;
        let (_, since) = self.strikes.get(node)?;
        Some(until.duration_since(*since))
    }

    /// Drop the reports whose hold ended by `now`. Returns whether the reported set changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.held.len();
        self.held.retain(|_, until| *until > now);
        self.held.len() != before
    }

    /// The nodes reported now.
    pub fn reported(&self) -> BTreeSet<NodeName> {
        self.held.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName(s.into())
    }

    fn watch(leader: &str) -> Option<Watch> {
        Some(Watch {
            leader: name(leader),
            targets: vec!["10.4.0.2".parse().unwrap()],
            behind: vec![name("remote-1")],
        })
    }

    /// Run `n` rounds one second apart from `t`, returning the time after them and whether any
    /// changed the reported set.
    fn rounds(f: &mut Failover, t: Instant, n: u32, answered: bool) -> (Instant, bool) {
        let mut changed = false;
        let mut t = t;
        for _ in 0..n {
            t += PROBE_EVERY;
            changed |= f.round(answered, t);
        }
        (t, changed)
    }

    /// Watch `leader` from `t` and have one round answered: the path is proven.
    fn proven(f: &mut Failover, leader: &str, t: Instant) -> Instant {
        f.watch(watch(leader), t);
        rounds(f, t, 1, true).0
    }

    #[test]
    fn a_leader_is_reported_after_three_unanswered_rounds_in_a_row_and_not_before() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        let t0 = proven(&mut f, "a", t0);
        let (t, changed) = rounds(&mut f, t0, FAILURES - 1, false);
        assert!(!changed && f.reported().is_empty());
        let (t, _) = rounds(&mut f, t, 1, true);
        let (t, changed) = rounds(&mut f, t, FAILURES - 1, false);
        assert!(!changed, "an answer starts the count again");
        let (_, changed) = rounds(&mut f, t, 1, false);
        assert!(changed);
        assert_eq!(f.reported(), BTreeSet::from([name("a")]));
    }

    #[test]
    fn a_path_never_answered_counts_only_after_the_grace_and_a_new_leader_starts_over() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        f.watch(watch("a"), t0);
        // A mesh still forming: nothing answers, nothing is reported for the grace period.
        let (t, changed) = rounds(&mut f, t0, 29, false);
        assert!(!changed, "{:?}", f.reported());
        let (_, changed) = rounds(&mut f, t, FAILURES, false);
        assert!(
            changed,
            "a leader broken from the start is reported after the grace"
        );
        // A new leader, answered once: three failures after that report it at once.
        let t1 = t0 + Duration::from_secs(100);
        let t1 = proven(&mut f, "b", t1);
        let (_, changed) = rounds(&mut f, t1, FAILURES, false);
        assert!(changed);
        // Watching another leader forgets the proof and the count.
        let t2 = t1 + Duration::from_secs(10);
        let t2 = proven(&mut f, "c", t2);
        rounds(&mut f, t2, FAILURES - 1, false);
        f.watch(watch("d"), t2 + Duration::from_secs(5));
        let (_, changed) = rounds(&mut f, t2 + Duration::from_secs(5), FAILURES, false);
        assert!(!changed, "d's path was never answered");
    }

    #[test]
    fn a_new_leader_behind_a_target_starts_over() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        let t = proven(&mut f, "a", t0);
        let (t, _) = rounds(&mut f, t, FAILURES - 1, false);
        // The other location fails over: its mesh IP moves to another node.
        let mut w = watch("a").unwrap();
        w.behind = vec![name("remote-2")];
        f.watch(Some(w), t);
        let (_, changed) = rounds(&mut f, t, FAILURES, false);
        assert!(
            !changed,
            "unproven again: the target's new leader may not answer yet"
        );
    }

    #[test]
    fn a_report_is_held_then_dropped_and_a_second_one_is_held_twice_as_long() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        let mut f = Failover::new(hold);
        let t0 = proven(&mut f, "a", t0);
        let (t1, _) = rounds(&mut f, t0, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold));
        // The location fails over: this node now watches b, which works.
        f.watch(watch("b"), t1);
        let (t, _) = rounds(&mut f, t1, 20, true);
        assert!(!f.expire(t), "held while the period runs");
        assert!(f.expire(t1 + hold), "dropped when it ends");
        assert!(f.reported().is_empty());
        // Back to a, still broken: reported again, held for twice as long.
        let t2 = proven(&mut f, "a", t1 + hold);
        rounds(&mut f, t2, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold * 2));
    }

    #[test]
    fn holds_stop_growing_and_are_forgotten_after_a_quiet_while() {
        let hold = Duration::from_secs(10);
        let mut f = Failover::new(hold);
        let mut t = Instant::now();
        for _ in 0..8 {
            let from = proven(&mut f, "a", t);
            let (end, _) = rounds(&mut f, from, FAILURES, false);
            t = end + hold * MAX_HOLD_FACTOR;
            f.expire(t);
            f.watch(None, t);
        }
        let from = proven(&mut f, "a", t);
        rounds(&mut f, from, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold * MAX_HOLD_FACTOR));
        let later = t + REMEMBER + hold * MAX_HOLD_FACTOR;
        f.expire(later);
        f.watch(None, later);
        let from = proven(&mut f, "a", later);
        rounds(&mut f, from, FAILURES, false);
        assert_eq!(
            f.hold_of(&name("a")),
            Some(hold),
            "forgotten after a quiet while"
        );
    }

    #[test]
    fn a_resumed_report_is_held_for_one_period_and_nothing_is_counted_unwatched() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        f.resume([name("a")], t0);
        assert_eq!(f.reported(), BTreeSet::from([name("a")]));
        let (_, changed) = rounds(&mut f, t0, 10, false);
        assert!(!changed, "a leader or alone: nothing is probed");
        assert!(f.expire(t0 + DEFAULT_HOLD));
    }
}
