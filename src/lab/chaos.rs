//! `meshctl lab chaos`: one fault injected into a running lab while pod-to-pod pings run across
//! it, so anyone can watch the mesh survive it. Faults: SIGKILL and restart of one node's agent
//! (at once, or after it stayed stopped for a while), an outage of the lab's kube-apiserver
//! (`--registry kube`), or a node taken out of the nodes file and put back (every node after
//! it in the mesh's order is renumbered twice).
//!
//! Before the fault the lab must have converged and every flow must get answers; after it, the run waits until it converges
//! again: every running agent's WireGuard peers (keys and allowed IPs) are what the engine
//! computes for its node from the registry, and after an outage every agent has published a
//! heartbeat newer than the API server's return (it resynced). The underlay is captured for
//! the whole run. The report gives packets sent and lost and the longest gap per flow, and the
//! plaintext pod packets the underlay carried; it passes when no packet was lost, none crossed
//! the underlay unencrypted, and the mesh converged.
//!
//! Depends on the lab's state, agent, apiserver, check (ping summaries), uapi and sys modules,
//! and on the topology engine for the expected peers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::state::{LabState, ProcRef};
use super::{LabError, LabName, agent, apiserver, check, cluster_views, failover, sys, uapi};
use crate::agent::unix_now;
use crate::model::{NodeName, WgKey};
use crate::topology;

/// Interval between echo requests of each flow.
pub const PING_INTERVAL: &str = "0.2";
/// How long the pings run before the fault and after convergence.
const MARGIN: Duration = Duration::from_secs(2);

/// The fault to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the agent of this node, then start it again with the same arguments.
    RestartAgent(String),
    /// Stop the kube-apiserver for this long, then start it again.
    ApiServerOutage(Duration),
    /// SIGKILL the agent of this node, leave it stopped this long, then start it again.
    StopAgent(String, Duration),
    /// Take this node out of the nodes file, wait for the mesh to converge without it, then
    /// put it back (file registry): the nodes after it are renumbered, and back again.
    Renumber(String),
    /// Stop this location leader's forwarding until its location failed over, then let it
    /// forward again and wait for it to lead again; each cut of the location's pods must stay
    /// within the bound (see [`super::failover`]).
    LeaderBlackhole(String, Duration),
    /// Ask this node's agent to rotate its key (`wiremesh.io/rotate-key`, `--registry kube`)
    /// and wait until every agent uses the new one; no flow may go unanswered longer than the
    /// bound (about one handshake after the others learn the key).
    RotateKey(String, Duration),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::RestartAgent(n) => write!(f, "restart-agent {n}"),
            Fault::ApiServerOutage(d) => write!(f, "apiserver-outage {}s", d.as_secs()),
            Fault::StopAgent(n, d) => write!(f, "stop-agent {n} {}s", d.as_secs()),
            Fault::Renumber(n) => write!(f, "renumber {n}"),
            Fault::LeaderBlackhole(n, _) => write!(f, "leader-blackhole {n}"),
            Fault::RotateKey(n, _) => write!(f, "rotate-key {n}"),
        }
    }
}

/// One ping that ran across the fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The source pod's namespace.
    pub from_pod: String,
    /// The source pod's node.
    pub from_node: String,
    /// The target pod's node.
    pub to_node: String,
    /// The address pinged.
    pub to: IpAddr,
    /// Echo requests sent.
    pub sent: u32,
    /// Echo replies received.
    pub received: u32,
    /// The longest run of requests in a row without a reply.
    pub gap: u32,
    /// Every run of requests without a reply: its first sequence number and its length.
    pub gaps: Vec<(u32, u32)>,
}

impl Flow {
    /// A flow from pod `from_pod` on `from_node` to address `to` on `to_node`, not run yet.
    pub fn new(from_pod: String, from_node: String, to_node: String, to: IpAddr) -> Flow {
        Flow {
            from_pod,
            from_node,
            to_node,
            to,
            sent: 0,
            received: 0,
            gap: 0,
            gaps: Vec::new(),
        }
    }

    /// Requests without a reply.
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.received)
    }
}

/// What a chaos run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosReport {
    /// The fault.
    pub fault: Fault,
    /// What was done, in order, with times since the pings started.
    pub steps: Vec<String>,
    /// The pings.
    pub flows: Vec<Flow>,
    /// How long after the fault ended the mesh converged; `None`: it did not within the timeout.
    pub converged_after: Option<Duration>,
    /// What still differed when the timeout struck.
    pub divergence: Vec<String>,
    /// Pod (or mesh) packets the underlay carried unencrypted during the run.
    pub plaintext: Vec<check::Packet>,
    /// What a leader-blackhole run saw of the failover.
    pub failover: Option<failover::FailoverReport>,
}

