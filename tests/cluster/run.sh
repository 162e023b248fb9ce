#!/usr/bin/env bash
# The real-cluster test: wiremesh installed as users install it, on a Kubernetes v1.20 cluster of
# N nodes (default 3) run on this machine, offline. Builds what is missing (the Kubernetes
# binaries: tests/apiserver/setup.sh --cluster; the release binaries; the image:
# scripts/image.sh), brings the cluster up (up.sh), applies the bundles exactly as shipped, runs
# the checks (check.sh) and the scenarios below, tears everything down on every exit path
# (down.sh), and prints one summary line last. Exit 0 only if every check passed.
#   tests/cluster/run.sh [N]
# Root. Holds /tmp/wiremesh-netns.lock and the shared CPU lock while the cluster runs.
# WMK_SCENARIOS (default "core join rollout delete full uninstall k3s migrate") picks scenarios; WMK_KEEP=1
# keeps the logs in /tmp/wmk-cluster after the run. Where the time goes: docs/testing.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=${1:-3}
[ "$(id -u)" = 0 ] || { echo "cluster: run as root" >&2; exit 1; }

if [ "${WMK_LOCKED:-}" != 1 ]; then
  # Builds first, outside the network-namespace lock (other suites may run meanwhile).
  t=$(date +%s)
  "$here/../apiserver/setup.sh" --cluster >/dev/null
  (cd "$here/../.." && flock -s /tmp/wiremesh-cpu.lock cargo build --release --locked --bins -q)
  echo "$(date -u +%T) cluster: builds ready in $(($(date +%s) - t)) s" >&2
  export WMK_LOCKED=1
  exec flock /tmp/wiremesh-netns.lock flock -s /tmp/wiremesh-cpu.lock "$0" "$@"
fi

. "$here/lib.sh"
summary=()
failed=
step=setup
finish() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ -z "$failed" ]; then failed="$step"; fi
  if [ -n "$failed" ] && [ -d "$S/cp" ]; then
    rm -rf /tmp/wmk-failed
    mkdir -p /tmp/wmk-failed
    cp -r "$S/cp"/*.log /tmp/wmk-failed/ 2>/dev/null
    for d in "$S"/nodes/n*; do
      [ -d "$d/log" ] && mkdir -p "/tmp/wmk-failed/${d##*/}" && cp "$d"/log/*.log "/tmp/wmk-failed/${d##*/}/" 2>/dev/null
    done
    kc -n kube-system logs -l app.kubernetes.io/name=wiremesh --tail=200 --prefix > /tmp/wmk-failed/agents.log 2>&1
    log "logs of the failed run: /tmp/wmk-failed"
  fi
  local t=$SECONDS
  "$here/down.sh" >/dev/null 2>&1
  log "teardown $((SECONDS - t)) s"
  local line
  line=$(printf '%s; ' "${summary[@]}")
  if [ -n "$failed" ]; then
    echo "cluster: FAIL at $failed; ${line%; }"
    exit 1
  fi
  echo "cluster: PASS; ${line%; }"
  exit 0
}
trap finish EXIT
trap 'exit 130' INT TERM

# Run a timed step: its output's last line goes into the summary.
record() { # name cmd...
  local name=$1 t0 out rc
  shift
  step=$name
  t0=$(now)
  set +e
  ( set -e; "$@" ) > "$S/step.out"
  rc=$?
  set -e
  out=$(tail -n 1 "$S/step.out")
  [ "$rc" = 0 ] || { failed="$name${out:+ ($out)}"; exit 1; }
  log "$name: $out ($(since "$t0") s; guard drops so far $(guard_drops))"
  summary+=("$out")
}
check() { "$here/check.sh" "$@"; }

# Stale state of an interrupted run (its processes were ended by its trap; names are ours).
"$here/down.sh" >/dev/null 2>&1 || true
mkdir -p "$S"
t0=$(now)
"$here/up.sh" images >/dev/null
log "images $(since "$t0") s"

