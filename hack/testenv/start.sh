#!/usr/bin/env bash
# Starts a real control plane on loopback: etcd, kube-apiserver (RBAC, ServiceAccount issuer,
# audit log), kube-controller-manager, kube-scheduler and kwok (simulated nodes).
#
#   hack/testenv/start.sh [--state DIR] [--owner-pid PID]
#
# Everything lives under DIR (default: a new temporary directory): pki/, logs/, kubeconfig,
# audit.log, pids and an `env` file to source (KUBECONFIG, KATA_TESTBED_STATE, ...). The state dir
# is printed on the last line of stdout. With --owner-pid, a watchdog stops the cluster as soon as
# that process exits (so a killed test run leaves no orphans). Stop with: hack/testenv/stop.sh DIR
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

state="" owner_pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --state) state=$2; shift 2 ;;
    --owner-pid) owner_pid=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
  [ -x "$TESTENV_BIN/$b" ] || die "$TESTENV_BIN/$b is missing: run hack/testenv/build.sh first"
done
command -v openssl >/dev/null || die "openssl is missing: apt-get install -y openssl"
command -v curl >/dev/null || die "curl is missing: apt-get install -y curl"
[ -n "$state" ] || state=$(mktemp -d /tmp/kata-testbed.XXXXXX)
mkdir -p "$state"/{pki,logs,etcd}
state=$(canonical_state "$state")
[ ! -s "$state/pids" ] || die "$state already runs a cluster (pids file present): stop it with hack/testenv/stop.sh $state"
t0=$(date +%s.%N)
pki="$state/pki"
# This test bed's run id: its Service range and Service IP (lib.sh), and the tag of its rules.
run_id=$(claim_slot runs 254 state "$state") || { bash "$TESTENV_HERE/reap.sh"; run_id=$(claim_slot runs 254 state "$state"); } ||
  die "all 254 test-bed run ids of this machine are claimed ($TESTBED_REGISTRY/runs): stop test beds with hack/testenv/stop.sh <state>"
echo "$run_id" >"$state/run-id"
# Given back if this script fails before the control plane runs (stop.sh gives it back after).
trap '[ -s "$state/pids" ] || release_slot runs "$run_id" state "$state"' EXIT
service_cidr=$(testbed_service_cidr "$run_id") service_ip=$(testbed_service_ip "$run_id")

