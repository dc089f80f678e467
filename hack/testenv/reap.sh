#!/usr/bin/env bash
# Removes what test beds killed mid-run (SIGKILL, a machine or session restart) left on the host,
# and nothing a live test bed still uses:
#   - real nodes (overlay roots, cgroups, bridges) of a state directory whose control plane is dead;
#   - such state directories under /tmp (kata-testbed.*), and the test payloads of dead processes;
#   - bridges kbrN and the kata-testbed iptables rules no live real node uses.
# A test bed is live while any process in its STATE/pids runs; one still starting (no pids yet) is
# left alone for 10 minutes; a state directory kept on purpose (stop.sh --keep) stays.
#
#   hack/testenv/reap.sh          reap, printing what was removed (nothing printed: nothing found)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state_is_live() { # STATE
  local pid
  if [ -s "$1/pids" ]; then
    for pid in $(awk '{print $1}' "$1/pids"); do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
  fi
  # No control plane recorded: starting now, or stopped with --keep. Young means starting.
  [ -n "$(find "$1" -maxdepth 0 -mmin -10 2>/dev/null)" ]
}

# Every state directory that has (or had) real nodes, plus the default /tmp ones.
candidate_states() {
  awk '$5 ~ "/nodes/[^/]+/merged$" { print $5 }' /proc/self/mountinfo | sed 's#/nodes/[^/]*/merged$##'
  find /tmp -maxdepth 1 -name 'kata-testbed.*' -type d 2>/dev/null
}

reap_state() { # STATE
  local node
  for node in "$1"/nodes/*/; do
    [ -d "$node" ] || continue
    node=$(basename "$node")
    log "reaping real node $node of the dead test bed $1"
    bash "$TESTENV_HERE/realnode/node.sh" stop "$1" "$node" >/dev/null 2>&1 || log "warning: stopping node $node of $1 failed"
  done
  case "$1" in
    /tmp/kata-testbed.*) [ -e "$1/kept" ] && return 0 # KATA_KEEP_TESTBED / stop.sh --keep: for debugging
      log "reaping the dead test bed $1"; bash "$TESTENV_HERE/stop.sh" "$1" >/dev/null 2>&1 ;;
    *) bash "$TESTENV_HERE/stop.sh" "$1" --keep >/dev/null 2>&1 ;; # e.g. the demo's: its owner decides
  esac
}

# Bridge indexes the real nodes of live test beds use (STATE/nodes/NAME/meta: "INDEX FLAVOUR").
live_bridges() {
  local s
  for s in $(candidate_states | sort -u); do
    state_is_live "$s" || continue
    cat "$s"/nodes/*/meta 2>/dev/null | awk '{ print "kbr" $1 }'
  done
}

reap_network() {
  local live br table rule
  live=$(live_bridges)
  for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{ print $2 }' | grep -E '^kbr[0-9]+$'); do
    grep -qx "$br" <<<"$live" && continue
    log "reaping bridge $br (no live real node uses it)"
    ip link del "$br" 2>/dev/null || true
  done
  [ -z "$live" ] || return 0
  # No live real node: every kata-testbed rule is a leftover (net.sh removes them with the last node).
  for table in filter nat; do
    iptables -w -t "$table" -S 2>/dev/null | grep -- '--comment kata-testbed' | sed 's/^-A /-D /' |
      while read -r rule; do
        log "reaping iptables rule ($table) $rule"
        eval "iptables -w -t $table $rule" 2>/dev/null || true
      done
  done
}

reap_payloads() { # the node-stages tests' payloads are named after their (dead) process
  local d pid
  for d in /tmp/kata-test-payload-*; do
    [ -d "$d" ] || continue
    pid=${d##*-}
    [[ "$pid" =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null || continue
    rm -rf "$d"
  done
}

for s in $(candidate_states | sort -u); do
  [ -d "$s" ] || continue
  state_is_live "$s" || reap_state "$s"
done
reap_network
reap_payloads
