#!/usr/bin/env bash
# Builds the test-bed binaries (kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok,
# helm) from their Go modules at the versions pinned in versions.env, and our fault-injecting API
# proxy (faultproxy/, standard library only), into $KATA_TESTENV_CACHE/bin.
# Idempotent: a component whose pinned version is already built is skipped, and the script says so.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v go >/dev/null || die "go is not installed; install Go 1.24 or newer and re-run"
mkdir -p "$TESTENV_BIN" "$TESTENV_CACHE/src"
export GOFLAGS="${GOFLAGS:--trimpath}" CGO_ENABLED=0

# stamp NAME VERSION: a component is up to date when its stamp records the pinned version.
is_built() { [ "$(cat "$TESTENV_BIN/.$1.version" 2>/dev/null)" = "$2" ]; }
mark_built() { echo "$2" >"$TESTENV_BIN/.$1.version"; }

# new_module NAME: an empty throwaway Go module in the cache, from which a pinned dependency is built.
new_module() {
  local dir="$TESTENV_CACHE/src/$1"
  rm -rf "$dir" && mkdir -p "$dir"
  printf 'module kata-deploy.test/testenv/%s\n\ngo 1.24.0\n' "$1" >"$dir/go.mod"
  echo "$dir"
}

# kube_version_ldflags VERSION: stamp the version as Kubernetes' own build does: without it a
# component reports v0.0.0-master and Helm charts with a kubeVersion constraint refuse to install.
kube_version_ldflags() {
  local v=$1 mm="${1#v}" ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=${mm%%.*} -X $pkg.gitMinor=$(echo "$mm" | cut -d. -f2)"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldflags"
}

build_kubernetes() {
  local v="$K8S_VERSION" minor="v0.${K8S_VERSION#v1.}"
  # The stamp includes the ldflags revision: binaries built without the version stamp are rebuilt.
  local stamp="$v+version-ldflags"
  if is_built kubernetes "$stamp"; then log "kubernetes $v already built, nothing to do"; return; fi
  log "kubernetes $v: resolving modules (k8s.io/kubernetes needs one replace per staging module)"
  local dir; dir=$(new_module k8s)
  local gomod; gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$v from the Go module proxy"
  # Every "k8s.io/x => ./staging/src/k8s.io/x" line becomes "k8s.io/x => k8s.io/x v0.Y.Z".
  sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$minor"'#p' "$gomod" >>"$dir/go.mod"
  local pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler)
  (cd "$dir" && go get "${pkgs[@]/%/@$v}" >/dev/null)
  log "kubernetes $v: compiling kube-apiserver, kube-controller-manager, kube-scheduler (the long step: ~15-25 min cold on 2 cores)"
  (cd "$dir" && go build -ldflags "$(kube_version_ldflags "$v")" -o "$TESTENV_BIN/" "${pkgs[@]}")
  mark_built kubernetes "$stamp"
}

# build_kube_command NAME: a further command of the same pinned k8s.io/kubernetes module as the
# control plane (the real nodes' kubelet; kubectl for the demo and NOTES.txt). `go get` it first:
# go.sum otherwise lacks the command's own dependencies.
build_kube_command() {
  local name=$1 v="$K8S_VERSION" minor="v0.${K8S_VERSION#v1.}" stamp="$K8S_VERSION+version-ldflags"
  if is_built "$name" "$stamp"; then log "$name $v already built, nothing to do"; return; fi
  log "$name $v: resolving and compiling k8s.io/kubernetes/cmd/$name"
  local dir; dir=$(new_module "$name")
  local gomod; gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$v from the Go module proxy"
  sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$minor"'#p' "$gomod" >>"$dir/go.mod"
  (cd "$dir" && go get "k8s.io/kubernetes/cmd/$name@$v" >/dev/null)
  (cd "$dir" && go build -ldflags "$(kube_version_ldflags "$v")" -o "$TESTENV_BIN/$name" "k8s.io/kubernetes/cmd/$name")
  mark_built "$name" "$stamp"
}

# build_containerd VERSION: containerd, its runc v2 shim and ctr, static, from the Go module proxy,
# into $TESTENV_BIN/containerd-VERSION/ (the runtime matrix and the real nodes use these).
build_containerd() {
  local v=$1 out="$TESTENV_BIN/containerd-$1" mod=github.com/containerd/containerd
  if is_built "containerd-$v" "$v"; then log "containerd $v already built, nothing to do"; return; fi
  case "$v" in v2.*) mod=$mod/v2 ;; esac
  log "containerd $v: resolving and compiling $mod (containerd, containerd-shim-runc-v2, ctr)"
  local dir; dir=$(new_module "containerd-$v")
  local pkgs=("$mod/cmd/containerd" "$mod/cmd/containerd-shim-runc-v2" "$mod/cmd/ctr")
  (cd "$dir" && go get "${pkgs[@]/%/@$v}" >/dev/null)
  mkdir -p "$out"
  # The version is stamped like containerd's own Makefile does: `containerd --version` and the CRI
  # runtime version (node.status.nodeInfo.containerRuntimeVersion) report it.
  (cd "$dir" && go build -tags no_btrfs,no_devmapper,no_zfs \
    -ldflags "-X $mod/version.Version=$v -X $mod/version.Revision=go-proxy" -o "$out/" "${pkgs[@]}")
  mark_built "containerd-$v" "$v"
}

# build_simple NAME MODULE PACKAGE VERSION: go build PACKAGE from MODULE@VERSION into bin/NAME.
build_simple() {
  local name=$1 mod=$2 pkg=$3 v=$4
  if is_built "$name" "$v"; then log "$name $v already built, nothing to do"; return; fi
  log "$name $v: resolving and compiling $pkg"
  local dir; dir=$(new_module "$name")
  (cd "$dir" && go get "$pkg@$v" >/dev/null && go build -o "$TESTENV_BIN/$name" "$pkg")
  mark_built "$name" "$v"
}

# build_local NAME DIR: go build our own standard-library-only tool in DIR (stamped by its sources).
build_local() {
  local name=$1 dir=$2
  local v; v=$(cat "$dir"/go.mod "$dir"/*.go | sha256sum | cut -c1-16)
  if is_built "$name" "$v"; then log "$name (sources $v) already built, nothing to do"; return; fi
  log "$name: compiling from $dir"
  (cd "$dir" && go build -o "$TESTENV_BIN/$name" .)
  mark_built "$name" "$v"
}

start=$(date +%s)
build_local kata-faultproxy "$TESTENV_HERE/faultproxy"
build_simple etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
build_simple kwok sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
build_simple helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_kubernetes
build_kube_command kubelet
build_kube_command kubectl
for v in $CONTAINERD_VERSIONS; do build_containerd "$v"; done
bash "$REPO_ROOT/hack/deny.sh" install
log "test bed ready in $TESTENV_BIN ($(( $(date +%s) - start ))s)"
