#!/usr/bin/env bash
# A real Kubernetes node on this machine: systemd as PID 1 (systemd-nspawn, booted on the base
# rootfs of build-rootfs.sh under an overlay of its own) running containerd + runc and a real
# kubelet registered to the test-bed API server of STATE.
#
#   node.sh start STATE NAME FLAVOUR         FLAVOUR: debian (containerd 1.6, config version 2)
#                                            or a pinned Go-proxy build such as v2.4.2 (version 3);
#                                            claims a free node slot of the machine, imports the
#                                            images of images.sh build, returns once the node is
#                                            Ready and schedulable
#   node.sh stop STATE NAME                  stops the node and removes everything it made
#   node.sh reboot STATE NAME                powers the node off and boots it again on the same
#                                            root (its files kept, /run and processes fresh);
#                                            returns once containerd answers again
#   node.sh exec STATE NAME CMD...           runs CMD inside the node (its namespaces)
#   node.sh import STATE NAME ARCHIVE NAME.. imports an OCI archive into the node's containerd
#                                            (namespace k8s.io) under each image NAME
#
# Each node has its own hostname, machine-id and /etc/containerd/config.toml. What the machine
# sees of it is per run, so two test beds may run nodes of the same name side by side: a slot I
# claimed in lib.sh's registry gives its kubelet port (10250+2I), pod subnet
# (TESTBED_POD_NET.I.0/24 on bridge kbrI), and its cgroup subtree is /kata-node-rRUN-NAME in every
# v1 hierarchy (RUN: the test bed's run id). The network is the machine's (the loopback API server must be reachable); pods reach
# the API server through the `kubernetes` Service IP, which net.sh maps to it (no kube-proxy).
# Everything lives under STATE/nodes/NAME; `stop` leaves no mount, cgroup, bridge or process.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"

cmd=${1:-} state=${2:-} name=${3:-}
[ -n "$cmd" ] && [ -n "$state" ] && [ -n "$name" ] || die "usage: node.sh start|stop|reboot|exec|import STATE NAME ... (see the header of $0)"
state=$(canonical_state "$state") # the registry's claims name it so
dir="$state/nodes/$name"
rootfs="$TESTENV_CACHE/realnode/rootfs"
# The cgroup subtree: recorded in meta at start, so stop finds it even once the run id is gone.
cgname=$(awk '{print $3}' "$dir/meta" 2>/dev/null || true)
v1_hierarchies() { find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -type d ! -name unified | sort; }

leader_pid() { # the node's systemd (PID 1 inside), from nspawn's child
  local npid; npid=$(cat "$dir/nspawn.pid" 2>/dev/null) || return 1
  pid_alive "$npid" || return 1
  local child; child=$(pgrep -P "$npid" | head -1) || return 1
  [ -n "$child" ] && echo "$child"
}

in_node() { # CMD...: run inside the node's namespaces
  local pid; pid=$(leader_pid) || die "node $name is not running"
  nsenter -t "$pid" -m -u -i -p -- "$@"
}

write() { # PATH-IN-NODE CONTENT: a file in the node's overlay upper layer
  local path="$dir/upper$1"
  mkdir -p "$(dirname "$path")"
  printf '%s\n' "$2" >"$path"
}

containerd_config() { # FLAVOUR
  case "$1" in
    debian)
      # containerd 1.6 (Debian): config version 2. restrict_oom_score_adj: this VM's bounding set
      # lacks CAP_SYS_RESOURCE (runc cannot raise oom_score_adj). Pause image: see import.
      cat <<'EOF'
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
      ;;
    *)
      cat <<'EOF'
version = 3
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"
EOF
      ;;
  esac
}

