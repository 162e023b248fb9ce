#!/usr/bin/env bash
# Data plane (root): pod-to-pod iperf3 through a wiremesh lab (two public nodes, real agents,
# userspace WireGuard) against a bare wireguard-go tunnel between the same two node namespaces.
# Prints `dataplane mesh_mbps=… bare_mbps=… ratio=…` (medians of 5 interleaved runs of 5 s; the ratio is the median of each pair's).
set -euo pipefail
cd "$(dirname "$0")/.."
M=./target/release/meshctl
lab=dpbench
ns1=wml-$lab-n1 ns2=wml-$lab-n2
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  rm -f /run/wireguard/wmbare1.sock /run/wireguard/wmbare2.sock
  "$M" lab down --name "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"$M" lab down --name "$lab" >/dev/null 2>&1 || true
"$M" lab up --name "$lab" --nodes 2 --locations 2 --nat 0 --granularity full >/dev/null
status=$("$M" lab status --name "$lab" -o json)
pod2=$(python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; print(n[1]["pods"][0]["ips"][0].split("/")[0])' "$status")
p1=$(python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; print(n[0]["pods"][0]["name"])' "$status")
p2=$(python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; print(n[1]["pods"][0]["name"])' "$status")
ul1=$(ip -n "$ns1" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
ul2=$(ip -n "$ns2" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)

# A bare tunnel between the same two node namespaces (unique interface names: lab notes, A).
umask 077
wg genkey > "$work/k1"; wg genkey > "$work/k2"
umask 022
ip netns exec "$ns1" wireguard-go -f wmbare1 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$ns2" wireguard-go -f wmbare2 >/dev/null 2>&1 & pids+=($!)
for _ in $(seq 50); do [ -S /run/wireguard/wmbare1.sock ] && [ -S /run/wireguard/wmbare2.sock ] && break; sleep 0.1; done
wg set wmbare1 listen-port 51901 private-key "$work/k1" peer "$(wg pubkey < "$work/k2")" endpoint "$ul2:51902" allowed-ips 10.230.0.2/32
wg set wmbare2 listen-port 51902 private-key "$work/k2" peer "$(wg pubkey < "$work/k1")" endpoint "$ul1:51901" allowed-ips 10.230.0.1/32
ip -n "$ns1" addr add 10.230.0.1/30 dev wmbare1; ip -n "$ns1" link set wmbare1 up
ip -n "$ns2" addr add 10.230.0.2/30 dev wmbare2; ip -n "$ns2" link set wmbare2 up
ip netns exec "$ns1" ping -c 2 -W 2 10.230.0.2 >/dev/null
ip netns exec "$p1" ping -c 2 -W 2 "$pod2" >/dev/null

source benches/common/iperf.sh
run_iperf() { iperf_mbps "$1" "$2" "$3" 5299; }
mesh=() bare=()
for _ in 1 2 3 4 5; do
  mesh+=("$(run_iperf "$p2" "$p1" "$pod2")")
  bare+=("$(run_iperf "$ns2" "$ns1" 10.230.0.2)")
done
python3 - "${mesh[*]}" "${bare[*]}" <<'PY'
import statistics, sys
m = [int(x) for x in sys.argv[1].split()]
b = [int(x) for x in sys.argv[2].split()]
ratios = [x / y for x, y in zip(m, b)]
print(f"dataplane mesh_mbps={statistics.median(m)} bare_mbps={statistics.median(b)} "
      f"ratio={statistics.median(ratios):.2f} runs_mesh={','.join(map(str, m))} runs_bare={','.join(map(str, b))}")
PY
