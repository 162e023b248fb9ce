#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and property tests, golden tests,
# and the root-only tests with real network namespaces, WireGuard and graphviz
# (feature `netns-tests`). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --features netns-tests -- -D warnings
cargo test --features netns-tests
