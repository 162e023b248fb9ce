//! A scale harness: one real `wiremesh agent` against a real kube-apiserver that holds
//! thousands of synthetic Nodes, a stream of changes at a set rate, and the agent's kernel
//! compared with what `meshctl plan` computes from the same API server.
//!
//! Used by the `scale_kube` tests (a few hundred nodes, in CI) and by
//! `examples/scale_load.rs` (5,000 nodes, run by `benches/scale.sh`), which includes this file
//! by path: it depends on crates and the library only, never on the other test helpers. It
//! reuses the lab's API server pieces (`wiremesh::lab::apiserver`, `lab::cluster`: PKI, etcd,
//! kube-apiserver, Peer CRD and RBAC from `manifests/`) and its UAPI reader.
//!
//! ```text
//! wmsc-<pid>-<n>-api  eth0 10.97.0.1/24 ──veth── wmsc-<pid>-<n>-ag  eth0 10.97.0.2/24
//!   etcd 127.0.0.1:2379                          wiremesh agent --kubeconfig (node "agent"),
//!   kube-apiserver https://10.97.0.1:6443          wireguard-go wiremesh0, CNI bridge, nft
//!   the load generator and meshctl plan          no default route
//!   (a thread that enters the namespace)
//! ```
//!
//! Nothing leaves these two namespaces: the synthetic nodes' endpoints are TEST-NET-1/2/3
//! addresses (RFC 5737), unroutable from the agent's namespace, which has no default route, and
//! no peer has a persistent keepalive (the agent's own Node sets none), so WireGuard never sends
//! to them. Every file (etcd's data too) lives in one temporary directory, on `/dev/shm` when
//! there is one (etcd's fsyncs then cost nothing: the agent is measured, not the disk).
//!
//! The cluster: nodes `node-00000`… in locations `loc-0000`… (`per_location` each), every one
//! with a key, endpoint, internal IP (annotations, as their agents would publish them) and a /24
//! pod CIDR; `probe`, alone in location `probe`, whose endpoint the stream moves at a steady
//! pace to time the agent; `agent`, alone in location `agent`, is the node under test: it
//! publishes its own key and endpoint.
//!
//! [`Scale`] is a guard: on drop (also on panic) it ends every process in both namespaces (the
//! agent first), reaps its children, deletes the namespaces and the directory.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::StreamExt as _;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use wiremesh::lab::state::{ApiServerState, ProcRef};
use wiremesh::lab::{LabError, apiserver, cluster, down, sys, uapi};

/// The API server's address (in its namespace).
pub const API_IP: &str = "10.97.0.1";
/// The agent's address (in its namespace): its Node's InternalIP.
pub const AGENT_IP: &str = "10.97.0.2";
/// The node under test.
pub const AGENT: &str = "agent";
/// The node whose endpoint the stream moves at a steady pace, to time the agent.
pub const PROBE: &str = "probe";
/// The WireGuard interface the agent programs.
pub const INTERFACE: &str = "wiremesh0";
/// Prefix of the namespaces: `wmsc-<pid>-<n>-api` and `-ag`.
pub const NETNS_PREFIX: &str = "wmsc";
/// Index of the probe node (key, pod CIDR, internal IP); synthetic nodes stay below it.
const PROBE_INDEX: usize = 16_383;
/// The agent's log filter: info, and the loop's debug lines ("registry changed events=N").
const LOG_LEVEL: &str = "info,wiremesh::agent=debug,wiremesh::reconcile::system=debug";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The cluster and the binaries.
#[derive(Debug, Clone)]
pub struct Options {
    /// Synthetic nodes (besides `agent` and `probe`).
    pub nodes: usize,
    /// Synthetic nodes per location.
    pub per_location: usize,
    /// The agent's (and `meshctl plan`'s) granularity: `full` or `location`.
    pub granularity: String,
    /// The `wiremesh` binary.
    pub wiremesh: PathBuf,
    /// The `meshctl` binary.
    pub meshctl: PathBuf,
}

/// splitmix64's mix of `x`: deterministic pseudo-random bits for keys, endpoints and choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Name of synthetic node `i`.
pub fn node_name(i: usize) -> String {
    if i == PROBE_INDEX {
        PROBE.to_owned()
    } else {
        format!("node-{i:05}")
    }
}

/// Name of location `l`.
pub fn location_name(l: usize) -> String {
    format!("loc-{l:04}")
}

/// The public key of synthetic node `i` (32 deterministic bytes; no private key exists).
fn key(i: usize) -> String {
    let mut k = [0u8; 32];
    for (c, chunk) in k.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix((i as u64) << 8 | c as u64).to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Endpoint `version` of synthetic node `i`: a TEST-NET address (hosts 1–253) and a port.
fn endpoint(i: usize, version: u64) -> String {
    const NETS: [&str; 3] = ["192.0.2", "198.51.100", "203.0.113"];
    let h = mix((i as u64) * 1_000_003 + version);
    format!(
        "{}.{}:{}",
        NETS[(h % 3) as usize],
        1 + (h >> 8) % 253,
        1024 + (h >> 16) % 60_000
    )
}

/// The probe's endpoint number `k`: TEST-NET-3's host 254, one port each.
fn probe_endpoint(k: usize) -> String {
    format!("203.0.113.254:{}", 1024 + k % 64_000)
}

/// A synthetic Node as a cluster would hold it: annotations its agent would have published,
/// a pod CIDR and a location.
pub fn synthetic_node(i: usize, location: &str, endpoint: &str) -> Node {
    assert!(i <= PROBE_INDEX, "node index {i} out of the pod CIDR range");
    let j = i + 1;
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name(i),
            "labels": {"kubernetes.io/hostname": node_name(i)},
            "annotations": {
                "kilo.squat.ai/key": key(i),
                "kilo.squat.ai/endpoint": endpoint,
                "kilo.squat.ai/internal-ip": format!("172.{}.{}.{}/16", 16 + j / 65_536, (j / 256) % 256, j % 256),
                "kilo.squat.ai/location": location,
            },
        },
        "spec": {
            "podCIDR": format!("10.{}.{}.0/24", 64 + j / 256, j % 256),
            "podCIDRs": [format!("10.{}.{}.0/24", 64 + j / 256, j % 256)],
        },
    });
    serde_json::from_value(v).expect("a valid Node")
}

