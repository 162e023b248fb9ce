//! Heap held and heap peaks of the agent's pure work at scale, measured exactly with a counting
//! allocator (mimalloc underneath, as in the agent): the engine, one desired state, the
//! planner's cache of the kernel, and the worst moment of each kind of change (one event, a
//! burst of a hundred) through the engine, the plan against the cached kernel state and the
//! cache's update — the same steps as the agent's loop, without the kernel and the API server.
//!
//! `cargo run --release --example engine_memory -- [--nodes 5000] [--granularity full]`
//!
//! Figures in BENCHMARKS.md (memory of the pure steps). The whole agent's resident memory
//! under load is measured by `benches/scale.sh`.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use wiremesh::desired::DesiredDelta;
use wiremesh::model::{Granularity, MeshNode, NodeName, WgKey};
use wiremesh::reconcile::plan::{OwnedState, apply_op, plan, plan_delta};
use wiremesh::topology::incremental::{Engine, Event, Update};
use wiremesh::topology::{Encapsulate, MeshOptions};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to mimalloc unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[path = "../benches/common/synthetic.rs"]
mod synthetic;
use synthetic::node;

#[derive(Parser)]
struct Args {
    /// Synthetic nodes (10 per location).
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// full or location.
    #[arg(long, default_value = "full")]
    granularity: String,
}

fn mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Run `f` and return its result with the heap peak it reached above the live heap before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

/// The `k`-th change of a burst: 70 % endpoint moves, 20 % location changes, 5 % leaves,
/// 5 % joins (as `benches/scale.sh`), on nodes spread over the mesh.
fn change(n: usize, k: usize, round: u32) -> Event {
    let i = 1 + (k * 7919 + round as usize * 104_729) % (n - 1);
    match k % 20 {
        0 => Event::NodeRemove(NodeName(format!("node-{i:05}"))),
        1 => Event::node(node(n + k, round)),
        2..=5 => {
            let mut m = node(i, round);
            m.location = format!("moved-{:04}", (i + round as usize) % (n / 10));
            Event::node(m)
        }
        _ => Event::node(node(i, round + 1)),
    }
}

/// What the agent's loop keeps of an engine update: one delta, or "plan everything".
enum Pending {
    Nothing,
    One(Box<DesiredDelta>),
    Full,
}

fn absorb(u: Update, p: &mut Pending) {
    match u {
        Update::Delta(d) if d.is_empty() => {}
        Update::Delta(d) => {
            *p = match p {
                Pending::Nothing => Pending::One(Box::new(d)),
                _ => Pending::Full,
            }
        }
        Update::Full(_) => *p = Pending::Full,
        Update::Unavailable(e) => panic!("{e}"),
    }
}

/// How the agent's loop takes a batch: event by event while one delta is all it holds, then
/// the rest folded into the engine without updates (it plans the whole state then).
fn take(engine: &mut Engine, events: Vec<Event>) -> Pending {
    let mut pending = Pending::Nothing;
    let mut events = events.into_iter();
    while matches!(pending, Pending::Nothing) {
        let Some(ev) = events.next() else { break };
        engine.apply_batch([ev], |u| absorb(u, &mut pending));
    }
    let rest: Vec<Event> = events.collect();
    if !rest.is_empty() {
        engine.fold_batch(rest);
        pending = Pending::Full;
    }
    pending
}

/// The agent's reconciliation without the kernel: plan the pending work against `known` and
/// apply the operations to it as the agent does (the delta's peers and routes moved into the
/// operations, the desired state dropped once planned, the operations moved into the cache).
/// Returns how many operations of each kind (`Op::kind`) it took.
fn reconcile(
    engine: &Engine,
    pending: Pending,
    known: &mut OwnedState,
    key: WgKey,
) -> BTreeMap<&'static str, usize> {
    let ops = match pending {
        Pending::Nothing => return BTreeMap::new(),
        Pending::One(d) => plan_delta(*d, known).expect("delta plan"),
        Pending::Full => plan(&engine.desired().expect("desired"), known, key),
    };
    let mut kinds = BTreeMap::new();
    for op in ops {
        *kinds.entry(op.kind()).or_insert(0) += 1;
        apply_op(known, op, key);
    }
    kinds
}

fn main() {
    let args = Args::parse();
    let granularity = match args.granularity.as_str() {
        "full" => Granularity::Full,
        "location" => Granularity::Location,
        g => panic!("unknown granularity {g}"),
    };
    let opts = MeshOptions {
        granularity,
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    };
    let n = args.nodes;
    let key = WgKey([9; 32]);
    let nodes: Vec<MeshNode> = (0..n).map(|i| node(i, 0)).collect();
    let inputs = live();
    println!(
        "{} nodes, {} granularity: the nodes as parsed from the registry: {}",
        n,
        args.granularity,
        mib(inputs)
    );

    let base = live();
    let (engine, peak) = peak_of(|| {
        Engine::new(
            nodes.clone(),
            Vec::new(),
            NodeName("node-00000".into()),
            opts.clone(),
        )
    });
    let mut engine = engine;
    println!(
        "engine: holds {} (peak while building {})",
        mib(live() - base),
        mib(peak)
    );
    let base = live();
    let (desired, peak) = peak_of(|| engine.desired().expect("desired"));
    println!(
        "one desired state: {} peers, {} routes: {} (peak {})",
        desired.peers.len(),
        desired.routes.len(),
        mib(live() - base),
        mib(peak)
    );
    drop(desired);
    let base = live();
    let mut known = OwnedState::default();
    let ((), peak) = peak_of(|| {
        reconcile(&engine, Pending::Full, &mut known, key);
    });
    println!(
        "cache of the kernel state: {} (peak of the first plan {})",
        mib(live() - base),
        mib(peak)
    );

    for (what, burst) in [
        ("one endpoint move", 0),
        ("one leave", 1),
        ("burst of 100", 100),
    ] {
        let mut worst = 0;
        let mut ops: BTreeMap<&'static str, usize> = BTreeMap::new();
        for round in 1..=4 {
            let events: Vec<Event> = match burst {
                0 => vec![change(n, 7, round)],
                1 => vec![change(n, 20 * round as usize, round)],
                b => (0..b).map(|k| change(n, k, round)).collect(),
            };
            let ((), peak) = peak_of(|| {
                let pending = take(&mut engine, events);
                for (kind, k) in reconcile(&engine, pending, &mut known, key) {
                    *ops.entry(kind).or_insert(0) += k;
                }
            });
            worst = worst.max(peak);
        }
        let by_kind: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "{what}: engine + plan + cache update, worst of 4: peak {} above the held heap \
             ({} operations in all 4: {})",
            mib(worst),
            ops.values().sum::<usize>(),
            by_kind.join(", ")
        );
    }
    println!(
        "held at the end: {} (nodes {}, the rest engine and cache)",
        mib(live()),
        mib(inputs)
    );
}
