//! `lab check`: every pod pings every other pod and one pair of pods on different nodes moves
//! a few MiB over TCP both ways ([`super::bulk`]), while a capture on the underlay proves that
//! pod traffic crosses it only inside WireGuard.
//!
//! ```text
//! tcpdump -i any in the underlay namespace (every port of its bridge) ─┐
//! ping each pod pair both ways at once, about N pings at a time        │
//! bulk TCP between two pods on different nodes, both ways at once      ├─→ CheckReport
//! pcap → packets → tally: WireGuard (UDP :port) / pod- or mesh-addressed / other ┘
//! ```
//!
//! Why the bulk transfer: pings are small and pass a tunnel whose MTU does not fit the path;
//! full-size TCP segments do not (without the MSS clamp or a fitting MTU they stall).
//!
//! The capture sees every frame the underlay bridge forwards between nodes and NAT routers. A
//! packet whose source or destination lies in a pod CIDR or the mesh subnet is plaintext
//! overlay traffic on the underlay: the check fails on the first one. Traffic between two nodes
//! of one LAN never reaches the underlay (it is the location's private network, where wiremesh
//! sends plaintext by design with `--encapsulate never`). When some pair of pods sits in
//! different LANs, the capture must also have seen WireGuard packets, or it proved nothing.
//!
//! Each ping's first reply is timed, so the report says when every pair had answered once.
//!
//! Parsing and tallying are pure; [`check`] runs the processes. Depends on the state, `sys`
//! and `status` (table layout).

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::LabError;
use super::bulk::{self, Transfer};
use super::state::LabState;
use super::sys;
use crate::cli::table;

/// Echo replies wanted from each pair.
pub const PING_COUNT: u32 = 2;
/// Seconds each pair may take (`ping -w`): room for a first handshake that has to be retried
/// after WireGuard's rekey timeout (5 s plus up to 1/3 s of jitter), e.g. because the first
/// initiation reached a peer whose agent had not configured this node yet, and for initiations
/// that keep crossing until the agents break the tie (`agent::stall`: two rounds, 10 s, seen
/// through 2 s samples, then a new handshake). At 12 s a pair whose pings crossed twice failed
/// the check about once per CI run although the agents resolved it a second later.
pub const PING_DEADLINE_SECS: u32 = 20;
/// Bytes kept of each captured packet: link header, IP, UDP and WireGuard's type field.
pub const SNAPLEN: u32 = 128;

/// A pod as the check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Its node.
    pub node: String,
    /// Its namespace.
    pub netns: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Index of its node's LAN (pods of different LANs talk across the underlay).
    pub lan: usize,
    /// Its node's cluster (1-based; pairs of different clusters go through the link's Peers).
    pub cluster: usize,
}

/// The outcome of pinging one address from one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingResult {
    /// Index of the source pod.
    pub from: usize,
    /// Index of the target pod.
    pub to: usize,
    /// The address pinged.
    pub ip: IpAddr,
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Whether all [`PING_COUNT`] replies came in time.
    pub ok: bool,
    /// When the first reply came, counted from the start of the check's first ping.
    pub first_reply: Option<Duration>,
}

/// The pods of a lab, in node order.
pub fn pods(state: &LabState) -> Vec<Pod> {
    state
        .nodes
        .iter()
        .zip(&state.spec.nodes)
        .flat_map(|(n, s)| {
            n.pods.iter().map(move |p| Pod {
                node: n.name.clone(),
                netns: p.netns.clone(),
                ips: p.addrs().collect(),
                lan: s.lan,
                cluster: s.cluster,
            })
        })
        .collect()
}

/// One ping to run: source pod, target pod (indexes into the pods), the target's address.
pub type PingTarget = (usize, usize, IpAddr);

/// Every (from, to, address) to ping: each pod to each address of every other pod.
pub fn pairs(pods: &[Pod]) -> Vec<(usize, usize, IpAddr)> {
    let mut out = Vec::new();
    for from in 0..pods.len() {
        for (to, p) in pods.iter().enumerate() {
            if from != to {
                out.extend(p.ips.iter().map(|ip| (from, to, *ip)));
            }
        }
    }
    out
}

/// The bulk TCP transfers to run, as `(from, to, the target's address)` indexes into the pods,
/// per address family (IPv4 first): the first pair of pods in different LANs with addresses of
/// the family (so the transfer crosses the underlay), else on different nodes, one way and
/// back, each to the target's address of the family. Empty when every pod is on one node.
pub fn bulk_pairs(pods: &[Pod]) -> Vec<(usize, usize, IpAddr)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let addr = |i: usize| pods[i].ips.iter().copied().find(|ip| ip.is_ipv6() == v6);
        let all: Vec<usize> = (0..pods.len()).filter(|&i| addr(i).is_some()).collect();
        let find = |apart: &dyn Fn(&Pod, &Pod) -> bool| {
            all.iter().find_map(|&a| {
                all.iter()
                    .find(|&&b| apart(&pods[a], &pods[b]))
                    .map(|&b| (a, b))
            })
        };
        let pair = find(&|a, b| a.lan != b.lan).or_else(|| find(&|a, b| a.node != b.node));
        if let Some((a, b)) = pair
            && let (Some(to_b), Some(to_a)) = (addr(b), addr(a))
        {
            out.extend([(a, b, to_b), (b, a, to_a)]);
        }
    }
    out
}

/// The name of `ip`'s family, as the report writes it.
pub fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// `(transmitted, received)` from ping's summary line.
pub fn parse_ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u32>().ok());
    Some((nums.next()?, nums.next()?))
}

/// What one `ping` process reported.
struct PingOutcome {
    transmitted: u32,
    received: u32,
    ok: bool,
    first_reply: Option<Duration>,
}