scenarios=${WMK_SCENARIOS:-core join rollout delete full uninstall k3s migrate}
has() { [[ " $scenarios " == *" $1 "* ]]; }

# --- kubeadm bundle, each node its own location (no IPIP in this kernel: within one location
# the nodes would need it) ---
step=up
t0=$(now)
"$here/up.sh" "$n" kubeadm each
log "cluster up: control plane + $n nodes in $(since "$t0") s"
summary+=("kubeadm $n nodes")

apply_to_mesh() {
  local t0
  t0=$(now)
  kc apply -f "$ROOT/manifests/wiremesh-kubeadm.yaml" >/dev/null
  check agents "$n" >/dev/null
  check pairs "$n" 180 >/dev/null
  echo "apply->mesh $(since "$t0") s"
}
record apply apply_to_mesh
record agents check agents "$n"
record pairs check pairs "$n"
record service check service
record apiserver check apiserver
record logs-exec check logs-exec
record resources check resources 20

# A node joins: its pods reach every other pod within JOIN_BOUND seconds of its start.
JOIN_BOUND=${WMK_JOIN_BOUND:-120}
m=$((n + 1))
join() {
  local t0 took
  t0=$(now)
  "$here/up.sh" node "$m" kubeadm "loc$m" 2>/dev/null
  check agents "$m" >/dev/null
  check pairs "$m" "$JOIN_BOUND" >/dev/null
  took=$(since "$t0")
  echo "node $m in mesh ${took} s after start (bound $JOIN_BOUND)"
}
if has join; then record join join; fi

# Rolling update to a new tag while every pod pings every other (2/s). The lost pings are
# counted and bounded; an agent restarted with unchanged identity must not make the others
# rewrite their WireGuard peers.
ROLLOUT_LOSS_BOUND=${WMK_ROLLOUT_LOSS_BOUND:-200}
# Every pod of LIST ("name node ip" lines) pings every other, 2/s, in the background.
pings_start() { # list
  local ips p ip
  ips=$(echo "$1" | awk '{print $3}' | tr '\n' ' ')
  while read -r p _ ip; do
    kc exec "$p" -- sh -c "for t in $ips; do [ \$t = $ip ] || setsid ping -i 0.5 -q \$t > /tmp/ping.\$t 2>&1 & done" >/dev/null
  done <<< "$1"
}
# Stops the pings of pings_start; sets lost, sent and worst (the most a pair lost).
pings_stop() { # list
  local p tx rx
  lost=0 sent=0 worst=0
  while read -r p _ _; do
    while read -r tx rx; do
      sent=$((sent + tx)); lost=$((lost + tx - rx))
      [ $((tx - rx)) -le "$worst" ] || worst=$((tx - rx))
    done < <(kc exec "$p" -- sh -c 'killall -INT ping; sleep 1; cat /tmp/ping.*; rm -f /tmp/ping.*' 2>/dev/null \
      | awk '/packets transmitted/{print $1, $4}')
  done <<< "$1"
}
rollout() {
  local list lost sent worst t0 name
  list=$("$here/check.sh" _pods)
  pings_start "$list"
  sleep 2
  t0=$(now)
  kc -n kube-system set image daemonset/wiremesh wiremesh="${WMK_IMAGE:-ghcr.io/wiremesh/wiremesh}:${WMK_SECOND_TAG:-0.1.0-rollout}" >/dev/null
  kc -n kube-system rollout status daemonset/wiremesh --timeout=300s >/dev/null
  name="rollout in $(since "$t0") s"
  sleep 5
  pings_stop "$list"
  [ "$sent" -gt 0 ] || { echo "no ping statistics" >&2; return 1; }
  [ "$worst" -le "$ROLLOUT_LOSS_BOUND" ] || { echo "$name: a pair lost $worst pings (bound $ROLLOUT_LOSS_BOUND)" >&2; return 1; }
  "$here/check.sh" pairs "$m" 60 >/dev/null
  echo "$name, $lost/$sent pings lost, worst pair $worst (bound $ROLLOUT_LOSS_BOUND)"
}
restart_keeps_peers() {
  local i before= after= p sel t0 took
  for i in $(seq 2 "$m"); do before="$before $("$here/check.sh" peer-ops "$i")"; done
  sel=(-l app.kubernetes.io/name=wiremesh --field-selector spec.nodeName="$(node_name 1)")
  p=$(kc -n kube-system get pods "${sel[@]}" -o name)
  t0=$(now)
  kc -n kube-system delete "$p" --wait=true >/dev/null
  # The new pod, not the old one still terminating (sel and p are the caller's).
  new_agent_ready() {
    [ "$(kc -n kube-system get pods "${sel[@]}" -o name 2>/dev/null)" != "$p" ] \
      && [ "$("$here/check.sh" _agent_ready 1)" = True ]
  }
  wait_for 120 new_agent_ready \
    || { echo "the agent on $(node_name 1) did not come back" >&2; return 1; }
  took=$(since "$t0")
  sleep 5
  for i in $(seq 2 "$m"); do after="$after $("$here/check.sh" peer-ops "$i")"; done
  [ "$before" = "$after" ] || { echo "peer operations on the other nodes changed: $before ->$after (restart took $took s)" >&2; return 1; }
  echo "agent on $(node_name 1) restarted in $took s, other nodes' peer operations unchanged ($after)"
}
if has rollout && has join; then
  record rollout rollout
  record restart restart_keeps_peers
