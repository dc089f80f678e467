#!/usr/bin/env bash
# Rollout benchmarks on the test bed (release build of the dispatcher), printed as a Markdown
# table. Each size runs in a fresh cluster so audit counts and node counts do not mix.
#
#   hack/bench.sh                      the BENCHMARKS.md matrix (N = 100, 1000, 5000; P = 10, 100)
#   hack/bench.sh 50:10:2 500:50:3     custom N:P:D triples (D in seconds)
#   hack/bench.sh 20000:500:1          the 20,000-node row of BENCHMARKS.md (about 35 min here)
#   hack/bench.sh 1000:100:1:upgrade   then an upgrade that changed nothing (--skip-installed)
#   hack/bench.sh 5000:100:3:uninstall then the uninstall with every install Job kept
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. hack/testenv/lib.sh
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(100:10:3 100:100:3 1000:10:3 1000:100:3 5000:100:3)
bash hack/testenv/build.sh
# The dispatcher as the image ships it (static musl, hack/build-images.sh): its allocator decides
# the memory figures. KATA_BENCH_TARGET=x86_64-unknown-linux-gnu measures a glibc build instead.
target=${KATA_BENCH_TARGET:-x86_64-unknown-linux-musl}
cargo build --release --locked --target "$target" -p kata-deploy-job-dispatcher
cargo build --release --locked -p kata-testbed --bins
export KATA_TEST_PROFILE="$target/release"
# Every table names the command and the commit that produced it (BENCHMARKS.md has no other figures).
echo "Measured with \`hack/bench.sh ${runs[*]}\` at commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with local changes)'), $(date -u +%F), the $target release build of the dispatcher, a fresh cluster per size; peak RSS is the dispatcher's VmHWM:"
echo
header=--header
for run in "${runs[@]}"; do
  IFS=: read -r n p d mode <<<"$run"
  extra=()
  [ "${mode:-}" = upgrade ] && extra=(--upgrade)
  [ "${mode:-}" = uninstall ] && extra=(--uninstall)
  state=$(bash hack/testenv/start.sh --owner-pid $$)
  KATA_TESTBED_STATE="$state" target/release/kata-bench --nodes "$n" --parallelism "$p" --duration "$d" $header "${extra[@]}" \
    || { bash hack/testenv/stop.sh "$state"; die "benchmark N=$n P=$p D=$d failed"; }
  header=
  bash hack/testenv/stop.sh "$state" >/dev/null 2>&1
done