/// The node under test as a kubelet registers it: no mesh annotation but its location.
fn agent_node() -> (Node, serde_json::Value) {
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": AGENT,
            "labels": {"kubernetes.io/hostname": AGENT},
            "annotations": {"kilo.squat.ai/location": AGENT},
        },
        "spec": {"podCIDR": "10.63.0.0/24", "podCIDRs": ["10.63.0.0/24"]},
    });
    let status = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": AGENT_IP},
        {"type": "Hostname", "address": AGENT},
    ]}});
    (serde_json::from_value(v).expect("a valid Node"), status)
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch of a tracing line's RFC 3339 UTC timestamp.
pub fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let hh = t.next()?.parse::<f64>().ok()?;
    let mm = t.next()?.parse::<f64>().ok()?;
    let ss = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3_600.0 + mm * 60.0 + ss)
}

/// The value of `key=` in a tracing line (up to the next space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// What the agent's log says it did in a time window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Activity {
    /// Registry batches the loop took in ("registry changed").
    pub batches: usize,
    /// Engine events in those batches (after the watch's coalescing).
    pub engine_events: usize,
    /// Reconciliations that changed the kernel ("kernel reconciled", "partly reconciled").
    pub reconciles: usize,
    /// Kernel operations they applied.
    pub ops: usize,
    /// Time of the last reconciliation in the window (Unix seconds).
    pub last_reconcile: Option<f64>,
    /// Warnings logged in the window.
    pub warnings: usize,
}

/// The agent's activity in `[from, to]` (Unix seconds) from its log text.
pub fn activity(log: &str, from: f64, to: f64) -> Activity {
    let mut a = Activity::default();
    for line in log.lines() {
        let Some(t) = log_time(line) else { continue };
        if t < from || t > to {
            continue;
        }
        if line.contains(" WARN ") {
            a.warnings += 1;
        }
        if line.contains("registry changed") {
            a.batches += 1;
            a.engine_events += field(line, "events")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
        } else if line.contains("kernel reconciled") || line.contains("kernel partly reconciled") {
            a.reconciles += 1;
            a.ops += field(line, "ops")
                .or_else(|| field(line, "applied"))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            a.last_reconcile = Some(t);
        }
    }
    a
}

/// When the agent had one probe: seconds from its write to the agent's line for the event
/// ("node changed (folded)" or "(delta)", or "peer added or changed": the watch delivered it)
/// and to the reconciliation that put it into the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProbeTimes {
    /// Write → the agent's engine.
    pub seen: Option<f64>,
    /// Write → the kernel.
    pub applied: Option<f64>,
}

/// For each probe sent at `sent` (Unix seconds) with endpoint `endpoint`, from the agent's log:
/// when its engine saw it and when a reconciliation put it (or a later probe value that
/// superseded it in the same batch) into the kernel. `None` for a probe never seen.
pub fn probe_latencies(log: &str, probes: &[(String, f64)]) -> Vec<ProbeTimes> {
    let index: BTreeMap<&str, usize> = probes
        .iter()
        .enumerate()
        .map(|(i, (e, _))| (e.as_str(), i))
        .collect();
    let mut seen: Vec<Option<f64>> = vec![None; probes.len()];
    let mut applied: Vec<Option<f64>> = vec![None; probes.len()];
    let mut waiting: Vec<usize> = Vec::new();
    for line in log.lines() {
        if line.contains("peer added or changed") || line.contains("node changed (") {
            if let Some(i) = line
                .split_once("endpoint=Some(\"")
                .and_then(|(_, r)| r.split_once('"'))
                .and_then(|(e, _)| index.get(e))
            {
                seen[*i] = seen[*i].or(log_time(line));
                waiting.push(*i);
            }
        } else if line.contains("kernel reconciled") && !waiting.is_empty() {
            let Some(t) = log_time(line) else { continue };
            for i in waiting.drain(..) {
                applied[i].get_or_insert(t);
            }
        }
    }
    // A probe coalesced away reached the agent, and the kernel, with the next one that did.
    let (mut next_seen, mut next_applied) = (None, None);
    for i in (0..probes.len()).rev() {
        match applied[i] {
            Some(_) => (next_seen, next_applied) = (seen[i], applied[i]),
            None => (seen[i], applied[i]) = (next_seen, next_applied),
        }
    }
    probes
        .iter()
        .enumerate()
        .map(|(i, (_, sent))| ProbeTimes {
            seen: seen[i].map(|t| (t - sent).max(0.0)),
            applied: applied[i].map(|t| (t - sent).max(0.0)),
        })
        .collect()
}