start_node() {
  local flavour=${4:-}
  [ -n "$flavour" ] || die "FLAVOUR missing: debian or a containerd version of CONTAINERD_VERSIONS ($CONTAINERD_VERSIONS)"
  [ -z "${5:-}" ] || die "node.sh start takes STATE NAME FLAVOUR: the node's slot is claimed, not given (got a 4th argument '$4')"
  [[ "$name" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "NAME '$name' is not a valid node name (lowercase letters, digits, '-')"
  local run_id; run_id=$(testbed_run_id "$state") || die "$state has no run id: start the test bed with hack/testenv/start.sh"
  [ -x "$rootfs/lib/systemd/systemd" ] || die "the real-node rootfs is missing: run hack/testenv/realnode/build-rootfs.sh"
  [ -x "$TESTENV_BIN/kubelet" ] || die "$TESTENV_BIN/kubelet is missing: run hack/testenv/build.sh"
  [ -s "$state/pki/ca.key" ] || die "$state is not a running test bed (no pki/ca.key): start one with hack/testenv/start.sh"
  local cbin=""
  if [ "$flavour" != debian ]; then
    cbin="$TESTENV_BIN/containerd-$flavour"
    [ -x "$cbin/containerd" ] || die "containerd $flavour is not built ($cbin): add it to CONTAINERD_VERSIONS and run hack/testenv/build.sh"
  fi
  leader_pid >/dev/null 2>&1 && die "node $name already runs (stop it first: node.sh stop $state $name)"
  local t0; t0=$(date +%s.%N)
  rm -rf "$dir" && mkdir -p "$dir"/{upper,work,merged,containerd,kubelet,pods-log,run-containerd}
  # What dead test beds left (their slots, bridges, rules) goes before a slot is claimed.
  bash "$TESTENV_HERE/reap.sh"
  local index; index=$(claim_node_slot) || die "no free real-node slot on this machine (1..200 in $TESTBED_REGISTRY/nodes, kubelet ports free): stop other test beds' nodes"
  cgname="kata-node-r$run_id-$name"
  echo "$index $flavour $cgname" >"$dir/meta"
  echo "$name" >>"$state/realnodes" # from here on, stop.sh stops it whatever happens next

  # --- identity and the node's own configuration, written into its overlay upper layer ---
  local machine_id; machine_id=$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  local node_ip; node_ip=$(ip -4 -o addr show scope global | awk '{split($4,a,"/"); print a[1]; exit}')
  [ -n "$node_ip" ] || die "no non-loopback IPv4 address on this machine (the kubelet refuses a loopback node IP)"
  local port=$((10250 + index * 2)) server; server=$(sed -n 's/.*server: "\([^"]*\)".*/\1/p' "$state/kubeconfig" | head -1)
  write /etc/hostname "$name"
  write /etc/machine-id "$machine_id"
  write /etc/hosts "127.0.0.1 localhost
$node_ip $name"
  write /etc/containerd/config.toml "$(containerd_config "$flavour")"
  if [ -n "$cbin" ]; then
    write /etc/systemd/system/containerd.service.d/10-testbed-flavour.conf "[Service]
Environment=PATH=/opt/containerd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ExecStart=
ExecStart=/opt/containerd/bin/containerd"
  fi
  # nspawn mounts the cgroup v1 controllers read-only; containerd and the kubelet create cgroups.
  # The kubelet also insists on a few kernel settings (it writes them when they differ, and /proc/sys
  # is read-only here): they are global to the machine, so rather than change this machine's kernel
  # the node sees files holding the values the kubelet wants, bound over those /proc/sys entries.
  # Likewise ip_forward, which the CNI bridge plugin turns on: pods here only reach addresses of
  # this machine (the API server through the Service IP), so nothing needs forwarding.
  write /usr/local/sbin/kata-testbed-prepare "#!/bin/sh
set -e
for d in /sys/fs/cgroup/*/; do mount -o remount,bind,rw \$d; done
mkdir -p /run/kata-testbed-sysctl
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 net/ipv4/ip_forward=1; do
  k=\${kv%=*}; f=/run/kata-testbed-sysctl/\$(echo \$k | tr / _)
  echo \${kv#*=} >\$f
  mount --bind \$f /proc/sys/\$k
done"
  chmod +x "$dir/upper/usr/local/sbin/kata-testbed-prepare"
  write /etc/systemd/system/kata-testbed-cgroups.service "[Unit]
Description=Test-bed node preparation: writable cgroup v1 controllers, the kubelet's kernel settings
DefaultDependencies=no
Before=containerd.service kubelet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/kata-testbed-prepare
[Install]
WantedBy=multi-user.target"
  write /etc/systemd/system/kubelet.service "[Unit]
Description=kubelet (test bed)
After=containerd.service kata-testbed-cgroups.service
Wants=containerd.service
[Service]
ExecStart=/usr/local/bin/kubelet --config=/etc/kubernetes/kubelet.yaml --kubeconfig=/etc/kubernetes/kubelet.kubeconfig --hostname-override=$name --node-ip=$node_ip --node-labels=kata-testbed/real=true,kata-testbed/containerd=$flavour
Restart=always
RestartSec=1
[Install]
WantedBy=multi-user.target"
  mkdir -p "$dir/upper/etc/systemd/system/multi-user.target.wants"
  for u in containerd.service kubelet.service kata-testbed-cgroups.service; do
    local src=/etc/systemd/system/$u
    [ "$u" = containerd.service ] && src=/lib/systemd/system/containerd.service
    ln -sf "$src" "$dir/upper/etc/systemd/system/multi-user.target.wants/$u"
  done
  write /etc/kubernetes/kubelet.yaml "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
port: $port
healthzPort: 0
readOnlyPort: 0
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
serializeImagePulls: false
evictionHard: {memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podPidsLimit: -1
resolvConf: /etc/resolv.conf
fileCheckFrequency: 5s
syncFrequency: 5s
# The node shares the host's network namespace: the kubelet's KUBE-FIREWALL/KUBE-KUBELET-CANARY
# chains would land in the host's iptables and outlive the run.
makeIPTablesUtilChains: false"
  # The kubelet's identity: a client certificate of the test-bed CA (system:masters: a test bed,
  # not a hardened node; the per-node Jobs' own identity is what the chart confines).
  mkdir -p "$dir/upper/etc/kubernetes/pki"
  local pki="$dir/upper/etc/kubernetes/pki"
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=system:node:$name" -keyout "$pki/kubelet.key" -out "$pki/kubelet.csr" >/dev/null 2>&1
  openssl x509 -req -in "$pki/kubelet.csr" -CA "$state/pki/ca.crt" -CAkey "$state/pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$state/pki/client.ext" -out "$pki/kubelet.crt" >/dev/null 2>&1 || die "signing the kubelet certificate failed"
  cp "$state/pki/ca.crt" "$pki/ca.crt"
  write /etc/kubernetes/kubelet.kubeconfig "apiVersion: v1
kind: Config
clusters: [{name: testbed, cluster: {server: \"$server\", certificate-authority: /etc/kubernetes/pki/ca.crt}}]
users: [{name: kubelet, user: {client-certificate: /etc/kubernetes/pki/kubelet.crt, client-key: /etc/kubernetes/pki/kubelet.key}}]
contexts: [{name: testbed, context: {cluster: testbed, user: kubelet}}]
current-context: testbed"
  # Pod network: a bridge per node; pods reach the API server through the Service IP (net.sh).
  write /etc/cni/net.d/10-testbed.conflist "{\"cniVersion\": \"1.0.0\", \"name\": \"testbed\", \"plugins\": [
  {\"type\": \"bridge\", \"bridge\": \"kbr$index\", \"isGateway\": true, \"ipMasq\": false,
   \"ipam\": {\"type\": \"host-local\", \"ranges\": [[{\"subnet\": \"$TESTBED_POD_NET.$index.0/24\"}]], \"routes\": [{\"dst\": \"0.0.0.0/0\"}]}},
  {\"type\": \"loopback\"}]}"
  mkdir -p "$dir/upper/opt/cni" && ln -sfn /usr/lib/cni "$dir/upper/opt/cni/bin"
  bash "$HERE/net.sh" up "$state" "$index"

  # --- the root: the shared base rootfs, read-only, under this node's overlay ---
  mount -t overlay "$cgname" -o "lowerdir=$rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged" ||
    die "mounting the overlay root of $name failed"
  # --- a cgroup subtree of its own in every v1 hierarchy (else kubepods land in the host's) ---
  # /dev/kvm, where the machine has one: host-check asks for it, as on a real Kata node.
  local kvm=""; [ -c /dev/kvm ] && kvm="--bind=/dev/kvm"
  local launcher="$dir/launch.sh"
  cat >"$launcher" <<EOF
#!/bin/sh
for h in $(v1_hierarchies | tr '\n' ' '); do mkdir -p "\$h/$cgname" && echo \$\$ >"\$h/$cgname/cgroup.procs" 2>/dev/null; done
exec env SYSTEMD_SECCOMP=0 systemd-nspawn --boot --register=no --keep-unit --console=passive \\
  --capability=all --machine="$name" --directory="$dir/merged" --bind=/dev/kmsg $kvm \\
  --bind="$dir/containerd:/var/lib/containerd" --bind="$dir/kubelet:/var/lib/kubelet" \\
  --bind="$dir/pods-log:/var/log/pods" --bind="$dir/run-containerd:/run/containerd" \\
  --bind-ro="$TESTENV_BIN/kubelet:/usr/local/bin/kubelet" ${cbin:+--bind-ro="$cbin:/opt/containerd/bin"}
EOF
  chmod +x "$launcher"
  setsid "$launcher" >"$dir/console.log" 2>&1 </dev/null &
  echo $! >"$dir/nspawn.pid"
  # --- ready: containerd answers on its socket and the kubelet registered a Ready node ---
  local deadline=$(( $(date +%s) + 90 ))
  until [ -S "$dir/run-containerd/containerd.sock" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { tail -30 "$dir/console.log" >&2; die "node $name: containerd did not start within 90s (console: $dir/console.log)"; }
    pid_alive "$(cat "$dir/nspawn.pid")" || { tail -30 "$dir/console.log" >&2; die "node $name: systemd-nspawn exited (console: $dir/console.log)"; }
    sleep 0.2
  done
  log "node $name ($flavour) booted, containerd up in $(python3 -c "import time; print(round(time.time()-$t0, 1))")s"
  # Images before the node is schedulable, so `IfNotPresent` finds them on the first try.
  if [ -s "$TESTENV_CACHE/realnode/images/localhost_kata-testbed_pause_1.oci.tar" ]; then
    bash "$HERE/images.sh" import "$state" "$name"
  else
    log "node $name: no image archives yet (hack/testenv/realnode/images.sh build): pods need their images imported"
  fi
  # Ready, then schedulable: the kubelet registers with the not-ready taint, which the node
  # lifecycle controller lifts in a real cluster; the test bed does not run that controller (it
  # would taint and evict the simulated nodes), so the taint is lifted here once Ready.
  local api=(curl -sf --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" --key "$state/pki/admin.key")
  deadline=$(( $(date +%s) + 120 ))
  until "${api[@]}" "$server/api/v1/nodes/$name" 2>/dev/null | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", [])) else 1)' 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { in_node journalctl -u kubelet --no-pager -n 30 >&2 || true; die "node $name: the kubelet did not report Ready within 120s"; }
    sleep 0.5
  done
  local taints; taints=$("${api[@]}" "$server/api/v1/nodes/$name" | python3 -c '
import json, sys
n = json.load(sys.stdin)
keep = [t for t in n["spec"].get("taints", []) if t["key"] != "node.kubernetes.io/not-ready"]
print(json.dumps({"spec": {"taints": keep or None}}))')
  "${api[@]}" -X PATCH -H 'Content-Type: application/merge-patch+json' "$server/api/v1/nodes/$name" -d "$taints" >/dev/null ||
    die "node $name: lifting the not-ready taint failed"
  log "node $name Ready and schedulable in $(python3 -c "import time; print(round(time.time()-$t0, 1))")s"
}

kill_node_processes() { # whatever is left in the node's cgroups (shims, containers); the cgroups go
  local h
  [ -n "$cgname" ] || return 0 # never started (no meta): no cgroup of its own, and "$h/" is the host's
  for h in $(v1_hierarchies); do
    [ -d "$h/$cgname" ] || continue
    for _ in 1 2 3 4 5; do
      find "$h/$cgname" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      find "$h/$cgname" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      [ -d "$h/$cgname" ] || break
      sleep 0.2
    done
  done
}

power_off() { # SIGTERM asks nspawn to power the node off (systemd stops kubelet, containerd, pods)
  local npid; npid=$(cat "$dir/nspawn.pid" 2>/dev/null || true)
  if [ -n "$npid" ] && pid_alive "$npid"; then
    kill -TERM "$npid" 2>/dev/null || true
    for _ in $(seq 100); do pid_alive "$npid" || break; sleep 0.1; done
    kill -KILL "$npid" 2>/dev/null || true
  fi
  kill_node_processes
}

claim_node_slot() { # the lowest free slot whose kubelet port nothing listens on; prints it
  local slot busy=() b
  while slot=$(claim_slot nodes 200 owner "$state $name"); do
    if [ -z "$(ss -Hltn "sport = :$((10250 + slot * 2))" 2>/dev/null)" ]; then
      for b in "${busy[@]}"; do release_slot nodes "$b" owner "$state $name"; done
      echo "$slot"
      return 0
    fi
    busy+=("$slot") # its port is taken: kept claimed while looking further, then given back
  done
  for b in "${busy[@]}"; do release_slot nodes "$b" owner "$state $name"; done
  return 1
}

reboot_node() {
  [ -x "$dir/launch.sh" ] || die "node $name was never started (no $dir/launch.sh)"
  local t0; t0=$(date +%s.%N)
  power_off
  awk -v d="$dir/merged" '$5 == d || $5 ~ "^"d"/" {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -f "$dir/run-containerd/containerd.sock"
  mount -t overlay "$cgname" -o "lowerdir=$rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged" ||
    die "mounting the overlay root of $name again failed"
  setsid "$dir/launch.sh" >>"$dir/console.log" 2>&1 </dev/null &
  echo $! >"$dir/nspawn.pid"
  local deadline=$(( $(date +%s) + 90 ))
  until [ -S "$dir/run-containerd/containerd.sock" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { tail -30 "$dir/console.log" >&2; die "node $name: containerd did not come back within 90s after the reboot"; }
    sleep 0.2
  done
  log "node $name rebooted, containerd up in $(python3 -c "import time; print(round(time.time()-$t0, 1))")s"
}

stop_node() {
  [ -d "$dir" ] || { log "node $name: nothing to stop"; return 0; }
  power_off
  # Mounts under the node's directory (the overlay root; anything propagated), deepest first.
  awk -v d="$dir/" '$5 ~ "^"d {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  local index; index=$(awk '{print $1}' "$dir/meta" 2>/dev/null || true)
  if [ -n "$index" ]; then
    bash "$HERE/net.sh" down "$state" "$index"
    # The slot goes back only if this node still holds it (a reaper may have freed it already).
    release_slot nodes "$index" owner "$state $name"
  fi
  rm -rf "$dir"
  sed -i "/^$name\$/d" "$state/realnodes" 2>/dev/null || true
  log "node $name stopped and removed"
}

case "$cmd" in
  start) start_node "$@" ;;
  stop) stop_node ;;
  reboot) reboot_node ;;
  exec) shift 3; in_node "$@" ;;
  import)
    shift 3; archive=${1:-}; shift || true
    [ -f "$archive" ] && [ $# -gt 0 ] || die "usage: node.sh import STATE NAME ARCHIVE IMAGE-NAME..."
    ctr_bin=/usr/bin/ctr
    flavour=$(awk '{print $2}' "$dir/meta")
    [ "$flavour" = debian ] || ctr_bin="$TESTENV_BIN/containerd-$flavour/ctr"
    sock="$dir/run-containerd/containerd.sock"
    # ctr names an imported image after the archive's org.opencontainers.image.ref.name; every
    # other NAME asked for is a tag of it.
    source=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])') ||
      die "$archive has no image name (org.opencontainers.image.ref.name): save it with images.sh build"
    "$ctr_bin" --address "$sock" -n k8s.io images import "$archive" >/dev/null 2>&1 || die "importing $archive into $name failed"
    for image in "$@"; do
      [ "$image" = "$source" ] && continue
      "$ctr_bin" --address "$sock" -n k8s.io images tag --force "$source" "$image" >/dev/null 2>&1 || die "tagging $source as $image in $name failed"
    done
    ;;
  *) die "unknown command '$cmd' (start|stop|reboot|exec|import)" ;;
esac
