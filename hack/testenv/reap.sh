#!/usr/bin/env bash
# Removes what test beds killed mid-run (SIGKILL, a machine or session restart) left on the host,
# and nothing a live test bed still uses:
#   - real nodes (overlay roots, cgroups, bridges) of a state directory whose control plane is dead;
#   - such state directories under /tmp (kata-testbed.*), and the test payloads of dead processes;
#   - claims of dead test beds in the machine's registry (lib.sh: run ids, real-node slots);
#   - bridges kbrN of no claimed slot, and the kata-testbed rules of no live run.
# A test bed is live while any process in its STATE/pids runs; one still starting (no pids yet) is
# left alone for 10 minutes; a state directory kept on purpose (stop.sh --keep) stays.
#
#   hack/testenv/reap.sh          reap, printing what was removed (nothing printed: nothing found)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state_is_live() { # STATE
  local pid
  if [ -s "$1/pids" ]; then
    for pid in $(awk '{print $1}' "$1/pids"); do pid_alive "$pid" && return 0; done
    return 1
  fi
  # No control plane recorded: starting now, or stopped with --keep. Young means starting.
  [ -n "$(find "$1" -maxdepth 0 -mmin -10 2>/dev/null)" ]
}

# Every state directory that has (or had) real nodes or a run id, plus the default /tmp ones.
candidate_states() {
  awk '$5 ~ "/nodes/[^/]+/merged$" { print $5 }' /proc/self/mountinfo | sed 's#/nodes/[^/]*/merged$##'
  find /tmp -maxdepth 1 -name 'kata-testbed.*' -type d 2>/dev/null
  cat "$TESTBED_REGISTRY"/runs/*/state 2>/dev/null
  awk '{ print $1 }' "$TESTBED_REGISTRY"/nodes/*/owner 2>/dev/null
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

# Claims whose test bed is dead or gone (stop.sh and node.sh stop release their own; a kill does not).
reap_registry() {
  local d owner node
  for d in "$TESTBED_REGISTRY"/runs/*/; do
    [ -d "$d" ] || continue
    owner=$(cat "$d/state" 2>/dev/null || true)
    # A claim not yet written (start.sh between mkdir and echo) is young: left alone.
    [ -n "$owner" ] || [ -z "$(find "$d" -maxdepth 0 -mmin +1)" ] || { rm -rf "$d"; continue; }
    [ -z "$owner" ] || { [ -d "$owner" ] && state_is_live "$owner"; } || { log "reaping run id $(basename "$d") of $owner"; rm -rf "$d"; }
  done
  for d in "$TESTBED_REGISTRY"/nodes/*/; do
    [ -d "$d" ] || continue
    read -r owner node <"$d/owner" 2>/dev/null || { [ -z "$(find "$d" -maxdepth 0 -mmin +1)" ] || rm -rf "$d"; continue; }
    [ -d "$owner/nodes/$node" ] && state_is_live "$owner" && continue
    log "reaping real-node slot $(basename "$d") of $owner ($node)"
    rm -rf "$d"
  done
}

# Live runs' tags (kata-testbed-rRUN) and claimed slots' bridges stay; the rest goes.
reap_network() {
  local br line r live_tags
  for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{ print $2 }' | grep -E '^kbr[0-9]+$'); do
    [ -d "$TESTBED_REGISTRY/nodes/${br#kbr}" ] && continue
    log "reaping bridge $br (no real node claims it)"
    ip link del "$br" 2>/dev/null || true
  done
  live_tags=$(for r in "$TESTBED_REGISTRY"/runs/*/; do [ -d "$r" ] && echo "kata-testbed-r$(basename "$r")"; done)
  testbed_rules | while read -r line; do
    grep -qxF -- "$(grep -o 'kata-testbed[-a-z0-9]*' <<<"$line" | head -1)" <<<"$live_tags" && continue
    log "reaping iptables rule $line"
    delete_rule $line || true
  done
}

reap_payloads() { # the node-stages tests' payloads are named after their (dead) process
  local d pid
  for d in /tmp/kata-test-payload-*; do
    [ -d "$d" ] || continue
    pid=${d##*-}
    [[ "$pid" =~ ^[0-9]+$ ]] && ! pid_alive "$pid" || continue
    rm -rf "$d"
  done
}

for s in $(candidate_states | sort -u); do
  [ -d "$s" ] || continue
  state_is_live "$s" || reap_state "$s"
done
reap_registry
reap_network
reap_payloads
