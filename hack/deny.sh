#!/usr/bin/env bash
# cargo deny on the workspace (deny.toml): RustSec advisories, licences, duplicate versions,
# sources. CI's lint suite runs it.
#
#   hack/deny.sh                      the check: installs the pinned cargo-deny into the test-bed
#                                     cache once, then checks against the vendored advisories
#   hack/deny.sh install              only install the pinned cargo-deny (hack/testenv/build.sh)
#   hack/deny.sh update ADVISORY_DB   refresh hack/advisories from a clone of
#                                     https://github.com/rustsec/advisory-db
#
# CI cannot reach GitHub, where the RustSec database lives: hack/advisories holds the advisories
# of every crate Cargo.lock names, from one commit of that database (SNAPSHOT says which). The
# check refuses a Cargo.lock that names a crate the snapshot was not taken for, so a new
# dependency cannot skip the advisory check.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/testenv/lib.sh"
cd "$REPO_ROOT"
DENY_VERSION=$CARGO_DENY_VERSION # versions.env
ADVISORIES="$REPO_ROOT/hack/advisories"

lock_crates() { sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u; }

update() {
  local db=$1
  [ -d "$db/crates" ] || die "$db is not a clone of the RustSec advisory-db (no crates/): git clone https://github.com/rustsec/advisory-db"
  local commit date
  commit=$(git -C "$db" rev-parse HEAD) date=$(git -C "$db" show -s --format=%cI HEAD)
  rm -rf "$ADVISORIES.new" && mkdir -p "$ADVISORIES.new/crates"
  local n=0
  while read -r c; do
    if [ -d "$db/crates/$c" ]; then cp -r "$db/crates/$c" "$ADVISORIES.new/crates/"; n=$((n + 1)); fi
  done < <(lock_crates)
  printf 'rustsec/advisory-db %s %s\nThe advisories of the crates in covered-crates.txt, copied unchanged (advisory-db is CC0-1.0).\n' \
    "$commit" "$date" >"$ADVISORIES.new/SNAPSHOT"
  lock_crates >"$ADVISORIES.new/covered-crates.txt"
  rm -rf "$ADVISORIES" && mv "$ADVISORIES.new" "$ADVISORIES"
  log "hack/advisories: $n crate(s) with advisories, from advisory-db $commit ($date)"
}

ensure_cargo_deny() {
  DENY="$TESTENV_CACHE/cargo-deny-$DENY_VERSION/bin/cargo-deny"
  if [ -x "$DENY" ]; then log "cargo-deny $DENY_VERSION already installed, nothing to do"; return; fi
  log "installing cargo-deny $DENY_VERSION into $TESTENV_CACHE (once)"
  timeout 1500 cargo install cargo-deny --version "$DENY_VERSION" --locked \
    --root "$TESTENV_CACHE/cargo-deny-$DENY_VERSION" >&2 ||
    die "installing cargo-deny $DENY_VERSION failed (crates.io reachable? see above)"
}

# The vendored snapshot as the git repository cargo-deny opens under CONFIG's db-path, dated
# with the snapshot's own commit date (its staleness check then measures the snapshot's real age).
stage_db() {
  local config=$1 path snap_date
  read -r _ _ snap_date <"$ADVISORIES/SNAPSHOT"
  # Where cargo-deny looks for db-urls' database under db-path (a hash of the URL): ask it.
  path=$(timeout 120 "$DENY" -L debug --offline --locked --config "$config" check advisories 2>&1 |
    sed -n "s/.*Opening advisory database at '\([^']*\)'.*/\1/p" | head -1) || true
  [ -n "$path" ] || die "cargo-deny $DENY_VERSION did not say where it opens the advisory database (its debug log changed?): run it with -L debug and adapt stage_db in hack/deny.sh"
  case $path in
    "$root"/*) ;;
    *) die "cargo-deny would open the advisory database at $path, outside this run's $root: check that deny.toml has an [advisories] table" ;;
  esac
  mkdir -p "$path"
  cp -r "$ADVISORIES/crates" "$path/"
  (
    cd "$path"
    git init -q && git add -A
    GIT_AUTHOR_DATE=$snap_date GIT_COMMITTER_DATE=$snap_date \
      git -c user.name=snapshot -c user.email=snapshot@localhost \
      commit -qm "RustSec advisory-db snapshot (hack/advisories/SNAPSHOT)"
    # cargo-deny dates a database by the newer of HEAD's commit and the mtime of .git/HEAD.
    touch -d "$snap_date" .git/HEAD
  )
}

check() {
  [ -f "$ADVISORIES/SNAPSHOT" ] || die "hack/advisories/SNAPSHOT is missing: run hack/deny.sh update <advisory-db clone>"
  local missing
  missing=$(lock_crates | comm -23 - <(sort -u "$ADVISORIES/covered-crates.txt"))
  [ -z "$missing" ] || die "Cargo.lock names crates the advisory snapshot was not taken for: $(paste -sd ' ' <<<"$missing"): run hack/deny.sh update <advisory-db clone> (git clone https://github.com/rustsec/advisory-db)"
  ensure_cargo_deny
  # cargo-deny runs --offline (the advisory database is the vendored one) but reads every crate
  # Cargo.lock names, for every platform (windows-only ones too), where a Linux build fetched only
  # its own: fetch them all from crates.io first (a fresh machine's registry has none of them).
  timeout 600 cargo fetch --locked >&2 || die "cargo fetch --locked failed: crates.io must be reachable (see above)"
  local config
  root=$(mktemp -d /tmp/kata-deny.XXXXXX) # global: the EXIT trap reads it
  trap 'rm -rf "$root"' EXIT
  # deny.toml with the database under this run's scratch directory.
  config="$REPO_ROOT/target/deny.toml"
  mkdir -p "$REPO_ROOT/target"
  sed "s#^\[advisories\]\$#[advisories]\ndb-path = \"$root\"#" deny.toml >"$config"
  stage_db "$config"
  log "cargo deny ($("$DENY" --version)), advisories from $(head -1 "$ADVISORIES/SNAPSHOT")"
  timeout 300 "$DENY" --offline --locked --config "$config" check advisories licenses bans sources
}

case ${1:-check} in
  install) ensure_cargo_deny ;;
  update) [ -n "${2:-}" ] || die "usage: hack/deny.sh update ADVISORY_DB_CLONE"; update "$2" ;;
  check) check ;;
  *) die "usage: hack/deny.sh [check] | install | update ADVISORY_DB_CLONE" ;;
esac