/// Ping `ip` from pod namespace `netns`; the first reply's time is taken from `since`, when its
/// line comes out of ping.
fn ping(netns: &str, ip: IpAddr, since: Instant) -> PingOutcome {
    let failed = PingOutcome {
        transmitted: 0,
        received: 0,
        ok: false,
        first_reply: None,
    };
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-n", "-i", "0.5"])
        .args(["-c", &PING_COUNT.to_string()])
        .args(["-w", &PING_DEADLINE_SECS.to_string()])
        .arg(ip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(netns, %ip, error = %e, "cannot run ping");
            return failed;
        }
    };
    let mut first_reply = None;
    let mut text = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if first_reply.is_none() && line.contains(" bytes from ") {
                first_reply = Some(since.elapsed());
            }
            text.push_str(&line);
            text.push('\n');
        }
    }
    let success = child.wait().is_ok_and(|s| s.success());
    let (transmitted, received) = parse_ping_summary(&text).unwrap_or((0, 0));
    PingOutcome {
        transmitted,
        received,
        ok: success && received >= PING_COUNT,
        first_reply,
    }
}

/// The pairs grouped by the two pods they join: each group holds both directions (every
/// address of each pod pinged from the other), to be started at the same moment.
///
/// Both ends of a pair start their first handshake together, as nodes of a real cluster do
/// all the time. Crossed initiations are usually resolved by the next round, 5 s later
/// (REKEY_TIMEOUT); [`PING_DEADLINE_SECS`] leaves room for that. Two pings in step can make
/// the rounds cross again and again (docs/lab.md); the agent breaks that tie itself within
/// about two rounds (`agent::stall`).
pub fn meetings(pods: &[Pod]) -> Vec<Vec<PingTarget>> {
    let mut groups: std::collections::BTreeMap<(usize, usize), Vec<PingTarget>> =
        std::collections::BTreeMap::new();
    for (from, to, ip) in pairs(pods) {
        groups
            .entry((from.min(to), from.max(to)))
            .or_default()
            .push((from, to, ip));
    }
    groups.into_values().collect()
}

/// Ping every pair, each pod pair both ways at the same moment, about `parallel` pings at a
/// time (half as many pod pairs, at least one). Each result's first reply is timed from the
/// moment the first ping started.
pub fn ping_all(pods: &[Pod], parallel: usize) -> Vec<PingResult> {
    let work = meetings(pods);
    let parallel = parallel / 2;
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(pods.len() * pods.len()));
    let since = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, work.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(group) = work.get(i) else {
                        break;
                    };
                    // One thread per direction, released together.
                    let start = Barrier::new(group.len());
                    std::thread::scope(|g| {
                        for &(from, to, ip) in group {
                            let (start, results) = (&start, &results);
                            g.spawn(move || {
                                start.wait();
                                let o = ping(&pods[from].netns, ip, since);
                                let r = PingResult {
                                    from,
                                    to,
                                    ip,
                                    transmitted: o.transmitted,
                                    received: o.received,
                                    ok: o.ok,
                                    first_reply: o.first_reply,
                                };
                                if let Ok(mut v) = results.lock() {
                                    v.push(r);
                                }
                            });
                        }
                    });
                }
            });
        }
    });
    let mut v = results.into_inner().unwrap_or_default();
    v.sort_by_key(|r| (r.from, r.to, r.ip));
    v
}

/// The ping matrix: a row per source pod, a column per target address.
pub fn render_matrix(pods: &[Pod], results: &[PingResult]) -> String {
    let targets: Vec<(usize, IpAddr)> = pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.ips.iter().map(move |ip| (i, *ip)))
        .collect();
    let mut rows = Vec::with_capacity(pods.len() + 1);
    let mut header = vec!["FROM \\ TO".to_owned()];
    header.extend(targets.iter().map(|(_, ip)| ip.to_string()));
    rows.push(header);
    for (from, p) in pods.iter().enumerate() {
        let mut row = vec![format!("{} {}", p.node, p.netns)];
        for (to, ip) in &targets {
            let cell = if *to == from {
                "-".to_owned()
            } else {
                match results
                    .iter()
                    .find(|r| r.from == from && r.to == *to && r.ip == *ip)
                {
                    Some(r) if r.ok => format!("ok {}/{}", r.received, r.transmitted),
                    Some(r) => format!("LOSS {}/{}", r.received, r.transmitted),
                    None => "?".to_owned(),
                }
            };
            row.push(cell);
        }
        rows.push(row);
    }
    table(&rows)
}

/// One captured IP packet, as far as the check cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (17 UDP, 1 ICMP, …).
    pub proto: u8,
    /// Source and destination port (TCP and UDP, first fragment only).
    pub ports: Option<(u16, u16)>,
    /// The WireGuard message type (1–4) when the UDP payload starts like one.
    pub wg_type: Option<u8>,
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            1 => "icmp".to_owned(),
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            58 => "icmp6".to_owned(),
            p => format!("proto {p}"),
        };
        match self.ports {
            Some((s, d)) => write!(f, "{}:{s} > {}:{d} {proto}", self.src, self.dst),
            None => write!(f, "{} > {} {proto}", self.src, self.dst),
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Decode an IP packet (v4 or v6) far enough for [`Packet`].
fn parse_ip(b: &[u8]) -> Option<Packet> {
    let version = b.first()? >> 4;
    let (src, dst, proto, l4) = match version {
        4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let frag_offset = be16(b, 6)? & 0x1fff;
            let src = Ipv4Addr::new(*b.get(12)?, b[13], b[14], b[15]);
            let dst = Ipv4Addr::new(*b.get(16)?, b[17], b[18], b[19]);
            let l4 = if frag_offset == 0 { b.get(ihl..) } else { None };
            (IpAddr::V4(src), IpAddr::V4(dst), *b.get(9)?, l4)
        }
        6 => {
            let addr = |at: usize| -> Option<Ipv6Addr> {
                let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(a))
            };
            (
                IpAddr::V6(addr(8)?),
                IpAddr::V6(addr(24)?),
                *b.get(6)?,
                b.get(40..),
            )
        }
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(l4)) => Some((be16(l4, 0)?, be16(l4, 2)?)),
        _ => None,
    };
    let wg_type = match (proto, l4) {
        (17, Some(l4)) => match l4.get(8..12) {
            Some([t @ 1..=4, 0, 0, 0]) => Some(*t),
            _ => None,
        },
        _ => None,
    };
    Some(Packet {
        src,
        dst,
        proto,
        ports,
        wg_type,
    })
}

