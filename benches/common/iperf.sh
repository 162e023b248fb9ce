# Sourced by the bench scripts (bash). iperf_mbps SERVER_NS CLIENT_NS ADDRESS [PORT]: one 5 s
# iperf3 run from CLIENT_NS to a one-shot server in SERVER_NS; prints the Mbit/s received.
iperf_mbps() {
  local port=${4:-5299}
  ip netns exec "$1" iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  ip netns exec "$2" iperf3 -c "$3" -p "$port" -t 5 -J \
    | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
  wait "$srv" 2>/dev/null || true
}