/// For each node created or deleted at `sent` (Unix seconds), from the agent's log: seconds
/// until the first line that names it after `sent` ("node changed (…)", "node removed (…)":
/// the agent's debug line for each event it takes, folded or with its own delta) and until
/// the reconciliation after that line. `None` for one the log never names.
pub fn membership_latencies(log: &str, changes: &[(String, f64)]) -> Vec<ProbeTimes> {
    let mut named: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
    let mut reconciled: Vec<(usize, f64)> = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let Some(t) = log_time(line) else { continue };
        if !(line.contains("node changed (") || line.contains("node removed (")) {
            if line.contains("kernel reconciled") || line.contains("kernel partly reconciled") {
                reconciled.push((i, t));
            }
            continue;
        }
        let key = "node=";
        if let Some(name) = line.split_whitespace().find_map(|w| w.strip_prefix(key)) {
            named.entry(name).or_default().push((i, t));
        }
    }
    changes
        .iter()
        .map(|(name, sent)| {
            let Some(&(line, t)) = named
                .get(name.as_str())
                .and_then(|v| v.iter().find(|(_, t)| t >= sent))
            else {
                return ProbeTimes::default();
            };
            let at = reconciled.partition_point(|(i, _)| *i < line);
            ProbeTimes {
                seen: Some(t - sent),
                applied: reconciled.get(at).map(|(_, r)| r - sent),
            }
        })
        .collect()
}

/// One WireGuard peer as the kernel holds it or the plan wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Endpoint, if any.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: BTreeSet<IpNetwork>,
    /// Persistent keepalive (0 = off).
    pub keepalive: u16,
}

/// One route: table, destination, gateway, device, preferred source, onlink.
pub type RouteView = (u32, IpNetwork, Option<IpAddr>, String, Option<IpAddr>, bool);

/// One rule: source, destination, incoming interface, table.
pub type RuleView = (Option<IpNetwork>, Option<IpNetwork>, Option<String>, u32);

/// What the agent owns in its node's kernel, in one comparable form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshView {
    /// The WireGuard interface's listen port.
    pub listen_port: Option<u16>,
    /// Its mesh address.
    pub address: Option<IpNetwork>,
    /// Peers by base64 public key.
    pub peers: BTreeMap<String, PeerView>,
    /// Routes of protocol 104.
    pub routes: BTreeSet<RouteView>,
    /// Rules of protocol 104.
    pub rules: BTreeSet<RuleView>,
}

fn first_diffs<T: std::fmt::Debug>(label: &str, items: impl Iterator<Item = T>) -> String {
    let all: Vec<T> = items.collect();
    if all.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = all.iter().take(3).map(|x| format!("{x:?}")).collect();
    format!("\n  {label} ({}): {}", all.len(), shown.join("; "))
}

impl MeshView {
    /// How `self` (the kernel) differs from `want` (the plan), in a few lines.
    pub fn diff(&self, want: &MeshView) -> String {
        let mut s = String::new();
        if self.listen_port != want.listen_port {
            s += &format!(
                "\n  listen port {:?}, plan {:?}",
                self.listen_port, want.listen_port
            );
        }
        if self.address != want.address {
            s += &format!("\n  address {:?}, plan {:?}", self.address, want.address);
        }
        s += &first_diffs(
            "peers missing",
            want.peers.keys().filter(|k| !self.peers.contains_key(*k)),
        );
        s += &first_diffs(
            "peers extra",
            self.peers.keys().filter(|k| !want.peers.contains_key(*k)),
        );
        s += &first_diffs(
            "peers different (kernel, plan)",
            self.peers.iter().filter_map(|(k, p)| {
                want.peers
                    .get(k)
                    .filter(|w| *w != p)
                    .map(|w| (k.clone(), p.clone(), w.clone()))
            }),
        );
        s += &first_diffs("routes missing", want.routes.difference(&self.routes));
        s += &first_diffs("routes extra", self.routes.difference(&want.routes));
        s += &first_diffs("rules missing", want.rules.difference(&self.rules));
        s += &first_diffs("rules extra", self.rules.difference(&want.rules));
        s
    }
}

fn table_number(v: &serde_json::Value) -> u32 {
    match v.as_str() {
        None | Some("main") => 254,
        Some("local") => 255,
        Some("default") => 253,
        Some(n) => n.parse().unwrap_or(0),
    }
}

fn parse_net(s: &str) -> IpNetwork {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not a network: {e}"))
}

