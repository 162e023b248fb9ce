#!/usr/bin/env bash
# Bring up (parts of) a real Kubernetes v1.20 cluster on this machine, offline (layout: lib.sh).
#   up.sh images                    pause, busybox and wiremesh images ($S/images/*.tar)
#   up.sh cp                        control plane in netns wmk-cp
#   up.sh node N [FLAVOUR] [LOC]    node N; FLAVOUR kubeadm (CNI in /etc/cni/net.d, /opt/cni/bin)
#                                   or k3s (k3s's CNI directories); LOC: its
#                                   topology.kubernetes.io/region label (the wiremesh location)
#   up.sh N [FLAVOUR] [each|one]    control plane + nodes 1..N in parallel, each in its own
#                                   location (default) or all in one
# Binaries: tests/apiserver/setup.sh --cluster. Root; hold /tmp/wiremesh-netns.lock (run.sh does).
. "$(dirname "$0")/lib.sh"

images() {
  local d=$S/images w
  mkdir -p "$d"
  w=$(mktemp -d "$S/img.XXXXXX")
  # pause: upstream's static C program.
  umoci init --layout "$w/pause"
  umoci new --image "$w/pause:3.2"
  umoci unpack --image "$w/pause:3.2" "$w/pb"
  install -m 0755 "$(bin pause)" "$w/pb/rootfs/pause"
  umoci repack --image "$w/pause:3.2" "$w/pb"
  umoci config --image "$w/pause:3.2" --config.entrypoint /pause
  skopeo copy --quiet "oci:$w/pause:3.2" "docker-archive:$d/pause.tar:$PAUSE_IMAGE"
  # The test pods: Debian's static busybox (sh, ping, nc, httpd).
  umoci init --layout "$w/bb"
  umoci new --image "$w/bb:1"
  umoci unpack --image "$w/bb:1" "$w/bbb"
  mkdir -p "$w/bbb/rootfs/bin" "$w/bbb/rootfs/tmp"
  install -m 0755 /bin/busybox "$w/bbb/rootfs/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$w/bbb/rootfs/bin/$a"; done
  umoci repack --image "$w/bb:1" "$w/bbb"
  umoci config --image "$w/bb:1" --config.cmd /bin/sh --config.env PATH=/bin
  skopeo copy --quiet "oci:$w/bb:1" "docker-archive:$d/busybox.tar:$TEST_IMAGE"
  rm -rf "$w"
  # wiremesh: the project's image, under the manifests' name and a second tag for the rolling
  # update check.
  cp "$("$ROOT/scripts/image.sh" "${WMK_SECOND_TAG:-0.1.0-rollout}")" "$d/wiremesh.tar"
}

