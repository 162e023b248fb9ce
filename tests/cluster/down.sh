#!/usr/bin/env bash
# Tear down what up.sh started, by process id: every node (its kubelet, kube-proxy, the pods'
# processes found in the node's cgroups, containerd and its shims found in the node's mount
# namespace, the holder), its cgroups and netns; then the control plane, the guard, the host
# directories up.sh had to create, and $S. Safe to run twice or on a half-built cluster.
#   down.sh          everything
#   down.sh node N   node N only (its Node object stays: delete it with kubectl)
# WMK_KEEP=1 keeps $S (logs) for a look after a failure.
. "$(dirname "$0")/lib.sh"

# Processes to end for a node: its own (mount namespace of the holder) and its pods' (cgroups).
node_pids() { # n
  local n=$1 name hp mnt p
  name=$(node_name "$n")
  find /sys/fs/cgroup/pids/"$name" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  hp=$(cat "$(node_dir "$n")/holder.pid" 2>/dev/null) || return 0
  mnt=$(readlink "/proc/$hp/ns/mnt" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mnt" ] && echo "${p#/proc/}"
  done
  return 0
}

node_down() { # n
  local n=$1 name d f pids _
  name=$(node_name "$n"); d=$(node_dir "$n")
  # Its guard's count outlives it (check.sh guard adds it up).
  guard_count "$name" >> "$S/guard-drops-gone" 2>/dev/null || true
  # The kubelet first, so it restarts nothing; then everything else of the node.
  for f in kubelet kube-proxy; do
    [ -f "$d/$f.pid" ] && kill -9 "$(cat "$d/$f.pid")" 2>/dev/null || true
  done
  for _ in 1 2 3 4 5; do
    pids=$(node_pids "$n" | sort -u | grep -vx "$$" || true)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.5
  done
  local h
  for h in /sys/fs/cgroup/*/"$name"; do
    [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  ip netns del "$name" 2>/dev/null || true
  ip -n "$CP_NS" link del "wmkv$n" 2>/dev/null || true
  if [ -d "$d" ] && [ "${WMK_KEEP:-0}" != 1 ]; then
    rm -rf "$d/containerd" "$d/root"
  fi
}

all_down() {
  local f n
  for f in "$S"/nodes/n*; do
    [ -d "$f" ] || continue
    n=${f##*/n}
    node_down "$n"
  done
  for f in sched kcm; do
    [ -f "$S/cp/$f.pid" ] && kill -9 "$(cat "$S/cp/$f.pid")" 2>/dev/null || true
  done
  for f in apiserver etcd; do
    [ -s "$S/cp/$f.pid" ] && kill -9 "$(cat "$S/cp/$f.pid")" 2>/dev/null || true
  done
  ip netns del "$CP_NS" 2>/dev/null || true
  nft delete table inet wmk_guard 2>/dev/null || true
  if [ -f "$S/created-dirs" ]; then
    # Only directories left empty (nothing of this harness is left in them).
    sort -u "$S/created-dirs" | while read -r f; do
      [ -d "$f" ] && find "$f" -depth -type d -empty -delete 2>/dev/null || true
    done
  fi
  if [ "${WMK_KEEP:-0}" = 1 ]; then
    log "kept $S"
  else
    rm -rf "$S"
  fi
}

case ${1:-} in
  node) node_down "$2" ;;
  "") all_down ;;
  *) echo "usage: $0 [node N]" >&2; exit 2 ;;
esac