/// The plan as `meshctl plan -o json` prints it, in the comparable form.
pub fn plan_view(json: &str) -> MeshView {
    let v: serde_json::Value = serde_json::from_str(json).expect("meshctl plan printed JSON");
    let opt_ip = |x: &serde_json::Value| x.as_str().map(|s| s.parse::<IpAddr>().expect("an IP"));
    let opt_net = |x: &serde_json::Value| x.as_str().map(parse_net);
    let mut m = MeshView {
        listen_port: v["interface"]["listen_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok()),
        address: opt_net(&v["interface"]["address"]),
        ..MeshView::default()
    };
    for p in v["peers"].as_array().into_iter().flatten() {
        m.peers.insert(
            p["public_key"].as_str().expect("a key").to_owned(),
            PeerView {
                endpoint: p["endpoint"]
                    .as_str()
                    .map(|e| e.parse().expect("an IP endpoint")),
                allowed_ips: p["allowed_ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(parse_net))
                    .collect(),
                keepalive: p["persistent_keepalive"]
                    .as_u64()
                    .and_then(|k| u16::try_from(k).ok())
                    .unwrap_or(0),
            },
        );
    }
    for r in v["routes"].as_array().into_iter().flatten() {
        m.routes.insert((
            r["table"]
                .as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(0),
            parse_net(r["dst"].as_str().expect("a destination")),
            opt_ip(&r["gateway"]),
            r["dev"].as_str().unwrap_or_default().to_owned(),
            opt_ip(&r["src"]),
            r["onlink"].as_bool().unwrap_or(false),
        ));
    }
    // Each guard is a blackhole route in the main table (see `Route::guard`).
    for g in v["guards"].as_array().into_iter().flatten() {
        m.routes.insert((
            254,
            parse_net(g.as_str().expect("a guard's destination")),
            None,
            "blackhole".to_owned(),
            None,
            false,
        ));
    }
    for r in v["rules"].as_array().into_iter().flatten() {
        m.rules.insert((
            opt_net(&r["src"]),
            opt_net(&r["dst"]),
            r["iif"].as_str().map(str::to_owned),
            r["table"]
                .as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(0),
        ));
    }
    m
}

/// Resident and peak memory of a process in KiB (`VmRSS`, `VmHWM`).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((get("VmRSS:")?, get("VmHWM:")?))
}

/// CPU time (user + system) of a process in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Samples a process's `VmRSS` every 100 ms on a thread of its own, until dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kib(pid) {
                    let mut v = out.lock().unwrap_or_else(|e| e.into_inner());
                    v.push((unix_secs(SystemTime::now()), rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// The highest `VmRSS` sampled in `[from, to]` (Unix seconds), in KiB.
    pub fn max_between(&self, from: f64, to: f64) -> u64 {
        let v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The weights of the kinds of change in a stream.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// A node's endpoint moves.
    pub moves: u32,
    /// A node changes location (among the existing ones).
    pub relocations: u32,
    /// A new node joins (its name sorts after every other synthetic node).
    pub adds: u32,
    /// A node, any of them, leaves.
    pub removes: u32,
}

/// A stream of changes.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Changes per second to send (the schedule; the API server may take fewer).
    pub rate: f64,
    /// How many changes in all.
    pub changes: usize,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Every how many changes the probe's endpoint moves (0: never).
    pub probe_every: usize,
    /// The kinds of change.
    pub mix: Mix,
    /// Seed of the choices.
    pub seed: u64,
}

/// What a stream did.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    /// Changes the API server accepted, by kind.
    pub accepted: BTreeMap<&'static str, usize>,
    /// Changes it refused, and the first refusal.
    pub refused: usize,
    /// The first refusal's error.
    pub first_error: Option<String>,
    /// When the first request was sent (Unix seconds).
    pub first_sent: f64,
    /// When the last accepted change was acknowledged (Unix seconds).
    pub last_ack: f64,
    /// Each request's latency in seconds, sorted.
    pub latencies: Vec<f64>,
    /// Probe endpoints and when each was sent (Unix seconds), in order.
    pub probes: Vec<(String, f64)>,
    /// Per probe: seconds from its write until a watcher of the harness's own (next to the
    /// generator) received it: what the API server takes to deliver a change.
    pub delivered: Vec<Option<f64>>,
    /// Nodes created or deleted (joins and leaves) and when each was sent (Unix seconds).
    pub memberships: Vec<(String, f64)>,
}

impl StreamReport {
    /// Changes the API server accepted.
    pub fn accepted_total(&self) -> usize {
        self.accepted.values().sum()
    }

    /// Accepted changes per second, first send to last acknowledgement.
    pub fn achieved_rate(&self) -> f64 {
        let span = self.last_ack - self.first_sent;
        if span > 0.0 {
            self.accepted_total() as f64 / span
        } else {
            0.0
        }
    }
}

/// The value at quantile `q` of sorted `v` (0 when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The registry as the generator knows it: which synthetic nodes exist, where, and which have
/// a request in flight (never two at once for one node, so each node's changes keep their
/// order).
#[derive(Default)]
struct Model {
    present: Vec<usize>,
    version: BTreeMap<usize, u64>,
    locations: usize,
    next_index: usize,
    probes: usize,
    rng: u64,
}

impl Model {
    fn random(&mut self) -> u64 {
        self.rng = mix(self.rng);
        self.rng
    }

    /// A present node without a request in flight.
    fn pick(&mut self, busy: &HashSet<usize>) -> Option<usize> {
        for _ in 0..16 {
            if self.present.is_empty() {
                return None;
            }
            let at = (self.random() % self.present.len() as u64) as usize;
            if !busy.contains(&self.present[at]) {
                return Some(at);
            }
        }
        None
    }
}

/// One change to send.
enum Change {
    Move(usize, String),
    Relocate(usize, String),
    Add(usize, Box<Node>),
    Remove(usize),
    Probe(String),
}

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Change::Move(..) => "move",
            Change::Relocate(..) => "relocate",
            Change::Add(..) => "add",
            Change::Remove(_) => "remove",
            Change::Probe(_) => "probe",
        }
    }

    fn node(&self) -> usize {
        match self {
            Change::Move(i, _) | Change::Relocate(i, _) | Change::Add(i, _) | Change::Remove(i) => {
                *i
            }
            Change::Probe(_) => PROBE_INDEX,
        }
    }
}

fn annotate(key: &str, value: &str) -> Patch<serde_json::Value> {
    Patch::Merge(serde_json::json!({"metadata": {"annotations": {key: value}}}))
}

/// One agent, one API server, a synthetic cluster; everything removed on drop.
pub struct Scale {
    /// The options it was built with.
    pub opts: Options,
    /// The API server's namespace.
    pub api_ns: String,
    /// The agent's namespace.
    pub agent_ns: String,
    namespaces: Vec<String>,
    api: ApiServerState,
    servers: Vec<Child>,
    agent: Option<Child>,
    agent_started: f64,
    sampler: Option<Sampler>,
    model: Model,
    // Last: removed after everything that runs in it has ended.
    dir: tempfile::TempDir,
}

