#!/usr/bin/env bash
# The real cluster's figures for BENCHMARKS.md (root): `kubectl apply` of the kubeadm bundle to
# every pod pair answering, and memory/CPU per node of the agent (with wireguard-go), the kubelet
# and kube-proxy at rest (20 s), for 3 and 5 nodes. Each is one tests/cluster/run.sh with only
# its core checks; the summary lines go to target/bench-results/cluster.txt.
#   benches/cluster.sh [NODES...]   default: 3 5
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-results
mkdir -p "$out"
: > "$out/cluster.txt"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(3 5)
for k in "${nodes[@]}"; do
  WMK_SCENARIOS=core tests/cluster/run.sh "$k" | tail -n 1 | tee -a "$out/cluster.txt"
done
