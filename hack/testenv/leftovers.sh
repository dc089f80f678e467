#!/usr/bin/env bash
# What the test run leaves on the host: a snapshot before the run, a comparison after it.
#
#   hack/testenv/leftovers.sh snapshot FILE   record the host's state
#   hack/testenv/leftovers.sh check FILE      print what is new since FILE; exit 1 if anything is
#
# Compared: iptables rules (filter and nat), network links, mount points, the claims of the test
# beds' registry (lib.sh: run ids, real-node slots), the test bed's and the tests' /tmp
# directories, and processes running a test-bed or workspace binary or systemd-nspawn.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

host_state() {
  for t in filter nat; do iptables -t "$t" -S 2>/dev/null | sed "s/^/iptables $t: /"; done
  ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print "link: " $2 }'
  awk '{ print "mount: " $5 }' /proc/self/mountinfo
  find "$TESTBED_REGISTRY" -mindepth 2 -maxdepth 2 -printf 'registry claim: %P\n' 2>/dev/null
  find /tmp -maxdepth 1 \( -name 'kata-*' -o -name 'kata_*' \) -printf 'tmp: %f\n' 2>/dev/null
  local bins="$TESTENV_BIN/|$REPO_ROOT/target/|systemd-nspawn"
  ps -e -o args= | grep -E "^($bins)" | grep -v -E '^\S*leftovers' | awk '{ print "process: " $1 }'
}

case ${1:-} in
  snapshot)
    [ -n "${2:-}" ] || die "usage: leftovers.sh snapshot FILE"
    host_state | sort -u >"$2"
    ;;
  check)
    [ -f "${2:-}" ] || die "usage: leftovers.sh check FILE (a snapshot taken before the run)"
    new=$(host_state | sort -u | comm -13 "$2" -)
    if [ -n "$new" ]; then
      log "the run left these behind on the host (not there before it):"
      printf '  %s\n' "$new" >&2
      exit 1
    fi
    log "nothing left behind on the host"
    ;;
  *) die "usage: leftovers.sh snapshot|check FILE" ;;
esac
