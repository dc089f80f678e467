# Shared paths for the test-bed scripts (sourced, not run).
TESTENV_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TESTENV_HERE/../.." && pwd)"
# shellcheck source=versions.env
. "$TESTENV_HERE/versions.env"
# Binaries live in a git-ignored cache; CI may point this at a directory kept between runs.
TESTENV_CACHE="${KATA_TESTENV_CACHE:-$REPO_ROOT/.cache/testenv}"
TESTENV_BIN="$TESTENV_CACHE/bin"
log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
