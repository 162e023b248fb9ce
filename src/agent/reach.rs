//! Which segment leaders this node cannot reach directly, judged from the WireGuard device's
//! per-peer counters and handshake times as the agent samples them: a peer is unreachable when
//! this node kept sending to it for [`UNREACHABLE_AFTER`] and received nothing back, and
//! reachable again only when a handshake with it completes. Bytes received are no proof of a
//! path that works both ways: behind a one-way block the other end's handshake initiations, or
//! its keepalives on an older session, still arrive. A completed handshake needs both
//! directions (the initiator receives the response; the responder receives data under the new
//! keys). A relayed peer keeps being tried directly (see [`Reachability::probes_due`]).
//! WireGuard guarantees an answer on a working path: a handshake is answered at once, and a
//! peer that received data and had nothing to send back sends a keepalive within 10 s. The
//! agent publishes the unreachable set (`wiremesh.io/unreachable`) and the engine relays
//! around it.
//!
//! Pure: the caller passes the time and the device's stats. Depends on the model and the
//! WireGuard stats type.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use crate::model::WgKey;
use crate::reconcile::wg::WgPeerStats;

/// How long this node sends to a peer and hears nothing back before it reports the peer
/// unreachable: WireGuard's passive keepalive (10 s) plus a sampling period, with margin.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(20);

/// How often a relayed peer's direct path is tried again (WireGuard gives up a handshake after
/// 90 s of attempts and does not try again until something is sent).
pub const PROBE_EVERY: Duration = Duration::from_secs(60);

/// The size of a WireGuard keepalive (a data message without payload). A persistent
/// keepalive is never answered, so bytes sent in steps of at most this between two samples
/// are no reason to expect an answer; data (48 bytes at least) and handshake initiations
/// (148) are. Assumes a persistent keepalive interval of at least the sampling period (5 s).
const KEEPALIVE_BYTES: u64 = 32;

/// What the agent tracks of one peer.
#[derive(Debug, Clone, Copy)]
struct Trying {
    /// The first sample that saw bytes sent to it and none received since the last that were;
    /// `None` while it answers (or nothing is sent).
    since: Option<Instant>,
    /// Bytes sent to it and received from it at the last sample.
    tx: u64,
    rx: u64,
    /// Its last completed handshake when it was found unreachable: only a later one clears it.
    handshake: Option<SystemTime>,
}

/// The reachability of the segment leaders this node holds as peers.
#[derive(Debug, Default)]
pub struct Reachability {
    trying: HashMap<WgKey, Trying>,
    unreachable: BTreeSet<WgKey>,
    probed: HashMap<WgKey, Instant>,
}

impl Reachability {
    /// The peers reported unreachable now.
    pub fn unreachable(&self) -> &BTreeSet<WgKey> {
        &self.unreachable
    }

    /// Take a sample of the device at `now`: `stats` are its peers, `is_segment` says which keys
    /// are segment leaders (external peers are not judged). Returns whether the unreachable set
    /// changed.
    pub fn sample(
        &mut self,
        now: Instant,
        stats: &[WgPeerStats],
        is_segment: impl Fn(&WgKey) -> bool,
    ) -> bool {
        let before = self.unreachable.clone();
        let present: BTreeSet<WgKey> = stats.iter().map(|s| s.public_key).collect();
        self.trying.retain(|k, _| present.contains(k));
        self.unreachable
            .retain(|k| present.contains(k) && is_segment(k));
        self.probed.retain(|k, _| self.unreachable.contains(k));
        for s in stats.iter().filter(|s| is_segment(&s.public_key)) {
            let t = self.trying.entry(s.public_key).or_insert(Trying {
                since: None,
                tx: s.tx_bytes,
                rx: s.rx_bytes,
                handshake: s.last_handshake,
            });
            if self.unreachable.contains(&s.public_key) {
                // Only a handshake completed since proves the path both ways.
                if s.last_handshake.is_some() && s.last_handshake > t.handshake {
                    t.since = None;
                    self.unreachable.remove(&s.public_key);
                }
            } else if s.tx_bytes < t.tx || s.rx_bytes < t.rx {
                // The peer was made anew: its counters start again.
                t.since = None;
            } else if s.rx_bytes > t.rx {
                t.since = None;
            } else if s.tx_bytes > t.tx + KEEPALIVE_BYTES {
                // More than a keepalive went out: data, or a handshake initiation.
                t.since.get_or_insert(now);
            }
            (t.tx, t.rx) = (s.tx_bytes, s.rx_bytes);
            if !self.unreachable.contains(&s.public_key)
                && t.since
                    .is_some_and(|since| now.duration_since(since) >= UNREACHABLE_AFTER)
            {
                t.handshake = s.last_handshake;
                self.unreachable.insert(s.public_key);
            }
        }
        before != self.unreachable
    }

