#!/usr/bin/env bash
# Load test (root): 5,000 synthetic Nodes in a real etcd + kube-apiserver, one real agent with
# userspace WireGuard, 1,000 changes/s for 60 s (examples/scale_load.rs). Three runs: full
# granularity with joins and leaves (each leave renumbers the mesh IPs after it), full without
# them, location granularity with them. Writes `scale …` lines into $1/scale.txt for
# benches/report.py, and the heap of the pure steps (examples/engine_memory.rs) into
# $1/engine-memory.txt. Needs the kube-apiserver of tests/apiserver/setup.sh (built once, ~5 min).
#
#   benches/scale.sh [OUT]                      # OUT: target/bench-results
#   NODES=1000 RATE=500 DURATION=20 benches/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-results}
mkdir -p "$out"
tests/apiserver/setup.sh >/dev/null
cargo build --release --bins --example scale_load --example engine_memory
./target/release/examples/engine_memory --nodes "${NODES:-5000}" | tee "$out/engine-memory.txt"
: > "$out/scale.txt"
run() { # granularity mix
  echo "-- $1 granularity, mix $2 (moves,location changes,joins,leaves)"
  ./target/release/examples/scale_load --nodes "${NODES:-5000}" --granularity "$1" --mix "$2" \
    --rate "${RATE:-1000}" --duration "${DURATION:-60}" | tee -a "$out/scale.txt"
}
run full 70,20,5,5
run full 80,20,0,0
run location 70,20,5,5