# --- certificates: one CA; serving cert for the apiserver; client certs per component so the
# audit log can tell the dispatcher's requests from the controllers' ---
openssl_quiet() { openssl "$@" >/dev/null 2>&1 || die "openssl $1 failed (args: $*)"; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kata-testbed-ca -keyout "$pki/ca.key" -out "$pki/ca.crt"
client_cert() { # name CN O
  openssl_quiet req -newkey rsa:2048 -nodes -subj "/O=$3/CN=$2" -keyout "$pki/$1.key" -out "$pki/$1.csr"
  # Extensions make it an X.509 v3 certificate: rustls (the Rust clients) rejects v1 ones.
  openssl_quiet x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 -extfile "$pki/client.ext" -out "$pki/$1.crt"
}
printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$pki/client.ext"
printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$service_ip" >"$pki/san.ext"
openssl_quiet req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
openssl_quiet x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 -extfile "$pki/san.ext" -out "$pki/apiserver.crt"
client_cert admin kata-testbed-admin system:masters
client_cert kcm system:kube-controller-manager system:masters
client_cert scheduler system:kube-scheduler system:masters
client_cert kwok kwok system:masters
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
server="https://127.0.0.1:$api_port"

# start NAME CMD...: runs in its own session, logs to logs/NAME.log, pid recorded for stop.sh.
start() {
  local name=$1; shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$state/pids"
}
wait_for() { # what timeout_s command...
  local what=$1 timeout=$2; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { tail -20 "$state/logs/"*.log >&2; "$TESTENV_HERE/stop.sh" "$state" >&2; die "$what not ready within ${timeout}s (logs above, state $state)"; }
    sleep 0.2
  done
}

kubeconfig() { # file cert key
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster: {server: "$server", certificate-authority: "$pki/ca.crt"}
users:
- name: user
  user: {client-certificate: "$2", client-key: "$3"}
contexts:
- name: testbed
  context: {cluster: testbed, user: user, namespace: default}
current-context: testbed
EOF
}
kubeconfig "$state/kubeconfig" "$pki/admin.crt" "$pki/admin.key"
for c in kcm scheduler kwok; do kubeconfig "$state/$c.kubeconfig" "$pki/$c.crt" "$pki/$c.key"; done

# Audit only what tests measure: requests of users other than the control plane's own components.
cat >"$state/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  users: [system:kube-controller-manager, system:kube-scheduler, kwok, system:apiserver]
- level: None
  nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version"]
- level: Metadata
EOF

log "starting etcd on 127.0.0.1:$etcd_port"
start etcd "$TESTENV_BIN/etcd" --name testbed --data-dir "$state/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "testbed=http://127.0.0.1:$peer_port" --unsafe-no-fsync --quota-backend-bytes=8589934592 \
  --log-level=warn
wait_for etcd 20 curl -sf "http://127.0.0.1:$etcd_port/health"

log "starting kube-apiserver on $server"
api_cmd=("$TESTENV_BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --secure-port="$api_port" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" --authorization-mode=RBAC --allow-privileged=true \
  --service-cluster-ip-range="$service_cidr" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --audit-policy-file="$state/audit-policy.yaml" --audit-log-path="$state/audit.log" \
  --audit-log-format=json --audit-log-maxsize=0 --audit-log-mode=blocking \
  --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --cert-dir="$pki/apiserver-generated")
# Kept so restart-apiserver.sh can bring the same API server back (fault-tolerance tests).
printf '%q ' "${api_cmd[@]}" >"$state/apiserver.cmd"
start kube-apiserver "${api_cmd[@]}"
wait_for kube-apiserver 60 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server/readyz"

log "starting kube-controller-manager, kube-scheduler, kwok"
start kube-controller-manager "$TESTENV_BIN/kube-controller-manager" --kubeconfig="$state/kcm.kubeconfig" \
  --controllers=job-controller,cronjob-controller,garbage-collector-controller,ttl-after-finished-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,root-ca-certificate-publisher-controller,pod-garbage-collector-controller \
  --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --kube-api-qps=1000 --kube-api-burst=2000 --concurrent-job-syncs=50 --concurrent-gc-syncs=50 \
  --secure-port=0
start kube-scheduler "$TESTENV_BIN/kube-scheduler" --kubeconfig="$state/scheduler.kubeconfig" \
  --leader-elect=false --secure-port=0
start kwok "$TESTENV_BIN/kwok" --kubeconfig="$state/kwok.kubeconfig" \
  --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --config="$TESTENV_HERE/kwok-stages.yaml" --node-lease-duration-seconds=40 \
  --server-address=127.0.0.1:0
# The default ServiceAccount appearing proves the controller-manager is up and reconciling.
wait_for "kube-controller-manager (default ServiceAccount)" 60 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server/api/v1/namespaces/default/serviceaccounts/default"

cat >"$state/env" <<EOF
export KATA_TESTBED_STATE="$state"
export KATA_TESTBED_RUN_ID="$run_id"
export KUBECONFIG="$state/kubeconfig"
export KATA_TESTBED_SERVER="$server"
export KATA_TESTBED_AUDIT_LOG="$state/audit.log"
export HELM="$TESTENV_BIN/helm"
EOF

if [ -n "$owner_pid" ]; then
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -s "$2/pids" ]; do sleep 1; done; [ -s "$2/pids" ] && "$3" "$2"' \
    watchdog "$owner_pid" "$state" "$TESTENV_HERE/stop.sh" >/dev/null 2>&1 </dev/null &
fi
log "cluster (run id $run_id, Service IP $service_ip) ready at $server in $(python3 -c "import time; print(round(time.time()-$t0, 1))")s; state: $state"
echo "$state"
