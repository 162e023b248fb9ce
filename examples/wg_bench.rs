//! How long peer changes take on a userspace WireGuard device (wireguard-go).
//!
//! In a fresh network namespace with one device: apply 1,000 peers to the empty device, read them
//! back, change one peer among the 1,000, and run a whole reconcile step for that change (read,
//! `peer_diff`, apply). Medians of 5 runs, printed as one machine-readable line:
//!
//! ```text
//! wg_bench backend=userspace peers=1000 runs=5 apply_all_ms=… one_changed_ms=… …
//! ```
//!
//! Needs root, `/dev/net/tun`, `ip` and `wireguard-go`. Run with
//! `cargo run --release --example wg_bench [PEERS]`. The namespace and the daemon are removed on
//! exit, also when a step fails (not on SIGKILL).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use wiremesh::desired::WgPeer;
use wiremesh::model::{Endpoint, WgKey};
use wiremesh::reconcile::plan::peer_diff;
use wiremesh::reconcile::wg::{WgDevice, WgMode, WgOptions, load_or_generate_private_key};

const RUNS: usize = 5;

/// The namespace, its device and a key directory; all removed on drop.
struct Bench {
    ns: String,
    dir: PathBuf,
    dev: Option<WgDevice>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(dev) = &self.dev
            && let Err(e) = dev.delete()
        {
            eprintln!("wg_bench: cleanup of {}: {e}", dev.name());
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn peer(i: u32, port: u16) -> WgPeer {
    let mut key = [0x5au8; 32];
    key[..4].copy_from_slice(&i.to_be_bytes());
    WgPeer {
        public_key: WgKey(key),
        endpoint: Some(Endpoint::Addr(SocketAddr::from((
            [192, 0, 2, (i % 250) as u8 + 1],
            port,
        )))),
        allowed_ips: vec![
            format!("10.100.{}.{}/32", (i >> 8) as u8, i as u8)
                .parse()
                .expect("valid CIDR"),
            format!("10.{}.{}.0/24", 128 + (i >> 8) as u8, i as u8)
                .parse()
                .expect("valid CIDR"),
        ],
        persistent_keepalive: 25,
        preshared_key: None,
        name: String::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn run(n: u32) -> Result<String, String> {
    let pid = std::process::id();
    let mut bench = Bench {
        ns: format!("wm-wgb-{pid}"),
        dir: std::env::temp_dir().join(format!("wm-wgb-{pid}")),
        dev: None,
    };
    ip(&["netns", "add", &bench.ns])?;
    let name = format!("wmwgb{pid}");
    let key = load_or_generate_private_key(&bench.dir.join("key")).map_err(|e| e.to_string())?;
    let opts = WgOptions {
        netns: Some(PathBuf::from(format!("/run/netns/{}", bench.ns))),
        ..WgOptions::new(WgMode::Userspace)
    };
    let dev = WgDevice::new(&name, key, &opts).map_err(|e| e.to_string())?;
    bench.dev = Some(dev.clone());
    let t = Instant::now();
    dev.create().map_err(|e| e.to_string())?;
    let create_ms = ms(t);
    dev.configure(51820).map_err(|e| e.to_string())?;

    let peers: Vec<WgPeer> = (0..n).map(|i| peer(i, 51820)).collect();
    let keys: Vec<WgKey> = peers.iter().map(|p| p.public_key).collect();
    let check = |r: wiremesh::reconcile::wg::PeersApplied| -> Result<(), String> {
        match r.failed.first() {
            None => Ok(()),
            Some((k, e)) => Err(format!("peer {k}: {e}")),
        }
    };
    let (mut apply_all, mut remove_all, mut read, mut one, mut reconcile_one) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        let t = Instant::now();
        check(dev.apply_peers(&peers, &[]).map_err(|e| e.to_string())?)?;
        apply_all.push(ms(t));

        let t = Instant::now();
        let state = dev
            .read()
            .map_err(|e| e.to_string())?
            .ok_or("device vanished")?;
        read.push(ms(t));
        if state.peers.len() != n as usize {
            return Err(format!("read {} peers, applied {n}", state.peers.len()));
        }

        // One peer's endpoint changes: apply only that peer.
        let i = (run as u32 * 97) % n;
        let changed = peer(i, 52000 + run as u16);
        let t = Instant::now();
        check(
            dev.apply_peers(std::slice::from_ref(&changed), &[])
                .map_err(|e| e.to_string())?,
        )?;
        one.push(ms(t));

        // The same change as one reconcile step: read the device, diff, apply.
        let mut desired = peers.clone();
        desired[i as usize] = peer(i, 53000 + run as u16);
        let t = Instant::now();
        let actual = dev
            .read()
            .map_err(|e| e.to_string())?
            .ok_or("device vanished")?;
        let (upsert, remove) = peer_diff(&desired, &actual.peers, &actual.recent_handshakes);
        let upsert: Vec<_> = upsert.into_iter().cloned().collect();
        check(
            dev.apply_peers(&upsert, &remove)
                .map_err(|e| e.to_string())?,
        )?;
        reconcile_one.push(ms(t));
        if upsert.len() != 1 || !remove.is_empty() {
            return Err(format!(
                "diff found {} changed and {} removed peers, expected 1 and 0",
                upsert.len(),
                remove.len()
            ));
        }

        let t = Instant::now();
        check(dev.apply_peers(&[], &keys).map_err(|e| e.to_string())?)?;
        remove_all.push(ms(t));
    }
    Ok(format!(
        "wg_bench backend={} peers={n} runs={RUNS} create_ms={create_ms:.1} apply_all_ms={:.1} \
         read_all_ms={:.1} one_changed_ms={:.2} reconcile_one_changed_ms={:.1} remove_all_ms={:.1}",
        dev.backend(),
        median(apply_all),
        median(read),
        median(one),
        median(reconcile_one),
        median(remove_all),
    ))
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    match run(n.max(1)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("wg_bench: {e}");
            std::process::exit(1);
        }
    }
}
