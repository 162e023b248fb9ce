//! `meshctl lab chaos leader-blackhole NODE`: the leader of a location stops forwarding (an
//! nftables table of the lab's own in its namespace drops every forwarded packet; its agent
//! and everything else keep running) while the other members' pods ping a pod of another
//! location and back. The run watches the registry's leader of the location and which of its
//! nodes hold WireGuard peers (act as leader) every 250 ms, lifts the blackhole once the
//! location has failed over and converged, and waits until the preferred leader leads again
//! (its members' reports end after the agents' `--failover-hold`).
//!
//! It passes when the location's pods were cut off at most the bound (default 10 s) after the
//! leader broke, and at most the bound again when it came back; the location changed leader
//! exactly twice (away and back: no flapping); and no pod packet crossed the underlay in
//! plaintext (checked by `chaos`).
//!
//! Depends on the lab's state, uapi and sys modules, the chaos pings, and the topology engine.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::chaos::{Flow, ping_interval};
use super::state::LabState;
use super::{LabError, LabName, cluster_view, uapi};
use crate::model::{Granularity, NodeName};
use crate::topology;

/// The lab's own nftables table that stops the leader's forwarding (never one of wiremesh's).
pub const BLACKHOLE_TABLE: &str = "lab_leader_blackhole";

/// How often the monitor samples the registry's leader and the nodes' WireGuard devices.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long the blackhole stays after the location failed over and converged.
const HOLD_BROKEN: Duration = Duration::from_secs(3);

/// What a leader-blackhole run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverReport {
    /// The location's segment (`location:NAME`).
    pub location: String,
    /// The leader that was blackholed (Kilo's choice).
    pub preferred: String,
    /// The node that took over and how long after the blackhole the registry said so.
    pub took_over: Option<(String, Duration)>,
    /// How long after the blackhole was lifted the preferred leader led again.
    pub returned: Option<Duration>,
    /// The longest time a member's flow got no answer while the leader was broken.
    pub cut: Duration,
    /// The longest time a member's flow got no answer after the blackhole was lifted.
    pub return_cut: Duration,
    /// How long two nodes of the location held WireGuard peers at once, in all.
    pub two_leaders: Duration,
    /// How often the registry's leader of the location changed during the run.
    pub changes: usize,
    /// The bound on each cut.
    pub bound: Duration,
}

impl FailoverReport {
    /// The location failed over and came back, each cut within the bound, no flapping.
    pub fn passed(&self) -> bool {
        self.took_over.is_some()
            && self.returned.is_some()
            && self.cut <= self.bound
            && self.return_cut <= self.bound
            && self.changes == 2
    }

    /// The report's lines (appended to the chaos report).
    pub fn render(&self, out: &mut String) {
        let secs = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        let _ = writeln!(
            out,
            "\n  failover of {} (leader {}):",
            self.location, self.preferred
        );
        match &self.took_over {
            Some((n, d)) => {
                let _ = writeln!(out, "    {n} took over {} after the blackhole", secs(*d));
            }
            None => {
                let _ = writeln!(out, "    NO other node took over");
            }
        }
        let verdict = |d: Duration| {
            if d <= self.bound {
                "ok"
            } else {
                "ABOVE the bound"
            }
        };
        let _ = writeln!(
            out,
            "    location cut off for {} while its leader was broken (bound {}): {}",
            secs(self.cut),
            secs(self.bound),
            verdict(self.cut)
        );
        match self.returned {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "    {} led again {} after the blackhole was lifted; cut off {} then: {}",
                    self.preferred,
                    secs(d),
                    secs(self.return_cut),
                    verdict(self.return_cut)
                );
            }
            None => {
                let _ = writeln!(out, "    {} did NOT lead again", self.preferred);
            }
        }
        let _ = writeln!(
            out,
            "    leader changes: {} ({}); two nodes held peers at once for {} in all",
            self.changes,
            if self.changes == 2 {
                "away and back"
            } else {
                "expected 2: FLAPPING or none"
            },
            secs(self.two_leaders)
        );
    }
}

