//! Engine benchmarks: full computation of one node's view at 100, 1000 and 5000 nodes, in full
//! and location granularity (10 nodes per location); at 5000 nodes, one incremental event (an
//! endpoint moves; a node in the middle leaves or returns, which renumbers the mesh IPs after
//! it) and the engine's full recomputation with its diff.
//!
//! Run with `cargo bench --bench engine`; `benches/run.sh` turns the figures into BENCHMARKS.md.

use std::hint::black_box;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wiremesh::model::{Granularity, NodeName};
use wiremesh::topology::incremental::{Engine, Event};
use wiremesh::topology::{Encapsulate, MeshOptions, compute};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::cluster;

fn opts(g: Granularity) -> MeshOptions {
    MeshOptions {
        granularity: g,
        encapsulate: Encapsulate::Never,
        ..MeshOptions::default()
    }
}

fn full_computation(c: &mut Criterion) {
    let mut group = c.benchmark_group("compute");
    for &n in &[100usize, 1000, 5000] {
        let nodes = cluster(n);
        let local = NodeName("node-00000".into());
        for (name, g) in [
            ("full", Granularity::Full),
            ("location", Granularity::Location),
        ] {
            let o = opts(g);
            group.bench_with_input(BenchmarkId::new(name, n), &nodes, |b, nodes| {
                b.iter(|| compute(black_box(nodes), &[], &local, &o).expect("plan"))
            });
        }
    }
    group.finish();
}

fn incremental_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("incremental");
    let n = 5000;
    let nodes = cluster(n);
    for (name, g) in [
        ("full", Granularity::Full),
        ("location", Granularity::Location),
    ] {
        let mut engine = Engine::new(
            nodes.clone(),
            Vec::new(),
            NodeName("node-00000".into()),
            opts(g),
        );
        // An endpoint moving back and forth on one node far from the local one.
        let mut a = nodes[n / 2].clone();
        a.endpoint = Some("198.51.100.1:51820".parse().expect("endpoint"));
        let b_node = nodes[n / 2].clone();
        let mut flip = false;
        group.bench_function(BenchmarkId::new(format!("endpoint-move/{name}"), n), |b| {
            b.iter(|| {
                flip = !flip;
                let ev = if flip { a.clone() } else { b_node.clone() };
                black_box(engine.apply(Event::node(ev)))
            })
        });
        let stats = engine.stats();
        assert!(
            stats.incremental > 0 && stats.full == 1,
            "events took the full path: {stats:?}"
        );
    }
    group.finish();
}

/// The costly events, in milliseconds each: fewer samples.
fn bursts(c: &mut Criterion) {
    let mut group = c.benchmark_group("burst");
    group.sample_size(20);
    let n = 5000;
    let nodes = cluster(n);
    for (name, g) in [
        ("full", Granularity::Full),
        ("location", Granularity::Location),
    ] {
        let mut engine = Engine::new(
            nodes.clone(),
            Vec::new(),
            NodeName("node-00000".into()),
            opts(g),
        );
        // A node in the middle leaves and comes back: Kilo's allocation renumbers the mesh IP
        // of every segment after it, so each event recomputes half the mesh.
        let mid = nodes[n / 2].clone();
        let mut gone = false;
        group.bench_function(BenchmarkId::new(format!("node-leaves/{name}"), n), |b| {
            b.iter(|| {
                gone = !gone;
                let ev = if gone {
                    Event::NodeRemove(mid.name.clone())
                } else {
                    Event::node(mid.clone())
                };
                black_box(engine.apply(ev))
            })
        });
        // What the engine does for a burst instead: one full recomputation and a diff.
        group.bench_function(BenchmarkId::new(format!("recompute/{name}"), n), |b| {
            b.iter(|| black_box(engine.set_now(None)))
        });
    }
    group.finish();
}

criterion_group!(benches, full_computation, incremental_event, bursts);
criterion_main!(benches);
