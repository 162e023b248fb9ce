#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, golden tests,
# and the root-only tests with real network namespaces, WireGuard and graphviz
# (feature `netns-tests`), and the tests against a real etcd + kube-apiserver v1.20 (feature
# `apiserver-tests`; the server is built once from Debian's source package and cached in
# /var/cache/wiremesh by tests/apiserver/setup.sh, ~5 minutes the first time); then, alone, the
# real-cluster test: the DaemonSet installed from the bundles on a 3-node Kubernetes v1.20
# cluster run on this machine (tests/cluster/run.sh; the Kubernetes binaries are built once with
# the API server, see docs/testing.md). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# All five Kubernetes binaries in one make (tests/cluster/ needs the other four).
tests/apiserver/setup.sh --cluster >/dev/null
cargo fmt --all -- --check
cargo clippy --all-targets --features netns-tests,apiserver-tests -- -D warnings
cargo test --features netns-tests,apiserver-tests
# After the other suites, never beside them: it holds the network-namespace lock and both CPUs.
tests/cluster/run.sh 3
