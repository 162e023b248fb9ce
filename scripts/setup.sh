#!/usr/bin/env bash
# Install what wiremesh's build, tests and lab need on a Debian machine (idempotent).
# Needs root for apt-get; does nothing when every package is already there.
set -euo pipefail
packages=(
  wireguard-go wireguard-tools iproute2 nftables iptables graphviz
  containernetworking-plugins iputils-ping iperf3 tcpdump jq curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi
# kubectl (its built-in kustomize renders manifests/kustomize/ in tests/manifests.rs): Debian 12
# has only a 1.20 client, whose kustomize is too old, so a release binary is fetched from
# dl.k8s.io and checked against its published SHA-256.
if ! command -v kubectl >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: kubectl not found; run as root to install it" >&2
    exit 1
  fi
  kv=v1.32.4
  arch=$(dpkg --print-architecture)
  echo "setup: installing kubectl $kv to /usr/local/bin"
  tmp=$(mktemp)
  curl -fsSLo "$tmp" "https://dl.k8s.io/release/$kv/bin/linux/$arch/kubectl"
  echo "$(curl -fsSL "https://dl.k8s.io/release/$kv/bin/linux/$arch/kubectl.sha256")  $tmp" | sha256sum --check --quiet
  install -m 0755 "$tmp" /usr/local/bin/kubectl
  rm -f "$tmp"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain >= 1.85 (https://rustup.rs)" >&2
  exit 1
fi