/// The segment of `node` in the lab's mesh as the registry says now: its key, its leader and
/// its members' names.
fn location_of(state: &LabState, node: &str) -> Result<(String, String, Vec<String>), LabError> {
    let view = cluster_view(state, state.spec.cluster_of(node))?;
    let (loaded, opts) = (&view.nodes, &view.opts);
    let checked = topology::claims::check(&loaded.items, opts);
    let topo = topology::build_checked(&checked, &view.peers, opts);
    let i = topo
        .segment_of(&NodeName(node.to_owned()))
        .ok_or_else(|| LabError::Options(format!("node {node} is not in the mesh")))?;
    let s = &topo.segments[i];
    Ok((
        s.key.to_string(),
        s.leader_node().name.to_string(),
        s.nodes.iter().map(|n| n.name.to_string()).collect(),
    ))
}

/// Refuse what cannot fail over: a file registry (agents publish nothing), full granularity,
/// or `node` not leading a location of two nodes or more.
pub fn validate(state: &LabState, node: &str) -> Result<(), LabError> {
    state.require_apiserver("chaos leader-blackhole")?;
    if state.spec.granularity != Granularity::Location {
        return Err(LabError::Options(
            "chaos leader-blackhole needs a lab by location (--granularity location)".into(),
        ));
    }
    let (location, leader, members) = location_of(state, node)?;
    if members.len() < 2 {
        return Err(LabError::Options(format!(
            "{node} is alone in {location}: there is no other node to take over"
        )));
    }
    if leader != node {
        return Err(LabError::Options(format!(
            "{node} does not lead {location} ({leader} does)"
        )));
    }
    Ok(())
}

/// The flows of the run: each other member's first pod to a pod in another segment, and back.
pub fn flows(state: &LabState, node: &str) -> Vec<Flow> {
    let Ok((_, _, members)) = location_of(state, node) else {
        return Vec::new();
    };
    let first_pod = |name: &str| {
        let (_, n) = state.node(name)?;
        let pod = n.pods.first()?;
        Some((
            pod.netns.clone(),
            pod.addrs().find(std::net::IpAddr::is_ipv4)?,
        ))
    };
    let Some((remote, (remote_pod, remote_ip))) = state
        .nodes
        .iter()
        .filter(|n| !members.contains(&n.name))
        .find_map(|n| Some((n.name.clone(), first_pod(&n.name)?)))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in members.iter().filter(|m| m.as_str() != node) {
        let Some((pod, ip)) = first_pod(m) else {
            continue;
        };
        out.push(Flow::new(pod, m.clone(), remote.clone(), remote_ip));
        out.push(Flow::new(remote_pod.clone(), remote.clone(), m.clone(), ip));
    }
    out
}

/// The blackhole in the leader's namespace; lifted on drop (also on every error path).
pub struct Blackhole {
    netns: String,
    lifted: bool,
}

impl Blackhole {
    /// Drop every packet the node in `netns` would forward.
    pub fn start(netns: &str) -> Result<Blackhole, LabError> {
        let rules = format!(
            "table inet {BLACKHOLE_TABLE} {{\n  chain forward {{\n    type filter hook forward \
             priority -400; policy drop;\n  }}\n}}\n"
        );
        nft(netns, &rules)?;
        Ok(Blackhole {
            netns: netns.to_owned(),
            lifted: false,
        })
    }

    /// Let the node forward again.
    pub fn lift(mut self) -> Result<(), LabError> {
        self.lifted = true;
        nft(
            &self.netns,
            &format!("delete table inet {BLACKHOLE_TABLE}\n"),
        )
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if !self.lifted {
            let _ = nft(
                &self.netns,
                &format!("delete table inet {BLACKHOLE_TABLE}\n"),
            );
        }
    }
}

