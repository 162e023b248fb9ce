#!/usr/bin/env bash
# The main job on the built-in example, no cluster needed: build meshctl, draw the mesh of
# examples/three-clouds.yaml to three-clouds.svg, and print what node fra-1 would program.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin meshctl --bin wiremesh
./target/release/meshctl graph --nodes examples/three-clouds.yaml --node fra-1 -O three-clouds.svg
echo "wrote three-clouds.svg (open it in a browser)"
./target/release/meshctl plan --nodes examples/three-clouds.yaml --node fra-1