impl ChaosReport {
    /// Requests lost over all flows.
    pub fn lost(&self) -> u32 {
        self.flows.iter().map(Flow::lost).sum()
    }

    /// No packet lost, none in plaintext on the underlay, every flow sent some, and the mesh
    /// converged. A leader blackhole loses packets by design: its failover must pass instead;
    /// a key rotation may lose what fits in its bound (no flow's longest gap above it).
    pub fn passed(&self) -> bool {
        let flows_ok = match (&self.failover, &self.fault) {
            (Some(f), _) => f.passed(),
            (None, Fault::RotateKey(_, bound)) => {
                self.flows.iter().all(|f| ping_interval() * f.gap <= *bound)
            }
            (None, _) => self.flows.iter().all(|f| f.lost() == 0),
        };
        self.converged_after.is_some()
            && self.plaintext.is_empty()
            && !self.flows.is_empty()
            && self.flows.iter().all(|f| f.sent > 0)
            && flows_ok
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = format!("chaos {}\n", self.fault);
        for s in &self.steps {
            let _ = writeln!(out, "  {s}");
        }
        let _ = writeln!(
            out,
            "\n  {:<44} {:>6} {:>6} {:>8}",
            "flow", "sent", "lost", "max gap"
        );
        for f in &self.flows {
            let name = format!("{} ({}) -> {} {}", f.from_pod, f.from_node, f.to_node, f.to);
            let gap = format!("{:.1}s", f64::from(f.gap) * ping_interval().as_secs_f64());
            let _ = writeln!(out, "  {name:<44} {:>6} {:>6} {gap:>8}", f.sent, f.lost());
        }
        let _ = writeln!(
            out,
            "\n  plaintext pod packets on the underlay: {}",
            self.plaintext.len()
        );
        for p in self.plaintext.iter().take(10) {
            let _ = writeln!(out, "    {p}");
        }
        let _ = writeln!(out);
        match self.converged_after {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "  converged {:.1}s after the fault ended",
                    d.as_secs_f64()
                );
            }
            None => {
                let _ = writeln!(out, "  NOT converged:");
                for d in &self.divergence {
                    let _ = writeln!(out, "    {d}");
                }
            }
        }
        if let Some(f) = &self.failover {
            f.render(&mut out);
        }
        if let Fault::RotateKey(_, bound) = &self.fault {
            let worst = self.flows.iter().map(|f| f.gap).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "  longest gap {:.1}s (bound {:.1}s)",
                (ping_interval() * worst).as_secs_f64(),
                bound.as_secs_f64()
            );
        }
        let sent: u32 = self.flows.iter().map(|f| f.sent).sum();
        let _ = writeln!(
            out,
            "  {}: {sent} packets sent, {} lost",
            if self.passed() { "passed" } else { "FAILED" },
            self.lost()
        );
        out
    }
}

/// [`PING_INTERVAL`] as a duration.
pub fn ping_interval() -> Duration {
    Duration::from_secs_f64(PING_INTERVAL.parse().unwrap_or(0.2))
}

/// The longest run of echo requests in a row without a reply, from ping's per-reply lines and
/// the number sent (`sent`, as [`stopped_ping_counts`] counts it).
pub fn longest_gap(text: &str, sent: u32) -> u32 {
    gaps(text, sent)
        .iter()
        .map(|&(_, len)| len)
        .max()
        .unwrap_or(0)
}

/// Every run of echo requests in a row without a reply: its first sequence number and length.
pub fn gaps(text: &str, sent: u32) -> Vec<(u32, u32)> {
    let mut answered: Vec<u32> = text
        .lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("DUP!"))
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .filter(|&seq| seq >= 1 && seq <= sent)
        .collect();
    answered.sort_unstable();
    answered.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for seq in answered.into_iter().chain(std::iter::once(sent + 1)) {
        if seq - last > 1 {
            out.push((last + 1, seq - last - 1));
        }
        last = seq;
    }
    out
}

/// Options of a chaos run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The fault.
    pub fault: Fault,
    /// How long to wait for convergence, before the fault and after it.
    pub timeout: Duration,
}

/// A ping running in a pod until stopped; killed on drop.
pub struct BackgroundPing {
    child: Child,
    flow: Flow,
    /// Reads ping's output as it comes (a long run would fill the pipe and stall ping).
    output: Option<std::thread::JoinHandle<String>>,
}