/// The IP packets in a pcap file (Ethernet, Linux cooked v1/v2 or raw IP link types);
/// non-IP frames are skipped.
pub fn parse_pcap(data: &[u8]) -> Result<Vec<Packet>, String> {
    let magic: [u8; 4] = data
        .get(0..4)
        .and_then(|m| m.try_into().ok())
        .ok_or("shorter than a pcap header")?;
    let big = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => return Err(format!("not a pcap file (magic {magic:02x?})")),
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let linktype = u32_at(20).ok_or("truncated pcap header")?;
    let mut out = Vec::new();
    let mut at = 24;
    while at < data.len() {
        let incl = u32_at(at + 8).ok_or("truncated record header")? as usize;
        let frame = data
            .get(at + 16..at + 16 + incl)
            .ok_or("truncated record")?;
        at += 16 + incl;
        let (ethertype, payload) = match linktype {
            1 => {
                let mut et = be16(frame, 12);
                let mut off = 14;
                if et == Some(0x8100) {
                    et = be16(frame, 16);
                    off = 18;
                }
                (et, frame.get(off..))
            }
            113 => (be16(frame, 14), frame.get(16..)),
            276 => (be16(frame, 0), frame.get(20..)),
            12 | 14 | 101 => (Some(0x0800), Some(frame)),
            other => return Err(format!("link type {other} is not supported")),
        };
        let is_ip = matches!(ethertype, Some(0x0800 | 0x86dd)) || matches!(linktype, 12 | 14 | 101);
        if let (true, Some(p)) = (is_ip, payload)
            && let Some(pkt) = parse_ip(p)
        {
            out.push(pkt);
        }
    }
    Ok(out)
}

/// The captured packets, sorted by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// IP packets seen.
    pub total: usize,
    /// WireGuard messages: UDP from or to the WireGuard port, payload shaped like WireGuard.
    pub wireguard: usize,
    /// Packets from or to a pod CIDR or the mesh subnet: overlay traffic in plaintext.
    pub plaintext: Vec<Packet>,
    /// Anything else (IPv6 neighbour discovery of the underlay links, other traffic between
    /// underlay addresses).
    pub other: Vec<Packet>,
}

/// Sort `packets`: plaintext overlay traffic (an address in `overlay`), WireGuard (UDP with
/// `port` on either side and a WireGuard message type), or other.
pub fn classify(packets: &[Packet], overlay: &[IpNetwork], port: u16) -> Tally {
    let mut t = Tally {
        total: packets.len(),
        ..Tally::default()
    };
    for p in packets {
        if overlay
            .iter()
            .any(|n| n.contains(p.src) || n.contains(p.dst))
        {
            t.plaintext.push(*p);
        } else if p.proto == 17
            && p.wg_type.is_some()
            && p.ports.is_some_and(|(s, d)| s == port || d == port)
        {
            t.wireguard += 1;
        } else {
            t.other.push(*p);
        }
    }
    t
}

/// A running `tcpdump` writing pcap to a pipe.
pub(super) struct Capture {
    child: Child,
    reader: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<String>,
}

impl Capture {
    /// Capture every interface of `netns` (`tcpdump -i any`), from when this returns.
    pub(super) fn start(netns: &str) -> Result<Capture, LabError> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", "any", "-n", "-U"])
            // Without immediate mode TPACKET_V3 holds packets in a ring block for up to a
            // second, and the ones still there when tcpdump is stopped are never written.
            .arg("--immediate-mode")
            .args(["-s", &SNAPLEN.to_string(), "-w", "-", "ip or ip6"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LabError::Spawn {
                program: "tcpdump".to_owned(),
                source,
            })?;
        let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(LabError::Pcap("tcpdump has no pipes".to_owned()));
        };
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let (tx, rx) = mpsc::channel::<String>();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        // tcpdump says "listening on any" once the capture runs.
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let said = stderr.join().unwrap_or_default();
                    return Err(LabError::Pcap(format!(
                        "tcpdump in {netns} did not start capturing: {}",
                        said.trim()
                    )));
                }
            }
        }
        Ok(Capture {
            child,
            reader,
            stderr,
        })
    }

    /// Stop the capture; the pcap bytes.
    pub(super) fn stop(mut self) -> Result<Vec<u8>, LabError> {
        // `ip netns exec` execs tcpdump: the child's PID is tcpdump's. SIGTERM flushes the file.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = self.child.wait();
        let data = self
            .reader
            .join()
            .map_err(|_| LabError::Pcap("the capture reader panicked".to_owned()))?;
        let said = self.stderr.join().unwrap_or_default();
        tracing::debug!(tcpdump = %said.trim(), "capture stopped");
        Ok(data)
    }
}

/// The `max` most frequent flows (`src > dst proto`, ports left out) among `packets`, most
/// frequent first.
fn flows(packets: &[Packet], max: usize) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for p in packets {
        let key = Packet { ports: None, ..*p }.to_string();
        *counts.entry(key).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(max);
    v
}

