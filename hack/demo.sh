#!/usr/bin/env bash
# The main job on an embedded default: a local control plane with REAL nodes (systemd + containerd
# + runc + a real kubelet each, in systemd-nspawn: one on Debian's containerd 1.6, one on a
# containerd 2.x) and simulated kwok nodes, then `helm install` of the real chart with our real
# images. Shows the rollout, what each real node's containerd now serves, and where to look.
#
#   hack/demo.sh [--real N] [--sim N] [--local N]   install (default: 2 real, 20 simulated nodes;
#                                                   --local adds stand-in nodes with fake host roots)
#   hack/demo.sh --down                             tear the demo down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. hack/testenv/lib.sh

demo="${KATA_DEMO_DIR:-$REPO_ROOT/.cache/demo}"
real_nodes=2 sim_nodes=20 local_nodes=0 down=0
while [ $# -gt 0 ]; do
  case "$1" in
    --real) real_nodes=$2; shift 2 ;;
    --sim) sim_nodes=$2; shift 2 ;;
    --local) local_nodes=$2; shift 2 ;;
    --down) down=1; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for n in "$real_nodes" "$sim_nodes" "$local_nodes"; do [[ "$n" =~ ^[0-9]+$ ]] || die "node counts must be whole numbers (got '$n')"; done
[ "$real_nodes" -le 4 ] || die "--real at most 4 on this machine (2 cores)"
if [ "$down" = 1 ]; then
  bash hack/testenv/stop.sh "$demo/cluster" || true
  rm -rf "$demo"
  log "demo removed"
  exit 0
fi
[ ! -s "$demo/cluster/pids" ] || die "a demo already runs in $demo: tear it down first with hack/demo.sh --down"

bash hack/install-deps.sh
bash hack/testenv/build.sh
[ "$real_nodes" = 0 ] || bash hack/testenv/realnode/build-rootfs.sh
log "building the binaries and the images"
cargo build --locked --bins -p kata-deploy-job-dispatcher -p kata-deploy-stage -p kata-testbed
[ "$real_nodes" = 0 ] || { bash hack/build-images.sh >/dev/null && bash hack/testenv/realnode/images.sh build; }
rm -rf "$demo" && mkdir -p "$demo/hosts" "$demo/work"
bash hack/make-test-payload.sh "$demo/payload" >/dev/null
bash hack/testenv/start.sh --state "$demo/cluster" >/dev/null
. "$demo/cluster/env"
export PATH="$TESTENV_BIN:$PATH"   # kubectl and helm of the test bed

# Real nodes alternate flavours: Debian's containerd 1.6, then the newest pinned containerd 2.x.
newest=$(echo "$CONTAINERD_VERSIONS" | tr ' ' '\n' | grep '^v2' | sort -V | tail -1)
real_names=()
for i in $(seq 1 "$real_nodes"); do
  flavour=debian; [ $((i % 2)) = 0 ] && flavour=$newest
  name="demo-real-$i"
  log "starting real node $name (containerd: $flavour)"
  bash hack/testenv/realnode/node.sh start "$demo/cluster" "$name" "$flavour"
  real_names+=("$name")
done
log "creating $sim_nodes simulated and $local_nodes local nodes"
target/debug/kata-testbed-ctl nodes --local "$local_nodes" --sim "$sim_nodes" --hosts-dir "$demo/hosts" >/dev/null
if [ "$local_nodes" -gt 0 ]; then
  # The stand-in kubelet joins the cluster's process list, so stop.sh / --down stops it too.
  setsid target/debug/kata-local-kubelet --kubeconfig "$KUBECONFIG" --hosts-dir "$demo/hosts" --work-dir "$demo/work" \
    --image "kata-deploy-job-dispatcher=$REPO_ROOT/target/debug/kata-deploy-job-dispatcher" \
    --image "kata-deploy-stage=$REPO_ROOT/target/debug/kata-deploy-stage" \
    --bind "$demo/payload=/opt/kata-payload:ro" >"$demo/cluster/logs/kata-local-kubelet.log" 2>&1 </dev/null &
  echo "$! kata-local-kubelet" >>"$demo/cluster/pids"
