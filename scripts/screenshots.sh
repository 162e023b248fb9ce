#!/usr/bin/env bash
# Re-make the pictures of `meshctl graph` in docs/img/: each example drawn as SVG by meshctl,
# then screenshotted at 100 % by headless Chromium (Debian's `chromium`; no network needed).
#   scripts/screenshots.sh          build meshctl and gen_cluster (debug), redraw every picture
# Needs chromium (apt-get install -y chromium); pngquant, when installed, makes the PNGs smaller.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/docs/img
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v chromium >/dev/null || { echo "screenshots: chromium not found (apt-get install -y chromium)" >&2; exit 1; }
cd "$root"
cargo build -q --bin meshctl --example gen_cluster
meshctl=$root/target/debug/meshctl
gen=$root/target/debug/examples/gen_cluster
"$gen" 40 10 > "$work/n40.json"    # 40 nodes in 4 locations
"$gen" 500 25 > "$work/n500.json"  # 500 nodes in 20 locations
mkdir -p "$out"

shot() { # name, meshctl graph arguments...
  local name=$1; shift
  "$meshctl" graph "$@" -O "$work/$name.svg" 2>/dev/null
  local size w h
  size=$(sed -n 2p "$work/$name.svg" | grep -o 'width="[0-9]*" height="[0-9]*"' | tr -dc '0-9 ')
  read -r w h <<< "$size"
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --screenshot="$out/$name.png" --window-size="$w,$h" "file://$work/$name.svg" >/dev/null 2>&1
  if command -v pngquant >/dev/null; then
    pngquant --force --skip-if-larger --quality 60-90 --output "$out/$name.png" "$out/$name.png" || true
  fi
  echo "docs/img/$name.png  ${w}×${h}  meshctl graph $*"
}

shot graph-three-clouds --nodes examples/three-clouds.yaml
shot graph-locations --nodes examples/locations.yaml --peers examples/peers.yaml --node home-a
shot graph-40-full-overview --nodes "$work/n40.json" --granularity full
shot graph-40-full-focus --nodes "$work/n40.json" --granularity full --focus node-00012
shot graph-500-location-overview --nodes "$work/n500.json" --granularity location
shot graph-500-location-one --nodes "$work/n500.json" --granularity location --location loc-0003
