#!/usr/bin/env bash
# Images for the real nodes, without a registry:
#
#   images.sh build             the pause image (scratch + static busybox sleeping forever), the
#                               project's images (hack/build-images.sh, if not built yet) and the
#                               TEST release image the chart installs by default (payload.image,
#                               hack/build-release-test-image.sh: synthetic Kata in upstream's
#                               layout), each saved as an OCI archive under $TESTENV_CACHE/realnode/images
#   images.sh import STATE NODE imports them into NODE's containerd (namespace k8s.io) under the
#                               names the chart and containerd ask for, so `IfNotPresent` resolves
#
# The pause image is imported as registry.k8s.io/pause:3.6 (containerd 1.6's default sandbox
# image) and :3.10 (2.x), so the nodes' containerd configs keep their defaults.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
bud() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
out="$TESTENV_CACHE/realnode/images"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$REPO_ROOT/chart/kata-deploy/Chart.yaml")
read -r release_ref release_tag < <(python3 -c "import yaml; i=yaml.safe_load(open('$REPO_ROOT/chart/kata-deploy/values.yaml'))['payload']['image']; print(i['reference'], i['tag'])")
# TEST releases (synthetic, upstream's layout): the chart's default, the 3.32 layout (no
# versions.yaml), a second version of the default whose Go shim differs (upgrade tests) and a
# broken one (a truncated tarball: failure tests). layout:variant:tag:damage
release_builds=("4.x::$release_tag:" "3.32::3.32.0:" "4.x:two:$release_tag-two:" "4.x::$release_tag-broken:truncate")
project_images=("quay.io/kata-containers/kata-deploy-job-dispatcher:$app_version" "quay.io/kata-containers/kata-deploy-stage:$app_version"
                "$release_ref:$release_tag" "$release_ref:3.32.0" "$release_ref:$release_tag-two" "$release_ref:$release_tag-broken")
PAUSE_NAMES=(registry.k8s.io/pause:3.6 registry.k8s.io/pause:3.10)

archive_of() { echo "$out/$(echo "$1" | tr '/:' '__').oci.tar"; }

build() {
  command -v buildah >/dev/null || die "buildah is missing: run hack/install-deps.sh"
  [ -x /bin/busybox ] && file_is_static /bin/busybox || die "/bin/busybox (busybox-static) is missing: run hack/install-deps.sh"
  mkdir -p "$out"
  # A fully qualified name: the CRI normalises references, and "kata-testbed/pause:1" would not match.
  local pause=localhost/kata-testbed/pause:1
  if [ ! -s "$(archive_of "$pause")" ]; then
    log "building the pause image (scratch + static busybox)"
    local ctx; ctx=$(mktemp -d)
    cp /bin/busybox "$ctx/busybox"
    printf 'FROM scratch\nCOPY busybox /busybox\nENTRYPOINT ["/busybox", "sleep", "2147483647"]\n' >"$ctx/Containerfile"
    bud bud --isolation chroot --layers=false -f "$ctx/Containerfile" -t "$pause" "$ctx" >/dev/null
    rm -rf "$ctx"
    save "$pause"
  fi
  local img missing=false
  for img in "${project_images[@]:0:2}"; do bud inspect --type image "$img" >/dev/null 2>&1 || missing=true; done
  if $missing; then
    log "building the project's images (hack/build-images.sh)"
    bash "$REPO_ROOT/hack/build-images.sh" >&2
  fi
  # Always rebuilt (seconds each): the test releases follow hack/make-test-payload.sh.
  local b layout variant tag damage
  for b in "${release_builds[@]}"; do
    IFS=: read -r layout variant tag damage <<<"$b"
    bash "$REPO_ROOT/hack/build-release-test-image.sh" --layout "$layout" --variant "$variant" --tag "$tag" ${damage:+--damage "$damage"} >/dev/null
  done
  # Always re-saved: the project's images change with the code.
  for img in "${project_images[@]}"; do save "$img"; done
}

file_is_static() { ! readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }

save() { # IMAGE: OCI archive of a local buildah image (temp + rename: never half-written)
  local dest; dest=$(archive_of "$1")
  rm -f "$dest.tmp"
  bud push -q "$1" "oci-archive:$dest.tmp:$1" >/dev/null || die "saving $1 as an OCI archive failed"
  mv -f "$dest.tmp" "$dest"
}

import() {
  local state=$1 node=$2
  local pause; pause=$(archive_of localhost/kata-testbed/pause:1)
  [ -s "$pause" ] || die "no images built: run $0 build first"
  local name
  bash "$HERE/node.sh" import "$state" "$node" "$pause" "${PAUSE_NAMES[@]}"
  for name in "${project_images[@]}"; do
    [ -s "$(archive_of "$name")" ] || die "$name has no archive: run $0 build"
    bash "$HERE/node.sh" import "$state" "$node" "$(archive_of "$name")" "$name"
  done
}

case "${1:-}" in
  build) build ;;
  import) [ $# -eq 3 ] || die "usage: images.sh import STATE NODE"; import "$2" "$3" ;;
  *) die "usage: images.sh build | images.sh import STATE NODE" ;;
esac
