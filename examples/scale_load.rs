//! Load test (root): thousands of synthetic Nodes in a real kube-apiserver, one real
//! `wiremesh agent` in its own network namespace with userspace WireGuard, and a stream of
//! changes at a set rate. Measures the time to first convergence, the rate the API server
//! took, how the agent batched the stream (registry batches and reconciliations against
//! changes), its lag (a probe node's endpoint moved four times a second, timed from the write
//! to the agent's "kernel reconciled"; and from the last change to the last reconciliation),
//! its memory (`VmRSS` sampled every 100 ms, `VmHWM`) and CPU time, and checks that the kernel
//! ends in exactly the state `meshctl plan` computes from the same API server.
//!
//! Prints one `scale key=value…` line, which `benches/report.py` turns into BENCHMARKS.md.
//! `benches/scale.sh` runs it for full and location granularity at 5,000 nodes.
//!
//! ```sh
//! cargo build --release --bins --example scale_load
//! sudo target/release/examples/scale_load --nodes 5000 --granularity full --rate 1000 --duration 60
//! ```
//!
//! The harness (namespaces, API server, synthetic cluster, generator, kernel ⇄ plan
//! comparison) is the integration tests' `tests/util/scale.rs`, included here by path.

#[allow(dead_code)]
#[path = "../tests/util/scale.rs"]
mod scale;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;

use scale::{
    Mix, Options, Scale, StreamOptions, activity, membership_latencies, probe_latencies, quantile,
    unix_secs,
};

/// Load test of one wiremesh agent against a real kube-apiserver.
#[derive(Parser)]
struct Args {
    /// Synthetic nodes.
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Synthetic nodes per location.
    #[arg(long, default_value_t = 10)]
    per_location: usize,
    /// The agent's granularity: full or location.
    #[arg(long, default_value = "full")]
    granularity: String,
    /// Changes per second to send.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of changes.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Weights of endpoint moves, location changes, joins and leaves.
    #[arg(long, default_value = "70,20,5,5")]
    mix: String,
    /// Seconds the agent is left alone after converging, before the stream (steady memory).
    #[arg(long, default_value_t = 10.0)]
    idle: f64,
    /// Copy the agent's log here at the end (it is removed with everything else).
    #[arg(long, value_name = "FILE")]
    keep_log: Option<PathBuf>,
}