fi

# The joined node is deleted: its peer and its pod CIDR's route leave every other node.
delete_node() {
  local cidr i t0
  cidr=$(kc get node "$(node_name "$m")" -o jsonpath='{.spec.podCIDR}')
  t0=$(now)
  "$here/down.sh" node "$m"
  kc delete node "$(node_name "$m")" >/dev/null
  # Its test pod went with it (the pod garbage collector would take 20-40 s to notice), then
  # one pod per remaining node.
  kc delete pods -l app=wmk-ping --field-selector spec.nodeName="$(node_name "$m")" --grace-period=0 --force >/dev/null 2>&1 || true
  kc scale deployment/wmk-ping --replicas="$n" >/dev/null
  "$here/check.sh" peers $((n - 1)) >/dev/null
  for i in $(seq "$n"); do
    wait_for 60 sh -c "! ip -n $(node_name "$i") route show | grep -q '^$cidr '" \
      || { echo "node $i still routes $cidr" >&2; return 1; }
  done
  echo "node $m deleted: peers and routes gone from $n nodes in $(since "$t0") s"
}
if has delete && has join; then record delete delete_node; fi

# Full granularity with every node in one location (no locations at all).
full() {
  kc -n kube-system set env daemonset/wiremesh WIREMESH_GRANULARITY=full >/dev/null
  kc -n kube-system rollout status daemonset/wiremesh --timeout=300s >/dev/null
  kc label node --all topology.kubernetes.io/region- >/dev/null
  check agents "$n" >/dev/null
  check peers $((n - 1)) >/dev/null
  check pairs "$n" 120
  # Kept with the logs of a failed run (/tmp/wmk-failed).
  kc -n kube-system logs -l app.kubernetes.io/name=wiremesh --tail=-1 --prefix > "$S/cp/full-agents.log" 2>&1 || true
}
if has full; then record full full; fi