/// Feed `script` to `nft -f -` in namespace `netns`.
fn nft(netns: &str, script: &str) -> Result<(), LabError> {
    super::sys::run_with(
        "ip",
        &["netns", "exec", netns, "nft", "-f", "-"].map(std::ffi::OsStr::new),
        Some(script.as_bytes()),
        &[],
    )
    .map(drop)
}

/// One sample of the monitor: when, the registry's leader, the nodes holding peers.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    leader: Option<String>,
    acting: usize,
}

/// Samples the location's leader (registry) and acting leaders (WireGuard) until stopped.
struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(root: &Path, lab: &LabName, node: &str) -> Monitor {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (root, lab, node) = (root.to_owned(), lab.clone(), node.to_owned());
        let (s, halt) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let at = Instant::now();
                if let Ok(state) = super::load(&root, &lab) {
                    let found = location_of(&state, &node).ok();
                    let acting = found.as_ref().map_or(0, |(_, _, members)| {
                        members
                            .iter()
                            .filter_map(|m| state.node(m))
                            .filter(|(_, n)| {
                                uapi::get(&n.uapi_socket(), Duration::from_secs(1))
                                    .is_ok_and(|d| !d.peers.is_empty())
                            })
                            .count()
                    });
                    if let Ok(mut v) = s.lock() {
                        v.push(Sample {
                            at,
                            leader: found.map(|(_, l, _)| l),
                            acting,
                        });
                    }
                }
                std::thread::sleep(SAMPLE_EVERY.saturating_sub(at.elapsed()));
            }
        });
        Monitor {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The first sample at or after `since` whose registry leader satisfies `f`.
    fn first(&self, since: Instant, f: impl Fn(&str) -> bool) -> Option<(String, Instant)> {
        let v = self.samples.lock().ok()?;
        v.iter().filter(|s| s.at >= since).find_map(|s| {
            s.leader
                .as_deref()
                .filter(|l| f(l))
                .map(|l| (l.to_owned(), s.at))
        })
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Wait until `f` holds for the monitor's registry leader (after `since`), at most `timeout`.
fn wait_leader(
    m: &Monitor,
    since: Instant,
    timeout: Duration,
    f: impl Fn(&str) -> bool + Copy,
) -> Option<(String, Instant)> {
    let t0 = Instant::now();
    loop {
        if let Some(found) = m.first(since, f) {
            return Some(found);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// When things happened, for the cuts (see [`finish`]).
pub struct Timeline {
    /// The report without the cuts.
    pub report: FailoverReport,
    /// When the blackhole was lifted.
    pub lifted: Option<Instant>,
}

/// Break `node`'s forwarding, wait for the failover and convergence, lift, wait for the return
/// and convergence. `steps` and `at` log what happened; `converge` waits for the mesh.
#[allow(clippy::too_many_arguments)]
pub fn run(
    root: &Path,
    lab: &LabName,
    state: &LabState,
    node: &str,
    bound: Duration,
    timeout: Duration,
    steps: &mut Vec<String>,
    at: &dyn Fn(String) -> String,
    converge: &dyn Fn() -> Result<bool, LabError>,
) -> Result<Timeline, LabError> {
    let (location, preferred, _) = location_of(state, node)?;
    let (_, n) = state
        .node(node)
        .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {node}")))?;
    let monitor = Monitor::start(root, lab, node);
    let mut report = FailoverReport {
        location,
        preferred: preferred.clone(),
        took_over: None,
        returned: None,
        cut: Duration::ZERO,
        return_cut: Duration::ZERO,
        two_leaders: Duration::ZERO,
        changes: 0,
        bound,
    };
    let broke = Instant::now();
    let hole = Blackhole::start(&n.netns)?;
    steps.push(at(format!(
        "{node} forwards nothing (nft table {BLACKHOLE_TABLE})"
    )));
    let other = wait_leader(&monitor, broke, timeout, |l| l != preferred);
    if let Some((l, when)) = &other {
        report.took_over = Some((l.clone(), when.duration_since(broke)));
        steps.push(at(format!("{l} leads {} in the registry", report.location)));
        let ok = converge()?;
        steps.push(at(if ok {
            "converged".into()
        } else {
            "did not converge".into()
        }));
        std::thread::sleep(HOLD_BROKEN);
    } else {
        steps.push(at("no other node took over".into()));
    }
    hole.lift()?;
    let lift = Instant::now();
    steps.push(at(format!("{node} forwards again")));
    if other.is_some() {
        // The members' reports end with their hold; then the preferred leader leads again.
        let back = wait_leader(&monitor, lift, timeout, |l| l == preferred);
        if let Some((_, when)) = back {
            report.returned = Some(when.duration_since(lift));
            steps.push(at(format!("{preferred} leads again in the registry")));
            let ok = converge()?;
            steps.push(at(if ok {
                "converged".into()
            } else {
                "did not converge".into()
            }));
        } else {
            steps.push(at(format!("{preferred} did not lead again")));
        }
    }
    let samples = monitor.finish();
    report.changes = samples
        .windows(2)
        .filter(|w| w[0].leader.is_some() && w[1].leader.is_some() && w[0].leader != w[1].leader)
        .count();
    report.two_leaders = samples
        .windows(2)
        .filter(|w| w[0].acting >= 2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .sum();
    Ok(Timeline {
        report,
        lifted: Some(lift),
    })
}

/// Fill in the cuts from the flows' gaps: a gap that began before `lifted` counts for the
/// broken leader, one after for the return. `started` is when the pings started.
pub fn finish(timeline: Timeline, flows: &[Flow], started: Instant) -> FailoverReport {
    let mut r = timeline.report;
    let interval = ping_interval();
    let lifted = timeline
        .lifted
        .map_or(Duration::MAX, |l| l.duration_since(started));
    for f in flows {
        for &(first, len) in &f.gaps {
            let began = interval * first.saturating_sub(1);
            let lasted = interval * len;
            if began < lifted {
                r.cut = r.cut.max(lasted);
            } else {
                r.return_cut = r.return_cut.max(lasted);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> FailoverReport {
        FailoverReport {
            location: "location:b".into(),
            preferred: "b-1".into(),
            took_over: Some(("b-2".into(), Duration::from_secs(4))),
            returned: Some(Duration::from_secs(12)),
            cut: Duration::from_secs(5),
            return_cut: Duration::from_millis(400),
            two_leaders: Duration::from_millis(250),
            changes: 2,
            bound: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_run_passes_only_with_both_cuts_within_the_bound_and_two_changes() {
        assert!(report().passed());
        let mut r = report();
        r.cut = Duration::from_secs(11);
        assert!(!r.passed());
        let mut r = report();
        r.changes = 4;
        assert!(!r.passed(), "flapping");
        let mut r = report();
        r.returned = None;
        assert!(!r.passed(), "the preferred leader never came back");
        let mut r = report();
        r.took_over = None;
        r.changes = 0;
        assert!(!r.passed());
        let mut text = String::new();
        report().render(&mut text);
        assert!(
            text.contains("b-2 took over 4.0s after the blackhole"),
            "{text}"
        );
        assert!(text.contains("cut off for 5.0s"), "{text}");
    }

    #[test]
    fn gaps_before_the_lift_count_for_the_break_and_after_it_for_the_return() {
        let started = Instant::now();
        let mut flow = Flow::new(
            "p".into(),
            "a".into(),
            "b".into(),
            "10.42.0.2".parse().unwrap(),
        );
        // 0.2 s pings: 25 lost from seq 11 (2 s in), 3 lost from seq 101 (20 s in).
        flow.gaps = vec![(11, 25), (101, 3)];
        let mut base = report();
        base.cut = Duration::ZERO;
        base.return_cut = Duration::ZERO;
        let t = Timeline {
            report: base,
            lifted: Some(started + Duration::from_secs(15)),
        };
        let r = finish(t, &[flow], started);
        assert_eq!(r.cut, Duration::from_secs(5));
        assert_eq!(r.return_cut, Duration::from_millis(600));
    }
}
