#!/usr/bin/env bash
# The main job on an embedded default: a local control plane with local nodes (fake host roots
# served by kata-local-kubelet, which runs our real binaries) and simulated kwok nodes, then
# `helm install` of the real chart. Shows the rollout and where to look.
#
#   hack/demo.sh [--local N] [--sim N] [--keep]     install (default: 2 local, 20 simulated nodes)
#   hack/demo.sh --down                             tear the demo down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. hack/testenv/lib.sh

demo="${KATA_DEMO_DIR:-$REPO_ROOT/.cache/demo}"
local_nodes=2 sim_nodes=20 down=0
while [ $# -gt 0 ]; do
  case "$1" in
    --local) local_nodes=$2; shift 2 ;;
    --sim) sim_nodes=$2; shift 2 ;;
    --down) down=1; shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [ "$down" = 1 ]; then
  bash hack/testenv/stop.sh "$demo/cluster" || true
  rm -rf "$demo"
  log "demo removed"
  exit 0
fi
[ ! -s "$demo/cluster/pids" ] || die "a demo already runs in $demo: tear it down first with hack/demo.sh --down"

bash hack/install-deps.sh
bash hack/testenv/build.sh
log "building the binaries"
cargo build --locked --bins -p kata-deploy-job-dispatcher -p kata-deploy-stage -p kata-testbed
rm -rf "$demo" && mkdir -p "$demo/hosts" "$demo/work"
bash hack/make-test-payload.sh "$demo/payload" >/dev/null
bash hack/testenv/start.sh --state "$demo/cluster" >/dev/null
. "$demo/cluster/env"

log "creating $local_nodes local and $sim_nodes simulated nodes"
target/debug/kata-testbed-ctl nodes --local "$local_nodes" --sim "$sim_nodes" --hosts-dir "$demo/hosts" >/dev/null
# The stand-in kubelet joins the cluster's process list, so stop.sh / --down stops it too.
setsid target/debug/kata-local-kubelet --kubeconfig "$KUBECONFIG" --hosts-dir "$demo/hosts" --work-dir "$demo/work" \
  --image "kata-deploy-job-dispatcher=$REPO_ROOT/target/debug/kata-deploy-job-dispatcher" \
  --image "kata-deploy-stage=$REPO_ROOT/target/debug/kata-deploy-stage" \
  --bind "$demo/payload=/opt/kata-payload:ro" >"$demo/cluster/logs/kata-local-kubelet.log" 2>&1 </dev/null &
echo "$! kata-local-kubelet" >>"$demo/cluster/pids"

log "helm install kata-deploy (job mode) — the dispatcher hook rolls out one Job per node"
start=$(date +%s)
if ! "$HELM" install kata-deploy chart/kata-deploy --namespace kata-system --create-namespace \
    --set stage.restart=none --set job.parallelism=5 --wait --timeout 5m; then
  log "helm install failed; the dispatcher's report and the per-node logs are in $demo/work"
  tail -n 40 "$demo"/work/kata-system_*dispatch-install*/*.log 2>/dev/null || true
  exit 1
fi
log "installed in $(( $(date +%s) - start ))s"
echo
echo "Dispatcher report:"
sed -n '/^NODE /,$p' "$demo"/work/kata-system_*dispatch-install*/*.log 2>/dev/null | head -n $(( local_nodes + sim_nodes + 3 )) || true
echo
echo "Local nodes' hosts now carry Kata:"
for h in "$demo"/hosts/*/; do
  n=$(basename "$h")
  printf '  %-16s %s files under opt/kata; containerd runtime handlers: %s\n' "$n" \
    "$(find "$h/opt" -type f 2>/dev/null | wc -l)" \
    "$(grep -rhoE 'runtimes\.(\"|)kata-[a-z0-9-]+' "$h/etc/containerd" 2>/dev/null | sed 's/.*runtimes\.\"\{0,1\}//' | sort -u | tr '\n' ' ')"
done
cat <<EOF

Where to look:
  export KUBECONFIG=$KUBECONFIG     (API server $KATA_TESTBED_SERVER)
  per-node Job logs (local nodes):  $demo/work/<namespace>_<pod>/<container>.log
  fake host roots:                  $demo/hosts/<node>/
  control-plane logs:               $demo/cluster/logs/
  uninstall (reverts every host):   $HELM uninstall kata-deploy -n kata-system --wait
  tear everything down:             hack/demo.sh --down
EOF
