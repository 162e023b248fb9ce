#!/bin/sh
# A stand-in for `wiremesh agent` in the lab tests until the real agent lands.
#
# It takes the agent's command line (see `meshctl lab up`), programs its node once from
# `meshctl plan` (the same engine the agent uses) with wireguard-go, wg and ip, writes the CNI
# configuration list, and then sleeps: it watches nothing and never updates anything. It
# starts wireguard-go without -f, so the daemon is re-parented away from it, as with the real
# agent's userspace backend; `meshctl lab down` must find it by its network namespace.
#
# Needs: $MESHCTL (else meshctl on PATH), jq, wireguard-go, wg, ip.
set -eu
[ "${1:-}" = agent ] && shift
host= nodes= key= gran=location cni=
while [ $# -gt 0 ]; do
  case "$1" in
    --hostname) host=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --private-key) key=$2; shift 2 ;;
    --granularity) gran=$2; shift 2 ;;
    --cni-config) cni=$2; shift 2 ;;
    *) shift ;;
  esac
done
meshctl=${MESHCTL:-meshctl}
plan=$("$meshctl" plan --nodes "$nodes" --node "$host" -o json --granularity "$gran" --encapsulate never)
echo "stub agent for $host: plan computed"

if [ "$(echo "$plan" | jq -r '.leader')" = true ]; then
  ifname=$(echo "$plan" | jq -r '.interface.name')
  wireguard-go "$ifname"
  wg set "$ifname" listen-port "$(echo "$plan" | jq -r '.interface.listen_port')" private-key "$key"
  echo "$plan" | jq -r '.peers[] | [.public_key, (.endpoint // "-"), (.allowed_ips | join(",")), .persistent_keepalive] | @tsv' |
    while IFS="$(printf '\t')" read -r pub ep ips ka; do
      if [ "$ep" = - ]; then
        wg set "$ifname" peer "$pub" allowed-ips "$ips" persistent-keepalive "$ka"
      else
        wg set "$ifname" peer "$pub" endpoint "$ep" allowed-ips "$ips" persistent-keepalive "$ka"
      fi
    done
  addr=$(echo "$plan" | jq -r '.interface.address // empty')
  [ -n "$addr" ] && ip addr add "$addr" dev "$ifname"
  ip link set "$ifname" up
  echo "stub agent for $host: $ifname up with $(echo "$plan" | jq '.peers | length') peers"
fi

# Routes: through the tunnel as planned; to the private network by gateway only (the lab's
# LAN interface name differs from the plan's display name).
echo "$plan" | jq -r '.routes[] | [.dst, (.gateway // "-"), .dev, (.src // "-"), .table] | @tsv' |
  while IFS="$(printf '\t')" read -r dst gw dev src table; do
    if [ "$dev" = wiremesh0 ]; then
      set -- "$dst" dev "$dev" onlink table "$table"
      [ "$gw" != - ] && set -- "$@" via "$gw"
      [ "$src" != - ] && set -- "$@" src "$src"
    else
      set -- "$dst" via "$gw" table "$table"
    fi
    ip route replace "$@"
  done

mkdir -p "$(dirname "$cni")"
echo "$plan" | jq '{cniVersion: "1.0.0", name: "wiremesh", plugins: [
    {type: "bridge", bridge: .bridge.name, isGateway: true, ipMasq: false, hairpinMode: true,
     mtu: 1420,
     ipam: {type: "host-local", ranges: [.masquerade.sources[] | [{subnet: .}]],
            routes: [{dst: "0.0.0.0/0"}]}},
    {type: "portmap", capabilities: {portMappings: true}}]}' > "$cni.tmp"
mv "$cni.tmp" "$cni"
echo "stub agent for $host: wrote $cni"
exec sleep infinity
