#!/usr/bin/env bash
# Build the wiremesh image without Docker or a registry: the Dockerfile's runtime stage, offline.
# A Debian bookworm minbase root file system (mmdebstrap) with the packages the Dockerfile
# installs, plus target/release/{wiremesh,meshctl} (build them first: cargo build --release
# --bins), entrypoint /usr/local/bin/wiremesh, packed with umoci and skopeo as
#   target/image/wiremesh.oci.tar     OCI archive
#   target/image/wiremesh.docker.tar  docker-archive (`ctr images import`, `docker load`)
# both tagged with the manifests' image name, so the manifests apply unchanged once the archive
# is imported into every node's container runtime (imagePullPolicy IfNotPresent).
#   scripts/image.sh [EXTRA_TAG]   EXTRA_TAG (e.g. 0.1.0-b): the same image under a second tag too
# The root file system tarball is cached in $WIREMESH_CACHE (default /var/cache/wiremesh), keyed
# by the package list, so only the first run downloads packages (from the Debian mirror in
# /etc/apt/sources.list.d/debian.sources); later runs take seconds. Needs root and the packages
# mmdebstrap, umoci, skopeo (tests/apiserver/setup.sh --cluster installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${WIREMESH_CACHE:-/var/cache/wiremesh}
out=$root/target/image
extra=${1:-}

# The packages: exactly the Dockerfile's runtime `apt-get install` list.
pkgs=$(sed -n '/--no-install-recommends/,/&&/p' "$root/Dockerfile" | grep -v -- '--no-install-recommends' \
  | sed 's/&&.*//; s/\\//g' | tr -s ' \n' '\n' | grep -v '^$' | sort | tr '\n' ' ')
[ -n "$pkgs" ] || { echo "image: no package list found in the Dockerfile" >&2; exit 1; }
# The image name: what the kubeadm bundle's DaemonSet runs.
ref=$(awk '/^ *image: /{print $2; exit}' "$root/manifests/wiremesh-kubeadm.yaml")
name=${ref%:*}
tag=${ref##*:}
for b in wiremesh meshctl; do
  [ -x "$root/target/release/$b" ] || { echo "image: target/release/$b missing: cargo build --release --bins" >&2; exit 1; }
done

key=$(printf 'bookworm minbase %s' "$pkgs" | sha256sum | cut -c1-16)
rootfs=$cache/rootfs-bookworm-$key.tar
if [ ! -f "$rootfs" ]; then
  mkdir -p "$cache"
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "image: building the root file system ($pkgs) from ${mirror:=http://deb.debian.org/debian}" >&2
  # Like the Dockerfile: no recommends, no apt lists left in the image.
  mmdebstrap --quiet --variant=minbase --include="${pkgs// /,}" \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --format=tar bookworm "$rootfs.tmp" "$mirror" </dev/null
  mv "$rootfs.tmp" "$rootfs"
fi

work=$(mktemp -d /tmp/wiremesh-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/oci"
umoci new --image "$work/oci:$tag"
umoci unpack --image "$work/oci:$tag" "$work/bundle"
tar -xf "$rootfs" -C "$work/bundle/rootfs"
install -m 0755 "$root/target/release/wiremesh" "$root/target/release/meshctl" "$work/bundle/rootfs/usr/local/bin/"
umoci repack --image "$work/oci:$tag" "$work/bundle"
umoci config --image "$work/oci:$tag" --config.entrypoint /usr/local/bin/wiremesh \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci gc --layout "$work/oci"
mkdir -p "$out"
rm -f "$out/wiremesh.oci.tar" "$out/wiremesh.docker.tar"
skopeo copy --quiet "oci:$work/oci:$tag" "oci-archive:$out/wiremesh.oci.tar:$ref"
more=()
[ -z "$extra" ] || more=(--additional-tag "$name:$extra")
skopeo copy --quiet "${more[@]}" "oci:$work/oci:$tag" "docker-archive:$out/wiremesh.docker.tar:$ref"
echo "image: $ref${extra:+ and $name:$extra}: $out/wiremesh.docker.tar, $out/wiremesh.oci.tar" >&2
echo "$out/wiremesh.docker.tar"
