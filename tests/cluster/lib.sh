# shellcheck shell=bash
# Shared definitions of the real-cluster harness (sourced by up.sh, down.sh, check.sh, run.sh).
# Layout (facts and reasons: docs/testing.md, "Real cluster"):
#   netns wmk-cp   the control plane: bridge wmkbr0 $UNDERLAY_GW/24 (the test underlay), etcd on
#                  127.0.0.1, kube-apiserver on $UNDERLAY_GW:6443, controller-manager, scheduler.
#                  No route out of the machine: blackholes for the pod and service ranges.
#   netns wmk-nN   node N: eth0 172.31.242.(10+N) on wmkbr0, default route via the control plane;
#                  a holder process (`sleep infinity`) owns the node's mount and UTS namespaces
#                  (hostname wmk-nN, fresh sysfs, tmpfs on /run, per-node binds over the host paths
#                  the DaemonSet and the kubelet use); containerd, kubelet and kube-proxy run there.
# Names start with wmk- (the project's labs use wml-, the netns tests wm-).
set -euo pipefail
shopt -s inherit_errexit
CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CLUSTER_DIR/../.." && pwd)
CACHE=${WIREMESH_CACHE:-/var/cache/wiremesh}
KVER=v1.20.2
# Everything of a run: PKI, logs, per-node directories and images.
S=${WMK_DIR:-/tmp/wmk-cluster}
CP_NS=wmk-cp
BRIDGE=wmkbr0
UNDERLAY=172.31.242.0/24
UNDERLAY_GW=172.31.242.1
CLUSTER_CIDR=10.242.0.0/16
SERVICE_RANGE=10.243.0.0/24
API_CLUSTER_IP=10.243.0.1
# Pods get this as their name server: a service address nothing answers, so no name is ever
# resolved through the machine's resolver.
CLUSTER_DNS=10.243.0.10
PAUSE_IMAGE=k8s.gcr.io/pause:3.2
TEST_IMAGE=wiremesh.test/busybox:1
NETNS_LOCK=/tmp/wiremesh-netns.lock
CPU_LOCK=/tmp/wiremesh-cpu.lock

log() { printf '%s cluster: %s\n' "$(date -u +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
node_name() { echo "wmk-n$1"; }
node_ip() { echo "172.31.242.$((10 + $1))"; }
node_dir() { echo "$S/nodes/n$1"; }
holder_pid() { cat "$(node_dir "$1")/holder.pid"; }
# Run a command in node N's network, mount and UTS namespaces (as its containerd and kubelet).
in_node() { local n=$1; shift; nsenter -t "$(holder_pid "$n")" -n -m -u -- "$@"; }
in_cp() { nsenter --net="/run/netns/$CP_NS" -- "$@"; }
# kubectl as the cluster's administrator, from inside the control plane's network namespace.
# The skew warning (kubectl 1.32 against 1.20) is dropped.
kc() {
  local kubectl
  kubectl=$(command -v kubectl || echo "$CACHE/kubectl-$KVER")
  in_cp "$kubectl" --kubeconfig="$S/cp/kubeconfig" "$@" 2> >(grep -v -e 'WARNING: version difference' -e '^$' >&2)
}
bin() { echo "$CACHE/$1-$KVER"; }
# Close every file descriptor above 2 (the callers' locks must not live on in daemons).
closefds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-"; fi
  done
}
# Start a daemon (a plain command, no shell function) in the background, without the callers'
# file descriptors; its process id goes to PIDFILE, its output to LOG.
spawn() { # pidfile log cmd...
  local pidfile=$1 logf=$2
  shift 2
  ( closefds; exec "$@" ) < /dev/null > "$logf" 2>&1 &
  echo $! > "$pidfile"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b - a}'; }

# Write a kubeconfig for a client certificate CN/O signed by the cluster CA.
client_kubeconfig() { # out cn org
  local out=$1 cn=$2 org=$3 pki=$S/cp/pki
  local base=${out%.kubeconfig}
  openssl req -newkey rsa:2048 -nodes -subj "/O=$org/CN=$cn" -keyout "$base.key" -out "$base.csr" 2>/dev/null
  # A random serial: nodes come up in parallel, and -CAcreateserial's shared serial file races.
  openssl x509 -req -in "$base.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -days 2 \
    -set_serial "0x$(openssl rand -hex 12)" -out "$base.crt" 2>/dev/null
  cat > "$out" <<KC
apiVersion: v1
kind: Config
clusters:
- name: wmk
  cluster: {server: "https://$UNDERLAY_GW:6443", certificate-authority: "$pki/ca.crt"}
users:
- name: u
  user: {client-certificate: "$base.crt", client-key: "$base.key"}
contexts:
- name: wmk
  context: {cluster: wmk, user: u}
current-context: wmk
KC
}

# Wait until CMD succeeds, at most SECONDS; return 1 on timeout.
wait_for() { # seconds cmd...
  local end=$(($(date +%s) + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 1
  done
}

# Sum of the drop guards' counters: packets from or to the test ranges that tried to leave by a
# real interface of the machine, or to leave a node's underlay for anything but the underlay.
# Packets a guard table counted in its rules whose comment is one of KINDS (all: every rule).
count_rules() { # kinds...
  awk -v kinds=" $* " '/packets/ {
      k = "all"; if (match($0, /comment "[a-z0-9]+"/)) k = substr($0, RSTART + 9, RLENGTH - 10)
      if (kinds ~ " all " || index(kinds, " " k " ")) for (i = 1; i <= NF; i++) if ($i == "packets") s += $(i + 1)
    } END { print s + 0 }'
}
# The assertable count of one node's guard (by netns name): plaintext pod packets and IPv6.
guard_count() {
  ip netns exec "$1" nft list table inet wmk_guard 2>/dev/null | count_rules pod ipv6
}
guard_drops() {
  local total=0 c f
  for f in "$S"/nodes/n*/holder.pid; do
    [ -e "/proc/$(cat "$f")" ] || continue
    c=$(nsenter -t "$(cat "$f")" -n nft list table inet wmk_guard 2>/dev/null | count_rules pod ipv6)
    total=$((total + c))
  done
  if [ -f "$S/guard-drops-gone" ]; then
    total=$((total + $(awk '{s+=$1} END{print s+0}' "$S/guard-drops-gone")))
  fi
  c=$(nft list table inet wmk_guard 2>/dev/null | count_rules all)
  echo $((total + c))
}
