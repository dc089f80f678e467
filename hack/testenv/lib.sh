# Shared paths for the test-bed scripts (sourced, not run).
TESTENV_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TESTENV_HERE/../.." && pwd)"
# shellcheck source=versions.env
. "$TESTENV_HERE/versions.env"
# Binaries live in a git-ignored cache; CI may point this at a directory kept between runs.
TESTENV_CACHE="${KATA_TESTENV_CACHE:-$REPO_ROOT/.cache/testenv}"
TESTENV_BIN="$TESTENV_CACHE/bin"
# The test bed's own addresses, in 198.18.0.0/15 (RFC 2544: reserved for benchmark tests, never
# a real network): Service range, the `kubernetes` Service IP, and 198.19.<i>.0/24 per real node's
# pods. The containment rules (realnode/net.sh) touch only these and the kbr* bridges, so a host
# whose own network is 10.0.0.0/24 or 10.244.0.0/16 keeps reaching it while tests run.
TESTBED_SERVICE_CIDR=198.18.0.0/24
TESTBED_SERVICE_IP=198.18.0.1
TESTBED_POD_NET=198.19
log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
