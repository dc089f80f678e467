#!/usr/bin/env bash
# Kills the kube-apiserver of a test-bed cluster (SIGKILL: every connection drops at once), keeps
# it down for DOWN seconds, starts it again with the same arguments and waits until it is ready.
# For fault-tolerance tests; etcd and the other components keep running.
#
#   hack/testenv/restart-apiserver.sh STATE [DOWN_SECONDS]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
state=${1:-}
down=${2:-3}
[ -n "$state" ] && [ -s "$state/apiserver.cmd" ] || die "usage: restart-apiserver.sh STATE [DOWN_SECONDS] (STATE from start.sh, with apiserver.cmd)"
pid=$(awk '$2 == "kube-apiserver" {print $1}' "$state/pids" | tail -1)
[ -n "$pid" ] || die "no kube-apiserver recorded in $state/pids"
kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
while pid_alive "$pid"; do sleep 0.1; done
log "kube-apiserver (pid $pid) killed; down for ${down}s"
sleep "$down"
eval "api_cmd=($(cat "$state/apiserver.cmd"))"
# shellcheck disable=SC2154
setsid "${api_cmd[@]}" >>"$state/logs/kube-apiserver.log" 2>&1 </dev/null &
new=$!
# Replace the pid in place so stop.sh stops the new process.
sed -i "s/^$pid kube-apiserver\$/$new kube-apiserver/" "$state/pids"
server=$(sed -n 's/^export KATA_TESTBED_SERVER="\(.*\)"$/\1/p' "$state/env")
pki="$state/pki"
for _ in $(seq 300); do
  if curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server/readyz" >/dev/null 2>&1; then
    log "kube-apiserver back (pid $new)"
    exit 0
  fi
  kill -0 "$new" 2>/dev/null || die "the restarted kube-apiserver exited (see $state/logs/kube-apiserver.log)"
  sleep 0.2
done
die "the restarted kube-apiserver was not ready within 60s (see $state/logs/kube-apiserver.log)"