# Uninstall as docs/install.md says; then nothing of wiremesh is left on any node.
uninstall() {
  local i name out left=
  kc delete -f "$ROOT/manifests/wiremesh-$1.yaml" --wait=true >/dev/null
  wait_for 120 sh -c "[ -z \"\$(\"$here/check.sh\" _agents)\" ]" || { echo "agent pods still there" >&2; return 1; }
  local conf=/etc/cni/net.d/10-wiremesh.conflist
  [ "$1" = kubeadm ] || conf=/var/lib/rancher/k3s/agent/etc/cni/net.d/10-wiremesh.conflist
  for i in $(seq "$n"); do
    name=$(node_name "$i")
    # As docs/install.md says; the key directory too ("if you want").
    kc debug "node/$name" --profile=sysadmin --image=ghcr.io/wiremesh/wiremesh:0.1.0 -- sh -c \
      "wiremesh cleanup --cni-config /host$conf --private-key /host/var/lib/wiremesh/key && rm -f /host/run/wireguard/wiremesh0.sock && rm -rf /host/var/lib/wiremesh/*" >/dev/null 2>&1
  done
  wait_for 120 sh -c "[ \"\$(\"$here/check.sh\" _debug_done)\" = $n ]" || { echo "debug pods did not finish" >&2; return 1; }
  kc delete pods -l 'app!=wmk-ping' --field-selector=status.phase=Succeeded >/dev/null
  for i in $(seq "$n"); do
    name=$(node_name "$i")
    out=$(in_node "$i" sh -c "
      ip link show wiremesh0 2>/dev/null | head -1
      ip link show wmbr0 2>/dev/null | head -1
      ip route show table all proto 104 2>/dev/null
      ip rule show 2>/dev/null | grep 'proto 104'
      nft list table inet wiremesh 2>/dev/null | head -1
      nft list table inet wiremesh_mss 2>/dev/null | head -1
      iptables-save 2>/dev/null | grep -i wiremesh
      ls $conf 2>/dev/null
      ls /run/wireguard /var/lib/wiremesh 2>/dev/null | grep -v ':\$' | grep ." || true)
    [ -z "$out" ] || left="$left $name: $(echo "$out" | tr '\n' ';')"
  done
  [ -z "$left" ] || { echo "left on the nodes:$left" >&2; return 1; }
  echo "uninstall ($1): nothing of wiremesh left on $n nodes"
}
if has uninstall; then record uninstall uninstall kubeadm; fi

# --- k3s bundle, on nodes whose container runtime uses k3s's CNI directories ---
# New nodes of FLAVOUR in place of the current ones (the bundle BUNDLE deleted first).
renew_nodes() { # flavour bundle
  local i pids=()
  kc delete -f "$ROOT/manifests/wiremesh-$2.yaml" --ignore-not-found >/dev/null 2>&1 || true
  # The test pods go with their nodes (new nodes of the same names would otherwise inherit
  # pods whose sandboxes died with the old ones).
  kc delete deployment wmk-ping --wait=false --ignore-not-found >/dev/null
  kc delete pods -l app=wmk-ping --grace-period=0 --force >/dev/null 2>&1 || true
  # Every node, also one that joined and was not deleted (a run without "delete").
  for i in $({ seq "$n"; "$here/check.sh" _live; } | sort -un); do
    "$here/down.sh" node "$i"
    kc delete node "$(node_name "$i")" --ignore-not-found >/dev/null
  done
  for i in $(seq "$n"); do
    "$here/up.sh" node "$i" "$1" "loc$i" 2>/dev/null &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
}
k3s() {
  local t0 pairs
  renew_nodes k3s kubeadm
  t0=$(now)
  kc apply -f "$ROOT/manifests/wiremesh-k3s.yaml" >/dev/null
  check agents "$n" >/dev/null
  pairs=$(check pairs "$n" 180)
  echo "k3s $n nodes, apply->mesh $(since "$t0") s, ${pairs%% *} pod pairs"
}
if has k3s; then
  record k3s k3s
  record k3s-service check service
  record k3s-apiserver check apiserver
  record k3s-logs-exec check logs-exec
  if has uninstall; then record k3s-uninstall uninstall k3s; fi
fi

# --- Migration from a bridge CNI with static routes, node by node, as docs/install.md says
# ("Migrating from a bridge CNI with static routes"). Every pod pings every other after each
# node's move; the guards accept plaintext only to the pod CIDRs a node still reaches through a
# static route (set "legacy"), so a plaintext packet between two moved nodes fails the run. ---
migrate() {
  local i j t0 t1 moved=() cidr=() out left= took= list lost sent worst pinged=0
  renew_nodes kubeadm k3s
  "$here/up.sh" legacy "$n"
  for i in $(seq "$n"); do cidr[i]=$(kc get node "$(node_name "$i")" -o jsonpath='{.spec.podCIDR}'); done
  kc wait --for=condition=Ready node --all --timeout=120s >/dev/null
  check pairs "$n" 120 >/dev/null || { echo "the bridge CNI's pods do not reach each other" >&2; return 1; }
  # Once: the DaemonSet only on the nodes that moved (none yet).
  sed 's#^      tolerations:#      nodeSelector: {wiremesh.io/migrate: wiremesh}\n      tolerations:#' \
    "$ROOT/manifests/wiremesh-kubeadm.yaml" | kc apply -f - >/dev/null
  t0=$(now)
  for i in $(seq "$n"); do
    t1=$(now)
    # The pods of the other nodes ping each other while this one moves.
    list=$("$here/check.sh" _pods | awk -v x="$(node_name "$i")" '$2 != x')
    pings_start "$list"
    kc drain "$(node_name "$i")" --ignore-daemonsets --delete-emptydir-data --grace-period=1 >/dev/null 2>&1
    # On the node: the old config, bridge, and routes to the nodes that moved. The harness's
    # guards follow each route: plaintext only to the pod CIDRs still routed by the old way.
    in_node "$i" sh -c "rm /etc/cni/net.d/10-bridge.conflist && ip link del cni0 && rm -rf /var/lib/cni/networks/bridge"
    for j in "${moved[@]}"; do
      in_node "$i" ip route del "${cidr[j]}"
      ip netns exec "$(node_name "$i")" nft delete element inet wmk_guard legacy "{ ${cidr[j]} }"
    done
    # On the nodes that moved: the route to this one.
    for j in "${moved[@]}"; do
      in_node "$j" ip route del "${cidr[i]}"
      ip netns exec "$(node_name "$j")" nft delete element inet wmk_guard legacy "{ ${cidr[i]} }"
    done
    kc label node "$(node_name "$i")" wiremesh.io/migrate=wiremesh --overwrite >/dev/null
    wait_for 120 sh -c "[ \"\$(\"$here/check.sh\" _agent_ready $i)\" = True ]" \
      || { echo "the agent on $(node_name "$i") did not get ready" >&2; return 1; }
    kc uncordon "$(node_name "$i")" >/dev/null
    pings_stop "$list"
    [ "$sent" -gt 0 ] || { echo "no ping statistics" >&2; return 1; }
    [ "$lost" = 0 ] || { echo "pods of the other nodes lost $lost/$sent pings while $(node_name "$i") moved" >&2; return 1; }
    pinged=$((pinged + sent))
    moved+=("$i")
    check pairs "$n" 120 >/dev/null || { echo "pod pairs after $(node_name "$i") moved" >&2; return 1; }
    took="$took $(since "$t1")"
  done
  # After the last node: everywhere, then the labels.
  kc -n kube-system patch daemonset wiremesh --type json \
    -p '[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]' >/dev/null
  kc -n kube-system rollout status daemonset/wiremesh --timeout=300s >/dev/null
  kc label nodes --all wiremesh.io/migrate- >/dev/null
  check agents "$n" >/dev/null
  check peers $((n - 1)) >/dev/null
  check pairs "$n" 120 >/dev/null
  for i in $(seq "$n"); do
    out=$(in_node "$i" sh -c "ip link show cni0 2>/dev/null | head -1; ls -d /etc/cni/net.d/10-bridge.conflist /var/lib/cni/networks/bridge 2>/dev/null
      ip route show | grep -v '^default' | grep ' via 172\.31\.242\.'" || true)
    [ -z "$out" ] || left="$left $(node_name "$i"): $(echo "$out" | tr '\n' ';')"
  done
  [ -z "$left" ] || { echo "old network left:$left" >&2; return 1; }
  echo "migrated $n nodes from bridge+static routes in $(since "$t0") s (per node:$took s); other nodes' pods lost 0/$pinged pings during the moves; all pod pairs after each"
}
if has migrate; then record migrate migrate; fi

record guard check guard
