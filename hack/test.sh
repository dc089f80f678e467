#!/usr/bin/env bash
# Runs every test of the project on a real control plane: builds the test bed (once), the
# workspace, starts one cluster for the whole run, then runs the Rust tests (unit and
# integration), the chart tests and the image tests. Exits non-zero if any suite failed.
#
#   hack/test.sh            all suites
#   hack/test.sh rust       only the Rust tests (also: lint, bench, chart, images)
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

state=$(bash hack/testenv/start.sh --owner-pid $$) || die "starting the test cluster failed"
trap 'bash hack/testenv/stop.sh "$state" >/dev/null 2>&1' EXIT
export KATA_TESTBED_STATE="$state"
# shellcheck disable=SC1091
. "$state/env"

failed=()
suite() { # name command...
  local name=$1; shift
  log "=== suite: $name"
  if "$@"; then log "=== suite $name: passed"; else log "=== suite $name: FAILED"; failed+=("$name"); fi
}
if [ "$only" = all ] || [ "$only" = lint ]; then
  lint() { cargo fmt --all -- --check && cargo clippy --workspace --all-targets --locked -- -D warnings; }
  suite lint lint
fi
if [ "$only" = all ] || [ "$only" = rust ]; then
  suite rust cargo test --workspace --locked --no-fail-fast
fi
if [ "$only" = reliability ]; then
  # The fault-tolerance and bad-input suite alone (RELIABILITY.md); "all" runs it within "rust".
  reliability() {
    cargo test --locked -p kata-testbed --test faults --test dispatcher --test chart_manifests -- --nocapture &&
      cargo test --locked -p kata-deploy-stage --test host_stages --test host_failures --test bad_input --test real_containerd --test cli -- --nocapture
  }
  suite reliability reliability
fi
if [ "$only" = all ] || [ "$only" = bench ]; then
  # A small size, so the benchmark harness keeps working (figures: hack/bench.sh, BENCHMARKS.md).
  suite bench target/debug/kata-bench --nodes 50 --parallelism 10 --duration 1 --header
fi
if [ "$only" = all ] || [ "$only" = chart ]; then
  suite chart bash hack/test-chart.sh
fi
if [ "$only" = all ] || [ "$only" = images ]; then
  suite images bash hack/test-images.sh --no-build
fi
if [ ${#failed[@]} -gt 0 ]; then
  log "failed suites: ${failed[*]}"
  exit 1
fi
log "all suites passed"
