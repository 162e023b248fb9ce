#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, golden tests,
# and the root-only tests with real network namespaces, WireGuard and graphviz
# (feature `netns-tests`), and the tests against a real etcd + kube-apiserver v1.20 (feature
# `apiserver-tests`; the server is built once from Debian's source package and cached in
# /var/cache/wiremesh by tests/apiserver/setup.sh, ~5 minutes the first time). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tests/apiserver/setup.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --all-targets --features netns-tests,apiserver-tests -- -D warnings
cargo test --features netns-tests,apiserver-tests