impl Scale {
    /// Build the namespaces, start etcd and kube-apiserver, install the Peer CRD and the
    /// agent's RBAC, register the agent's Node. No synthetic node and no agent yet.
    pub fn new(opts: Options) -> Scale {
        let base = Path::new("/dev/shm");
        let dir = tempfile::Builder::new()
            .prefix("wm-scale.")
            .tempdir_in(if base.is_dir() {
                base.to_path_buf()
            } else {
                std::env::temp_dir()
            })
            .expect("temporary directory");
        let name = format!(
            "{NETNS_PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let locations = opts.nodes.div_ceil(opts.per_location.max(1));
        let mut s = Scale {
            api_ns: format!("{name}-api"),
            agent_ns: format!("{name}-ag"),
            namespaces: Vec::new(),
            api: ApiServerState {
                cluster: 1,
                netns: format!("{name}-api"),
                ip: API_IP.parse().expect("an address"),
                port: 6443,
                dir: dir.path().join("api"),
                binary: apiserver::find_binary(None)
                    .expect("kube-apiserver: run tests/apiserver/setup.sh"),
                etcd: None,
                apiserver: None,
            },
            servers: Vec::new(),
            agent: None,
            agent_started: 0.0,
            sampler: None,
            model: Model {
                locations,
                next_index: opts.nodes,
                rng: 0x5ca1e,
                ..Model::default()
            },
            opts,
            dir,
        };
        s.setup();
        s
    }

    fn setup(&mut self) {
        for ns in [self.api_ns.clone(), self.agent_ns.clone()] {
            sys::ip(&["netns", "add", &ns]).expect("ip netns add");
            self.namespaces.push(ns.clone());
            sys::ip_n(&ns, &["link", "set", "lo", "up"]).expect("lo up");
        }
        sys::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &self.api_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.agent_ns,
        ])
        .expect("veth");
        for (ns, addr) in [(&self.api_ns, API_IP), (&self.agent_ns, AGENT_IP)] {
            sys::ip_n(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]).expect("addr");
            sys::ip_n(ns, &["link", "set", "eth0", "up"]).expect("eth0 up");
        }
        std::fs::create_dir_all(self.agent_dir().join("run/wireguard")).expect("agent dir");

        apiserver::write_pki("scale", &self.api).expect("PKI");
        let (etcd, r) = apiserver::start_etcd(&self.api).expect("start etcd");
        self.servers.push(etcd);
        self.api.etcd = Some(r);
        let (kas, r) = apiserver::start_apiserver(&self.api).expect("start kube-apiserver");
        self.servers.push(kas);
        self.api.apiserver = Some(r);
        let (etcd_log, kas_log) = (self.api.etcd_log(), self.api.apiserver_log());
        let servers = &mut self.servers;
        let mut alive = || {
            let (a, b) = servers.split_at_mut(1);
            apiserver::check_alive(&mut [
                (&mut a[0], "etcd", etcd_log.as_path()),
                (&mut b[0], "kube-apiserver", kas_log.as_path()),
            ])
        };
        cluster::wait_ready(&self.api, Duration::from_secs(90), &mut alive)
            .expect("the API server answers");
        cluster::install(&self.api).expect("Peer CRD and RBAC");
        cluster::wait_ready(&self.api, Duration::from_secs(60), alive)
            .expect("the agent's identity is let in");
        let (node, status) = agent_node();
        self.admin(|c| async move {
            let nodes = Api::<Node>::all(c);
            nodes.create(&PostParams::default(), &node).await?;
            nodes
                .patch_status(AGENT, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            Ok(())
        })
        .expect("the agent's Node");
    }

    /// The agent's directory: key, CNI config, `run/` (its `/run`), log.
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// Run `f` with an administrator client, on a thread in the API server's namespace.
    fn admin<T, F, Fut>(&self, f: F) -> Result<T, kube::Error>
    where
        T: Send,
        F: FnOnce(kube::Client) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let out = cluster::with_admin(&self.api, |c| async move { Ok(f(c).await) });
        out.unwrap_or_else(|e: LabError| panic!("cannot reach the API server: {e}"))
    }

    /// Create the synthetic nodes and the probe, `concurrency` requests at a time. Returns how
    /// long it took.
    pub fn create_nodes(&mut self, concurrency: usize) -> Duration {
        let n = self.opts.nodes;
        let per = self.opts.per_location.max(1);
        let nodes: Vec<Node> = (0..n)
            .map(|i| synthetic_node(i, &location_name(i / per), &endpoint(i, 0)))
            .chain(std::iter::once(synthetic_node(
                PROBE_INDEX,
                PROBE,
                &probe_endpoint(0),
            )))
            .collect();
        let t0 = Instant::now();
        self.admin(|c| async move {
            let api = Api::<Node>::all(c);
            let pp = PostParams::default();
            let results: Vec<Result<Node, kube::Error>> = futures::stream::iter(nodes)
                .map(|node| {
                    let (api, pp) = (&api, &pp);
                    async move { api.create(pp, &node).await }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await;
            results.into_iter().try_for_each(|r| r.map(drop))
        })
        .expect("create the synthetic Nodes");
        self.model.present = (0..n).collect();
        self.model.probes = 1;
        t0.elapsed()
    }

    /// Start the agent (release or debug build, as given), userspace WireGuard, no
    /// encapsulation, the API server as its only registry.
    pub fn start_agent(&mut self) {
        let d = self.agent_dir();
        let log = std::fs::File::create(d.join("agent.log")).expect("agent log");
        let err = log.try_clone().expect("agent log");
        let path = |p: PathBuf| p.display().to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.agent_ns, "sh", "-c"])
            .arg("mount --bind \"$1\" /run && shift && exec \"$@\"")
            .arg("sh")
            .arg(d.join("run"))
            .arg(&self.opts.wiremesh)
            .args(["agent", "--hostname", AGENT, "--kubeconfig"])
            .arg(path(self.api.agent_kubeconfig()))
            .args(["--private-key", &path(d.join("key"))])
            .args(["--cni-config", &path(d.join("cni.conflist"))])
            .args(["--granularity", &self.opts.granularity])
            .args(["--encapsulate", "never", "--wireguard", "userspace"])
            .args(["--log-level", LOG_LEVEL])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start the agent");
        self.agent_started = unix_secs(SystemTime::now());
        self.sampler = Some(Sampler::start(child.id()));
        self.agent = Some(child);
    }

    /// When the agent was started (Unix seconds).
    pub fn agent_started(&self) -> f64 {
        self.agent_started
    }

    /// The agent's PID.
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("the agent was started").id()
    }

    /// The memory sampler of the agent.
    pub fn sampler(&self) -> &Sampler {
        self.sampler.as_ref().expect("the agent was started")
    }

    /// The PID of the agent's wireguard-go (any process in its namespace but the agent).
    pub fn wireguard_pid(&self) -> Option<u32> {
        let agent = self.agent.as_ref().map(Child::id);
        sys::pids_in_netns(std::slice::from_ref(&self.agent_ns))
            .into_iter()
            .find(|p| Some(*p) != agent)
    }

    /// Every process in the harness's namespaces.
    pub fn pids(&self) -> Vec<u32> {
        sys::pids_in_netns(&self.namespaces)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.agent_dir().join("agent.log")).unwrap_or_default()
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        sys::tail(&self.agent_dir().join("agent.log"), n)
    }

    fn assert_agent_runs(&mut self) {
        let exited = self
            .agent
            .as_mut()
            .map(|c| c.try_wait().ok().flatten())
            .unwrap_or(None);
        if let Some(status) = exited {
            panic!(
                "the agent exited ({status}); its log ends with:\n{}",
                self.log_tail(30)
            );
        }
    }

    /// The agent's kernel state: its WireGuard device (over UAPI, from the host) and its
    /// routes, rules and address (`ip -j` in its namespace).
    pub fn kernel(&self) -> Result<MeshView, String> {
        let sock = self
            .agent_dir()
            .join(format!("run/wireguard/{INTERFACE}.sock"));
        let dev = uapi::get(&sock, Duration::from_secs(20)).map_err(|e| e.to_string())?;
        let mut m = MeshView {
            listen_port: dev.listen_port,
            ..MeshView::default()
        };
        for p in dev.peers {
            m.peers.insert(
                p.public_key.to_string(),
                PeerView {
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.into_iter().collect(),
                    keepalive: p.persistent_keepalive,
                },
            );
        }
        let json = |args: &[&str]| -> Result<serde_json::Value, String> {
            let out = sys::ip_n(&self.agent_ns, args).map_err(|e| e.to_string())?;
            serde_json::from_str(&out).map_err(|e| format!("ip {args:?}: {e}"))
        };
        for family in ["-4", "-6"] {
            let routes = json(&[
                family, "-j", "route", "show", "table", "all", "proto", "104",
            ])?;
            for r in routes.as_array().into_iter().flatten() {
                let dst = match r["dst"].as_str().unwrap_or_default() {
                    "default" if family == "-6" => "::/0",
                    "default" => "0.0.0.0/0",
                    d => d,
                };
                let opt_ip = |x: &serde_json::Value| x.as_str().and_then(|s| s.parse().ok());
                // A guard has no device (IPv6 shows `lo`): named by its type.
                let dev = match r["type"].as_str() {
                    Some("blackhole") => "blackhole",
                    _ => r["dev"].as_str().unwrap_or_default(),
                };
                m.routes.insert((
                    table_number(&r["table"]),
                    parse_net(dst),
                    opt_ip(&r["gateway"]),
                    dev.to_owned(),
                    opt_ip(&r["prefsrc"]),
                    r["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == "onlink")),
                ));
            }
            let rules = json(&[family, "-j", "rule", "show"])?;
            for r in rules.as_array().into_iter().flatten() {
                if r["protocol"].as_str() != Some("104") {
                    continue;
                }
                // `from all` is printed as "src": "all".
                let net = |k: &str, len: &str| {
                    r[k].as_str()
                        .filter(|a| *a != "all")
                        .map(|a| parse_net(&format!("{a}/{}", r[len].as_u64().unwrap_or(32))))
                };
                m.rules.insert((
                    net("src", "srclen"),
                    net("dst", "dstlen"),
                    r["iif"].as_str().map(str::to_owned),
                    table_number(&r["table"]),
                ));
            }
        }
        let addrs = json(&["-j", "addr", "show", "dev", INTERFACE])?;
        m.address = addrs
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
            .find(|a| a["scope"] == "global")
            .and_then(|a| {
                let ip: IpAddr = a["local"].as_str()?.parse().ok()?;
                IpNetwork::new(ip, u8::try_from(a["prefixlen"].as_u64()?).ok()?).ok()
            });
        Ok(m)
    }

    /// What `meshctl plan --node agent` computes from the API server, with the agent's options.
    /// An error until the agent has published its key and endpoint.
    pub fn plan(&self) -> Result<MeshView, String> {
        let admin = self.api.admin_kubeconfig();
        let out = sys::ns_exec(
            &self.api_ns,
            &self.opts.meshctl.display().to_string(),
            &[
                "plan",
                "--kubeconfig",
                &admin.display().to_string(),
                "--node",
                AGENT,
                "--granularity",
                &self.opts.granularity,
                "--encapsulate",
                "never",
                "--request-timeout",
                "120",
                "-o",
                "json",
            ],
        )
        .map_err(|e| e.to_string())?;
        Ok(plan_view(&out))
    }

    /// Wait until the kernel holds exactly what `meshctl plan` computes (peers with endpoints,
    /// allowed IPs and keepalives; routes; rules; address; port), at most `timeout`. Returns
    /// when it did (Unix seconds) and the plan. Panics with the difference otherwise.
    pub fn wait_converged(&mut self, timeout: Duration) -> (f64, MeshView) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("nothing compared yet");
        loop {
            self.assert_agent_runs();
            if Instant::now() >= deadline {
                panic!(
                    "the kernel does not match meshctl plan after {timeout:?}: {last}\n\
                     agent log tail:\n{}",
                    self.log_tail(20)
                );
            }
            // The plan of the API server's current state (the agent publishes its own key and
            // endpoint first), then the kernel, until it matches or a few seconds pass.
            let want = match self.plan() {
                Ok(w) => w,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
            };
            let recheck = Instant::now() + Duration::from_secs(5);
            while Instant::now() < recheck.min(deadline) {
                match self.kernel() {
                    Ok(k) if k == want && !want.peers.is_empty() => {
                        return (unix_secs(SystemTime::now()), want);
                    }
                    Ok(k) => last = k.diff(&want),
                    Err(e) => last = e,
                }
                self.assert_agent_runs();
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }

    /// Send `so.changes` changes at `so.rate` per second. The generator never has two requests
    /// in flight for one node; it picks nodes and kinds with `so.seed`.
    pub fn stream(&mut self, so: &StreamOptions) -> StreamReport {
        let mut model = std::mem::take(&mut self.model);
        model.rng ^= so.seed;
        let out = self.admin(move |c| async move {
            let api = Api::<Node>::all(c.clone());
            // A watcher of the probe alone, as a reference for the API server's delivery.
            let received: Arc<Mutex<BTreeMap<String, f64>>> = Arc::default();
            let reference = {
                let received = received.clone();
                let cfg = kube::runtime::watcher::Config::default()
                    .fields(&format!("metadata.name={PROBE}"));
                tokio::spawn(async move {
                    let mut w = std::pin::pin!(kube::runtime::watcher(Api::<Node>::all(c), cfg));
                    while let Some(ev) = w.next().await {
                        let now = unix_secs(SystemTime::now());
                        if let Ok(kube::runtime::watcher::Event::Apply(n)) = ev
                            && let Some(e) = n
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get("kilo.squat.ai/endpoint"))
                        {
                            let mut r = received.lock().unwrap_or_else(|e| e.into_inner());
                            r.entry(e.clone()).or_insert(now);
                        }
                    }
                })
            };
            let busy: Rc<RefCell<HashSet<usize>>> = Rc::default();
            let start = tokio::time::Instant::now();
            let interval = Duration::from_secs_f64(1.0 / so.rate.max(1e-3));
            let w = so.mix;
            let total_w = u64::from(w.moves + w.relocations + w.adds + w.removes).max(1);
            let mut probes = Vec::new();
            let changes = (0..so.changes).map(|i| {
                let b = busy.borrow();
                let change =
                    if so.probe_every > 0 && i % so.probe_every == 0 && !b.contains(&PROBE_INDEX) {
                        let e = probe_endpoint(model.probes);
                        model.probes += 1;
                        Change::Probe(e)
                    } else {
                        let r = model.random() % total_w;
                        let picked = model.pick(&b);
                        match picked {
                            Some(at) if r < u64::from(w.moves) => {
                                let n = model.present[at];
                                let v = model.version.entry(n).or_default();
                                *v += 1;
                                let v = *v;
                                Change::Move(n, endpoint(n, v))
                            }
                            Some(at) if r < u64::from(w.moves + w.relocations) => {
                                let n = model.present[at];
                                let l = (model.random() % model.locations.max(1) as u64) as usize;
                                Change::Relocate(n, location_name(l))
                            }
                            Some(at) if r >= u64::from(w.moves + w.relocations + w.adds) => {
                                let n = model.present.swap_remove(at);
                                Change::Remove(n)
                            }
                            _ => {
                                let n = model.next_index;
                                assert!(
                                    n < PROBE_INDEX,
                                    "too many nodes added for the pod CIDR range"
                                );
                                model.next_index += 1;
                                let l = (model.random() % model.locations.max(1) as u64) as usize;
                                model.present.push(n);
                                Change::Add(
                                    n,
                                    Box::new(synthetic_node(n, &location_name(l), &endpoint(n, 0))),
                                )
                            }
                        }
                    };
                drop(b);
                busy.borrow_mut().insert(change.node());
                if let Change::Probe(e) = &change {
                    probes.push((e.clone(), i));
                }
                let (api, busy) = (&api, busy.clone());
                let slot = start + interval.mul_f64(i as f64);
                async move {
                    tokio::time::sleep_until(slot).await;
                    let sent = unix_secs(SystemTime::now());
                    let kind = change.kind();
                    let node = change.node();
                    let pp = PatchParams::default();
                    let r = match change {
                        Change::Move(n, e) => api
                            .patch(&node_name(n), &pp, &annotate("kilo.squat.ai/endpoint", &e))
                            .await
                            .map(drop),
                        Change::Probe(e) => api
                            .patch(PROBE, &pp, &annotate("kilo.squat.ai/endpoint", &e))
                            .await
                            .map(drop),
                        Change::Relocate(n, l) => api
                            .patch(&node_name(n), &pp, &annotate("kilo.squat.ai/location", &l))
                            .await
                            .map(drop),
                        Change::Add(_, node) => {
                            api.create(&PostParams::default(), &node).await.map(drop)
                        }
                        Change::Remove(n) => api
                            .delete(&node_name(n), &DeleteParams::default())
                            .await
                            .map(drop),
                    };
                    busy.borrow_mut().remove(&node);
                    (i, kind, node, sent, unix_secs(SystemTime::now()), r)
                }
            });
            let results: Vec<_> = futures::stream::iter(changes)
                .buffer_unordered(so.concurrency.max(1))
                .collect()
                .await;
            // The reference watcher gets a few seconds more for the last probes.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                let have = received.lock().unwrap_or_else(|e| e.into_inner()).len();
                if have >= probes.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            reference.abort();
            let received = std::mem::take(&mut *received.lock().unwrap_or_else(|e| e.into_inner()));
            Ok((results, probes, model, received))
        });
        let (results, probe_slots, model, received) = out.expect("the stream's client");
        self.model = model;
        let mut rep = StreamReport {
            first_sent: f64::MAX,
            ..StreamReport::default()
        };
        let mut sent_at = BTreeMap::new();
        for (slot, kind, node, sent, acked, r) in &results {
            rep.first_sent = rep.first_sent.min(*sent);
            rep.latencies.push(acked - sent);
            match r {
                Ok(()) => {
                    *rep.accepted.entry(*kind).or_default() += 1;
                    rep.last_ack = rep.last_ack.max(*acked);
                    sent_at.insert(*slot, *sent);
                    if matches!(*kind, "add" | "remove") {
                        rep.memberships.push((node_name(*node), *sent));
                    }
                }
                Err(e) => {
                    rep.refused += 1;
                    rep.first_error
                        .get_or_insert_with(|| format!("{kind}: {e}"));
                }
            }
        }
        rep.latencies.sort_by(f64::total_cmp);
        rep.probes = probe_slots
            .into_iter()
            .filter_map(|(e, slot)| sent_at.get(&slot).map(|t| (e, *t)))
            .collect();
        rep.delivered = rep
            .probes
            .iter()
            .map(|(e, sent)| received.get(e).map(|t| (t - sent).max(0.0)))
            .collect();
        rep
    }

    /// The agent's CPU time so far, in seconds.
    pub fn agent_cpu(&self) -> f64 {
        cpu_secs(self.agent_pid()).unwrap_or_default()
    }

    /// The agent's `VmRSS` and `VmHWM` now, in KiB.
    pub fn agent_memory(&self) -> (u64, u64) {
        memory_kib(self.agent_pid()).unwrap_or_default()
    }
}

