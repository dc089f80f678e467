#!/usr/bin/env bash
# Wait until at least one node carries katacontainers.io/kata-runtime=true: the "install complete"
# signal of job mode (the label stage runs last on each node). On timeout, dump the Jobs, the pods
# and every container's logs in the release namespace, and exit 1.
#
#   hack/wait-for-kata.sh [--namespace kata-system] [--timeout 900] [--min-nodes 1] [--interval 5]
#
# Talks to the cluster with kubectl when there is one ($KUBECTL, else kubectl on PATH); otherwise
# with curl and the current context of $KUBECONFIG (default ~/.kube/config): client certificate,
# bearer token or token file; python3 reads the kubeconfig and the JSON answers. KUBECTL=none
# forces the curl mode.
set -euo pipefail

ns=kata-system timeout=900 min_nodes=1 interval=5
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) ns=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --min-nodes) min_nodes=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "wait-for-kata: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in "$timeout" "$min_nodes" "$interval"; do
  case "$v" in ''|*[!0-9]*) echo "wait-for-kata: --timeout/--min-nodes/--interval take whole numbers" >&2; exit 2 ;; esac
done
LABEL="katacontainers.io/kata-runtime=true"
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
[ "$KUBECTL" != none ] || KUBECTL=""   # KUBECTL=none forces the curl mode
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- API access: GET <path> prints the JSON body (kubectl get --raw, or curl) ----------------
if [ -n "$KUBECTL" ]; then
  api_get() { "$KUBECTL" get --raw "$1"; }
  echo "wait-for-kata: using $KUBECTL"
else
  command -v curl >/dev/null || { echo "wait-for-kata: neither kubectl nor curl found" >&2; exit 2; }
  command -v python3 >/dev/null || { echo "wait-for-kata: without kubectl, python3 is needed to read the kubeconfig" >&2; exit 2; }
  kcfg=${KUBECONFIG:-$HOME/.kube/config}
  kcfg=${kcfg%%:*}
  [ -r "$kcfg" ] || { echo "wait-for-kata: cannot read kubeconfig '$kcfg' (set KUBECONFIG)" >&2; exit 2; }
  # Writes $tmp/curl.cfg (curl options) from the current context: server, CA, cert/key or token.
  python3 - "$kcfg" "$tmp" <<'PY'
import base64, os, sys
try:
    import yaml
    load = yaml.safe_load
except ImportError:  # a kubeconfig written as JSON still works without PyYAML
    import json
    load = json.loads
path, tmp = sys.argv[1], sys.argv[2]
base = os.path.dirname(os.path.abspath(path))
cfg = load(open(path).read())
def by_name(items, name, what):
    for i in items or []:
        if i.get("name") == name:
            return i.get(what) or {}
    sys.exit(f"wait-for-kata: kubeconfig has no {what} named {name!r}")
ctx = by_name(cfg.get("contexts"), cfg.get("current-context"), "context")
cluster = by_name(cfg.get("clusters"), ctx.get("cluster"), "cluster")
user = by_name(cfg.get("users"), ctx.get("user"), "user")
def file_opt(d, key, name):
    if d.get(key + "-data"):
        p = os.path.join(tmp, name)
        with open(p, "wb") as f:
            f.write(base64.b64decode(d[key + "-data"]))
        return p
    if d.get(key):
        return d[key] if os.path.isabs(d[key]) else os.path.join(base, d[key])
    return None
q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
lines = ["silent", "show-error", "fail", f"url = {q(cluster['server'].rstrip('/'))}"]
ca = file_opt(cluster, "certificate-authority", "ca.crt")
if ca:
    lines.append(f"cacert = {q(ca)}")
elif cluster.get("insecure-skip-tls-verify"):
    lines.append("insecure")
cert, key = file_opt(user, "client-certificate", "client.crt"), file_opt(user, "client-key", "client.key")
if cert and key:
    lines += [f"cert = {q(cert)}", f"key = {q(key)}"]
