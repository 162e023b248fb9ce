//! Crossed handshake initiations that keep crossing, told from the WireGuard device's per-peer
//! counters as the agent samples them, and broken by making the peer anew on this side.
//!
//! When both ends of a tunnel have packets for each other and no session, both send a handshake
//! initiation. If the two cross, each end answers the other's and drops the response to its own
//! (its handshake state now belongs to the other's initiation): no session, and each end holds
//! a responder key pair that only the other's data would confirm. The next initiation is
//! triggered by the next packet to send, but not before REKEY_TIMEOUT (5 s) after the last
//! handshake message this end sent (wireguard-go `SendHandshakeInitiation`, the kernel alike),
//! and that was its response, sent at the same moment as the other end's. So when both ends send
//! on the same schedule (pings both ways started together, probes aligned to the second), both
//! become free to initiate at the same moment and both are triggered by the same tick: they
//! cross again, every 5 s, until scheduling noise sets them apart. The jitter of WireGuard's
//! retransmission timer never acts, because the data-triggered initiation always comes first.
//! Measured with two wireguard-go 0.0.20220316 daemons, configured at the same moment and pinged
//! both ways at once: 1 in 30 runs crossed three times in a row (no packet for 15 s).
//!
//! The signature is unambiguous: bytes go out to the peer, and what comes back is only
//! handshake initiations (148 bytes each; the response to our own is dropped before it is
//! counted), with no handshake completed, in two rounds or more ([`STALL_AFTER`]). A working
//! session, or a peer that is down, never looks like that. The cure is to remove the peer and
//! add it again as it was, at a moment that has nothing to do with the traffic: the new peer
//! may initiate at once (its keepalive, or the next packet), the other end is not due to
//! initiate then, answers, and the handshake completes.
//!
//! Pure: the caller passes the time and the device's stats. Depends on the model and the
//! WireGuard stats type.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::model::WgKey;
use crate::reconcile::wg::WgPeerStats;

/// How often the device is sampled for crossed initiations: well under REKEY_TIMEOUT (5 s), so
/// two rounds in a row are seen as two.
pub const STALL_PERIOD: Duration = Duration::from_secs(2);

/// How long initiations must keep crossing, counted from the first sample that saw one
/// arrive unanswered, before the peer is made anew; two initiations at least must have
/// arrived too. Rounds are REKEY_TIMEOUT (5 s) apart, so this is the second round, seen
/// through samples up to [`STALL_PERIOD`] late: a single crossing, which the next round
/// usually resolves, is left alone.
pub const STALL_AFTER: Duration = Duration::from_secs(3);

/// The least time between two re-adds of one peer: a peer whose path works one way only
/// also sends initiations that never complete, and re-adding it again and again would not help.
pub const REKEY_HOLDOFF: Duration = Duration::from_secs(60);

/// Where in [`STALL_PERIOD`] the node with `key` samples: spread by the key, so two agents
/// started at the same moment do not sample, and make each other anew, in step.
pub fn phase(key: &WgKey) -> Duration {
    let period = u64::try_from(STALL_PERIOD.as_millis()).unwrap_or(u64::MAX);
    let spread = u64::from(u16::from_le_bytes([key.0[0], key.0[1]]));
    Duration::from_millis(period.saturating_mul(spread) / 65_536)
}

/// The size of a handshake initiation.
const INITIATION_BYTES: u64 = 148;

/// What the detector tracks of one peer.
#[derive(Debug, Clone, Copy)]
struct Watch {
    /// Bytes sent to and received from it at the last sample.
    tx: u64,
    rx: u64,
    /// Its last completed handshake at the last sample.
    handshake: Option<SystemTime>,
    /// The first sample that saw initiations arrive while this end sent and nothing answered;
    /// `None` while the session works (or nothing is known).
    since: Option<Instant>,
    /// Initiations received since `since`.
    initiations: u64,
    /// Bytes sent to it since `since`.
    sent: u64,
    /// When it was last made anew.
    rekeyed: Option<Instant>,
}

impl Watch {
    /// The session works (or is new): nothing is held against the peer.
    fn clear(&mut self) {
        self.since = None;
        self.initiations = 0;
        self.sent = 0;
    }
}

/// Crossed-initiation detector over the peers of one device.
#[derive(Debug, Default)]
pub struct Stalls {
    peers: HashMap<WgKey, Watch>,
}

