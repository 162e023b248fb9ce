#!/usr/bin/env bash
# The main job, no cluster needed: a whole wiremesh mesh on this machine. Builds wiremesh, then
# `meshctl lab up` mirrors examples/three-clouds.yaml (three nodes in network namespaces, one
# behind NAT, real agents, userspace WireGuard, pods attached with the CNI plugins),
# `meshctl lab check` pings every pod from every pod and proves the underlay carries no
# plaintext pod packet, and `meshctl lab graph` draws the running mesh to lab.svg.
# Needs root. The lab stays up for you to look at: `sudo target/release/meshctl lab down`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo: the lab needs root (network namespaces, WireGuard): run sudo $0" >&2
  exit 2
fi
scripts/setup.sh
cargo build --release --bin meshctl --bin wiremesh
M=./target/release/meshctl
$M lab down >/dev/null 2>&1 || true
$M lab up
$M lab check
$M lab graph -O lab.svg
echo "wrote lab.svg (open it in a browser)"
$M lab status
echo
echo "the lab is still up: look around (ip netns list), then remove it with: sudo $M lab down"