    /// The unreachable peers whose direct path is due to be tried again at `now` (each once per
    /// [`PROBE_EVERY`]); they are marked as tried.
    pub fn probes_due(&mut self, now: Instant) -> Vec<WgKey> {
        let mut due = Vec::new();
        for k in &self.unreachable {
            let last = self.probed.get(k);
            if last.is_none_or(|t| now.duration_since(*t) >= PROBE_EVERY) {
                due.push(*k);
                self.probed.insert(*k, now);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(key: u8, tx: u64, rx: u64) -> WgPeerStats {
        WgPeerStats {
            public_key: WgKey([key; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    /// The same, with a handshake completed at `at` seconds (wall clock).
    fn shook(key: u8, tx: u64, rx: u64, at: u64) -> WgPeerStats {
        WgPeerStats {
            last_handshake: Some(SystemTime::UNIX_EPOCH + secs(at)),
            ..stats(key, tx, rx)
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_peer_sent_to_that_never_answers_is_unreachable_after_the_bound_and_back_when_it_does() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        // Nothing sent: never judged, however long.
        assert!(!r.sample(t0, &[stats(1, 0, 0)], all));
        assert!(!r.sample(t0 + secs(60), &[stats(1, 0, 0)], all));
        // Sending starts: counted from the first sample that saw bytes go out unanswered.
        let t1 = t0 + secs(61);
        assert!(!r.sample(t1, &[stats(1, 148, 0)], all));
        assert!(!r.sample(t1 + secs(15), &[stats(1, 444, 0)], all));
        assert!(r.sample(t1 + secs(20), &[stats(1, 592, 0)], all));
        assert!(
            r.unreachable().contains(&WgKey([1; 32])),
            "sent for 20 s, nothing back"
        );
        // A handshake completes: reachable at once.
        assert!(r.sample(t1 + secs(25), &[shook(1, 740, 92, 1000)], all));
        assert!(r.unreachable().is_empty());
    }

    #[test]
    fn bytes_from_a_peer_that_cannot_hear_us_do_not_make_it_reachable() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        // A session from before the block: the last handshake at 1000 s.
        r.sample(t0, &[shook(1, 100, 100, 1000)], all);
        r.sample(t0 + secs(5), &[shook(1, 400, 100, 1000)], all);
        assert!(r.sample(t0 + secs(25), &[shook(1, 900, 100, 1000)], all));
        // It keeps sending keepalives on the old session and handshake initiations we answer
        // in vain: bytes arrive, no handshake completes.
        for i in 0..10u64 {
            let rx = 100 + 148 * (i + 1);
            r.sample(
                t0 + secs(30 + 5 * i),
                &[shook(1, 1000 + 92 * i, rx, 1000)],
                all,
            );
            assert!(
                !r.unreachable().is_empty(),
                "cleared at sample {i} by bytes alone"
            );
        }
        // Made anew by a probe (no handshake at all), still nothing completes.
        r.sample(t0 + secs(90), &[stats(1, 148, 92)], all);
        assert!(!r.unreachable().is_empty(), "a reset is no answer");
        // The block is gone: a handshake completes.
        assert!(r.sample(t0 + secs(95), &[shook(1, 300, 300, 1100)], all));
        assert!(r.unreachable().is_empty());
    }

    #[test]
    fn a_peer_that_answers_within_the_bound_is_never_reported() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        // One-way traffic answered by a keepalive every 10 s, sampled every 5 s.
        let mut rx = 0;
        for i in 0..20u64 {
            if i % 2 == 1 {
                rx += 32;
            }
            r.sample(t0 + secs(5 * i), &[stats(1, 1000 * (i + 1), rx)], all);
            assert!(r.unreachable().is_empty(), "reported at sample {i}");
        }
    }

    #[test]
    fn persistent_keepalives_that_nobody_answers_are_no_reason_to_report() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        // A NATed node keeps its mappings open every 25 s on a quiet mesh: one 32-byte
        // keepalive per period, never answered (WireGuard answers data, not keepalives).
        for i in 0..30u64 {
            let tx = 1000 + 32 * (i / 5);
            r.sample(t0 + secs(5 * i), &[shook(1, tx, 500, 1000)], all);
            assert!(r.unreachable().is_empty(), "reported at sample {i}");
        }
        // A handshake initiation that goes unanswered is.
        r.sample(t0 + secs(150), &[shook(1, 1500, 500, 1000)], all);
        r.sample(t0 + secs(155), &[shook(1, 1648, 500, 1000)], all);
        assert!(r.sample(t0 + secs(170), &[shook(1, 1796, 500, 1000)], all));
    }

    #[test]
    fn external_peers_and_peers_gone_are_never_reported() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let segment = |k: &WgKey| k.0[0] == 1;
        r.sample(t0, &[stats(1, 0, 0), stats(2, 0, 0)], segment);
        r.sample(t0 + secs(1), &[stats(1, 148, 0), stats(2, 148, 0)], segment);
        r.sample(
            t0 + secs(25),
            &[stats(1, 500, 0), stats(2, 500, 0)],
            segment,
        );
        assert_eq!(
            r.unreachable().iter().collect::<Vec<_>>(),
            vec![&WgKey([1; 32])]
        );
        // The peer leaves the device: its report goes too.
        assert!(r.sample(t0 + secs(26), &[], segment));
        assert!(r.unreachable().is_empty());
    }

    #[test]
    fn a_peer_made_anew_is_judged_from_its_new_counters() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        r.sample(t0, &[stats(1, 100, 50)], all);
        r.sample(t0 + secs(1), &[stats(1, 200, 50)], all);
        r.sample(t0 + secs(21), &[stats(1, 300, 50)], all);
        assert!(!r.unreachable().is_empty());
        // Removed and added again by a probe: counters from 0; still unreachable until an answer.
        r.sample(t0 + secs(22), &[stats(1, 148, 0)], all);
        assert!(!r.unreachable().is_empty(), "a reset is no answer");
        assert!(r.sample(t0 + secs(27), &[shook(1, 148, 92, 500)], all));
        assert!(r.unreachable().is_empty(), "the handshake was answered");
        // Made anew while reachable: judged afresh from the new counters, not reported at once.
        assert!(!r.sample(t0 + secs(30), &[stats(1, 148, 0)], all));
        assert!(!r.sample(t0 + secs(35), &[stats(1, 296, 0)], all));
        assert!(r.unreachable().is_empty());
    }

    #[test]
    fn an_unreachable_peer_is_probed_once_per_period() {
        let mut r = Reachability::default();
        let t0 = Instant::now();
        let all = |_: &WgKey| true;
        r.sample(t0, &[stats(1, 148, 0)], all);
        r.sample(t0 + secs(1), &[stats(1, 296, 0)], all);
        let t = t0 + secs(21);
        r.sample(t, &[stats(1, 444, 0)], all);
        assert_eq!(r.probes_due(t), vec![WgKey([1; 32])]);
        assert!(r.probes_due(t + secs(30)).is_empty());
        assert_eq!(r.probes_due(t + PROBE_EVERY), vec![WgKey([1; 32])]);
    }
}