/// Everything `lab check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The pods.
    pub pods: Vec<Pod>,
    /// One result per pair.
    pub pings: Vec<PingResult>,
    /// Where the capture ran.
    pub capture_netns: String,
    /// The overlay ranges looked for on the underlay.
    pub overlay: Vec<IpNetwork>,
    /// The WireGuard port.
    pub port: u16,
    /// What the capture saw.
    pub tally: Tally,
    /// Whether some pair crosses the underlay (then WireGuard packets must have been seen).
    pub crosses_underlay: bool,
    /// Pairs of nodes whose traffic goes through a relay, as their WireGuard devices hold them
    /// after the pings: (node, peer, relay), each pair once.
    pub relayed: Vec<(String, String, String)>,
    /// The bulk TCP transfers ([`bulk_pairs`]); empty when every pod is on one node.
    pub bulk: Vec<Transfer>,
    /// Whether the lab has two clusters or more (the report then counts the pairs across them).
    pub multi_cluster: bool,
}

impl CheckReport {
    /// Pairs without all replies.
    pub fn losses(&self) -> usize {
        self.pings.iter().filter(|r| !r.ok).count()
    }

    /// Per address family the pings ran in (IPv4 first): its name, the pairs pinged and those
    /// without all replies.
    pub fn losses_by_family(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let of: Vec<&PingResult> = self.pings.iter().filter(|r| r.ip.is_ipv6() == v6).collect();
            if let Some(first) = of.first() {
                let lost = of.iter().filter(|r| !r.ok).count();
                out.push((family_name(&first.ip), of.len(), lost));
            }
        }
        out
    }

    /// The pairs whose pods are in different clusters, and those without all replies.
    pub fn cross_cluster(&self) -> (usize, usize) {
        let across: Vec<&PingResult> = self
            .pings
            .iter()
            .filter(|r| self.pods[r.from].cluster != self.pods[r.to].cluster)
            .collect();
        (across.len(), across.iter().filter(|r| !r.ok).count())
    }

    /// How long after the first ping every pair had answered at least once: the time to full
    /// connectivity, or `None` when some pair never answered.
    pub fn connected_after(&self) -> Option<Duration> {
        self.pings
            .iter()
            .map(|r| r.first_reply)
            .try_fold(Duration::ZERO, |max, t| Some(max.max(t?)))
    }

    /// Whether the capture saw WireGuard traffic when it had to.
    pub fn wireguard_seen(&self) -> bool {
        !self.crosses_underlay || self.tally.wireguard > 0
    }

    /// Whether every bulk transfer moved every byte in time.
    pub fn bulk_ok(&self) -> bool {
        self.bulk.iter().all(Transfer::ok)
    }

    /// Whether every pod reached every other, bulk TCP did not stall, and the underlay carried
    /// no plaintext pod packet.
    pub fn passed(&self) -> bool {
        self.losses() == 0
            && self.bulk_ok()
            && self.tally.plaintext.is_empty()
            && self.wireguard_seen()
    }

    /// The report as text: the matrix, then the underlay verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "reachability: {} pods, {} pairs, ping -c {PING_COUNT} -w {PING_DEADLINE_SECS} \
             from each pod to each other pod, both ways of a pair at the same moment",
            self.pods.len(),
            self.pings.len()
        );
        s.push_str(&render_matrix(&self.pods, &self.pings));
        match self.connected_after() {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "every pair answered within {:.1} s of the first ping",
                    t.as_secs_f64()
                );
            }
            None => {
                let _ = writeln!(s, "some pairs never answered");
            }
        }
        for (family, pairs, lost) in self.losses_by_family() {
            let _ = writeln!(
                s,
                "  {family}: {pairs} pairs, {lost} lost packets{}",
                if lost == 0 { "" } else { " (FAILED)" }
            );
        }
        if self.multi_cluster {
            let (pairs, lost) = self.cross_cluster();
            let _ = writeln!(
                s,
                "  across clusters: {pairs} pairs, {lost} lost packets{}; within clusters: {} \
                 pairs, {} lost packets",
                if lost == 0 { "" } else { " (FAILED)" },
                self.pings.len() - pairs,
                self.losses() - lost
            );
        }
        if self.bulk.is_empty() {
            let _ = writeln!(s, "\nbulk TCP: not run (every pod is on one node)");
        } else {
            let _ = writeln!(
                s,
                "\nbulk TCP: {} MiB each way at once, failing on {} s without progress or {} s in all",
                bulk::BYTES >> 20,
                bulk::STALL.as_secs(),
                bulk::DEADLINE.as_secs()
            );
            for t in &self.bulk {
                let _ = writeln!(s, "  {}", t.line());
            }
        }
        let ranges: Vec<String> = self.overlay.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "\nunderlay: captured every port of the underlay bridge ({}, tcpdump -i any) during \
             the pings{}: {} IP packets",
            self.capture_netns,
            if self.bulk.is_empty() {
                ""
            } else {
                " and the bulk transfers"
            },
            self.tally.total
        );
        let _ = writeln!(
            s,
            "  {} WireGuard messages (UDP, port {})",
            self.tally.wireguard, self.port
        );
        let _ = writeln!(
            s,
            "  {} packets from or to pod CIDRs or the mesh subnet{} ({})",
            self.tally.plaintext.len(),
            if self.multi_cluster { "s" } else { "" },
            ranges.join(", ")
        );
        for (flow, n) in flows(&self.tally.plaintext, 10) {
            let _ = writeln!(s, "    plaintext on the underlay: {flow} ({n}×)");
        }
        let _ = writeln!(s, "  {} other packets", self.tally.other.len());
        for (flow, n) in flows(&self.tally.other, 5) {
            let _ = writeln!(s, "    {flow} ({n}×)");
        }
        if self.relayed.is_empty() {
            let _ = writeln!(
                s,
                "\nrelays: none (every pair of leaders reaches each other directly)"
            );
        } else {
            let _ = writeln!(
                s,
                "\nrelays: {} pair(s) of leaders cannot reach each other directly",
                self.relayed.len()
            );
            for (a, b, via) in &self.relayed {
                let _ = writeln!(s, "  {a} <-> {b} through {via}");
            }
        }
        let verdict = |ok: bool| if ok { "ok" } else { "FAILED" };
        let _ = writeln!(
            s,
            "\nresult: reachability {} ({} of {} pairs lost packets{}{}); bulk TCP {}; no \
             plaintext pod packets on the underlay {}; WireGuard seen on the underlay {}",
            verdict(self.losses() == 0),
            self.losses(),
            self.pings.len(),
            self.losses_by_family()
                .iter()
                .map(|(family, pairs, lost)| format!("; {family} {lost} of {pairs}"))
                .collect::<String>(),
            if self.multi_cluster {
                let (pairs, lost) = self.cross_cluster();
                format!("; across clusters {lost} of {pairs}")
            } else {
                String::new()
            },
            if self.bulk.is_empty() {
                "not run"
            } else {
                verdict(self.bulk_ok())
            },
            verdict(self.tally.plaintext.is_empty()),
            if self.crosses_underlay {
                verdict(self.tally.wireguard > 0)
            } else {
                "not needed (all pods in one LAN)"
            }
        );
        s
    }
}

