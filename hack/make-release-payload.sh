#!/usr/bin/env bash
# Generate a synthetic payload in the layout of the OFFICIAL Kata release image
# (quay.io/kata-containers/kata-deploy, tools/packaging/kata-deploy/Dockerfile upstream), for tests:
#
#   hack/make-release-payload.sh <dir> [--layout 3.32|4.x] [--variant STR] [--size-mib N] [--damage truncate]
#
# <dir> becomes what the image holds at /opt/kata-artifacts:
#   tarballs/kata-static-<component>.tar.zst   one per component named in shim-components.json
#                                              for x86_64, entries ./opt/kata/... (zstd)
#   shim-components.json                       upstream's own file, verbatim
#                                              (images/release-test/shim-components-<3.32|4.1>.json)
#   nydus-snapshotter/                         containerd-nydus-grpc, nydus-overlayfs,
#                                              config-guest-pulling.toml, nydus-snapshotter.service
#   versions.yaml                              4.x layout only (3.32's image has none)
# The files themselves come from hack/make-test-payload.sh (test shims that log their runs,
# synthetic base configurations, kernel and image with their versioned names and relative links):
#   shim-v2-go     bin/containerd-shim-kata-v2 + share/defaults/kata-containers/configuration-*.toml
#   shim-v2-rust   runtime-rs/bin/containerd-shim-kata-v2 + .../runtime-rs/configuration-*.toml
#   qemu*          bin/qemu-system-x86_64
#   kernel*        share/kata-containers/vmlinux-<ver>.container + vmlinux.container link
#   rootfs-*       share/kata-containers/kata-containers-<ver>.img + kata-containers.img link
#   any other      share/kata-test-components/<component> (one small file naming it)
# --variant STR changes the Go shim's bytes only (and versions.yaml), so an upgrade between two
# variants changes exactly bin/containerd-shim-kata-v2 (and versions.yaml in 4.x).
# --damage truncate cuts the end off kata-static-shim-v2-go.tar.zst (a broken image, for the tests
# that prove a bad tarball fails the node before any host change).
# Deterministic: same arguments, same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

usage() { echo "usage: $0 <dir> [--layout 3.32|4.x] [--variant STR] [--size-mib N] [--damage truncate]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
layout=4.x variant="" size_mib=0 damage=""
while [ $# -gt 0 ]; do
  case "$1" in
    --layout) [ $# -ge 2 ] || usage; layout=$2; shift 2 ;;
    --variant) [ $# -ge 2 ] || usage; variant=$2; shift 2 ;;
    --size-mib) [ $# -ge 2 ] || usage; size_mib=$2; shift 2 ;;
    --damage) [ $# -ge 2 ] || usage; damage=$2; shift 2 ;;
    *) usage ;;
  esac
done
case "$layout" in
  3.32) components_json=images/release-test/shim-components-3.32.json ;;
  4.x) components_json=images/release-test/shim-components-4.1.json ;;
  *) echo "--layout must be 3.32 or 4.x" >&2; exit 2 ;;
esac
command -v zstd >/dev/null || { echo "zstd is missing (apt-get install zstd)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash hack/make-test-payload.sh "$work/payload" --size-mib "$size_mib" >/dev/null
src=$work/payload
if [ -n "$variant" ]; then
  printf 'echo "kata-deploy test payload variant %s"\n' "$variant" >>"$src/bin/containerd-shim-kata-v2"
fi

rm -rf "$out"
mkdir -p "$out/tarballs" "$out/nydus-snapshotter"
cp "$components_json" "$out/shim-components.json"

# component <name> <relative paths under opt/kata...>: kata-static-<name>.tar.zst as upstream packs it.
component() {
  local name=$1; shift
  local stage=$work/c-$name
  mkdir -p "$stage/opt/kata"
  local p
  for p in "$@"; do
    mkdir -p "$stage/opt/kata/$(dirname "$p")"
    cp -a "$src/$p" "$stage/opt/kata/$p"
  done
  ( cd "$stage" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - ./opt/kata ) |
    zstd -q -3 --no-progress -o "$out/tarballs/kata-static-$name.tar.zst"
}

kernel=$(cd "$src" && ls share/kata-containers/vmlinux-*.container)
image=$(cd "$src" && ls share/kata-containers/kata-containers-*.img)
go_cfgs=$(cd "$src" && find share/defaults/kata-containers -maxdepth 1 -name 'configuration-*.toml' | LC_ALL=C sort)
rs_cfgs=$(cd "$src" && find share/defaults/kata-containers/runtime-rs -name 'configuration-*.toml' | LC_ALL=C sort)
mkdir -p "$src/share/kata-test-components"
for name in $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("\n".join(sorted({c for s in d["shims"].values() for a,cs in s.items() if a=="x86_64" for c in cs})))' "$components_json"); do
  case "$name" in
    shim-v2-go) component "$name" bin/containerd-shim-kata-v2 $go_cfgs ;;
    shim-v2-rust) component "$name" runtime-rs/bin/containerd-shim-kata-v2 $rs_cfgs ;;
    qemu*) component "$name" bin/qemu-system-x86_64 ;;
    kernel*) component "$name" "$kernel" share/kata-containers/vmlinux.container ;;
    rootfs-*) component "$name" "$image" share/kata-containers/kata-containers.img ;;
    *) printf '%s (kata-deploy test component)\n' "$name" >"$src/share/kata-test-components/$name"
       component "$name" "share/kata-test-components/$name" ;;
  esac
done

cp -a "$src/nydus-snapshotter/containerd-nydus-grpc" "$src/nydus-snapshotter/nydus-overlayfs" "$out/nydus-snapshotter/"
# Upstream ships these two templates beside the binaries; the stage renders its own.
printf 'version = 1\nroot = "@SNAPSHOTTER_ROOT_DIR@"\naddress = "@SNAPSHOTTER_GRPC_SOCKET_ADDRESS@"\n[daemon]\nfs_driver = "proxy"\n' \
  >"$out/nydus-snapshotter/config-guest-pulling.toml"
printf '[Unit]\nDescription=Nydus snapshotter\n[Service]\nExecStart=@CONTAINERD_NYDUS_GRPC_BINARY@ --config @CONFIG_GUEST_PULLING@ --log-to-stdout\n' \
  >"$out/nydus-snapshotter/nydus-snapshotter.service"
if [ "$layout" = 4.x ]; then
  printf '# kata-deploy test release (synthetic)\nreleases:\n  kata-containers:\n    version: "4.1.0%s"\n' "${variant:+-$variant}" >"$out/versions.yaml"
fi
case "$damage" in
  "") ;;
  truncate) f="$out/tarballs/kata-static-shim-v2-go.tar.zst"; truncate -s "$(( $(stat -c %s "$f") - 64 ))" "$f" ;;
  *) echo "--damage must be truncate" >&2; exit 2 ;;
esac
chmod -R a+rX "$out"
echo "release payload ($layout layout) written to $out: $(ls "$out/tarballs" | wc -l) component tarballs, $(du -sk "$out" | cut -f1) KiB"