impl Drop for Scale {
    fn drop(&mut self) {
        self.sampler = None;
        // The agent first (it would log the API server's end), then everything else.
        if let Some(p) = self.agent.as_ref().and_then(|c| sys::proc_ref(c.id())) {
            sys::terminate(&[p], Duration::from_secs(5));
        }
        let servers: Vec<ProcRef> = self
            .servers
            .iter()
            .filter_map(|c| sys::proc_ref(c.id()))
            .collect();
        down::end_processes(&self.namespaces, &servers);
        for c in self.agent.iter_mut().chain(self.servers.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `a` is `b` seconds, to the log's microsecond.
    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-6)
    }

    const LOG: &str = "\
2026-12-03T10:00:00.100000Z DEBUG wiremesh::agent: registry changed events=3
2026-12-03T10:00:00.110000Z DEBUG wiremesh::agent: node changed (folded) node=node-00001 location=loc-1 endpoint=Some(\"192.0.2.1:1\")
2026-12-03T10:00:00.120000Z  INFO wiremesh::agent: kernel reconciled ops=1
2026-12-03T10:00:00.130000Z DEBUG wiremesh::agent: node removed (folded) node=node-00002
2026-12-03T10:00:00.140000Z DEBUG wiremesh::agent: node changed (delta) node=node-00003 location=loc-3 endpoint=Some(\"192.0.2.3:3\")
2026-12-03T10:00:00.141000Z  INFO wiremesh::agent: peer added or changed peer=node-00003 key=K endpoint=Some(\"192.0.2.3:3\")
2026-12-03T10:00:00.300000Z  INFO wiremesh::agent: kernel reconciled ops=4000
2026-12-03T10:00:01.000000Z DEBUG wiremesh::agent: node changed (folded) node=node-00001 location=loc-2 endpoint=Some(\"192.0.2.1:1\")
";

    #[test]
    fn a_join_or_leave_is_timed_from_its_write_to_the_reconciliation_after_the_agent_named_it() {
        let t0 = log_time("2026-12-03T10:00:00.000000Z x").unwrap();
        let changes = vec![
            ("node-00002".to_string(), t0),
            ("node-00003".to_string(), t0),
            // Written after the line naming it at 0.11 s: the line at 1 s names it, and no
            // reconciliation follows that one.
            ("node-00001".to_string(), t0 + 0.5),
            ("node-00009".to_string(), t0),
        ];
        let got = membership_latencies(LOG, &changes);
        assert!(
            close(got[0].seen, 0.13) && close(got[0].applied, 0.3),
            "{got:?}"
        );
        assert!(
            close(got[1].seen, 0.14) && close(got[1].applied, 0.3),
            "{got:?}"
        );
        assert!(
            close(got[2].seen, 0.5) && got[2].applied.is_none(),
            "{got:?}"
        );
        assert_eq!(got[3], ProbeTimes::default());
    }

    #[test]
    fn a_probe_is_timed_to_the_first_reconciliation_after_the_agent_saw_it() {
        let t0 = log_time("2026-12-03T10:00:00.000000Z x").unwrap();
        let probes = vec![
            ("192.0.2.1:1".to_string(), t0),
            ("192.0.2.3:3".to_string(), t0 + 0.05),
        ];
        let got = probe_latencies(LOG, &probes);
        assert!(
            close(got[0].seen, 0.11) && close(got[0].applied, 0.12),
            "{got:?}"
        );
        assert!(
            close(got[1].seen, 0.09) && close(got[1].applied, 0.25),
            "{got:?}"
        );
    }
}
