#!/usr/bin/env bash
# Build the Kubernetes v1.20.2 binaries the tests need from Debian's kubernetes source package,
# with Debian's Go, and install etcd. The binaries are cached outside the clone, in
# $WIREMESH_CACHE (default /var/cache/wiremesh), as NAME-v1.20.2, so this runs once per machine.
#   tests/apiserver/setup.sh            kube-apiserver only (the apiserver tests); prints its path
#   tests/apiserver/setup.sh --cluster  also kubelet, kube-proxy, kube-controller-manager,
#                                       kube-scheduler, the pause binary (and kubectl when none is
#                                       on PATH) plus the packages of tests/cluster/; prints the
#                                       cache directory
# Whatever is missing is built in ONE `make` from one source tree (shared compile of the common
# packages): kube-apiserver alone about 5 minutes on 2 cores, all five about 9 (see
# docs/testing.md), 1.4 GB of memory at the link step. The make holds the shared CPU lock
# /tmp/wiremesh-cpu.lock. Recipe and reasons: ../shared/kube-apiserver-notes.md and
# ../shared/real-cluster-notes.md. Needs root (apt-get).
set -euo pipefail
cache=${WIREMESH_CACHE:-/var/cache/wiremesh}
ver=v1.20.2
cluster=0
[ "${1:-}" = --cluster ] && cluster=1

wanted=(kube-apiserver)
packages=(golang-go etcd-server rsync jq golang-github-modern-go-reflect2-dev dpkg-dev curl openssl)
if [ "$cluster" = 1 ]; then
  wanted+=(kubelet kube-proxy kube-controller-manager kube-scheduler)
  command -v kubectl >/dev/null 2>&1 || wanted+=(kubectl)
  # The node runtime and the offline image tools (tests/cluster/, scripts/image.sh). Not Debian's
  # kubernetes-client: it conflicts with other kubectl packages; kubectl is built above if absent.
  packages+=(containerd runc busybox-static umoci skopeo mmdebstrap conntrack socat ethtool gcc libc6-dev)
fi
result() { if [ "$cluster" = 1 ]; then echo "$cache"; else echo "$cache/kube-apiserver-$ver"; fi; }

missing_bins() {
  local b
  for b in "${wanted[@]}"; do [ -x "$cache/$b-$ver" ] || echo "cmd/$b"; done
  if [ "$cluster" = 1 ] && [ ! -x "$cache/pause-$ver" ]; then echo pause; fi
}
missing_pkgs() {
  local p
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done
}

if [ -z "$(missing_bins)" ] && [ -z "$(missing_pkgs)" ]; then
  result
  exit 0
fi
mkdir -p "$cache"
if [ -n "$(missing_pkgs)" ] || [ -n "$(missing_bins)" ]; then
  src_list=/etc/apt/sources.list.d/debian-src.sources
  if [ ! -f "$src_list" ]; then
    # deb-src is not enabled by default: the first stanza of the deb822 file, as deb-src.
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Types: deb$/Types: deb-src/' > "$src_list"
  fi
fi
if [ -n "$(missing_pkgs)" ]; then
  apt-get update -qq
  # shellcheck disable=SC2046
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    $(missing_pkgs) >/dev/null
fi
todo=$(missing_bins | grep '^cmd/' || true)
need_pause=$(missing_bins | grep -x pause || true)
if [ -z "$todo" ] && [ -z "$need_pause" ]; then
  result
  exit 0
fi
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -qq kubernetes >/dev/null 2>&1
cd kubernetes-*/
if [ -n "$need_pause" ]; then
  # The sandbox ("pause") container's program, as upstream builds it: static C.
  gcc -Os -Wall -Werror -static -DVERSION=v3.2 -o "$cache/pause-$ver" build/pause/linux/pause.c
fi
if [ -n "$todo" ]; then
  # Go >= 1.18 with the vendored reflect2 v1.0.1 crashes at run time when a custom resource is
  # created; use reflect2 1.0.2 from Debian instead.
  v=vendor/github.com/modern-go/reflect2
  find "$v" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$v/"
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on HOME=$work/home
  # One make for every missing binary; KUBE_STATIC_OVERRIDES keeps the kubelet static like the rest.
  # shellcheck disable=SC2086
  flock -s /tmp/wiremesh-cpu.lock make WHAT="$(echo $todo)" KUBE_STATIC_OVERRIDES=kubelet >&2
  for w in $todo; do
    b=${w#cmd/}
    install -m 0755 "_output/bin/$b" "$cache/$b-$ver"
    "$cache/$b-$ver" --version >&2 || true
  done
fi
result
