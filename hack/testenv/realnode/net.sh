#!/usr/bin/env bash
# The network of the real nodes (no kube-proxy in the test bed):
#
#   net.sh up STATE SLOT      bridge kbrSLOT for that node's pods, and the `kubernetes` Service IP
#                             of STATE's run (lib.sh: 198.18.RUN.1:443) mapped to STATE's loopback
#                             API server, for pods (PREROUTING on the bridges) and the nodes
#                             themselves (OUTPUT)
#   net.sh down STATE SLOT    removes the bridge, and the rules of STATE when no other node of it
#                             is left
#
# Containment: nothing addressed to a Service range or sent by a pod leaves the machine — traffic
# from the test-bed bridges may only go to another test-bed bridge or be delivered locally, and
# the run's Service range is rejected unless mapped. Every rule matches only the test bed's own
# addresses (lib.sh: a reserved benchmarking range) or its kbr* bridges, so the host's own traffic
# is never touched. Each rule carries the comment kata-testbed-rRUN: a run's rules are its own,
# another test bed's nodes keep theirs, and reap.sh removes those of dead runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"

cmd=${1:-} state=${2:-} slot=${3:-}
[ -n "$cmd" ] && [ -n "$state" ] && [[ "$slot" =~ ^[0-9]+$ ]] || die "usage: net.sh up|down STATE SLOT"
state=$(canonical_state "$state")
command -v iptables >/dev/null || die "iptables is missing: run hack/install-deps.sh"
bridge="kbr$slot"
run_id=$(testbed_run_id "$state") || run_id=""
# Without a run id (a state it was never written to) there are no rules of it: only the bridge goes.
[ -n "$run_id" ] || [ "$cmd" = down ] || die "$state has no run id (no run-id file): start the test bed with hack/testenv/start.sh"
tag="kata-testbed-r$run_id"
service_cidr=$(testbed_service_cidr "$run_id") service_ip=$(testbed_service_ip "$run_id")

rule() { # TABLE CHAIN ARGS...: add once
  local table=$1 chain=$2; shift 2
  iptables -w -t "$table" -C "$chain" "$@" -m comment --comment "$tag" 2>/dev/null ||
    iptables -w -t "$table" -I "$chain" 1 "$@" -m comment --comment "$tag"
}

case "$cmd" in
  up)
    api_port=$(sed -n 's#.*server: "https://127.0.0.1:\([0-9]*\)".*#\1#p' "$state/kubeconfig" | head -1)
    [ -n "$api_port" ] || die "no loopback API server in $state/kubeconfig"
    ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
    ip link set "$bridge" up
    # A DNAT to 127.0.0.1 from a pod is only routed with route_localnet on the pod's bridge.
    sysctl -qw "net.ipv4.conf.$bridge.route_localnet=1"
    # Order matters for `-I 1`: the REJECT/DROP guards are added first so the DNATs sit above them.
    rule filter OUTPUT -d "$service_cidr" -j REJECT
    rule filter FORWARD -i kbr+ ! -o kbr+ -j DROP
    rule filter FORWARD -d "$service_cidr" -j DROP
    rule nat OUTPUT -d "$service_ip/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$api_port"
    rule nat PREROUTING -i kbr+ -d "$service_ip/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$api_port"
    ;;
  down)
    ip link del "$bridge" 2>/dev/null || true
    # The run's rules are shared by the nodes of STATE: removed with the last one.
    others=$(node_slots_of "$state" | grep -vx "$slot" || true)
    if [ -n "$run_id" ] && [ -z "$others" ]; then
      testbed_rules | { grep -- "--comment $tag\( \|\$\)" || true; } | while read -r r; do delete_rule $r || true; done
    fi
    ;;
  *) die "unknown command '$cmd' (up|down)" ;;
esac