/// Ping every pod from every pod while capturing on the underlay.
pub fn check(state: &LabState, parallel: usize) -> Result<CheckReport, LabError> {
    sys::require_root()?;
    sys::require_tools(&[sys::IP, sys::PING, sys::TCPDUMP])?;
    let pods = pods(state);
    let with_ips = pods.iter().filter(|p| !p.ips.is_empty()).count();
    if with_ips < 2 {
        return Err(LabError::Options(format!(
            "lab {} has {with_ips} pods with an address; check needs two or more (started with \
             --no-agents or --pods 0?)",
            state.name
        )));
    }
    let crosses_underlay = pods.iter().any(|a| {
        pods.iter()
            .any(|b| a.lan != b.lan && !a.ips.is_empty() && !b.ips.is_empty())
    });
    let mut overlay = state.spec.pod_cidrs();
    overlay.extend(state.spec.mesh_subnets());
    let capture = Capture::start(&state.underlay_ns)?;
    let pings = ping_all(&pods, parallel);
    let transfers: Vec<(String, String, IpAddr)> = bulk_pairs(&pods)
        .into_iter()
        .map(|(a, b, ip)| (pods[a].netns.clone(), pods[b].netns.clone(), ip))
        .collect();
    let bulk = bulk::transfer_all(&transfers);
    // Let the last packets through the pipe before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let data = capture.stop()?;
    let packets = parse_pcap(&data).map_err(LabError::Pcap)?;
    Ok(CheckReport {
        tally: classify(&packets, &overlay, state.spec.port),
        pods,
        pings,
        capture_netns: state.underlay_ns.clone(),
        overlay,
        port: state.spec.port,
        crosses_underlay,
        relayed: relayed(state),
        bulk,
        multi_cluster: state.spec.multi_cluster(),
    })
}