fi
for n in "${real_names[@]}"; do kubectl wait --for=condition=Ready "node/$n" --timeout=120s >/dev/null; done
# The test bed runs no node-lifecycle controller: the not-ready taint the API server puts on every
# new Node is never lifted from a simulated node. Lift it once kwok reports the node Ready, as that
# controller would, or install Jobs (DaemonSet taint rules) rightly skip those nodes.
for n in $(kubectl get nodes -o name | grep -- '-sim-'); do
  kubectl wait --for=condition=Ready "$n" --timeout=60s >/dev/null
  kubectl taint nodes "${n#node/}" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
done

log "helm install kata-deploy (job mode) — the dispatcher hook rolls out one Job per node"
values=(--set job.parallelism=5)
# The non-confidential shims the demo payload carries: the chart's default also enables the TEE
# shims, which pull images in the guest (nydus) and so need containerd >= 1.7 — host-check refuses
# them on the containerd 1.6 node, as it would on a real one.
values+=(--set shims.disableAll=true --set shims.qemu.enabled=true --set shims.qemu-runtime-rs.enabled=true)
# The dispatcher runs on a real node (real container, real logs); local nodes cannot restart a runtime.
[ "$real_nodes" = 0 ] || values+=(--set-string "job.dispatcher.nodeSelector.kata-testbed/real=true")
[ "$local_nodes" = 0 ] || values+=(--set stage.restart=none)
# kwok marks its simulated nodes with a NoSchedule taint; install Jobs follow DaemonSet taint rules.
[ "$sim_nodes" = 0 ] || values+=(--set "job.nodeJobs.tolerations[0].key=kwok.x-k8s.io/node" --set "job.nodeJobs.tolerations[0].operator=Exists")
start=$(date +%s)
if ! helm install kata-deploy chart/kata-deploy --namespace kata-system --create-namespace "${values[@]}" --wait --timeout 8m; then
  log "helm install failed; the dispatcher's report:"
  kubectl -n kata-system logs job/kata-deploy-dispatch-install --tail 40 2>/dev/null || true
  exit 1
fi
log "installed in $(( $(date +%s) - start ))s"
echo
echo "Dispatcher report (kubectl -n kata-system logs job/kata-deploy-dispatch-install):"
kubectl -n kata-system logs job/kata-deploy-dispatch-install 2>/dev/null | sed -n '/NODE /,$p' | head -n $(( real_nodes + sim_nodes + local_nodes + 4 )) || true
echo
echo "Real nodes:"
for n in "${real_names[@]}"; do
  handlers=$(kubectl get node "$n" -o jsonpath='{range .status.runtimeHandlers[*]}{.name}{" "}{end}')
  printf '  %-12s %-24s label kata-runtime=%s\n' "$n" "$(kubectl get node "$n" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}')" \
    "$(kubectl get node "$n" -o jsonpath='{.metadata.labels.katacontainers\.io/kata-runtime}')"
  printf '               runtimeHandlers (kubelet): %s\n' "${handlers:-(not reported by containerd 1.6)}"
  printf '               kata handlers in containerd'"'"'s config: %s\n' \
    "$(bash hack/testenv/realnode/node.sh exec "$demo/cluster" "$n" sh -c 'c=containerd; [ -x /opt/containerd/bin/containerd ] && c=/opt/containerd/bin/containerd; $c config dump 2>/dev/null' | grep -oE 'runtimes\.(["'"'"']?)kata-[a-z0-9-]+' | sed -E 's/.*runtimes\.["'"'"']?//' | sort -u | tr '\n' ' ')"
done
cat <<EOF

Where to look (the commands of the chart's NOTES.txt work as they are):
  export KUBECONFIG=$KUBECONFIG PATH=$TESTENV_BIN:\$PATH
  kubectl -n kata-system logs job/kata-deploy-dispatch-install
  kubectl -n kata-system get jobs -l katacontainers.io/dispatcher=kata-deploy-install
  kubectl -n kata-system logs job/<per-node job of a real node> --all-containers --prefix
  inside a real node:               hack/testenv/realnode/node.sh exec $demo/cluster ${real_names[0]:-demo-real-1} systemctl status containerd
  control-plane logs:               $demo/cluster/logs/
  uninstall (reverts every node):   helm uninstall kata-deploy -n kata-system --wait
  tear everything down:             hack/demo.sh --down
EOF