/// `(sent, received)` of a ping stopped by a signal, from its output (one line per reply, then
/// the summary). The last packet may still have been on its way when ping was stopped: if it
/// has no reply it counts as not sent rather than lost (on a loaded machine its reply can take
/// longer than the moment between the last send and the signal).
pub fn stopped_ping_counts(text: &str) -> (u32, u32) {
    let (sent, received) = check::parse_ping_summary(text).unwrap_or((0, 0));
    let last_answered = text
        .lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("DUP!"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next())
        .any(|seq| seq.parse::<u32>().ok() == Some(sent));
    if sent > 0 && !last_answered {
        (sent - 1, received.min(sent - 1))
    } else {
        (sent, received)
    }
}

impl BackgroundPing {
    /// Start pinging `flow.to` from `flow.from_pod`, every [`PING_INTERVAL`] seconds.
    pub fn start(flow: Flow) -> Result<BackgroundPing, LabError> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &flow.from_pod, "ping", "-n"])
            .args(["-i", PING_INTERVAL, &flow.to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn {
                program: "ip netns exec … ping".to_owned(),
                source,
            })?;
        let output = child.stdout.take().map(|mut o| {
            std::thread::spawn(move || {
                let mut out = String::new();
                let _ = std::io::Read::read_to_string(&mut o, &mut out);
                out
            })
        });
        Ok(BackgroundPing {
            child,
            flow,
            output,
        })
    }

    /// Whether the ping still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGINT (ping prints its summary), then count (see [`stopped_ping_counts`]).
    pub fn stop(mut self) -> Flow {
        // `ip netns exec` execs ping, so the child is ping itself.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let _ = self.child.wait();
        let out = self
            .output
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let (sent, received) = stopped_ping_counts(&out);
        let mut flow = self.flow.clone();
        flow.sent = sent;
        flow.received = received;
        flow.gaps = gaps(&out, sent);
        flow.gap = flow.gaps.iter().map(|&(_, len)| len).max().unwrap_or(0);
        flow
    }
}

impl Drop for BackgroundPing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first IPv4 pod address of each node (`None` for a node without pods).
fn first_pods(state: &LabState) -> Vec<Option<(String, IpAddr)>> {
    state
        .nodes
        .iter()
        .map(|n| {
            n.pods.iter().find_map(|p| {
                p.addrs()
                    .find(IpAddr::is_ipv4)
                    .map(|ip| (p.netns.clone(), ip))
            })
        })
        .collect()
}

/// The flows of a fault: from the restarted node's pod to every other node's pod, or a ring over
/// all nodes for an outage.
fn flows(state: &LabState, fault: &Fault) -> Vec<Flow> {
    let pods = first_pods(state);
    let flow = |from: usize, to: usize| -> Option<Flow> {
        let (from_pod, _) = pods.get(from)?.clone()?;
        let (_, ip) = pods.get(to)?.clone()?;
        Some(Flow::new(
            from_pod,
            state.nodes[from].name.clone(),
            state.nodes[to].name.clone(),
            ip,
        ))
    };
    let n = state.nodes.len();
    match fault {
        Fault::Renumber(node) => {
            // Every other node's pod to the first other node's pod, and that one to the last.
            let gone = state.node(node).map(|(i, _)| i);
            let others: Vec<usize> = (0..n).filter(|&j| Some(j) != gone).collect();
            let (Some(&first), Some(&last)) = (others.first(), others.last()) else {
                return Vec::new();
            };
            let mut v: Vec<Flow> = others[1..].iter().filter_map(|&j| flow(j, first)).collect();
            if last != first {
                v.extend(flow(first, last));
            }
            v
        }
        Fault::RestartAgent(node) | Fault::StopAgent(node, _) => match state.node(node) {
            Some((i, _)) => (0..n)
                .filter(|&j| j != i)
                .filter_map(|j| flow(i, j))
                .collect(),
            None => Vec::new(),
        },
        Fault::LeaderBlackhole(node, _) => failover::flows(state, node),
        Fault::RotateKey(node, _) => match state.node(node) {
            Some((i, _)) => (0..n)
                .filter(|&j| j != i)
                .flat_map(|j| [flow(i, j), flow(j, i)])
                .flatten()
                .collect(),
            None => Vec::new(),
        },
        Fault::ApiServerOutage(_) if n < 2 => Vec::new(),
        Fault::ApiServerOutage(_) => (0..n).filter_map(|i| flow(i, (i + 1) % n)).collect(),
    }
}

