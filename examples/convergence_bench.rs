//! Convergence benchmark (root): one node's annotation changes in a 1,000-node cluster file; how
//! long until the real agent has the new state in the kernel (p50/p99)?
//!
//! A fresh network namespace runs `wiremesh agent` (userspace WireGuard, as in the lab) for node
//! `node-00000` of a generated 1,000-node full mesh. Each round rewrites the file (atomic rename)
//! with one other node's `force-endpoint` moved, and takes the time from just before the rename
//! to the agent's "kernel reconciled" log line for that change (the line is written after the
//! kernel acknowledged the peer update). After the rounds the device is read back over UAPI to
//! check it really holds the last endpoint. Nothing is sent anywhere: no peer is reachable and no
//! traffic is routed.
//!
//! `cargo build --release && sudo ./target/release/examples/convergence_bench [ROUNDS]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

const NODES: usize = 1000;

struct Guard {
    ns: String,
    agent: Option<Child>,
    dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        // wireguard-go daemonized inside the namespace: stop every process left in it.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?} failed");
}

fn key(i: usize) -> String {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[31] = 0x33;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// The cluster file with node `moved` at endpoint `ep` (if any).
fn cluster(own_key: &str, moved: Option<(usize, &str)>) -> String {
    let items: Vec<serde_json::Value> = (0..NODES)
        .map(|i| {
            let (hi, lo) = (i >> 8, i & 0xff);
            let mut ep = format!("10.251.{hi}.{lo}:51820");
            if let Some((m, e)) = moved
                && m == i
            {
                ep = e.to_owned();
            }
            let (k, internal) = if i == 0 {
                (own_key.to_owned(), "10.250.0.1/16".to_owned())
            } else {
                (key(i), format!("10.251.{hi}.{lo}/16"))
            };
            serde_json::json!({
                "kind": "Node",
                "metadata": {"name": format!("node-{i:05}"), "annotations": {
                    "kilo.squat.ai/key": k,
                    "kilo.squat.ai/force-endpoint": if i == 0 { "10.250.0.1:51820".to_owned() } else { ep },
                    "kilo.squat.ai/internal-ip": internal,
                }},
                "spec": {"podCIDR": format!("10.{}.{lo}.0/24", 64 + hi)}
            })
        })
        .collect();
    serde_json::json!({"kind": "NodeList", "items": items}).to_string()
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Seconds since the Unix epoch of a tracing line's RFC 3339 UTC timestamp.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

fn uapi_endpoint(sock: &Path, pubkey_hex: &str) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.write_all(b"get=1\n\n").ok()?;
    // wireguard-go keeps the connection open: the answer ends with an empty line.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while !buf.ends_with(b"\n\n") {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let out = String::from_utf8_lossy(&buf);
    let mut current = false;
    for line in out.lines() {
        if let Some(k) = line.strip_prefix("public_key=") {
            current = k == pubkey_hex;
        } else if current && let Some(e) = line.strip_prefix("endpoint=") {
            return Some(e.to_owned());
        }
    }
    None
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let agent_bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("wiremesh")))
        .filter(|p| p.exists())
        .expect("build the wiremesh binary first: cargo build --release");
    let ns = format!("wm-cv-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(dir.join("wireguard")).expect("dir");
    std::fs::create_dir_all("/run/wireguard").expect("/run/wireguard");
    let mut g = Guard {
        ns: ns.clone(),
        agent: None,
        dir: dir.clone(),
    };
    run(&["ip", "netns", "add", &ns]);
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    run(&[
        "ip", "-n", &ns, "link", "add", "cv0", "type", "veth", "peer", "name", "cv1",
    ]);
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.250.0.1/16",
        "dev",
        "cv0",
    ]);
    run(&["ip", "-n", &ns, "link", "set", "cv0", "up"]);
    run(&["ip", "-n", &ns, "link", "set", "cv1", "up"]);

    // The agent generates its key; make it here first so the nodes file can carry it.
    let key_path = dir.join("key");
    let nodes = dir.join("nodes.json");
    let _ = std::fs::remove_file(&key_path);
    let loaded = wiremesh::reconcile::wg::load_or_generate_private_key(&key_path).expect("key");
    let own_pub = loaded.public_key().to_string();
    write_atomic(&nodes, &cluster(&own_pub, None));
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let cmd = format!(
        "mount --bind {wg} /run/wireguard && exec {bin} agent --hostname node-00000 --nodes {nodes} \
         --private-key {key} --granularity full --encapsulate never --wireguard userspace \
         --cni-config {cni} --resync-period 3600s --log-level info",
        wg = dir.join("wireguard").display(),
        bin = agent_bin.display(),
        nodes = nodes.display(),
        key = key_path.display(),
        cni = dir.join("cni/10-wiremesh.conflist").display(),
    );
    g.agent = Some(
        Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c", &cmd])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent"),
    );
    let sock = dir.join("wireguard/wiremesh0.sock");
    let hex = |b64: &str| -> String {
        let b = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("b64");
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    let start = Instant::now();
    while uapi_endpoint(&sock, &hex(&key(NODES - 1))).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agent did not program the mesh"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let initial = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));

    let mut lat = Vec::with_capacity(rounds);
    let mut log_read = BufReader::new(std::fs::File::open(dir.join("agent.log")).expect("log"));
    let mut line = String::new();
    while log_read
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
    let mut last = (0, String::new());
    for r in 0..rounds {
        let node = 1 + (r * 7919) % (NODES - 1);
        let ep = format!("10.252.{}.{}:{}", r / 250, r % 250, 40000 + r);
        let text = cluster(&own_pub, Some((node, &ep)));
        let t0 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        write_atomic(&nodes, &text);
        let deadline = Instant::now() + Duration::from_secs(5);
        let t1 = loop {
            line.clear();
            match log_read.read_line(&mut line) {
                Ok(n) if n > 0 => {
                    if line.contains("kernel reconciled")
                        && let Some(t) = log_time(&line)
                    {
                        break t;
                    }
                }
                _ => {
                    assert!(
                        Instant::now() < deadline,
                        "no reconcile logged for round {r}"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        };
        lat.push((t1 - t0) * 1000.0);
        last = (node, ep);
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = uapi_endpoint(&sock, &hex(&key(last.0)));
    assert_eq!(
        got.as_deref(),
        Some(last.1.as_str()),
        "the kernel holds the last endpoint"
    );
    lat.sort_by(f64::total_cmp);
    println!(
        "convergence_bench nodes={NODES} rounds={rounds} initial_ms={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        initial.as_secs_f64() * 1000.0,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
}