/// The relayed pairs as the nodes' WireGuard devices hold them: a peer of a node without
/// allowed IPs while another peer holds that peer's pod CIDR. Each pair once, sorted.
pub fn relayed(state: &LabState) -> Vec<(String, String, String)> {
    let by_key: std::collections::BTreeMap<String, &str> = state
        .nodes
        .iter()
        .filter_map(|n| Some((n.public_key.clone()?, n.name.as_str())))
        .collect();
    let devices: Vec<(&str, super::uapi::WgDevice)> = state
        .nodes
        .iter()
        .filter_map(|n| {
            let dev = super::uapi::get(&n.uapi_socket(), Duration::from_secs(2)).ok()?;
            Some((n.name.as_str(), dev))
        })
        .collect();
    let mut out = std::collections::BTreeSet::new();
    for (node, dev) in &devices {
        for p in dev.peers.iter().filter(|p| p.allowed_ips.is_empty()) {
            let Some(&peer) = by_key.get(&p.public_key.to_string()) else {
                continue;
            };
            let Some(cidr) = state
                .spec
                .nodes
                .iter()
                .find(|n| n.name == peer)
                .and_then(|n| n.pod_cidrs.first())
            else {
                continue;
            };
            let via = dev
                .peers
                .iter()
                .find(|q| q.allowed_ips.contains(cidr))
                .and_then(|q| by_key.get(&q.public_key.to_string()));
            if let Some(via) = via {
                let (a, b) = if *node < peer {
                    (*node, peer)
                } else {
                    (peer, *node)
                };
                out.insert((a.to_owned(), b.to_owned(), (*via).to_owned()));
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pod(node: &str, ns: &str, ip: &str, lan: usize) -> Pod {
        Pod {
            node: node.into(),
            netns: ns.into(),
            ips: vec![ip.parse().unwrap()],
            lan,
            cluster: 1,
        }
    }

    fn ipv4_udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0, 0, 0, 0]);
        p.extend(payload);
        p
    }

    fn ipv4_icmp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend([8, 0, 0, 0, 0, 1, 0, 1]);
        p
    }

    /// An IPv6 packet: fixed header (next header `proto`), then `l4`.
    fn ipv6(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend(u16::try_from(l4.len()).unwrap().to_be_bytes());
        p.extend([proto, 64]);
        p.extend(src.parse::<Ipv6Addr>().unwrap().octets());
        p.extend(dst.parse::<Ipv6Addr>().unwrap().octets());
        p.extend(l4);
        p
    }

    fn ipv6_udp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend(sport.to_be_bytes());
        udp.extend(dport.to_be_bytes());
        udp.extend([0, 0, 0, 0]);
        udp.extend(payload);
        ipv6(src, dst, 17, &udp)
    }

    /// A little-endian pcap with Linux cooked v2 framing, as `tcpdump -i any` writes.
    fn pcap_sll2(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut f = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        f.extend([0; 8]);
        f.extend(65535u32.to_le_bytes());
        f.extend(276u32.to_le_bytes());
        for p in packets {
            let ethertype: [u8; 2] = if p[0] >> 4 == 6 {
                [0x86, 0xdd]
            } else {
                [0x08, 0x00]
            };
            let mut frame = ethertype.to_vec();
            frame.extend([0, 0, 0, 0, 0, 3, 0, 1, 0, 6]);
            frame.extend([0; 8]);
            frame.extend(p);
            let len = u32::try_from(frame.len()).unwrap();
            f.extend([0; 8]);
            f.extend(len.to_le_bytes());
            f.extend(len.to_le_bytes());
            f.extend(frame);
        }
        f
    }

    #[test]
    fn ping_summary_is_parsed() {
        let out = "--- 10.42.1.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 1002ms\n";
        assert_eq!(parse_ping_summary(out), Some((3, 2)));
        let out = "5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4004ms";
        assert_eq!(parse_ping_summary(out), Some((5, 0)));
        assert_eq!(
            parse_ping_summary("ping: connect: Network is unreachable"),
            None
        );
    }

    #[test]
    fn every_pod_pings_every_other_pods_addresses() {
        let pods = vec![
            pod("a", "p1", "10.42.0.2", 0),
            pod("b", "p2", "10.42.1.2", 1),
            pod("c", "p3", "10.42.2.2", 2),
        ];
        let p = pairs(&pods);
        assert_eq!(p.len(), 6);
        assert!(p.iter().all(|(f, t, _)| f != t));
    }

    #[test]
    fn each_meeting_holds_both_ways_of_one_pod_pair_and_together_they_ping_every_pair() {
        let mut b = pod("b", "p1", "10.42.1.2", 1);
        b.ips.push("fd00::2".parse().unwrap());
        let pods = vec![
            b,
            pod("a", "p2", "10.42.0.2", 0),
            pod("a", "p3", "10.42.0.3", 0),
            pod("c", "p4", "10.42.2.2", 2),
        ];
        let meetings = meetings(&pods);
        assert_eq!(meetings.len(), 6, "one per unordered pod pair");
        for m in &meetings {
            let ends: BTreeSet<(usize, usize)> =
                m.iter().map(|&(f, t, _)| (f.min(t), f.max(t))).collect();
            assert_eq!(ends.len(), 1, "one pod pair per meeting: {m:?}");
            let (x, y) = *ends.first().unwrap();
            assert!(m.iter().any(|&(f, t, _)| (f, t) == (x, y)), "{m:?}");
            assert!(m.iter().any(|&(f, t, _)| (f, t) == (y, x)), "{m:?}");
        }
        // Pod 0 has two addresses: its meetings ping both of them.
        let with_b = meetings
            .iter()
            .find(|m| m.iter().any(|&(f, t, _)| (f, t) == (1, 0)));
        assert_eq!(with_b.unwrap().len(), 3);
        let mut all: Vec<_> = meetings.concat();
        all.sort();
        let mut want = pairs(&pods);
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn matrix_marks_loss_and_the_diagonal() {
        let pods = vec![
            pod("a", "p1", "10.42.0.2", 0),
            pod("b", "p2", "10.42.1.2", 1),
        ];
        let pings = vec![
            PingResult {
                from: 0,
                to: 1,
                ip: "10.42.1.2".parse().unwrap(),
                transmitted: 2,
                received: 2,
                ok: true,
                first_reply: Some(Duration::from_millis(300)),
            },
            PingResult {
                from: 1,
                to: 0,
                ip: "10.42.0.2".parse().unwrap(),
                transmitted: 10,
                received: 0,
                ok: false,
                first_reply: None,
            },
        ];
        let m = render_matrix(&pods, &pings);
        assert_eq!(
            m,
            "FROM \\ TO  10.42.0.2  10.42.1.2\n\
             a p1       -          ok 2/2\n\
             b p2       LOSS 0/10  -\n"
        );
    }

    #[test]
    fn pcap_packets_are_sorted_into_wireguard_plaintext_and_other() {
        let wg_init = [1, 0, 0, 0, 9, 9];
        let packets = vec![
            ipv4_udp([10, 200, 0, 1], [10, 200, 0, 2], 51820, 51820, &wg_init),
            ipv4_udp(
                [10, 200, 0, 3],
                [10, 200, 0, 1],
                40000,
                51820,
                &[4, 0, 0, 0],
            ),
            ipv4_icmp([10, 42, 0, 2], [10, 42, 1, 2]),
            ipv4_icmp([10, 200, 0, 1], [10, 200, 0, 2]),
            ipv4_udp([10, 200, 0, 1], [10, 200, 0, 2], 53, 51820, b"hello"),
        ];
        let parsed = parse_pcap(&pcap_sll2(&packets)).unwrap();
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[0].wg_type, Some(1));
        let overlay: Vec<IpNetwork> = vec![
            "10.42.0.0/16".parse().unwrap(),
            "10.4.0.0/16".parse().unwrap(),
        ];
        let t = classify(&parsed, &overlay, 51820);
        assert_eq!(t.total, 5);
        assert_eq!(t.wireguard, 2);
        assert_eq!(t.plaintext.len(), 1);
        assert_eq!(t.plaintext[0].to_string(), "10.42.0.2 > 10.42.1.2 icmp");
        assert_eq!(
            t.other.len(),
            2,
            "plain ICMP and non-WireGuard UDP are other"
        );
    }

    #[test]
    fn ipv6_wireguard_is_wireguard_and_ipv6_pod_or_mesh_packets_are_plaintext() {
        let wg_data = [4, 0, 0, 0, 1, 2, 3];
        let echo = [128, 0, 0, 0, 0, 1, 0, 1];
        let packets = vec![
            ipv6_udp("fd00:200::1", "fd00:200::2", 51820, 51820, &wg_data),
            ipv6_udp("fd00:200::3", "fd00:200::1", 51820, 51820, &[1, 0, 0, 0]),
            ipv6("fd00:201:0:1::2", "fd00:201:0:2::2", 58, &echo),
            ipv6("fd00:4::1", "fd00:4::2", 58, &echo),
            ipv6_udp("fd00:200::1", "fd00:200::2", 53, 51820, b"hello"),
            ipv6("fe80::1", "ff02::2", 58, &[133, 0, 0, 0]),
            ipv4_udp([10, 200, 0, 1], [10, 200, 0, 2], 51820, 51820, &wg_data),
        ];
        let parsed = parse_pcap(&pcap_sll2(&packets)).unwrap();
        assert_eq!(parsed.len(), 7);
        assert_eq!(parsed[0].wg_type, Some(4));
        assert_eq!(parsed[0].ports, Some((51820, 51820)));
        let overlay: Vec<IpNetwork> = vec![
            "10.42.0.0/16".parse().unwrap(),
            "fd00:201:0:1::/64".parse().unwrap(),
            "fd00:201:0:2::/64".parse().unwrap(),
            "fd00:4::/64".parse().unwrap(),
        ];
        let t = classify(&parsed, &overlay, 51820);
        assert_eq!(t.wireguard, 3, "WireGuard over IPv6 and over IPv4 UDP");
        let plain: Vec<String> = t.plaintext.iter().map(ToString::to_string).collect();
        assert_eq!(
            plain,
            [
                "fd00:201:0:1::2 > fd00:201:0:2::2 icmp6",
                "fd00:4::1 > fd00:4::2 icmp6"
            ]
        );
        assert_eq!(
            t.other.len(),
            2,
            "non-WireGuard UDP and router solicitation"
        );
    }

    /// A report on `pods` in different LANs without pings yet: 8 packets on the underlay, all
    /// WireGuard.
    fn crossing_report(pods: Vec<Pod>) -> CheckReport {
        CheckReport {
            pods,
            pings: vec![],
            capture_netns: "wml-wm-ul".into(),
            overlay: vec![],
            port: 51820,
            tally: Tally {
                total: 8,
                wireguard: 8,
                ..Tally::default()
            },
            crosses_underlay: true,
            relayed: Vec::new(),
            bulk: vec![],
            multi_cluster: false,
        }
    }

    #[test]
    fn a_two_cluster_report_counts_the_pairs_across_clusters_and_their_losses() {
        let mut pods = vec![
            pod("a", "p1", "10.201.1.2", 0),
            pod("b", "p2", "10.201.2.2", 0),
            pod("c", "p3", "10.201.3.2", 1),
        ];
        pods[2].cluster = 2;
        let mut r = crossing_report(pods);
        r.multi_cluster = true;
        let ping = |from: usize, to: usize, ok: bool| PingResult {
            from,
            to,
            ip: r.pods[to].ips[0],
            transmitted: 2,
            received: if ok { 2 } else { 0 },
            ok,
            first_reply: ok.then_some(Duration::from_millis(100)),
        };
        r.pings = vec![
            ping(0, 1, true),
            ping(1, 0, true),
            ping(0, 2, true),
            ping(2, 0, false),
            ping(1, 2, true),
            ping(2, 1, true),
        ];
        assert_eq!(r.cross_cluster(), (4, 1));
        let text = r.render();
        assert!(
            text.contains(
                "across clusters: 4 pairs, 1 lost packets (FAILED); within clusters: 2 pairs, \
                 0 lost packets"
            ),
            "{text}"
        );
        assert!(text.contains("; across clusters 1 of 4)"), "{text}");
        assert!(!r.passed());
        r.multi_cluster = false;
        assert!(
            !r.render().contains("across clusters"),
            "one cluster: no such line"
        );
    }

    /// Two dual-stack pods on nodes in different LANs.
    fn dual_stack_pods() -> Vec<Pod> {
        let mut a = pod("a", "p1", "10.42.0.2", 0);
        a.ips.push("fd00:201:0:1::2".parse().unwrap());
        let mut b = pod("b", "p2", "10.42.1.2", 1);
        b.ips.push("fd00:201:0:2::2".parse().unwrap());
        vec![a, b]
    }

    #[test]
    fn bulk_pairs_run_once_per_family_to_the_targets_address_of_that_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            bulk_pairs(&dual_stack_pods()),
            vec![
                (0, 1, ip("10.42.1.2")),
                (1, 0, ip("10.42.0.2")),
                (0, 1, ip("fd00:201:0:2::2")),
                (1, 0, ip("fd00:201:0:1::2")),
            ]
        );
        assert_eq!(
            bulk_pairs(&[
                pod("a", "p1", "fd00:201:0:1::2", 0),
                pod("b", "p2", "fd00:201:0:2::2", 1)
            ]),
            vec![(0, 1, ip("fd00:201:0:2::2")), (1, 0, ip("fd00:201:0:1::2"))],
            "IPv6 only"
        );
    }

    #[test]
    fn report_counts_each_family_apart_and_fails_on_loss_in_one() {
        let ping = |from, to, ip: &str, ok: bool| PingResult {
            from,
            to,
            ip: ip.parse().unwrap(),
            transmitted: 2,
            received: if ok { 2 } else { 0 },
            ok,
            first_reply: ok.then_some(Duration::from_millis(10)),
        };
        let mut r = CheckReport {
            pings: vec![
                ping(0, 1, "10.42.1.2", true),
                ping(0, 1, "fd00:201:0:2::2", true),
                ping(1, 0, "10.42.0.2", true),
                ping(1, 0, "fd00:201:0:1::2", true),
            ],
            ..crossing_report(dual_stack_pods())
        };
        assert_eq!(r.losses_by_family(), vec![("IPv4", 2, 0), ("IPv6", 2, 0)]);
        let text = r.render();
        assert!(r.passed(), "{text}");
        assert!(text.contains("  IPv4: 2 pairs, 0 lost packets\n"), "{text}");
        assert!(text.contains("  IPv6: 2 pairs, 0 lost packets\n"), "{text}");
        assert!(
            text.contains("reachability ok (0 of 4 pairs lost packets; IPv4 0 of 2; IPv6 0 of 2)"),
            "{text}"
        );
        r.pings[3] = ping(1, 0, "fd00:201:0:1::2", false);
        let text = r.render();
        assert!(!r.passed());
        assert!(
            text.contains("  IPv6: 2 pairs, 1 lost packets (FAILED)"),
            "{text}"
        );
        assert!(
            text.contains(
                "reachability FAILED (1 of 4 pairs lost packets; IPv4 0 of 2; IPv6 1 of 2)"
            ),
            "{text}"
        );
    }

    #[test]
    fn bad_pcap_is_refused() {
        assert!(parse_pcap(b"").is_err());
        assert!(parse_pcap(&[0u8; 24]).is_err());
        let mut truncated = pcap_sll2(&[ipv4_icmp([1, 1, 1, 1], [2, 2, 2, 2])]);
        truncated.truncate(truncated.len() - 3);
        assert!(parse_pcap(&truncated).is_err());
        assert_eq!(parse_pcap(&pcap_sll2(&[])).unwrap(), vec![]);
    }

    #[test]
    fn report_fails_on_loss_plaintext_or_missing_wireguard() {
        let pods = vec![
            pod("a", "p1", "10.42.0.2", 0),
            pod("b", "p2", "10.42.1.2", 1),
        ];
        let ok = |from, to, ip: &str, ms| PingResult {
            from,
            to,
            ip: ip.parse().unwrap(),
            transmitted: 2,
            received: 2,
            ok: true,
            first_reply: Some(Duration::from_millis(ms)),
        };
        let mut r = CheckReport {
            pings: vec![ok(0, 1, "10.42.1.2", 5300), ok(1, 0, "10.42.0.2", 40)],
            overlay: vec!["10.42.0.0/16".parse().unwrap()],
            ..crossing_report(pods)
        };
        assert!(r.passed(), "{}", r.render());
        assert!(
            r.render()
                .contains("no plaintext pod packets on the underlay ok")
        );
        assert_eq!(r.connected_after(), Some(Duration::from_millis(5300)));
        assert!(
            r.render()
                .contains("every pair answered within 5.3 s of the first ping")
        );
        r.tally.wireguard = 0;
        assert!(
            !r.passed(),
            "no WireGuard seen although pods talk across the underlay"
        );
        r.crosses_underlay = false;
        assert!(r.passed());
        r.tally
            .plaintext
            .push(parse_ip(&ipv4_icmp([10, 42, 0, 2], [10, 42, 1, 2])).unwrap());
        assert!(!r.passed());
        assert!(
            r.render()
                .contains("plaintext on the underlay: 10.42.0.2 > 10.42.1.2 icmp")
        );
        r.pings[0].first_reply = None;
        r.pings[0].ok = false;
        assert_eq!(r.connected_after(), None);
        assert!(r.render().contains("some pairs never answered"));
        assert!(r.render().contains("relays: none"));
        r.relayed = vec![("node3".into(), "node4".into(), "node1".into())];
        assert!(r.render().contains("relays: 1 pair(s)"));
        assert!(r.render().contains("  node3 <-> node4 through node1\n"));
    }

    #[test]
    fn a_stalled_bulk_transfer_fails_the_check() {
        let transfer = |received| Transfer {
            from: "p1".into(),
            to: "p2".into(),
            addr: "10.42.1.2".parse().unwrap(),
            received,
            elapsed: Duration::from_millis(200),
            error: (received < bulk::BYTES).then(|| "receiving stalled".to_owned()),
        };
        let mut r = CheckReport {
            pods: vec![pod("a", "p1", "10.42.0.2", 0)],
            pings: vec![],
            capture_netns: "wml-wm-ul".into(),
            overlay: vec![],
            port: 51820,
            tally: Tally::default(),
            crosses_underlay: false,
            relayed: Vec::new(),
            bulk: vec![transfer(bulk::BYTES), transfer(bulk::BYTES)],
            multi_cluster: false,
        };
        assert!(r.passed(), "{}", r.render());
        assert!(r.render().contains("bulk TCP ok"), "{}", r.render());
        r.bulk[1] = transfer(12_000);
        assert!(!r.passed());
        let text = r.render();
        assert!(text.contains("bulk TCP FAILED"), "{text}");
        assert!(text.contains("p1 → p2 (IPv4 10.42.1.2): STALLED"), "{text}");
        r.bulk.clear();
        assert!(r.render().contains("bulk TCP not run"));
    }

    #[test]
    fn bulk_pairs_cross_the_underlay_when_they_can_then_nodes_and_go_both_ways() {
        let pods = vec![
            pod("a", "p1", "10.42.0.2", 0),
            pod("a", "p2", "10.42.0.3", 0),
            pod("b", "p3", "10.42.1.2", 0),
            pod("c", "p4", "10.42.2.2", 1),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            bulk_pairs(&pods),
            vec![(0, 3, ip("10.42.2.2")), (3, 0, ip("10.42.0.2"))]
        );
        assert_eq!(
            bulk_pairs(&pods[..3]),
            vec![(0, 2, ip("10.42.1.2")), (2, 0, ip("10.42.0.2"))],
            "one LAN: pods of two nodes"
        );
        assert_eq!(bulk_pairs(&pods[..2]), vec![], "one node");
    }
}