/// What differs between each running agent's WireGuard peers and the engine's desired peers for
/// its node (keys and allowed IPs); with `heartbeat_since`, also every agent whose published
/// last-seen is older. Empty when the lab has converged.
pub fn divergence(state: &LabState, heartbeat_since: Option<i64>) -> Result<Vec<String>, LabError> {
    divergence_without(state, heartbeat_since, None)
}

/// [`divergence`], leaving out node `absent` (taken out of the registry while its agent runs).
fn divergence_without(
    state: &LabState,
    heartbeat_since: Option<i64>,
    absent: Option<&str>,
) -> Result<Vec<String>, LabError> {
    let mut out = Vec::new();
    // Each node against its own cluster's mesh: its Nodes and its Peers (in a multi-cluster
    // lab, those the link keeps for the other clusters' segments).
    for view in cluster_views(state)? {
        let (loaded, opts) = (&view.nodes, &view.opts);
        let checked = topology::claims::check(&loaded.items, opts);
        let topo = topology::build_checked(&checked, &view.peers, opts);
        let members = state
            .nodes
            .iter()
            .filter(|n| state.spec.cluster_of(&n.name) == view.cluster);
        for n in members {
            divergence_of(n, loaded, &topo, opts, heartbeat_since, absent, &mut out);
        }
    }
    Ok(out)
}

