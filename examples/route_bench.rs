//! Route programming throughput: wiremesh's pipelined netlink path against `ip -batch`.
//!
//! Run as root: `cargo run --release --example route_bench [-- N ...]` (default N = 1000 10000).
//!
//! Creates a throw-away network namespace `wm-rb-<pid>` holding a veth pair (this kernel has no
//! `dummy`), then for each N, five times: installs N routes `10.200.x.y/32 dev rt0` with
//! [`Netlink::apply_routes`] and, in the same round, with `ip -n NS -batch FILE` (the order
//! alternates between rounds), deleting them in between, and times each. Prints the medians, one
//! line per N and operation:
//!
//! ```text
//! route_bench n=10000 ours_routes_per_s=… ipbatch_routes_per_s=… ratio=…
//! route_bench_del n=10000 ours_routes_per_s=… ipbatch_routes_per_s=… ratio=…
//! ```
//!
//! `ratio` is ours / ip-batch, taken within each round, then the median. A third line per N
//! (`route_bench_naive`) times the textbook rtnetlink way for comparison: one request per route,
//! `buffer_unordered(64)`. The namespace is deleted on exit, also on error or panic.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use nix::sched::CloneFlags;
use wiremesh::desired::{MAIN_TABLE, Route, RouteDev};
use wiremesh::reconcile::netlink::{Devices, Netlink};

const ROUNDS: usize = 5;
const DEV: &str = "rt0";

/// The namespace, deleted on drop.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dst(i: usize) -> String {
    format!("10.{}.{}.{}/32", 200 + i / 65536, (i / 256) % 256, i % 256)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rates (routes/s) of one round.
struct Round {
    ours_add: f64,
    ours_del: f64,
    ip_add: f64,
    ip_del: f64,
    /// One rtnetlink request per route, 64 futures in flight (`buffer_unordered(64)`): the
    /// textbook way, for comparison with the batched datagrams.
    naive_add: f64,
}

