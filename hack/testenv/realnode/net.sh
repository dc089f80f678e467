#!/usr/bin/env bash
# The network of the real nodes (no kube-proxy in the test bed):
#
#   net.sh up STATE INDEX     bridge kbrINDEX for that node's pods, and the `kubernetes` Service
#                             IP ($TESTBED_SERVICE_IP:443) mapped to the loopback API server of STATE, for
#                             pods (PREROUTING on the bridges) and the nodes themselves (OUTPUT)
#   net.sh down STATE INDEX   removes the bridge, and the rules of STATE when no node is left
#
# Containment: nothing addressed to the Service range or sent by a pod leaves the machine —
# traffic from the test-bed bridges may only go to another test-bed bridge or be delivered
# locally, and the Service range is rejected unless mapped. Every rule matches only the test
# bed's own addresses (lib.sh: a reserved benchmarking range) or its kbr* bridges, so the host's
# own traffic is never touched; each carries the comment kata-testbed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"

cmd=${1:-} state=${2:-} index=${3:-}
[ -n "$cmd" ] && [ -n "$state" ] && [[ "$index" =~ ^[0-9]+$ ]] || die "usage: net.sh up|down STATE INDEX"
command -v iptables >/dev/null || die "iptables is missing: run hack/install-deps.sh"
bridge="kbr$index"
api_port=$(sed -n 's#.*server: "https://127.0.0.1:\([0-9]*\)".*#\1#p' "$state/kubeconfig" | head -1)
[ -n "$api_port" ] || die "no loopback API server in $state/kubeconfig"
tag="kata-testbed"

rule() { # TABLE CHAIN ARGS...: add once
  local table=$1 chain=$2; shift 2
  iptables -w -t "$table" -C "$chain" "$@" -m comment --comment "$tag" 2>/dev/null ||
    iptables -w -t "$table" -I "$chain" 1 "$@" -m comment --comment "$tag"
}
unrule() { # TABLE CHAIN ARGS...: delete if present
  local table=$1 chain=$2; shift 2
  while iptables -w -t "$table" -D "$chain" "$@" -m comment --comment "$tag" 2>/dev/null; do :; done
}
service_rules() { # add|del
  local f=rule; [ "$1" = del ] && f=unrule
  # Order matters for `-I 1`: the REJECT/DROP guards are added first so the DNATs sit above them.
  $f filter OUTPUT -d "$TESTBED_SERVICE_CIDR" -j REJECT
  $f filter FORWARD -i kbr+ ! -o kbr+ -j DROP
  $f filter FORWARD -d "$TESTBED_SERVICE_CIDR" -j DROP
  $f nat OUTPUT -d "$TESTBED_SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$api_port"
  $f nat PREROUTING -i kbr+ -d "$TESTBED_SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$api_port"
}

case "$cmd" in
  up)
    # One Service IP mapping per machine: real nodes of another test bed would reach the wrong API.
    other_mapping() { iptables -w -t nat -S OUTPUT | grep -- "--comment $tag" | grep -o 'to-destination 127.0.0.1:[0-9]*' | grep -v ":$api_port\$" || true; }
    other=$(other_mapping)
    # A test bed killed mid-run leaves its mapping behind: reap the dead, then look again.
    if [ -n "$other" ]; then bash "$HERE/../reap.sh"; other=$(other_mapping); fi
    [ -z "$other" ] || die "real nodes of another test bed are running here ($other): stop them first (hack/testenv/stop.sh <its state>, or hack/demo.sh --down)"
    ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
    ip link set "$bridge" up
    # A DNAT to 127.0.0.1 from a pod is only routed with route_localnet on the pod's bridge.
    sysctl -qw "net.ipv4.conf.$bridge.route_localnet=1"
    service_rules add
    ;;
  down)
    ip link del "$bridge" 2>/dev/null || true
    # The Service mapping is shared by the nodes of STATE: removed with the last one.
    if ! ip -o link show type bridge | grep -q ' kbr[0-9]*:'; then service_rules del; fi
    ;;
  *) die "unknown command '$cmd' (up|down)" ;;
esac
