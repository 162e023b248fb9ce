#!/usr/bin/env bash
# Run every benchmark and rewrite BENCHMARKS.md from the results.
#
#   benches/run.sh            # all benchmarks this machine can run (root adds the kernel ones
#                             # and the 5,000-node load test, benches/scale.sh)
#   benches/run.sh --quick    # shorter measurement, for a smoke run
#
# Results go to target/bench-results/; benches/report.py turns them into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-results
mkdir -p "$out"
measure=5
[ "${1:-}" = "--quick" ] && measure=1

echo "== engine (criterion)"
cargo bench --bench engine -- --warm-up-time 1 --measurement-time "$measure" | tee "$out/engine.txt"

echo "== meshctl plan on a 5000-node file"
cargo build --release --bin meshctl --example gen_cluster
./target/release/examples/gen_cluster 5000 > "$out/nodes-5000.json"
: > "$out/plan-5000.txt"
for _ in 1 2 3 4 5; do
  start=$(date +%s%N)
  ./target/release/meshctl plan --nodes "$out/nodes-5000.json" --node node-00000 \
    --granularity full -o json --timings 2>> "$out/plan-5000.txt" > /dev/null
  echo "total: $(( ($(date +%s%N) - start) / 1000 )) us" >> "$out/plan-5000.txt"
done

if [ "$(id -u)" = 0 ] && [ -x benches/kernel.sh ]; then
  echo "== kernel benchmarks (root)"
  benches/kernel.sh "$out"
fi

if [ "$(id -u)" = 0 ] && [ -x benches/scale.sh ]; then
  echo "== load test: one agent, 5000 nodes, a real API server (root)"
  if [ "$measure" = 1 ]; then DURATION=10 benches/scale.sh "$out"; else benches/scale.sh "$out"; fi
fi

python3 benches/report.py "$out" > BENCHMARKS.md
echo "BENCHMARKS.md rewritten"