impl Stalls {
    /// Take a sample of the device at `now`: `stats` are its peers; peers for which `judged`
    /// is false are left alone (e.g. the ones [`super::reach`] already probes). Returns the
    /// peers whose initiations keep crossing: to be removed and added again, as they are. Each
    /// is then left alone for [`REKEY_HOLDOFF`].
    pub fn sample(
        &mut self,
        now: Instant,
        stats: &[WgPeerStats],
        judged: impl Fn(&WgKey) -> bool,
    ) -> Vec<WgKey> {
        self.peers
            .retain(|k, _| stats.iter().any(|s| s.public_key == *k));
        let mut due = Vec::new();
        for s in stats {
            // A peer seen for the first time is judged from its counters' start (zero, no
            // handshake), so the first round of a new peer is not lost to the first sample.
            let w = self.peers.entry(s.public_key).or_insert(Watch {
                tx: 0,
                rx: 0,
                handshake: None,
                since: None,
                initiations: 0,
                sent: 0,
                rekeyed: None,
            });
            if s.tx_bytes < w.tx || s.rx_bytes < w.rx {
                // Made anew (by us or by someone else): its counters start again, from zero.
                w.clear();
                (w.tx, w.rx, w.handshake) = (0, 0, None);
            }
            let (sent, got) = (s.tx_bytes - w.tx, s.rx_bytes - w.rx);
            let completed = s.last_handshake.is_some() && s.last_handshake != w.handshake;
            if completed || got % INITIATION_BYTES != 0 {
                // A handshake completed, or a response or data arrived: the session works.
                w.clear();
            } else {
                if got > 0 {
                    // Only initiations came back: a crossing (or a peer that cannot hear us),
                    // so far.
                    w.since.get_or_insert(now);
                    w.initiations += got / INITIATION_BYTES;
                }
                if w.since.is_some() {
                    w.sent += sent;
                }
            }
            (w.tx, w.rx, w.handshake) = (s.tx_bytes, s.rx_bytes, s.last_handshake);
            let held = w
                .rekeyed
                .is_some_and(|t| now.duration_since(t) < REKEY_HOLDOFF);
            let crossing = w.initiations >= 2
                && w.sent > 0
                && w.since
                    .is_some_and(|since| now.duration_since(since) >= STALL_AFTER);
            if crossing && !held && judged(&s.public_key) {
                w.clear();
                w.rekeyed = Some(now);
                due.push(s.public_key);
            }
        }
        due.sort();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tx: u64, rx: u64, handshake: Option<u64>) -> WgPeerStats {
        WgPeerStats {
            public_key: WgKey([1; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: handshake.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const ALL: fn(&WgKey) -> bool = |_| true;

    /// One round of crossed initiations as one end counts it: its initiation and its response
    /// to the other's go out (148 + 92), the other's initiation comes in (148); the response to
    /// its own is dropped before it is counted.
    const ROUND_TX: u64 = 148 + 92;

    #[test]
    fn initiations_that_keep_crossing_make_the_peer_due_once_per_holdoff() {
        // The counters of the wireguard-go run that crossed three times (rx 444, tx 720).
        let mut s = Stalls::default();
        let t0 = Instant::now();
        assert!(s.sample(t0, &[at(0, 0, None)], ALL).is_empty());
        assert!(
            s.sample(t0 + secs(2), &[at(ROUND_TX, 148, None)], ALL)
                .is_empty()
        );
        assert!(
            s.sample(t0 + secs(4), &[at(ROUND_TX, 148, None)], ALL)
                .is_empty()
        );
        // The second round, 5 s after the first.
        assert_eq!(
            s.sample(t0 + secs(6), &[at(2 * ROUND_TX, 296, None)], ALL),
            vec![WgKey([1; 32])]
        );
        // Held off: later rounds are not acted on again at once.
        assert!(
            s.sample(t0 + secs(8), &[at(2 * ROUND_TX, 296, None)], ALL)
                .is_empty()
        );
        assert!(
            s.sample(t0 + secs(12), &[at(3 * ROUND_TX, 444, None)], ALL)
                .is_empty()
        );
        assert!(
            s.sample(t0 + secs(20), &[at(4 * ROUND_TX, 592, None)], ALL)
                .is_empty()
        );
        // Still crossing when the hold-off ends: due again.
        let t1 = t0 + secs(6) + REKEY_HOLDOFF;
        assert_eq!(
            s.sample(t1, &[at(5 * ROUND_TX, 740, None)], ALL),
            vec![WgKey([1; 32])]
        );
    }

    #[test]
    fn initiations_and_our_sends_seen_in_different_samples_count_together() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        s.sample(t0, &[at(0, 0, None)], ALL);
        // Their initiation, then ours and our response two seconds later, and so on.
        s.sample(t0 + secs(2), &[at(0, 148, None)], ALL);
        s.sample(t0 + secs(4), &[at(ROUND_TX, 148, None)], ALL);
        // Two initiations; nothing sent since the second, but what was sent before counts.
        assert_eq!(
            s.sample(t0 + secs(6), &[at(ROUND_TX, 296, None)], ALL),
            vec![WgKey([1; 32])]
        );
    }

    #[test]
    fn the_first_round_of_a_peer_seen_late_or_made_anew_counts() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        // First seen after its first round already crossed.
        assert!(s.sample(t0, &[at(ROUND_TX, 148, None)], ALL).is_empty());
        assert_eq!(
            s.sample(t0 + secs(4), &[at(2 * ROUND_TX, 296, None)], ALL),
            vec![WgKey([1; 32])]
        );
        // Made anew (here by someone else, the hold-off past), and crossing again at once.
        let t1 = t0 + secs(4) + REKEY_HOLDOFF;
        assert!(s.sample(t1, &[at(ROUND_TX, 148, None)], ALL).is_empty());
        assert_eq!(
            s.sample(t1 + secs(4), &[at(2 * ROUND_TX, 296, None)], ALL),
            vec![WgKey([1; 32])]
        );
    }

    #[test]
    fn nodes_sample_at_phases_of_their_own() {
        assert_eq!(phase(&WgKey([0; 32])), Duration::ZERO);
        let mut k = [0; 32];
        k[1] = 0x80;
        assert_eq!(phase(&WgKey(k)), STALL_PERIOD / 2);
        assert!(phase(&WgKey([0xff; 32])) < STALL_PERIOD);
    }

    #[test]
    fn a_crossing_that_the_next_round_resolves_is_left_alone() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        s.sample(t0, &[at(0, 0, None)], ALL);
        s.sample(t0 + secs(2), &[at(ROUND_TX, 148, None)], ALL);
        // The retry completes: the response (92) and a keepalive (32) arrive, a handshake time.
        let done = at(ROUND_TX + 148 + 32, 148 + 92 + 32, Some(1000));
        for i in 3..20 {
            assert!(
                s.sample(t0 + secs(2 * i), std::slice::from_ref(&done), ALL)
                    .is_empty()
            );
        }
    }

    #[test]
    fn working_sessions_and_silent_peers_are_never_due() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        // Data both ways, a handshake long ago.
        for i in 0..20u64 {
            let st = at(1000 + 500 * i, 800 + 480 * i, Some(1000));
            assert!(s.sample(t0 + secs(2 * i), &[st], ALL).is_empty());
        }
        // A peer that is down: we send (data, then our own initiations), nothing comes back.
        let mut s = Stalls::default();
        for i in 0..20u64 {
            let st = at(1000 + 148 * i, 800, Some(1000));
            assert!(s.sample(t0 + secs(2 * i), &[st], ALL).is_empty());
        }
        // Initiations arrive, but this end sends nothing at all (its responses are all it
        // would send, and here not even those are counted): nothing to answer, not judged.
        let mut s = Stalls::default();
        for i in 0..20u64 {
            let st = at(0, 148 * i, None);
            assert!(s.sample(t0 + secs(2 * i), &[st], ALL).is_empty());
        }
        // A peer that initiates while we have nothing to send is answered, not judged: its
        // initiations with our responses complete (a handshake time each round).
        let mut s = Stalls::default();
        for i in 0..20u64 {
            let st = at(92 * i, 148 * i + 32 * i, Some(1000 + i));
            assert!(s.sample(t0 + secs(2 * i), &[st], ALL).is_empty());
        }
    }

    #[test]
    fn a_peer_made_anew_or_not_judged_is_not_due() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        s.sample(t0, &[at(0, 0, None)], ALL);
        s.sample(t0 + secs(2), &[at(ROUND_TX, 148, None)], ALL);
        // Removed and added again by someone: counters from 0, judged afresh.
        s.sample(t0 + secs(4), &[at(148, 0, None)], ALL);
        assert!(s.sample(t0 + secs(8), &[at(148, 0, None)], ALL).is_empty());
        // Crossing, but the caller does not judge it (e.g. a relayed peer being probed).
        let none = |_: &WgKey| false;
        let mut s = Stalls::default();
        for i in 0..10u64 {
            let st = at(ROUND_TX * i, 148 * i, None);
            assert!(s.sample(t0 + secs(2 * i), &[st], none).is_empty());
        }
    }
}