token = user.get("token")
if not token and user.get("tokenFile"):
    token = open(user["tokenFile"]).read().strip()
if token:
    lines.append(f"header = {q('Authorization: Bearer ' + token)}")
if not ((cert and key) or token):
    sys.exit("wait-for-kata: the kubeconfig user has no client certificate or token (exec/auth plugins need kubectl)")
with open(os.path.join(tmp, "curl.cfg"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(tmp, "server"), "w") as f:
    f.write(cluster["server"].rstrip("/"))
PY
  server=$(cat "$tmp/server")
  # curl's config names the server once; the path is appended per request.
  api_get() { curl --config <(grep -v '^url = ' "$tmp/curl.cfg") "$server$1"; }
  echo "wait-for-kata: using curl against $server"
fi

# Formats the API's JSON answers (stdin): nodes | jobs | pods | containers.
cat >"$tmp/fmt.py" <<'PY'
import json, sys
d = json.load(sys.stdin)
mode = sys.argv[1]
for i in d["items"]:
    m, st = i["metadata"], i.get("status", {})
    if mode == "nodes":
        print(m["name"])
    elif mode == "jobs":
        conds = "".join(" [%s=%s: %s %s]" % (c["type"], c["status"], c.get("reason", ""), c.get("message", ""))
                        for c in st.get("conditions", []))
        print("%s: active=%s succeeded=%s failed=%s node=%s%s" % (
            m["name"], st.get("active", 0), st.get("succeeded", 0), st.get("failed", 0),
            m.get("annotations", {}).get("katacontainers.io/node-name", "-"), conds))
    elif mode == "pods":
        print("%s: %s node=%s %s %s" % (m["name"], st.get("phase"), i["spec"].get("nodeName", "-"),
                                        st.get("reason", ""), st.get("message", "")))
        for c in st.get("initContainerStatuses", []) + st.get("containerStatuses", []):
            print("  %s: %s" % (c["name"], json.dumps(c.get("state", {}))))
    elif mode == "containers":
        for c in i["spec"].get("initContainers", []) + i["spec"]["containers"]:
            print(m["name"], c["name"])
PY
fmt() { python3 "$tmp/fmt.py" "$1"; }
# get_fmt <path> <mode>: fails (without formatting) when the API call fails.
get_fmt() { api_get "$1" >"$tmp/answer.json" && fmt "$2" <"$tmp/answer.json"; }

labelled_nodes() { get_fmt "/api/v1/nodes?labelSelector=${LABEL/=/%3D}" nodes; }

dump() {
  echo "=== Jobs in $ns"
  get_fmt "/apis/batch/v1/namespaces/$ns/jobs" jobs || echo "(cannot list Jobs)"
  echo "=== Pods in $ns"
  api_get "/api/v1/namespaces/$ns/pods" >"$tmp/pods.json" || { echo "(cannot list pods)"; return; }
  fmt pods <"$tmp/pods.json"
  fmt containers <"$tmp/pods.json" | while read -r pod ctr; do
    echo "=== logs $pod/$ctr"
    api_get "/api/v1/namespaces/$ns/pods/$pod/log?container=$ctr&tailLines=200" || echo "(no logs)"
  done
}

deadline=$(( $(date +%s) + timeout ))
while :; do
  nodes=$(labelled_nodes 2>"$tmp/err" | tr '\n' ' ') || true
  count=$(wc -w <<<"$nodes")
  if [ "$count" -ge "$min_nodes" ]; then
    echo "wait-for-kata: $count node(s) carry $LABEL: $nodes"
    exit 0
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "wait-for-kata: timed out after ${timeout}s: $count node(s) carry $LABEL (wanted $min_nodes)" >&2
    [ ! -s "$tmp/err" ] || { echo "last API error:" >&2; cat "$tmp/err" >&2; }
    dump
    exit 1
  fi
  sleep "$interval"
done