cp_up() {
  local d=$S/cp
  mkdir -p "$d"
  ip netns add "$CP_NS"
  ip -n "$CP_NS" link set lo up
  ip -n "$CP_NS" link add "$BRIDGE" type bridge
  ip -n "$CP_NS" addr add "$UNDERLAY_GW/24" dev "$BRIDGE"
  ip -n "$CP_NS" link set "$BRIDGE" up
  # Nothing addressed to a pod or a service may follow a route out of here: the control plane
  # namespace has no default route, and these blackholes answer at once (per-node pod CIDR
  # routes via the node's IP are added as nodes get their CIDRs).
  ip -n "$CP_NS" route add blackhole "$CLUSTER_CIDR"
  ip -n "$CP_NS" route add blackhole "$SERVICE_RANGE"
  # The host's drop guard: anything from or to the test ranges leaving the machine's own
  # namespace by any interface but lo is dropped and counted (the run asserts 0).
  nft -f - <<NFT
table inet wmk_guard {
  chain guard_output { type filter hook output priority -10; policy accept;
    oifname "lo" accept
    ip saddr { $UNDERLAY, $CLUSTER_CIDR, $SERVICE_RANGE } counter drop
    ip daddr { $UNDERLAY, $CLUSTER_CIDR, $SERVICE_RANGE } counter drop
  }
  chain guard_forward { type filter hook forward priority -10; policy accept;
    ip saddr { $UNDERLAY, $CLUSTER_CIDR, $SERVICE_RANGE } counter drop
    ip daddr { $UNDERLAY, $CLUSTER_CIDR, $SERVICE_RANGE } counter drop
  }
}
NFT
  # etcd + kube-apiserver: the project's API server recipe, as a real cluster's.
  local out
  out=$(closefds; nsenter --net="/run/netns/$CP_NS" -- env DIR="$d" BIND="$UNDERLAY_GW" API_PORT=6443 \
    ETCD_PORT=2379 CLUSTER=1 SERVICE_RANGE="$SERVICE_RANGE" "$ROOT/tests/apiserver/up.sh")
  echo "$out" | sed -n 's/^ETCD_PID=//p' > "$d/etcd.pid"
  echo "$out" | sed -n 's/^APISERVER_PID=//p' > "$d/apiserver.pid"
  client_kubeconfig "$d/kcm.kubeconfig" system:kube-controller-manager system:kube-controller-manager
  client_kubeconfig "$d/sched.kubeconfig" system:kube-scheduler system:kube-scheduler
  spawn "$d/kcm.pid" "$d/kcm.log" nsenter --net="/run/netns/$CP_NS" -- \
    "$(bin kube-controller-manager)" --kubeconfig="$d/kcm.kubeconfig" \
    --allocate-node-cidrs --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SERVICE_RANGE" --service-account-private-key-file="$d/pki/sa.key" \
    --root-ca-file="$d/pki/ca.crt" --use-service-account-credentials --leader-elect=false \
    --port=0 --secure-port=0 --v=1
  spawn "$d/sched.pid" "$d/sched.log" nsenter --net="/run/netns/$CP_NS" -- \
    "$(bin kube-scheduler)" --kubeconfig="$d/sched.kubeconfig" --leader-elect=false \
    --port=0 --secure-port=0 --v=1
  # Pods' resolv.conf (kubelet --resolv-conf) and the nodes' /etc/resolv.conf.
  echo "nameserver $CLUSTER_DNS" > "$S/resolv.conf"
  wait_for 60 kc get serviceaccount default || die "no default ServiceAccount (controller-manager: $d/kcm.log)"
}

# Host mount points the node binds over; created when missing and removed again by down.sh.
host_dirs() { # flavour
  echo /var/lib/cni /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/wiremesh
  if [ "$1" = k3s ]; then
    echo /var/lib/rancher/k3s/agent/etc/cni/net.d /var/lib/rancher/k3s/data/current/bin
  else
    echo /etc/cni/net.d /opt/cni/bin
  fi
}

