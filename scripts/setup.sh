#!/usr/bin/env bash
# Install what wiremesh's build, tests and lab need on a Debian machine (idempotent).
# Needs root for apt-get; does nothing when every package is already there.
set -euo pipefail
packages=(
  wireguard-go wireguard-tools iproute2 nftables iptables graphviz
  containernetworking-plugins iputils-ping iperf3 tcpdump jq
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
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain >= 1.85 (https://rustup.rs)" >&2
  exit 1
fi
