#!/usr/bin/env bash
# The README's first command, as a test: `hack/demo.sh` (its own control plane, 2 real nodes and
# 20 simulated ones, `helm install` of the real chart) must exit 0 with every node installed,
# each real node labelled and its containerd serving the kata handlers; then `hack/demo.sh
# --down` must remove it. Run by hack/test.sh (suite demo); the demo lives under target/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. hack/testenv/lib.sh
export KATA_DEMO_DIR="$REPO_ROOT/target/test-demo"
out="$REPO_ROOT/target/test-demo.log"
passes=0 fails=0
check() { # DESCRIPTION COMMAND...
  if "${@:2}"; then echo "PASS $1"; passes=$((passes + 1)); else echo "FAIL $1"; fails=$((fails + 1)); fi
}
bash hack/demo.sh --down >/dev/null 2>&1 # a demo this test left when killed
start=$(date +%s)
timeout 900 bash hack/demo.sh >"$out" 2>&1
rc=$?
echo "hack/demo.sh exited $rc in $(( $(date +%s) - start ))s (output: $out)"
[ "$rc" = 0 ] || tail -40 "$out"
check "hack/demo.sh exits 0" test "$rc" = 0
# The dispatcher's report: one line per node, 22 nodes, every one succeeded.
report=$(sed -n '/^Dispatcher report/,/^Real nodes:/p' "$out")
# Rows of its node table: "<node>  <result>  <duration>  <reason>".
check "the dispatcher's table has 22 nodes, each succeeded" \
  test "$(grep -cE '^[a-z0-9.-]+ {2,}succeeded ' <<<"$report")" = 22
check "no row of another result" bash -c '! grep -E "^[a-z0-9.-]+ {2,}[a-z]" <<<"$1" | grep -qvE "^[a-z0-9.-]+ {2,}succeeded "' _ "$report"
for n in demo-real-1 demo-real-2; do
  line=$(grep -A2 "^  $n " "$out")
  check "$n is labelled kata-runtime=true" grep -q 'label kata-runtime=true' <<<"$line"
  check "$n's containerd config has kata-qemu and kata-qemu-runtime-rs" \
    grep -qE "kata handlers in containerd's config: .*kata-qemu .*kata-qemu-runtime-rs|kata handlers in containerd's config: .*kata-qemu-runtime-rs .*kata-qemu " <<<"$line"
done
timeout 300 bash hack/demo.sh --down >>"$out" 2>&1
check "hack/demo.sh --down removes the demo" test ! -e "$KATA_DEMO_DIR"
echo "$passes passed, $fails failed"
[ "$fails" = 0 ]
