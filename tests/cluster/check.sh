#!/usr/bin/env bash
# Checks on a running harness cluster (up.sh). Each prints what it measured on stdout and fails
# (exit 1, with the reason on stderr) when the claim does not hold.
#   check.sh agents N         N wiremesh agents Ready (their readiness probe), every Node Ready
#   check.sh pairs N [SECS]   the test Deployment on N nodes; every pod pings every other within
#                             SECS (default 120); prints the seconds it took
#   check.sh service          the ClusterIP Service answers from every pod
#   check.sh apiserver        every pod reaches the API server through its ClusterIP
#   check.sh logs-exec        kubectl logs and exec work for the pod on every node
#   check.sh guard            the drop guards counted 0 packets
#   check.sh peers N          every node's WireGuard device has N peers
#   check.sh resources [SECS] per node: memory (RSS) and CPU over SECS (default 20) of the agent
#                             (with wireguard-go), the kubelet and kube-proxy
#   check.sh peer-ops NODE    the agent's count of WireGuard peer operations on node NODE
. "$(dirname "$0")/lib.sh"

# "name node ip" of the test pods, Running ones only.
pods() {
  kc get pods -l app=wmk-ping -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP} {.status.phase}{"\n"}{end}' \
    | awk '$4 == "Running" && $3 != "" {print $1, $2, $3}'
}

# Wait until every live node runs a test pod.
all_pods() {
  local want
  want=$(live_nodes | wc -l)
  wait_for 120 sh -c "[ \$(\"$0\" _pods | wc -l) = $want ]" \
    || die "$(pods | wc -l) of $want test pods Running"
}

agents() { # n
  local n=$1 ready
  wait_for 240 sh -c "[ \"\$(\"$0\" _ds_ready)\" = $n ]" || {
    kc -n kube-system get pods -o wide >&2 || true
    die "$(kc -n kube-system get ds wiremesh -o jsonpath='{.status.numberReady}') of $n agents Ready"
  }
  kc wait --for=condition=Ready node --all --timeout=120s >/dev/null || die "not every Node Ready: $(kc get nodes --no-headers)"
  ready=$(kc get nodes --no-headers | awk '$2 == "Ready"' | wc -l)
  [ "$ready" -ge "$n" ] || die "$ready of $n nodes Ready"
  echo "$n agents Ready, $ready nodes Ready"
}

# Every pod pings every other pod once; prints the failed pairs ("from->to").
failed_pairs() {
  local list p ips
  list=$(pods)
  ips=$(echo "$list" | awk '{print $3}' | tr '\n' ' ')
  echo "$list" | while read -r p _ ip; do
    kc exec "$p" -- sh -c "for t in $ips; do [ \$t = $ip ] || ping -c 1 -W 2 \$t >/dev/null 2>&1 || echo $ip'->'\$t; done" 2>/dev/null \
      || echo "$ip->exec-failed"
  done
}

pairs() { # n [secs]
  local n=$1 secs=${2:-120} t0 count bad=
  t0=$(now)
  kc apply -f "$CLUSTER_DIR/pingers.yaml" >/dev/null
  kc scale deployment/wmk-ping --replicas="$n" >/dev/null
  wait_for "$secs" sh -c "[ \$(\"$0\" _pods | wc -l) = $n ]" || die "only $(pods | wc -l) of $n test pods Running"
  count=$(pods | awk '{print $2}' | sort -u | wc -l)
  [ "$count" = "$n" ] || die "test pods on $count nodes, not $n"
  while :; do
    bad=$(failed_pairs)
    [ -n "$bad" ] || break
    if [ "$(awk -v a="$t0" -v b="$(now)" 'BEGIN{print (b - a > '"$secs"')}')" = 1 ]; then
      die "pod pairs failing after ${secs}s: $(echo $bad)"
    fi
    sleep 1
  done
  echo "$((n * (n - 1)))/$((n * (n - 1))) pod pairs in $(since "$t0") s"
}

