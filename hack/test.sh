#!/usr/bin/env bash
# Runs every test of the project on a real control plane: builds the test bed (once), the
# workspace, starts one cluster for the whole run, then runs the Rust tests (unit and
# integration), the chart tests and the image tests. Exits non-zero if any suite failed.
#
#   hack/test.sh            all suites
#   hack/test.sh rust       only the Rust tests (also: lint, deny, bench, chart, images, demo)
# Every suite (each Rust integration-test target is one) runs under its own time limit inside a
# whole-run budget (hack/testenv/suites.sh); the end prints each suite's wall time.
#   hack/test.sh reliability  the fault-tolerance and bad-input suite (RELIABILITY.md)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. hack/testenv/lib.sh
only=${1:-all}

bash hack/testenv/build.sh || die "building the test bed failed"
bash hack/testenv/realnode/build-rootfs.sh || die "building the real-node rootfs failed"
log "building the workspace (binaries and tests)"
cargo build --workspace --bins --tests --locked || die "cargo build failed"
if [ "$only" = all ] || [ "$only" = rust ] || [ "$only" = images ]; then
  # The images the real nodes run (and the images suite tests), built from this very tree.
  log "building the images (hack/build-images.sh) and the real nodes' image archives"
  bash hack/build-images.sh >/dev/null || die "building the images failed"
  bash hack/testenv/realnode/images.sh build || die "saving the images for the real nodes failed"
fi

# A run killed before this one (SIGKILL, a machine restart) may have left real nodes, bridges and
# rules behind: reap what belongs to no live test bed, so that neither blocks this run.
bash hack/testenv/reap.sh
# The run's own record: every suite's output (KATA_SUITE_LOG) and what tests measured
# (KATA_FIGURES_FILE), from which hack/gen-reliability.py writes RELIABILITY.md's results.
run_dir="$PWD/target/test-run"
mkdir -p "$run_dir"
export KATA_SUITE_LOG="$run_dir/output.log" KATA_FIGURES_FILE="$run_dir/figures.tsv"
: >"$KATA_SUITE_LOG"
: >"$KATA_FIGURES_FILE"
echo "hack/test.sh $only at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)" | tee -a "$KATA_SUITE_LOG" >&2
# What the host looks like before the run: the end of the run checks that nothing was left behind.
before=$(mktemp /tmp/kata-leftovers.XXXXXX)
bash hack/testenv/leftovers.sh snapshot "$before"
state=$(bash hack/testenv/start.sh --owner-pid $$) || die "starting the test cluster failed"
trap 'bash hack/testenv/stop.sh "$state" >/dev/null 2>&1; rm -f "$before"' EXIT
export KATA_TESTBED_STATE="$state"
# shellcheck disable=SC1091
. "$state/env"

# shellcheck source=testenv/suites.sh
. hack/testenv/suites.sh

# Per-suite limits (seconds): about 3x the suite's warm time on this 2-core machine, so a hang is
# cut long before CI's 90 minutes and named; KATA_SUITE_LIMIT_<target> overrides one.
limit_of() {
  local var="KATA_SUITE_LIMIT_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  case $1 in
    real_node_walk) echo 900 ;;
    runtime_matrix | real_nodes | real_node_faults | real_reconcile | chart_e2e | dispatcher | faults) echo 600 ;;
    *) echo 420 ;;
  esac
}
# Every integration-test target of the workspace: "package target" per line.
test_targets() {
  cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"]:
            print(p["name"], t["name"])'
}

if [ "$only" = all ] || [ "$only" = lint ]; then
  suite lint 600 bash -c 'cargo fmt --all -- --check && cargo clippy --workspace --all-targets --locked -- -D warnings'
fi
if [ "$only" = all ] || [ "$only" = lint ] || [ "$only" = deny ]; then
  # Advisories (vendored RustSec snapshot), licences, duplicate versions, sources: deny.toml.
  suite deny 300 bash hack/deny.sh
fi
if [ "$only" = all ] || [ "$only" = rust ]; then
  # Unit tests and doc tests, then each integration-test target as its own bounded suite.
  suite rust-unit 600 cargo test --workspace --locked --no-fail-fast --lib --bins
  suite rust-doc 300 cargo test --workspace --locked --no-fail-fast --doc
  while read -r pkg target; do
    suite "rust:$target" "$(limit_of "$target")" cargo test --locked --no-fail-fast -p "$pkg" --test "$target"
  done < <(test_targets)
fi
if [ "$only" = reliability ]; then
  # The fault-tolerance and bad-input suite alone (RELIABILITY.md); "all" runs it within "rust".
  suite reliability 1800 bash -c '
    cargo test --locked -p kata-testbed --test faults --test dispatcher --test chart_manifests -- --nocapture &&
      cargo test --locked -p kata-deploy-stage --test host_stages --test host_failures --test bad_input --test real_containerd --test cli -- --nocapture'
fi
if [ "$only" = all ] || [ "$only" = bench ]; then
  # A small size, so the benchmark harness keeps working (figures: hack/bench.sh, BENCHMARKS.md).
  suite bench 300 target/debug/kata-bench --nodes 50 --parallelism 10 --duration 1 --header
fi
if [ "$only" = all ] || [ "$only" = chart ]; then
  suite chart 600 bash hack/test-chart.sh
fi
if [ "$only" = all ] || [ "$only" = images ]; then
  suite images 300 bash hack/test-images.sh --no-build
fi
if [ "$only" = all ] || [ "$only" = demo ]; then
  # The README's first command: its own control plane, real and simulated nodes, the real chart.
  suite demo 1200 bash hack/test-demo.sh
fi
bash hack/testenv/stop.sh "$state" >&2 || log "stopping the test cluster failed"
if [ "$only" = all ]; then
  # Only a whole run is compared: a single suite run may follow another one's leftovers.
  suite leftovers 60 bash hack/testenv/leftovers.sh check "$before"
  # Every test RELIABILITY.md's tables name ran and passed in this very run.
  suite reliability-doc 60 python3 hack/gen-reliability.py --check "$KATA_SUITE_LOG" "$KATA_FIGURES_FILE"
fi
suite_report
if [ ${#failed[@]} -gt 0 ]; then
  log "failed suites: ${failed[*]}"
  exit 1
fi
log "all suites passed"
