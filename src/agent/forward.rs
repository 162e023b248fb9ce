//! Failover of a location's leader whose forwarding broke: a member of a location (not its
//! leader) sends an echo request every [`PROBE_EVERY`] through its leader to the mesh IPs of a
//! few other segments; when [`FAILURES`] rounds in a row get no answer from any of them, it
//! reports the leader (`wiremesh.io/forwarding-failed`) and the engine passes over a leader
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

/// After the leader or the targets change, rounds are not counted for this long: the new
/// leader programs its peers and shakes hands with the other segments first.
pub const GRACE: Duration = Duration::from_secs(2);

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
    /// mesh is not by location). A change restarts the count after [`GRACE`].
    pub fn watch(&mut self, watch: Option<Watch>, now: Instant) {
        if self.watching.as_ref().map(|(w, _)| w) != watch.as_ref() {
            self.watching = watch.map(|w| (w, now));
            self.failures = 0;
        }
    }

    /// What is being probed, if anything.
    pub fn watching(&self) -> Option<&Watch> {
        self.watching.as_ref().map(|(w, _)| w)
    }

    /// Whether a round is due to be counted at `now` (something is watched, grace is over).
    pub fn counting(&self, now: Instant) -> bool {
        self.watching
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) >= GRACE)
    }

    /// The result of one round at `now`. Returns whether the reported set changed.
    pub fn round(&mut self, answered: bool, now: Instant) -> bool {
        if !self.counting(now) {
            return false;
        }
        if answered {
            self.failures = 0;
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

    #[test]
    fn a_leader_is_reported_after_three_unanswered_rounds_in_a_row_and_not_before() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        f.watch(watch("a"), t0);
        let (t, changed) = rounds(&mut f, t0 + GRACE, FAILURES - 1, false);
        assert!(!changed && f.reported().is_empty());
        let (t, _) = rounds(&mut f, t, 1, true);
        let (t, changed) = rounds(&mut f, t, FAILURES - 1, false);
        assert!(!changed, "an answer starts the count again");
        let (_, changed) = rounds(&mut f, t, 1, false);
        assert!(changed);
        assert_eq!(f.reported(), BTreeSet::from([name("a")]));
    }

    #[test]
    fn rounds_in_the_grace_after_a_new_leader_do_not_count() {
        let t0 = Instant::now();
        let mut f = Failover::new(DEFAULT_HOLD);
        f.watch(watch("a"), t0);
        // One second apart from t0: the first ones fall into the grace period.
        let (_, changed) = rounds(&mut f, t0, FAILURES, false);
        assert!(!changed, "{:?}", f.reported());
        f.watch(watch("b"), t0 + Duration::from_secs(10));
        let (_, changed) = rounds(&mut f, t0 + Duration::from_secs(10), FAILURES, false);
        assert!(!changed, "the count starts again for the new leader");
    }

    #[test]
    fn a_report_is_held_then_dropped_and_a_second_one_is_held_twice_as_long() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(30);
        let mut f = Failover::new(hold);
        f.watch(watch("a"), t0);
        let (t1, _) = rounds(&mut f, t0 + GRACE, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold));
        // The location fails over: this node now watches b, which works.
        f.watch(watch("b"), t1);
        let (t, _) = rounds(&mut f, t1 + GRACE, 20, true);
        assert!(!f.expire(t), "held while the period runs");
        assert!(f.expire(t1 + hold), "dropped when it ends");
        assert!(f.reported().is_empty());
        // Back to a, still broken: reported again, held for twice as long.
        let t2 = t1 + hold;
        f.watch(watch("a"), t2);
        rounds(&mut f, t2 + GRACE, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold * 2));
    }

    #[test]
    fn holds_stop_growing_and_are_forgotten_after_a_quiet_while() {
        let hold = Duration::from_secs(10);
        let mut f = Failover::new(hold);
        let mut t = Instant::now();
        for _ in 0..8 {
            f.watch(watch("a"), t);
            let (end, _) = rounds(&mut f, t + GRACE, FAILURES, false);
            t = end + hold * MAX_HOLD_FACTOR;
            f.expire(t);
            f.watch(None, t);
        }
        f.watch(watch("a"), t);
        rounds(&mut f, t + GRACE, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold * MAX_HOLD_FACTOR));
        let later = t + REMEMBER + hold * MAX_HOLD_FACTOR;
        f.expire(later);
        f.watch(watch("a"), later);
        rounds(&mut f, later + GRACE, FAILURES, false);
        assert_eq!(f.hold_of(&name("a")), Some(hold), "forgotten after a quiet while");
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