/// Add the routes one rtnetlink request each, 64 in flight; returns the failures.
async fn naive_add(nl: &Netlink, n: usize) -> Result<usize> {
    let index = nl
        .handle()
        .link()
        .get()
        .match_name(DEV.to_owned())
        .execute()
        .try_next()
        .await?
        .context("rt0")?
        .header
        .index;
    let failed = futures::stream::iter(0..n)
        .map(|i| {
            let h = nl.handle().clone();
            async move {
                let d: std::net::Ipv4Addr = dst(i).trim_end_matches("/32").parse().expect("ip");
                let msg = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(d, 32)
                    .output_interface(index)
                    .scope(rtnetlink::packet_route::route::RouteScope::Link)
                    .build();
                h.route().add(msg).execute().await
            }
        })
        .buffer_unordered(64)
        .filter(|r| futures::future::ready(r.is_err()))
        .count()
        .await;
    Ok(failed)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn round(
    nl: &Netlink,
    ns: &str,
    routes: &[Route],
    files: &(tempfile::NamedTempFile, tempfile::NamedTempFile),
    ours_first: bool,
) -> Result<Round> {
    let n = routes.len();
    let count = || -> Result<usize> {
        Ok(ip(&["-n", ns, "route", "show", "dev", DEV])?
            .lines()
            .count())
    };
    let mut r = Round {
        ours_add: 0.0,
        ours_del: 0.0,
        ip_add: 0.0,
        ip_del: 0.0,
        naive_add: 0.0,
    };
    let batch = |f: &tempfile::NamedTempFile| -> Result<Duration> {
        let path = f.path().to_str().context("temp path")?;
        let t = Instant::now();
        ip(&["-n", ns, "-batch", path])?;
        Ok(t.elapsed())
    };
    for step in 0..2 {
        if (step == 0) == ours_first {
            let t = Instant::now();
            let res = nl.apply_routes(routes, &[]).await;
            r.ours_add = rate(n, t.elapsed());
            ensure!(res.failures() == 0, "{} adds failed", res.failures());
            ensure!(count()? == n, "ours: route count after add");
            let t = Instant::now();
            let res = nl.apply_routes(&[], routes).await;
            r.ours_del = rate(n, t.elapsed());
            ensure!(res.failures() == 0, "{} deletes failed", res.failures());
        } else {
            r.ip_add = rate(n, batch(&files.0)?);
            ensure!(count()? == n, "ip -batch: route count after add");
            r.ip_del = rate(n, batch(&files.1)?);
        }
        ensure!(count()? == 0, "routes left after delete");
    }
    let t = Instant::now();
    let failed = naive_add(nl, n).await?;
    r.naive_add = rate(n, t.elapsed());
    ensure!(failed == 0 && count()? == n, "naive: {failed} adds failed");
    batch(&files.1)?;
    Ok(r)
}

fn batch_file(verb: &str, n: usize) -> Result<tempfile::NamedTempFile> {
    let mut f = tempfile::NamedTempFile::new()?;
    for i in 0..n {
        writeln!(f, "route {verb} {} dev {DEV}", dst(i))?;
    }
    f.flush()?;
    Ok(f)
}

async fn bench(ns: &str, sizes: &[usize]) -> Result<()> {
    let nl = Netlink::new(Devices {
        wireguard: DEV.into(),
        private: String::new(),
        tunnel: String::new(),
        bridge: String::new(),
    })?;
    eprintln!("{nl:?}");
    println!("| n | ours add/s | ip -batch add/s | ratio | ours del/s | ip -batch del/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    let mut lines = Vec::new();
    for &n in sizes {
        let routes: Vec<Route> = (0..n)
            .map(|i| Route {
                table: MAIN_TABLE,
                dst: dst(i).parse().expect("valid"),
                gateway: None,
                dev: RouteDev::WireGuard,
                src: None,
                onlink: false,
            })
            .collect();
        let files = (batch_file("add", n)?, batch_file("del", n)?);
        let mut rounds = Vec::new();
        for k in 0..ROUNDS {
            let r = round(&nl, ns, &routes, &files, k % 2 == 0).await?;
            eprintln!(
                "n={n} round={k} ours_add={:.0} ip_add={:.0} ours_del={:.0} ip_del={:.0} \
                 naive_add={:.0}",
                r.ours_add, r.ip_add, r.ours_del, r.ip_del, r.naive_add
            );
            rounds.push(r);
        }
        let med = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let (oa, ia, ra) = (
            med(|r| r.ours_add),
            med(|r| r.ip_add),
            med(|r| r.ours_add / r.ip_add),
        );
        let (od, id, rd) = (
            med(|r| r.ours_del),
            med(|r| r.ip_del),
            med(|r| r.ours_del / r.ip_del),
        );
        println!("| {n} | {oa:.0} | {ia:.0} | {ra:.2} | {od:.0} | {id:.0} | {rd:.2} |");
        lines.push(format!(
            "route_bench n={n} ours_routes_per_s={oa:.0} ipbatch_routes_per_s={ia:.0} ratio={ra:.3}"
        ));
        let naive = med(|r| r.naive_add);
        lines.push(format!(
            "route_bench_naive n={n} rtnetlink_buffer_unordered64_routes_per_s={naive:.0} \
             ours_over_naive={:.3}",
            med(|r| r.ours_add / r.naive_add)
        ));
        lines.push(format!(
            "route_bench_del n={n} ours_routes_per_s={od:.0} ipbatch_routes_per_s={id:.0} ratio={rd:.3}"
        ));
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = match std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<Vec<usize>, _>>()
    {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => vec![1000, 10_000],
        Err(e) => bail!("usage: route_bench [N ...]: {e}"),
    };
    ensure!(
        sizes.iter().all(|&n| n > 0 && n <= 65536 * 55),
        "N must be in 1..=3604480"
    );
    let ns = Ns(format!("wm-rb-{}", std::process::id()));
    ip(&["netns", "add", &ns.0])?;
    ip(&[
        "-n", &ns.0, "link", "add", DEV, "type", "veth", "peer", "name", "rt0p",
    ])?;
    ip(&["-n", &ns.0, "link", "set", "rt0p", "up"])?;
    ip(&["-n", &ns.0, "link", "set", DEV, "up"])?;
    let name = ns.0.clone();
    let worker = std::thread::spawn(move || -> Result<()> {
        let fd = std::fs::File::open(format!("/run/netns/{name}"))?;
        nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(bench(&name, &sizes))
    });
    match worker.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
