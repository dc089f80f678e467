# Shared paths for the test-bed scripts (sourced, not run).
TESTENV_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TESTENV_HERE/../.." && pwd)"
# shellcheck source=versions.env
. "$TESTENV_HERE/versions.env"
# Binaries live in a git-ignored cache; CI may point this at a directory kept between runs.
TESTENV_CACHE="${KATA_TESTENV_CACHE:-$REPO_ROOT/.cache/testenv}"
TESTENV_BIN="$TESTENV_CACHE/bin"
# The test bed's own addresses, in 198.18.0.0/15 (RFC 2544: reserved for benchmark tests, never
# a real network): each test bed has a run id R (claimed by start.sh), its Service range is
# 198.18.R.0/24 and its `kubernetes` Service IP 198.18.R.1; each real node has a slot I (claimed by
# realnode/node.sh) giving its pods 198.19.I.0/24 on bridge kbrI and its kubelet port. The
# containment rules (realnode/net.sh) touch only these and the kbr* bridges, so a host whose own
# network is 10.0.0.0/24 or 10.244.0.0/16 keeps reaching it while tests run, and two test beds on
# one machine never share an address, a bridge, a port, a cgroup or a rule.
TESTBED_POD_NET=198.19
# Machine-wide registry of the claimed run ids (runs/R/state: the test bed's state directory) and
# real-node slots (nodes/I/owner: "STATE NAME"). A claim is an atomic mkdir; /run is cleared by a
# reboot, and reap.sh frees the claims of dead test beds.
TESTBED_REGISTRY=/run/kata-testbed
testbed_service_cidr() { echo "198.18.$1.0/24"; } # RUN-ID
testbed_service_ip() { echo "198.18.$1.1"; }      # RUN-ID
canonical_state() { (cd "$1" 2>/dev/null && pwd -P) || echo "$1"; } # STATE: its absolute path
testbed_run_id() { # STATE: its run id (start.sh wrote it), or fail
  local r; r=$(cat "$1/run-id" 2>/dev/null) && [[ "$r" =~ ^[0-9]+$ ]] && echo "$r"
}
claim_slot() { # KIND(runs|nodes) MAX FILE CONTENT: the lowest free slot 1..MAX, claimed; prints it
  local i
  mkdir -p "$TESTBED_REGISTRY/$1"
  for i in $(seq 1 "$2"); do
    if mkdir "$TESTBED_REGISTRY/$1/$i" 2>/dev/null; then
      printf '%s\n' "$4" >"$TESTBED_REGISTRY/$1/$i/$3"
      echo "$i"
      return 0
    fi
  done
  return 1
}
node_slots_of() { # STATE: the real-node slots it holds (registry nodes/I/owner "STATE NAME")
  local f s
  for f in "$TESTBED_REGISTRY"/nodes/*/owner; do
    read -r s _ <"$f" 2>/dev/null || continue
    [ "$s" != "$1" ] || basename "$(dirname "$f")"
  done
}
testbed_rules() { # the test beds' iptables rules (comment kata-testbed-rRUN), as "TABLE -A CHAIN ..."
  local t
  for t in filter nat; do iptables -w -t "$t" -S 2>/dev/null | grep -- '--comment kata-testbed' | sed "s/^/$t /"; done
}
delete_rule() { # TABLE -A CHAIN ARGS...: one line of testbed_rules, deleted
  local t=$1; shift
  eval "iptables -w -t $t $(sed 's/^-A /-D /' <<<"$*")" 2>/dev/null
}
release_slot() { # KIND SLOT FILE CONTENT: given back, if it is still CONTENT's claim
  if [ "$(cat "$TESTBED_REGISTRY/$1/$2/$3" 2>/dev/null)" = "$4" ]; then rm -rf "${TESTBED_REGISTRY:?}/$1/$2"; fi
}
# Whether PID runs: a zombie (killed, not yet reaped by its new parent, which takes a while where
# PID 1 is not an init) counts as exited, where `kill -0` would call it alive.
pid_alive() { local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1); [ -n "$st" ] && [ "$st" != Z ]; }
log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