fn kib_to_mib(k: u64) -> String {
    format!("{:.1}", k as f64 / 1024.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let w: Vec<u32> = args
        .mix
        .split(',')
        .map(|x| x.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .context("--mix: four numbers, e.g. 70,20,5,5")?;
    let [moves, relocations, adds, removes] = w[..] else {
        bail!("--mix: four numbers, e.g. 70,20,5,5");
    };
    if args.granularity != "full" && args.granularity != "location" {
        bail!("--granularity: full or location");
    }
    let bin_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .context("no directory of this example")?;
    let (wiremesh, meshctl) = (bin_dir.join("wiremesh"), bin_dir.join("meshctl"));
    if !wiremesh.exists() || !meshctl.exists() {
        bail!("build the binaries first: cargo build --release --bins --example scale_load");
    }

    let mut s = Scale::new(Options {
        nodes: args.nodes,
        per_location: args.per_location,
        granularity: args.granularity.clone(),
        wiremesh,
        meshctl,
    });
    eprintln!("creating {} Nodes", args.nodes);
    let create = s.create_nodes(64);
    eprintln!("created in {create:.1?}; starting the agent");
    s.start_agent();
    let (converged, first) = s.wait_converged(Duration::from_secs(600));
    let log = s.log();
    let initial = activity(&log, s.agent_started(), converged);
    let first_convergence = initial.last_reconcile.unwrap_or(converged) - s.agent_started();
    let cpu_initial = s.agent_cpu();
    let (rss_converged, _) = s.agent_memory();
    eprintln!(
        "converged in {first_convergence:.2} s: {} peers, {} routes; idle {} s",
        first.peers.len(),
        first.routes.len(),
        args.idle
    );
    std::thread::sleep(Duration::from_secs_f64(args.idle));
    let (rss_idle, _) = s.agent_memory();

    let changes = (args.rate * args.duration).round() as usize;
    let cpu_before = s.agent_cpu();
    eprintln!(
        "streaming {changes} changes at {}/s, {} in flight",
        args.rate, args.concurrency
    );
    let rep = s.stream(&StreamOptions {
        rate: args.rate,
        changes,
        concurrency: args.concurrency,
        probe_every: ((args.rate / 4.0).round() as usize).max(1),
        mix: Mix {
            moves,
            relocations,
            adds,
            removes,
        },
        seed: 1,
    });
    let stream_end = unix_secs(SystemTime::now());
    eprintln!(
        "sent: {} accepted at {:.0}/s, {} refused{}; waiting for the kernel",
        rep.accepted_total(),
        rep.achieved_rate(),
        rep.refused,
        rep.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    let (done, last) = s.wait_converged(Duration::from_secs(600));
    let cpu_stream = s.agent_cpu() - cpu_before;
    let log = s.log();
    let act = activity(&log, rep.first_sent, done);
    let lag = act
        .last_reconcile
        .map_or(0.0, |t| (t - rep.last_ack).max(0.0));
    let times = probe_latencies(&log, &rep.probes);
    let sorted = |f: fn(&scale::ProbeTimes) -> Option<f64>| {
        let mut v: Vec<f64> = times.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let probes = sorted(|p| p.applied);
    let probes_seen = sorted(|p| p.seen);
    // Joins and leaves: each renumbers the mesh IPs after it in full granularity.
    let joins = membership_latencies(&log, &rep.memberships);
    let mut joins_applied: Vec<f64> = joins.iter().filter_map(|p| p.applied).collect();
    joins_applied.sort_by(f64::total_cmp);
    let joins_missed = joins.len() - joins_applied.len();
    let mut delivered: Vec<f64> = rep.delivered.iter().flatten().copied().collect();
    delivered.sort_by(f64::total_cmp);
    let rss_stream_max = s.sampler().max_between(rep.first_sent, stream_end);
    eprintln!(
        "converged {:.2} s after the last change; idle {} s",
        lag, args.idle
    );
    std::thread::sleep(Duration::from_secs_f64(args.idle));
    let (rss_end, hwm) = s.agent_memory();
    let wg_rss = s
        .wireguard_pid()
        .and_then(scale::memory_kib)
        .map_or(0, |(r, _)| r);
    if let Some(path) = &args.keep_log {
        std::fs::copy(s.agent_dir().join("agent.log"), path)
            .with_context(|| format!("copying the agent's log to {}", path.display()))?;
    }
    let accepted = rep.accepted_total();
    let get = |k: &str| rep.accepted.get(k).copied().unwrap_or(0);
    println!(
        "scale nodes={} granularity={} mix={} per_location={} peers={} routes={} peers_end={} \
         create_s={:.1} first_convergence_s={:.2} initial_cpu_s={:.2} \
         rate_target={} duration_s={} concurrency={} changes={} accepted={} refused={} \
         achieved_rate={:.0} api_p50_ms={:.1} api_p99_ms={:.1} \
         moves={} relocations={} adds={} removes={} probes={} \
         batches={} engine_events={} reconciles={} ops={} warnings={} \
         lag_s={:.3} probe_p50_ms={:.0} probe_p99_ms={:.0} probe_max_ms={:.0} \
         probe_seen_p50_ms={:.0} probe_seen_p99_ms={:.0} \
         membership_p50_ms={:.0} membership_p99_ms={:.0} membership_unseen={} \
         api_delivery_p50_ms={:.0} api_delivery_p99_ms={:.0} \
         stream_cpu_s={:.2} cpu_us_per_change={:.0} \
         rss_converged_mib={} rss_idle_mib={} rss_stream_max_mib={} rss_end_mib={} \
         hwm_mib={} wireguard_go_rss_mib={} exact=yes",
        args.nodes,
        args.granularity,
        w.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.per_location,
        first.peers.len(),
        first.routes.len(),
        last.peers.len(),
        create.as_secs_f64(),
        first_convergence,
        cpu_initial,
        args.rate,
        args.duration,
        args.concurrency,
        changes,
        accepted,
        rep.refused,
        rep.achieved_rate(),
        quantile(&rep.latencies, 0.5) * 1000.0,
        quantile(&rep.latencies, 0.99) * 1000.0,
        get("move"),
        get("relocate"),
        get("add"),
        get("remove"),
        get("probe"),
        act.batches,
        act.engine_events,
        act.reconciles,
        act.ops,
        act.warnings,
        lag,
        quantile(&probes, 0.5) * 1000.0,
        quantile(&probes, 0.99) * 1000.0,
        probes.last().copied().unwrap_or_default() * 1000.0,
        quantile(&probes_seen, 0.5) * 1000.0,
        quantile(&probes_seen, 0.99) * 1000.0,
        quantile(&joins_applied, 0.5) * 1000.0,
        quantile(&joins_applied, 0.99) * 1000.0,
        joins_missed,
        quantile(&delivered, 0.5) * 1000.0,
        quantile(&delivered, 0.99) * 1000.0,
        cpu_stream,
        if accepted > 0 {
            cpu_stream / accepted as f64 * 1e6
        } else {
            0.0
        },
        kib_to_mib(rss_converged),
        kib_to_mib(rss_idle),
        kib_to_mib(rss_stream_max),
        kib_to_mib(rss_end),
        kib_to_mib(hwm),
        kib_to_mib(wg_rss),
    );
    Ok(())
}