node_up() { # n flavour location
  local n=$1 flavour=${2:-kubeadm} loc=${3:-} name ip d conf_dir bin_dir h
  name=$(node_name "$n"); ip=$(node_ip "$n"); d=$(node_dir "$n")
  mkdir -p "$d"/{root,log}
  echo "$flavour" > "$d/flavour"
  if [ "$flavour" = k3s ]; then
    conf_dir=/var/lib/rancher/k3s/agent/etc/cni/net.d bin_dir=/var/lib/rancher/k3s/data/current/bin
  else
    conf_dir=/etc/cni/net.d bin_dir=/opt/cni/bin
  fi
  # Network: eth0 on the control plane's bridge. Forwarding on, as kubeadm's preflight demands;
  # IPv6 forwarding stays 0 (the Debian default): the agent must not need it on an IPv4 cluster.
  ip netns add "$name"
  ip -n "$name" link set lo up
  ip link add "wmkv$n" netns "$CP_NS" type veth peer name eth0 netns "$name"
  ip -n "$CP_NS" link set "wmkv$n" master "$BRIDGE" up
  ip -n "$name" addr add "$ip/24" dev eth0
  ip -n "$name" link set eth0 up
  ip -n "$name" route add default via "$UNDERLAY_GW"
  ip netns exec "$name" sysctl -qw net.ipv4.ip_forward=1
  # Guard: nothing leaves the node's eth0 for an address outside the underlay (the control
  # plane, which has no route out, would drop it anyway). Counted by kind: "pod" is a plaintext
  # pod packet on the underlay (wiremesh is fail-closed: the run asserts 0, and 0 for "ipv6");
  # "service" and "other" are the node's own early dials (the agent before kube-proxy's rules,
  # the kubelet's cloud-metadata probes), reported with their destinations.
  ip netns exec "$name" nft -f - <<NFT
table inet wmk_guard {
  set other { type ipv4_addr . inet_service; flags dynamic; }
  # Pod CIDRs this node reaches in plaintext by design: the static routes of the bridge CNI a
  # migration starts from (empty unless the run's migrate scenario fills it; see run.sh).
  set legacy { type ipv4_addr; flags interval; }
  chain guard_postrouting { type filter hook postrouting priority 100; policy accept;
    oifname "eth0" ip daddr @legacy counter accept comment "legacy"
    oifname "eth0" ip daddr $CLUSTER_CIDR counter drop comment "pod"
    oifname "eth0" ip daddr $SERVICE_RANGE counter drop comment "service"
    oifname "eth0" ip daddr != $UNDERLAY meta l4proto tcp add @other { ip daddr . tcp dport }
    oifname "eth0" ip daddr != $UNDERLAY counter drop comment "other"
    oifname "eth0" ip6 daddr != { fe80::/10, ff02::/16 } counter drop comment "ipv6"
  }
}
NFT
  # Per-node directories bound over the host paths.
  local binds=() hd
  for hd in $(host_dirs "$flavour"); do
    mkdir -p "$d/root$hd"
    if [ ! -d "$hd" ]; then
      # Record the top-most directory created, for down.sh.
      local top=$hd
      while [ ! -d "$(dirname "$top")" ]; do top=$(dirname "$top"); done
      mkdir -p "$hd"
      echo "$top" >> "$S/created-dirs"
    fi
    binds+=("$d/root$hd:$hd")
  done
  cp -a /usr/lib/cni/. "$d/root$bin_dir/"
  # The holder: a new mount + UTS namespace in the node's netns; the mounts are made in it.
  spawn "$d/holder.pid" "$d/log/holder.log" \
    nsenter --net="/run/netns/$name" unshare --mount --uts --propagation private -- sh -c '
    set -e
    hostname "$1"; shift
    t=$(mktemp -d /tmp/wmk-cg.XXXXXX)
    mount --rbind /sys/fs/cgroup "$t"
    mount -t sysfs sysfs /sys
    mount --move "$t" /sys/fs/cgroup
    rmdir "$t"
    mount -t tmpfs -o mode=755 tmpfs /run
    mkdir -p /run/netns /run/wireguard /run/containerd
    touch /run/xtables.lock
    mount --bind "$1" /etc/resolv.conf; shift
    for b in "$@"; do mount --bind "${b%%:*}" "${b#*:}"; done
    exec sleep infinity' holder "$name" "$S/resolv.conf" "${binds[@]}"
  wait_for 10 test -e "/proc/$(holder_pid "$n")/ns/mnt" || die "node $n: no holder"
  # The mounts are done when the holder sleeps.
  wait_for 10 grep -q sleep "/proc/$(holder_pid "$n")/comm" || die "node $n: holder failed: $(cat "$d/log/holder.log")"
  # cgroups: the kubelet's root under every hierarchy.
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "$h$name"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" > "$h$name/cpuset.cpus"
      cat "$h/cpuset.mems" > "$h$name/cpuset.mems"
    fi
  done
  cat > "$d/containerd.toml" <<TOML
version = 2
root = "$d/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$bin_dir"
    conf_dir = "$conf_dir"
TOML
  spawn "$d/containerd.pid" "$d/log/containerd.log" \
    nsenter -t "$(holder_pid "$n")" -n -m -u -- containerd --config "$d/containerd.toml"
  wait_for 20 in_node "$n" ctr -a /run/containerd/containerd.sock version || die "node $n: containerd did not start"
  local img
  for img in "$S"/images/*.tar; do
    in_node "$n" ctr -a /run/containerd/containerd.sock -n k8s.io images import "$img" > /dev/null
  done
  client_kubeconfig "$d/kubelet.kubeconfig" "system:node:$name" system:nodes
  client_kubeconfig "$d/proxy.kubeconfig" system:kube-proxy system:node-proxier
  local labels=()
  [ -z "$loc" ] || labels=(--node-labels="topology.kubernetes.io/region=$loc")
  spawn "$d/kubelet.pid" "$d/log/kubelet.log" nsenter -t "$(holder_pid "$n")" -n -m -u -- \
    "$(bin kubelet)" --kubeconfig="$d/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
    --cgroup-driver=cgroupfs --cgroup-root="/$name" --fail-swap-on=false \
    --hostname-override="$name" --node-ip="$ip" --read-only-port=0 \
    --pod-infra-container-image="$PAUSE_IMAGE" --anonymous-auth=false \
    --client-ca-file="$S/cp/pki/ca.crt" --authorization-mode=AlwaysAllow \
    --cluster-dns="$CLUSTER_DNS" --cluster-domain=cluster.local --resolv-conf="$S/resolv.conf" \
    --volume-plugin-dir=/var/lib/kubelet/volume-plugins --image-gc-high-threshold=100 \
    --eviction-hard='memory.available<100Mi,nodefs.available<1%,imagefs.available<1%,nodefs.inodesFree<1%' \
    "${labels[@]}" --v=1
  # iptables mode; conntrack's table size is read-only outside the machine's own namespace.
  spawn "$d/kube-proxy.pid" "$d/log/kube-proxy.log" nsenter -t "$(holder_pid "$n")" -n -m -u -- \
    "$(bin kube-proxy)" --kubeconfig="$d/proxy.kubeconfig" --hostname-override="$name" \
    --cluster-cidr="$CLUSTER_CIDR" --proxy-mode=iptables --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --v=1
  wait_for 60 kc get node "$name" || die "node $n did not register (kubelet: $d/log/kubelet.log)"
  local cidr= _
  for _ in $(seq 30); do
    cidr=$(kc get node "$name" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)
    [ -z "$cidr" ] || break
    sleep 1
  done
  [ -n "$cidr" ] || die "node $n has no pod CIDR"
  # The API server answers pods (through the kubernetes Service) at their own addresses.
  ip -n "$CP_NS" route replace "$cidr" via "$ip"
  log "node $n ($name, $flavour${loc:+, location $loc}) registered, pod CIDR $cidr"
}

# The network a cluster without flannel has before wiremesh: on every node of 1..N a bridge CNI
# config (bridge cni0, host-local on the node's pod CIDR), sorting before wiremesh's file, and a
# static route to every other node's pod CIDR through its underlay address. The nodes' guards
# accept (and count as "legacy") plaintext to those CIDRs.
legacy_cni() { # n
  local n=$1 i j conf_dir cidr
  for i in $(seq "$n"); do
    cidr=$(kc get node "$(node_name "$i")" -o jsonpath='{.spec.podCIDR}')
    conf_dir=/etc/cni/net.d
    [ "$(cat "$(node_dir "$i")/flavour")" != k3s ] || conf_dir=/var/lib/rancher/k3s/agent/etc/cni/net.d
    cat > "$(node_dir "$i")/root$conf_dir/10-bridge.conflist" <<JSON
{"cniVersion": "0.3.1", "name": "bridge", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
    for j in $(seq "$n"); do
      [ "$j" != "$i" ] || continue
      ip -n "$(node_name "$j")" route add "$cidr" via "$(node_ip "$i")"
      ip netns exec "$(node_name "$j")" nft add element inet wmk_guard legacy "{ $cidr }"
    done
  done
  log "bridge CNI and static routes on $n nodes"
}

case ${1:-} in
  images) images ;;
  legacy) legacy_cni "$2" ;;
  cp) cp_up ;;
  node) node_up "$2" "${3:-kubeadm}" "${4:-}" ;;
  [0-9]*)
    cp_up
    pids=()
    for i in $(seq "$1"); do
      loc=
      [ "${3:-each}" = one ] || loc=loc$i
      node_up "$i" "${2:-kubeadm}" "$loc" &
      pids+=($!)
    done
    for p in "${pids[@]}"; do
      if ! wait "$p"; then
        # The other nodes stop too (what they started, down.sh ends).
        kill "${pids[@]}" 2>/dev/null || true
        die "a node failed to come up"
      fi
    done
    ;;
  *) echo "usage: $0 images|cp|node N [FLAVOUR] [LOC]|legacy N|N [FLAVOUR] [each|one]" >&2; exit 2 ;;
esac
