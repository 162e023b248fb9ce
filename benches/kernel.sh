#!/usr/bin/env bash
# Kernel benchmarks (root): route programming, WireGuard peers, convergence and the data plane.
# Writes raw results into the directory given as $1 (benches/report.py reads them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-results}
mkdir -p "$out"
cargo build --release --bins --example route_bench --example wg_bench --example convergence_bench
echo "-- routes";      ./target/release/examples/route_bench 2>/dev/null | tee "$out/routes.txt"
echo "-- wireguard";   ./target/release/examples/wg_bench 2>/dev/null | tee "$out/wg.txt"
echo "-- convergence"; ./target/release/examples/convergence_bench 200 | tee "$out/convergence.txt"
echo "-- data plane";  benches/dataplane.sh | tee "$out/dataplane.txt"
echo "-- relayed vs direct"; benches/relay.sh | tee "$out/relay.txt"
echo "-- leader failover"; benches/failover.sh | tee "$out/failover.txt"
