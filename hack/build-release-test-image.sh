#!/usr/bin/env bash
# Build a TEST image in the layout of the official Kata release image, without a registry:
#   quay.io/kata-containers/kata-deploy:<tag>   FROM scratch, /opt/kata-artifacts only, no shell
# The content is synthetic (hack/make-release-payload.sh: test shims, placeholder kernel and
# image, upstream's own shim-components.json); the name is the chart's default payload.image so a
# test bed without a registry resolves it locally (IfNotPresent). Never push it to a registry.
#
#   hack/build-release-test-image.sh [--layout 3.32|4.x] [--variant STR] [--tag TAG] [--reference REF] [--damage truncate]
#
#   --layout    3.32 (no versions.yaml) or 4.x (default)
#   --variant   changes the Go shim's bytes (and versions.yaml): a "second release" for upgrades
#   --tag       default: payload.image.tag of chart/kata-deploy/values.yaml
#   --reference default: payload.image.reference of chart/kata-deploy/values.yaml
#   --damage    truncate: a broken image (one tarball cut short), for failure tests
# Environment: STORAGE_DRIVER (default vfs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
layout=4.x variant="" tag="" reference="" damage=""
while [ $# -gt 0 ]; do
  case "$1" in
    --layout) layout=$2; shift 2 ;;
    --variant) variant=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --reference) reference=$2; shift 2 ;;
    --damage) damage=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-release-test-image: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "build-release-test-image: $*" >&2; }
command -v buildah >/dev/null || { log "ERROR: buildah is not installed (apt-get install -y buildah)"; exit 1; }
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
default() { python3 -c "import yaml; print(yaml.safe_load(open('chart/kata-deploy/values.yaml'))['payload']['image']['$1'])"; }
[ -n "$tag" ] || tag=$(default tag)
[ -n "$reference" ] || reference=$(default reference)
image="$reference:$tag"
ctx=$repo/.cache/images/release-test-$layout${variant:+-$variant}${damage:+-$damage}
bash hack/make-release-payload.sh "$ctx" --layout "$layout" --variant "$variant" ${damage:+--damage "$damage"} >&2
log "building $image: a TEST image (synthetic Kata release, $layout layout${variant:+, variant $variant}${damage:+, DAMAGED: $damage}), not the real release"
buildah --storage-driver "$STORAGE_DRIVER" bud --isolation chroot --layers=false --build-arg VERSION="$tag" \
  -f images/release-test/Containerfile -t "$image" "$ctx" >&2
echo "$image"