/// What differs for node `n` (see [`divergence_without`]), appended to `out`.
fn divergence_of(
    n: &super::state::NodeState,
    loaded: &crate::registry::file::Loaded<crate::model::MeshNode>,
    topo: &topology::Topology<'_>,
    opts: &topology::MeshOptions,
    heartbeat_since: Option<i64>,
    absent: Option<&str>,
    out: &mut Vec<String>,
) {
    if !n.agent.as_ref().is_some_and(sys::is_running) || Some(n.name.as_str()) == absent {
        return;
    }
    if let Some(since) = heartbeat_since {
        let seen = loaded
            .items
            .iter()
            .find(|m| m.name.as_str() == n.name)
            .and_then(|m| m.last_seen);
        if seen.is_none_or(|s| s < since) {
            out.push(format!(
                "{}: no heartbeat since the API server returned",
                n.name
            ));
        }
    }
    let desired = match topo.local_state(&NodeName(n.name.clone()), opts) {
        Ok((d, _)) => d,
        Err(e) => {
            out.push(format!("{}: not in the mesh yet ({e})", n.name));
            return;
        }
    };
    let want: BTreeMap<WgKey, Vec<String>> = desired
        .peers
        .iter()
        .map(|p| (p.public_key, sorted(p.allowed_ips.iter())))
        .collect();
    let have: BTreeMap<WgKey, Vec<String>> =
        match uapi::get(&n.uapi_socket(), Duration::from_secs(2)) {
            Ok(dev) => dev
                .peers
                .iter()
                .map(|p| (p.public_key, sorted(p.allowed_ips.iter())))
                .collect(),
            Err(e) => {
                out.push(format!("{}: cannot read WireGuard: {e}", n.name));
                return;
            }
        };
    for (k, ips) in &want {
        match have.get(k) {
            None => out.push(format!("{}: peer {k} missing", n.name)),
            Some(h) if h != ips => out.push(format!(
                "{}: peer {k} has allowed IPs {} instead of {}",
                n.name,
                h.join(","),
                ips.join(",")
            )),
            Some(_) => {}
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        out.push(format!("{}: unexpected peer {k}", n.name));
    }
}

fn sorted<T: ToString>(v: impl Iterator<Item = T>) -> Vec<String> {
    let mut s: Vec<String> = v.map(|x| x.to_string()).collect();
    s.sort();
    s
}

/// Poll [`divergence`] until it is empty (`Ok(elapsed)`) or `timeout` passes (`Err(last)`).
fn wait_converged(
    root: &Path,
    lab: &LabName,
    heartbeat_since: Option<i64>,
    timeout: Duration,
) -> Result<Result<Duration, Vec<String>>, LabError> {
    wait_converged_without(root, lab, heartbeat_since, None, timeout)
}

/// [`wait_converged`], leaving out node `absent` (see [`divergence_without`]).
fn wait_converged_without(
    root: &Path,
    lab: &LabName,
    heartbeat_since: Option<i64>,
    absent: Option<&str>,
    timeout: Duration,
) -> Result<Result<Duration, Vec<String>>, LabError> {
    let t0 = Instant::now();
    loop {
        let state = super::load(root, lab)?;
        let d = divergence_without(&state, heartbeat_since, absent)?;
        if d.is_empty() {
            return Ok(Ok(t0.elapsed()));
        }
        if t0.elapsed() > timeout {
            return Ok(Err(d));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether `flow` gets an answer: up to 10 single pings, 2 s each.
fn flow_works(flow: &Flow) -> bool {
    (0..10).any(|_| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &flow.from_pod,
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
            ])
            .args(["-W", "2", &flow.to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The lines a log file got after byte `offset`.
fn log_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Run one fault on lab `lab` and report; `Err` only when the fault could not be run at all.
pub fn run(root: &Path, lab: &LabName, opts: &ChaosOptions) -> Result<ChaosReport, LabError> {
    let state = super::load(root, lab)?;
    match &opts.fault {
        Fault::Renumber(node) => {
            if state.apiserver.is_some() {
                return Err(LabError::Options(
                    "chaos renumber edits the nodes file: it needs a lab with the file registry"
                        .into(),
                ));
            }
            state
                .node(node)
                .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {node}")))?;
        }
        Fault::RestartAgent(node) | Fault::StopAgent(node, _) => {
            require_running_agent(&state, lab, node)?;
        }
        Fault::LeaderBlackhole(node, _) => failover::validate(&state, node)?,
        Fault::RotateKey(node, _) => {
            state.require_apiserver("chaos rotate-key")?;
            require_running_agent(&state, lab, node)?;
        }
        Fault::ApiServerOutage(_) => {
            let api = state.require_apiserver("chaos apiserver-outage")?;
            if !api.apiserver.as_ref().is_some_and(sys::is_running) {
                return Err(LabError::Options(
                    "the lab's kube-apiserver does not run".into(),
                ));
            }
        }
    }
    let planned = flows(&state, &opts.fault);
    if planned.is_empty() {
        return Err(LabError::Options(
            "no pod-to-pod flow to watch: the lab needs two nodes with pods".into(),
        ));
    }
    if let Err(d) = wait_converged(root, lab, None, opts.timeout)? {
        return Err(LabError::CheckFailed(format!(
            "the lab has not converged before the fault: {}",
            d.join("; ")
        )));
    }
    // Each flow must work before the fault: a fresh lab may not have had its first handshake
    // yet (a lost initiation is retried only after 5 s), which is no loss caused by the fault.
    for f in &planned {
        if !flow_works(f) {
            return Err(LabError::CheckFailed(format!(
                "{} ({}) does not reach {} on {} before the fault",
                f.from_pod, f.from_node, f.to, f.to_node
            )));
        }
    }
    let mut overlay = state.spec.pod_cidrs();
    overlay.push(state.spec.mesh_subnet);
    let capture = check::Capture::start(&state.underlay_ns)?;
    let mut pings = planned
        .into_iter()
        .map(BackgroundPing::start)
        .collect::<Result<Vec<_>, _>>()?;
    let t0 = Instant::now();
    let at = |what: String| format!("+{:>5.1}s {what}", t0.elapsed().as_secs_f64());
    let mut steps = Vec::new();
    std::thread::sleep(MARGIN);
    let mut timeline = None;
    let heartbeat_since = match &opts.fault {
        Fault::RotateKey(node, _) => {
            rotate_key(&state, node, opts.timeout, &mut steps, &at)?;
            None
        }
        Fault::LeaderBlackhole(node, bound) => {
            let converge = || Ok(wait_converged(root, lab, None, opts.timeout)?.is_ok());
            timeline = Some(failover::run(
                root,
                lab,
                &state,
                node,
                *bound,
                opts.timeout,
                &mut steps,
                &at,
                &converge,
            )?);
            None
        }
        Fault::RestartAgent(node) => {
            restart_agent(root, lab, node, None, opts.timeout, &mut steps, &at)?;
            None
        }
        Fault::StopAgent(node, down) => {
            restart_agent(root, lab, node, Some(*down), opts.timeout, &mut steps, &at)?;
            None
        }
        Fault::Renumber(node) => {
            let path = state.nodes_file();
            let original = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
                op: "read",
                path: path.clone(),
                source,
            })?;
            write_atomically(&path, &without_node(&original, node)?)?;
            steps.push(at(format!("{node} taken out of the nodes file")));
            let gone = wait_converged_without(root, lab, None, Some(node), opts.timeout)?;
            steps.push(at(match gone {
                Ok(_) => "converged without it".into(),
                Err(d) => format!("did not converge without it: {}", d.join("; ")),
            }));
            std::thread::sleep(MARGIN);
            write_atomically(&path, &original)?;
            steps.push(at(format!("{node} put back into the nodes file")));
            None
        }
        Fault::ApiServerOutage(d) => {
            apiserver::stop(root, lab)?;
            steps.push(at("kube-apiserver stopped".into()));
            std::thread::sleep(*d);
            apiserver::start(root, lab, opts.timeout)?;
            steps.push(at("kube-apiserver started and answering".into()));
            Some(unix_now())
        }
    };
    let converged = wait_converged(root, lab, heartbeat_since, opts.timeout)?;
    steps.push(at(match &converged {
        Ok(_) => "converged".into(),
        Err(_) => "gave up waiting for convergence".into(),
    }));
    std::thread::sleep(MARGIN);
    let flows: Vec<Flow> = pings.drain(..).map(BackgroundPing::stop).collect();
    let failover = timeline.map(|t| failover::finish(t, &flows, t0));
    // Let the last packets through the pipe before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let packets = check::parse_pcap(&capture.stop()?).map_err(LabError::Pcap)?;
    let tally = check::classify(&packets, &overlay, state.spec.port);
    let (converged_after, divergence) = match converged {
        Ok(d) => (Some(d), Vec::new()),
        Err(d) => (None, d),
    };
    Ok(ChaosReport {
        fault: opts.fault.clone(),
        steps,
        flows,
        converged_after,
        divergence,
        plaintext: tally.plaintext,
        failover,
    })
}

/// Refuse a fault on `node` unless it is a node of the lab whose agent runs.
fn require_running_agent(state: &LabState, lab: &LabName, node: &str) -> Result<(), LabError> {
    let (_, n) = state
        .node(node)
        .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {node}")))?;
    if !n.agent.as_ref().is_some_and(sys::is_running) {
        return Err(LabError::Options(format!(
            "the agent of node {node} does not run"
        )));
    }
    Ok(())
}

/// Ask `node`'s agent for a new key through the lab's API server and wait until it published
/// one (the run then waits for every agent to use it, as after any fault).
fn rotate_key(
    state: &LabState,
    node: &str,
    timeout: Duration,
    steps: &mut Vec<String>,
    at: &dyn Fn(String) -> String,
) -> Result<(), LabError> {
    use crate::agent::rotate;
    let api = state.require_apiserver_of("chaos rotate-key", node)?;
    let key_of = |nodes: &[k8s_openapi::api::core::v1::Node]| {
        nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node))
            .map(|n| {
                (
                    rotate::published_key(n).unwrap_or_default(),
                    rotate::done(n),
                )
            })
    };
    let (old, _) = key_of(&super::cluster::nodes(api)?).unwrap_or_default();
    let token = unix_now().to_string();
    super::cluster::annotate(
        api,
        node,
        &[(rotate::REQUEST.to_owned(), Some(token.clone()))],
    )?;
    steps.push(at(format!("{node}: {} {token}", rotate::REQUEST)));
    let t0 = Instant::now();
    loop {
        if let Some((new, Some(done))) = key_of(&super::cluster::nodes(api)?)
            && done == token
        {
            if new == old {
                return Err(LabError::CheckFailed(format!(
                    "{node} says it rotated its key, but still publishes {old}"
                )));
            }
            steps.push(at(format!(
                "{node} publishes its new key {new} (was {old})"
            )));
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(LabError::CheckFailed(format!(
                "{node} did not publish a new key within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The nodes file `text` without the item of node `name`.
fn without_node(text: &str, name: &str) -> Result<String, LabError> {
    let mut doc: serde_json::Value = crate::yaml::from_str(text)
        .map_err(|e| LabError::Options(format!("the lab's nodes file is not YAML: {e}")))?;
    let items = doc
        .get_mut("items")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or_else(|| LabError::Options("the lab's nodes file has no items".into()))?;
    let before = items.len();
    items.retain(|n| n["metadata"]["name"].as_str() != Some(name));
    if items.len() == before {
        return Err(LabError::Options(format!(
            "{name} is not in the nodes file"
        )));
    }
    crate::yaml::to_string(&doc)
        .map_err(|e| LabError::Options(format!("cannot write the nodes file: {e}")))
}

/// Replace `path` with `text` in one rename, as an operator's tool should (the agents never
/// read a half-written file).
fn write_atomically(path: &Path, text: &str) -> Result<(), LabError> {
    let tmp = path.with_extension("chaos.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| LabError::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        })
}

/// An agent killed and started again.
#[derive(Debug)]
pub struct Restarted {
    /// The killed agent.
    pub old: ProcRef,
    /// The new agent.
    pub new: ProcRef,
    /// The new agent's process (dropping it leaves the agent running).
    pub child: Child,
    /// Where the new agent's lines start in the node's agent log.
    pub log_offset: u64,
}

/// SIGKILL the agent of `node` and start it again with the lab's agent arguments, recording the
/// new agent in the lab's state. Waits for nothing else.
pub fn kill_and_restart(root: &Path, lab: &LabName, node: &str) -> Result<Restarted, LabError> {
    kill_and_restart_after(root, lab, node, None, |_| {})
}

/// [`kill_and_restart`], with the agent left stopped for `down` in between; `killed` is told
/// the old agent's PID once it is dead.
fn kill_and_restart_after(
    root: &Path,
    lab: &LabName,
    node: &str,
    down: Option<Duration>,
    mut killed: impl FnMut(u32),
) -> Result<Restarted, LabError> {
    let mut state = super::load(root, lab)?;
    let binary = agent::find_binary(state.agent_binary.as_deref())?;
    let (i, n) = state
        .node(node)
        .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {node}")))?;
    let old = n
        .agent
        .filter(sys::is_running)
        .ok_or_else(|| LabError::Options(format!("the agent of node {node} does not run")))?;
    let log_offset = std::fs::metadata(n.agent_log())
        .map(|m| m.len())
        .unwrap_or(0);
    kill(Pid::from_raw(old.pid as i32), Signal::SIGKILL).map_err(|e| {
        LabError::Options(format!(
            "cannot kill the agent of {node} ({}): {e}",
            old.pid
        ))
    })?;
    let t = Instant::now();
    while sys::is_running(&old) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed(old.pid);
    if let Some(d) = down {
        std::thread::sleep(d);
    }
    let (child, new) = agent::spawn(&state, &state.nodes[i], &binary, &state.agent_args)?;
    state.nodes[i].agent = Some(new);
    state.save()?;
    Ok(Restarted {
        old,
        new,
        child,
        log_offset,
    })
}

/// [`kill_and_restart`], then wait for the new agent's first reconciliation and note what it
/// did.
fn restart_agent(
    root: &Path,
    lab: &LabName,
    node: &str,
    down: Option<Duration>,
    timeout: Duration,
    steps: &mut Vec<String>,
    at: &dyn Fn(String) -> String,
) -> Result<(), LabError> {
    let mut r = kill_and_restart_after(root, lab, node, down, |pid| {
        steps.push(at(format!(
            "agent of {node} (pid {pid}) killed with SIGKILL"
        )));
    })?;
    if let Some(d) = down {
        steps.push(at(format!("(it stayed stopped for {}s)", d.as_secs())));
    }
    steps.push(at(format!(
        "agent of {node} started again (pid {})",
        r.new.pid
    )));
    let state = super::load(root, lab)?;
    let (i, n) = state
        .node(node)
        .ok_or_else(|| LabError::Options(format!("lab {lab} has no node {node}")))?;
    let log = n.agent_log();
    let t = Instant::now();
    loop {
        agent::check_alive(&state.nodes[i..=i], std::slice::from_mut(&mut r.child))?;
        let text = log_since(&log, r.log_offset);
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("first reconciliation done"))
        {
            let detail = line
                .split_once("first reconciliation done")
                .map_or("", |(_, rest)| rest.trim());
            steps.push(at(format!("its first reconciliation: {detail}")));
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(LabError::Timeout {
                what: format!("the first reconciliation of the restarted agent of {node}"),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLIES: &str = "PING 10.201.2.2 (10.201.2.2) 56(84) bytes of data.
64 bytes from 10.201.2.2: icmp_seq=1 ttl=62 time=0.41 ms
64 bytes from 10.201.2.2: icmp_seq=2 ttl=62 time=0.39 ms
";

    #[test]
    fn a_packet_still_in_flight_when_ping_stops_is_not_lost() {
        let out = format!(
            "{REPLIES}\n--- 10.201.2.2 ping statistics ---\n3 packets transmitted, 2 received, 33% packet loss, time 402ms\n"
        );
        assert_eq!(stopped_ping_counts(&out), (2, 2));
    }

    #[test]
    fn a_packet_lost_before_the_last_one_counts() {
        // No reply to 2; the last one (3) was answered.
        let out = REPLIES.replace("icmp_seq=2 ", "icmp_seq=3 ")
            + "\n--- 10.201.2.2 ping statistics ---\n3 packets transmitted, 2 received, 33% packet loss\n";
        assert_eq!(stopped_ping_counts(&out), (3, 2));
    }

    #[test]
    fn a_duplicate_reply_does_not_stand_for_the_last_packet() {
        let out = format!(
            "{REPLIES}64 bytes from 10.201.2.2: icmp_seq=3 ttl=62 time=0.40 ms (DUP!)\n\n--- 10.201.2.2 ping statistics ---\n3 packets transmitted, 2 received, +1 duplicates, 33% packet loss\n"
        );
        assert_eq!(stopped_ping_counts(&out), (2, 2));
    }

    fn flow(sent: u32, received: u32) -> Flow {
        Flow {
            from_pod: "wml-a-node1-pod1".into(),
            from_node: "node1".into(),
            to_node: "node2".into(),
            to: "10.42.1.2".parse().unwrap(),
            sent,
            received,
            gap: sent - received,
            gaps: vec![(received + 1, sent - received)],
        }
    }

    fn report(flows: Vec<Flow>, converged: bool) -> ChaosReport {
        ChaosReport {
            fault: Fault::ApiServerOutage(Duration::from_secs(90)),
            steps: vec!["+  2.0s kube-apiserver stopped".into()],
            flows,
            converged_after: converged.then(|| Duration::from_secs(3)),
            divergence: if converged {
                Vec::new()
            } else {
                vec!["node2: peer X missing".into()]
            },
            plaintext: Vec::new(),
            failover: None,
        }
    }

    #[test]
    fn a_run_passes_only_without_loss_and_with_convergence() {
        assert!(report(vec![flow(100, 100)], true).passed());
        assert!(!report(vec![flow(100, 99)], true).passed());
        assert!(!report(vec![flow(100, 100)], false).passed());
        assert!(
            !report(vec![flow(0, 0)], true).passed(),
            "a flow that sent nothing"
        );
        assert!(!report(Vec::new(), true).passed());
    }

    #[test]
    fn a_single_plaintext_packet_fails_the_run_and_is_named() {
        let mut r = report(vec![flow(100, 100)], true);
        assert!(r.passed());
        r.plaintext.push(check::Packet {
            src: "10.42.0.2".parse().unwrap(),
            dst: "10.42.1.2".parse().unwrap(),
            proto: 1,
            ports: None,
            wg_type: None,
        });
        assert!(!r.passed());
        let text = r.render();
        assert!(
            text.contains(
                "plaintext pod packets on the underlay: 1\n    10.42.0.2 > 10.42.1.2 icmp"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_longest_gap_is_the_longest_run_of_unanswered_requests() {
        let reply =
            |seq: u32| format!("64 bytes from 10.42.1.2: icmp_seq={seq} ttl=62 time=0.4 ms\n");
        let answered = |seqs: &[u32]| seqs.iter().map(|&s| reply(s)).collect::<String>();
        assert_eq!(longest_gap(&answered(&[1, 2, 3, 4]), 4), 0);
        assert_eq!(longest_gap(&answered(&[1, 5, 6, 9]), 10), 3);
        // Unanswered at the start and at the end count too.
        assert_eq!(longest_gap(&answered(&[4, 5]), 5), 3);
        assert_eq!(longest_gap(&answered(&[1]), 6), 5);
        assert_eq!(longest_gap("", 7), 7);
        // A duplicate does not stand for an answer.
        let dup = format!("{}{}", reply(1), reply(2).replace(" ms", " ms (DUP!)"));
        assert_eq!(longest_gap(&dup, 3), 2);
        // Each run where it starts, with its length.
        assert_eq!(
            gaps(&answered(&[1, 5, 6, 9]), 10),
            [(2, 3), (7, 2), (10, 1)]
        );
    }

    #[test]
    fn a_renumbered_nodes_file_loses_exactly_that_node() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- metadata:\n    name: node1\n- metadata:\n    name: node2\n- metadata:\n    name: node3\n";
        let out = without_node(text, "node2").unwrap();
        let doc: serde_json::Value = crate::yaml::from_str(&out).unwrap();
        let names: Vec<&str> = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["node1", "node3"]);
        assert!(without_node(text, "node9").is_err());
    }

    #[test]
    fn the_report_names_each_flow_its_losses_and_what_did_not_converge() {
        let r = report(vec![flow(500, 497), flow(500, 500)], false);
        let text = r.render();
        assert!(text.starts_with("chaos apiserver-outage 90s\n"), "{text}");
        assert!(
            text.contains("wml-a-node1-pod1 (node1) -> node2 10.42.1.2"),
            "{text}"
        );
        assert!(text.contains("   500      3     0.6s\n"), "{text}");
        assert!(
            text.contains("plaintext pod packets on the underlay: 0"),
            "{text}"
        );
        assert!(
            text.contains("NOT converged:\n    node2: peer X missing"),
            "{text}"
        );
        assert!(text.contains("FAILED: 1000 packets sent, 3 lost"), "{text}");
        assert_eq!(r.lost(), 3);
    }
}
