#!/usr/bin/env bash
# Relayed versus direct (root): a `meshctl lab --registry kube` of four locations, node3 and
# node4 behind NAT routers of their own, so their agents relay the pair through node1 (docs/nat.md).
# In the same run, node3's pod to node4's pod (relayed: two WireGuard legs through node1) against
# node3's pod to node1's pod (direct: the first of those legs), alternating: ping RTT (40 pings,
# 0.2 s apart) and iperf3 throughput (5 s), medians of 3 rounds.
# MESHCTL=path overrides the meshctl binary (default the release build).
# Prints `relay relayed_mbps=… direct_mbps=… relayed_rtt_ms=… direct_rtt_ms=… relayed_after_s=…`.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MESHCTL:-./target/release/meshctl}
lab=rlbench
cleanup() { "$M" lab down --name "$lab" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
start=$(date +%s.%N)
"$M" lab up --name "$lab" --registry kube --nodes 4 --locations 4 --nat 2 --granularity full >/dev/null
status=$("$M" lab status --name "$lab" -o json)
pod() { python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; print(n[int(sys.argv[2])]["pods"][0][sys.argv[3]])' "$status" "$1" "$2"; }
ip_of() { python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; print(n[int(sys.argv[2])]["pods"][0]["ips"][0].split("/")[0])' "$status" "$1"; }
p3=$(pod 2 name) p4=$(pod 3 name) p1=$(pod 0 name)
ip4=$(ip_of 3) ip1=$(ip_of 0)
# The pair answers only once it is relayed (its NATs never let a direct tunnel form).
for _ in $(seq 120); do
  ip netns exec "$p3" ping -c 1 -W 1 "$ip4" >/dev/null 2>&1 && break
  sleep 1
done
ip netns exec "$p3" ping -c 2 -W 2 "$ip4" >/dev/null
relayed_after=$(python3 -c "import time; print(round(time.time() - $start, 1))")
"$M" lab check --name "$lab" | grep -q "node3 <-> node4 through node1" || {
  echo "relay: node3 <-> node4 is not relayed through node1" >&2
  exit 1
}
ip netns exec "$p1" ping -c 2 -W 2 "$(ip_of 2)" >/dev/null

rtt() { # from-ns address: average RTT in ms of 40 pings
  ip netns exec "$1" ping -q -c 40 -i 0.2 "$2" | awk -F/ '/^rtt|^round-trip/ {print $5}'
}
source benches/common/iperf.sh
mbps() { iperf_mbps "$1" "$2" "$3" 5298; }
rr=() dr=() rm=() dm=()
for _ in 1 2 3; do
  rr+=("$(rtt "$p3" "$ip4")")
  dr+=("$(rtt "$p3" "$ip1")")
  rm+=("$(mbps "$p4" "$p3" "$ip4")")
  dm+=("$(mbps "$p1" "$p3" "$ip1")")
done
python3 - "${rm[*]}" "${dm[*]}" "${rr[*]}" "${dr[*]}" "$relayed_after" <<'PY'
import statistics, sys
rm, dm = ([int(x) for x in a.split()] for a in sys.argv[1:3])
rr, dr = ([float(x) for x in a.split()] for a in sys.argv[3:5])
print(f"relay relayed_mbps={statistics.median(rm)} direct_mbps={statistics.median(dm)} "
      f"relayed_rtt_ms={statistics.median(rr):.3f} direct_rtt_ms={statistics.median(dr):.3f} "
      f"relayed_after_s={sys.argv[5]} runs_relayed_mbps={','.join(map(str, rm))} "
      f"runs_direct_mbps={','.join(map(str, dm))}")
PY
