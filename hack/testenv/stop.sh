#!/usr/bin/env bash
# Stops every process hack/testenv/start.sh started for STATE (SIGTERM, then SIGKILL after 10 s),
# newest first, and removes the state directory unless --keep is given.
#
#   hack/testenv/stop.sh STATE [--keep]
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state=${1:-}
[ -n "$state" ] || die "usage: stop.sh STATE [--keep]"
keep=${2:-}
[ -d "$state" ] || { log "$state does not exist: nothing to stop"; exit 0; }
state=$(canonical_state "$state") # as start.sh recorded it in the registry
# Real nodes first (hack/testenv/realnode/node.sh): their kubelets talk to this control plane, and
# their mounts live under the state directory.
if [ -s "$state/realnodes" ]; then
  for node in $(cat "$state/realnodes"); do bash "$TESTENV_HERE/realnode/node.sh" stop "$state" "$node" || true; done
fi
if [ -s "$state/pids" ]; then
  pids=$(tac "$state/pids" | awk '{print $1}')
  for pid in $pids; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0
    for pid in $pids; do pid_alive "$pid" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for pid in $pids; do kill -KILL -- "-$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; done
  : >"$state/pids"
fi
# Its run id goes back to the machine's pool (only if the claim is still this state's).
if run_id=$(testbed_run_id "$state"); then release_slot runs "$run_id" state "$state"; fi
rm -f "$state/run-id"
log "stopped the cluster of $state"
if [ "$keep" != "--keep" ]; then rm -rf "$state"; else touch "$state/kept"; fi
