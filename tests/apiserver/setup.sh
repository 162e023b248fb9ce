#!/usr/bin/env bash
# Build a real kube-apiserver (v1.20.2, from Debian's kubernetes source package, with Debian's
# Go) and install etcd, for the tests that need a real API server. The binary is cached outside
# the clone, in $WIREMESH_CACHE (default /var/cache/wiremesh), so this runs once per machine:
# about 5 minutes and 1.3 GB of memory on 2 cores. Prints the path of the binary.
# Recipe and reasons: ../shared/kube-apiserver-notes.md. Needs root (apt-get).
set -euo pipefail
cache=${WIREMESH_CACHE:-/var/cache/wiremesh}
bin=$cache/kube-apiserver-v1.20.2
if [ -x "$bin" ] && command -v etcd >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
src_list=/etc/apt/sources.list.d/debian-src.sources
if [ ! -f "$src_list" ]; then
  # deb-src is not enabled by default: the first stanza of the deb822 file, as deb-src.
  awk 'BEGIN{RS="";ORS="\n\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
    | sed 's/^Types: deb$/Types: deb-src/' > "$src_list"
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
  golang-go etcd-server rsync jq golang-github-modern-go-reflect2-dev dpkg-dev curl openssl >/dev/null
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -qq kubernetes >/dev/null 2>&1
cd kubernetes-*/
# Go >= 1.18 with the vendored reflect2 v1.0.1 crashes at run time when a custom resource is
# created; use reflect2 1.0.2 from Debian instead.
v=vendor/github.com/modern-go/reflect2
find "$v" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$v/"
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on HOME=$work/home
make WHAT=cmd/kube-apiserver >&2
install -m 0755 _output/bin/kube-apiserver "$bin"
"$bin" --version >&2
echo "$bin"