service() {
  local ip p out ok=0 total=0
  all_pods
  ip=$(kc get service wmk-ping -o jsonpath='{.spec.clusterIP}')
  # Kubernetes' part first: every pod in the Service's Endpoints.
  wait_for 60 sh -c "[ \$(\"$0\" _endpoints) = $(pods | wc -l) ]" \
    || die "Service endpoints: $("$0" _endpoints) of $(pods | wc -l)"
  for p in $(pods | awk '{print $1}'); do
    total=$((total + 1))
    out=
    for _ in $(seq 10); do
      out=$(kc exec "$p" -- sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 $ip 80" 2>&1 || true)
      echo "$out" | grep -q 'wmk-ping-' && break
      sleep 1
    done
    echo "$out" | grep -q 'wmk-ping-' || die "Service $ip:80 did not answer pod $p: $out"
    ok=$((ok + 1))
  done
  echo "service $ip answered $ok/$total pods"
}

apiserver() {
  local p out ok=0 total=0
  all_pods
  for p in $(pods | awk '{print $1}'); do
    total=$((total + 1))
    # Plain HTTP to the TLS port: Go's server answers 400 "Client sent an HTTP request to an
    # HTTPS server", which proves the TCP path both ways.
    for _ in 1 2 3 4 5; do
      out=$(kc exec "$p" -- sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 $API_CLUSTER_IP 443" 2>/dev/null || true)
      echo "$out" | grep -q '400' && break
      sleep 1
    done
    echo "$out" | grep -q '400' || die "pod $p did not reach the API server at $API_CLUSTER_IP:443"
    ok=$((ok + 1))
  done
  echo "API server ClusterIP reached from $ok/$total pods"
}

logs_exec() {
  local p node out nodes=0
  all_pods
  while read -r p node _; do
    out=$(kc logs "$p" 2>&1) || die "kubectl logs $p (node $node): $out"
    echo "$out" | grep -q "started on $node" || die "kubectl logs $p: unexpected: $out"
    out=$(kc exec "$p" -- hostname 2>&1) || die "kubectl exec $p (node $node): $out"
    [ "$out" = "$p" ] || die "kubectl exec $p hostname: $out"
    nodes=$((nodes + 1))
  done < <(pods)
  echo "logs+exec on $nodes nodes"
}

guard() {
  local c
  local f where= early=0 dests=
  c=$(guard_drops)
  for f in "$S"/nodes/n*/holder.pid; do
    [ -e "/proc/$(cat "$f")" ] || continue
    early=$((early + $(nsenter -t "$(cat "$f")" -n nft list table inet wmk_guard 2>/dev/null | count_rules service other || true)))
    dests="$dests $(nsenter -t "$(cat "$f")" -n nft list set inet wmk_guard other 2>/dev/null \
      | sed -n 's/.*elements = { *\(.*\) *}.*/\1/p' | tr -d ' ' || true)"
  done
  if [ "$c" != 0 ]; then
    for f in "$S"/nodes/n*/holder.pid; do
      where="$where ${f%/holder.pid}: $(nsenter -t "$(cat "$f")" -n nft list table inet wmk_guard 2>/dev/null \
        | awk '/packets [1-9]/{print}' | tr -s ' \n' ' ')"
    done
    where="$where host: $(nft list table inet wmk_guard 2>/dev/null | awk '/packets [1-9]/' | tr -s ' \n' ' ')"
    die "the drop guards counted $c packets trying to leave the test network:$where"
  fi
  dests=$(echo "$dests" | tr ', ' '\n\n' | grep . | sort -u | tr '\n' ' ' || true)
  echo "guard: 0 plaintext pod packets, 0 reached the machine's namespace; $early early node dials stopped${dests:+ (other: ${dests% })}"
}

# Nodes up (by their directory and holder), as numbers.
live_nodes() {
  local f
  for f in "$S"/nodes/n*/holder.pid; do
    [ -e "/proc/$(cat "$f")" ] && { f=${f%/holder.pid}; echo "${f##*/n}"; }
  done
  return 0
}

peers() { # want
  local i c bad
  wait_for 90 sh -c '
    for i in $("'"$0"'" _live); do
      c=$(nsenter -t "$(cat "'"$S"'/nodes/n$i/holder.pid")" -m -n wg show wiremesh0 peers 2>/dev/null | wc -l)
      [ "$c" = '"$1"' ] || exit 1
    done' || {
    bad=
    for i in $(live_nodes); do bad="$bad n$i:$(in_node "$i" wg show wiremesh0 peers 2>/dev/null | wc -l)"; done
    die "WireGuard peers per node:$bad (want $1)"
  }
  echo "$1 peers on every node"
}

peer_ops() { # node
  in_cp curl -sf "http://$(node_ip "$1"):1107/metrics" \
    | awk '/^wiremesh_kernel_operations_total\{.*kind="peer"/{s+=$NF} END{printf "%d\n", s}'
}

# Resident memory (KiB) and CPU ticks (user+system) of a process.
rss() { awk '/^VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
resources() { # secs
  local secs=${1:-20} i d hz pids k a b p agent line=
  hz=$(getconf CLK_TCK)
  declare -A before
  for i in $(live_nodes); do
    d=$(node_dir "$i")
    agent=$(find /sys/fs/cgroup/pids/"$(node_name "$i")" -name cgroup.procs -exec cat {} + 2>/dev/null \
      | while read -r p; do
          case $(cat "/proc/$p/comm" 2>/dev/null) in wiremesh | wireguard-go) echo "$p" ;; esac
        done | tr '\n' ' ')
    echo "$i agent $agent" >> "$S/res.pids"
    echo "$i kubelet $(cat "$d/kubelet.pid")" >> "$S/res.pids"
    echo "$i kube-proxy $(cat "$d/kube-proxy.pid")" >> "$S/res.pids"
  done
  while read -r i k pids; do
    a=0; for p in $pids; do a=$((a + $(ticks "$p"))); done
    before["$i $k"]=$a
  done < "$S/res.pids"
  sleep "$secs"
  while read -r i k pids; do
    a=0 b=0; for p in $pids; do a=$((a + $(ticks "$p"))); b=$((b + $(rss "$p"))); done
    line="$line n$i $k $((b / 1024)) MiB $(awk -v t=$((a - ${before["$i $k"]})) -v hz="$hz" -v s="$secs" 'BEGIN{printf "%.1f", 100 * t / hz / s}')% CPU;"
  done < "$S/res.pids"
  rm -f "$S/res.pids"
  line=${line# }
  echo "${line%;}"
}

case ${1:-} in
  peers) peers "$2" ;;
  peer-ops) peer_ops "$2" ;;
  resources) resources "${2:-20}" ;;
  _live) live_nodes ;;
  _endpoints) kc get endpoints wmk-ping -o jsonpath='{.subsets[*].addresses[*].ip}' 2>/dev/null | wc -w ;;
  _agent_ready) kc -n kube-system get pods -l app.kubernetes.io/name=wiremesh --field-selector spec.nodeName="$(node_name "$2")" \
    -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null ;;
  _agents) kc -n kube-system get pods -l app.kubernetes.io/name=wiremesh -o name 2>/dev/null ;;
  _debug_done) kc get pods --no-headers 2>/dev/null | awk '$1 ~ /^node-debugger-/ && $3 == "Completed"' | wc -l ;;
  agents) agents "$2" ;;
  pairs) pairs "$2" "${3:-120}" ;;
  service) service ;;
  apiserver) apiserver ;;
  logs-exec) logs_exec ;;
  guard) guard ;;
  failed-pairs) failed_pairs ;;
  _ds_ready) kc -n kube-system get ds wiremesh -o jsonpath='{.status.numberReady}' 2>/dev/null ;;
  _pods) pods ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
