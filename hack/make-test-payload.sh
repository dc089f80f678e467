#!/usr/bin/env bash
# Generate a small synthetic kata-deploy payload with the real layout, for images and tests.
#
#   hack/make-test-payload.sh <dir> [--size-mib N]
#
# Layout (relative to <dir>): the layout of a Kata static release (kata-static-*.tar.zst, /opt/kata),
# mirroring what the stage image ships at /opt/kata-payload:
#   bin/containerd-shim-kata-v2, bin/qemu-system-x86_64          small executables (Go runtime)
#   runtime-rs/bin/containerd-shim-kata-v2                       small executable (runtime-rs)
#   share/defaults/kata-containers/configuration-<shim>.toml     Go-runtime shims' base configs
#   share/defaults/kata-containers/runtime-rs/configuration-<shim>.toml   runtime-rs shims' base configs
#   share/kata-containers/vmlinux-<ver>.container, kata-containers-<ver>.img   guest kernel and image
#   share/kata-containers/vmlinux.container -> vmlinux-<ver>.container          relative symlinks, as
#   share/kata-containers/kata-containers.img -> kata-containers-<ver>.img      in a release
#   nydus-snapshotter/containerd-nydus-grpc, nydus-overlayfs     small executables
#   SHA256SUMS        "<hex>  <relative path>" of every regular file (sha256sum format)
#   SYMLINKS          "<relative path> -> <target>" of every symlink
# Every shim of upstream kata-deploy's current list (chart values / RUST_SHIMS) has its base config.
# The output is deterministic for a given size, so image layers and test fixtures are stable.
set -euo pipefail

usage() { echo "usage: $0 <dir> [--size-mib N]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out="$1"; shift
size_mib=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) [ $# -ge 2 ] || usage; size_mib="$2"; shift 2 ;;
    --size-mib=*) size_mib="${1#*=}"; shift ;;
    *) usage ;;
  esac
done
case "$size_mib" in ''|*[!0-9]*) echo "--size-mib must be a non-negative integer" >&2; exit 2 ;; esac

mkdir -p "$out"/bin "$out"/runtime-rs/bin "$out"/share/defaults/kata-containers/runtime-rs \
         "$out"/share/kata-containers "$out"/nydus-snapshotter

exe() { # <path> <name>: a tiny executable that reports what it stands for, and records each run
  # (its path and arguments) in /run/kata-deploy-test-payload.log of the host that ran it: how the
  # real-node tests see containerd start the shim the artifacts stage installed.
  printf '#!/bin/sh\necho "$0 $*" >>/run/kata-deploy-test-payload.log 2>/dev/null\necho "%s (kata-deploy test payload)"\n' "$2" >"$1"
  chmod 0755 "$1"
}
exe "$out/bin/containerd-shim-kata-v2" "containerd-shim-kata-v2 (go runtime)"
exe "$out/bin/qemu-system-x86_64" "qemu-system-x86_64"
exe "$out/runtime-rs/bin/containerd-shim-kata-v2" "containerd-shim-kata-v2 (runtime-rs)"
exe "$out/nydus-snapshotter/containerd-nydus-grpc" "containerd-nydus-grpc"
# Started by its unit (--config ...), the snapshotter stays up as the real daemon does, so a test
# sees whether systemd runs it.
printf 'case "$1" in --config) exec sleep infinity ;; esac\n' >>"$out/nydus-snapshotter/containerd-nydus-grpc"
exe "$out/nydus-snapshotter/nydus-overlayfs" "nydus-overlayfs"

# config <shim> <hypervisor table> <kernel_params> <create_container_timeout>
# runtime-rs shims (-runtime-rs, dragonball, openvmm) go to runtime-rs/ and carry the timeout in
# [agent.kata], as runtime-rs reads it there; the Go runtime reads it from [runtime].
config() {
  local shim="$1" hv="$2" kp="$3" cct="$4" dir="$out/share/defaults/kata-containers" rs=false
  case "$shim" in *-runtime-rs|dragonball) dir="$dir/runtime-rs"; rs=true ;; esac
  local agent_cct="" runtime_cct="create_container_timeout = $cct"
  if $rs; then agent_cct="create_container_timeout = $cct"; runtime_cct=""; fi
  cat >"$dir/configuration-$shim.toml" <<TOML
# Synthetic Kata Containers configuration for shim "$shim" (test payload).
[hypervisor.$hv]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
image = "/opt/kata/share/kata-containers/kata-containers.img"
machine_type = "q35"
kernel_params = "$kp"
enable_annotations = ["enable_iommu", "virtio_fs_extra_args", "kernel_params"]
valid_hypervisor_paths = ["/opt/kata/bin/qemu-system-x86_64"]
default_vcpus = 1
default_memory = 2048
shared_fs = "virtio-fs"
virtio_fs_daemon = "/opt/kata/libexec/virtiofsd"
valid_virtio_fs_daemon_paths = ["/opt/kata/libexec/virtiofsd"]
enable_debug = false

[agent.kata]
dial_timeout = 45
enable_debug = false
$agent_cct

[runtime]
enable_debug = false
internetworking_model = "tcfilter"
disable_guest_seccomp = true
sandbox_cgroup_only = false
$runtime_cct
TOML
}
for shim in clh clh-azure clh-runtime-rs clh-azure-runtime-rs; do config "$shim" clh "" 60; done
config dragonball dragonball "" 60
config fc firecracker "" 60
for shim in qemu qemu-runtime-rs qemu-snp qemu-snp-runtime-rs qemu-tdx qemu-tdx-runtime-rs qemu-se qemu-se-runtime-rs; do
  config "$shim" qemu "" 60
done
for shim in qemu-coco-dev qemu-coco-dev-runtime-rs; do config "$shim" qemu "agent.guest_components_procs=none" 60; done
for shim in qemu-nvidia-cpu qemu-nvidia-cpu-runtime-rs qemu-nvidia-gpu qemu-nvidia-gpu-runtime-rs qemu-nvidia-gpu-snp \
            qemu-nvidia-gpu-snp-runtime-rs qemu-nvidia-gpu-tdx qemu-nvidia-gpu-tdx-runtime-rs; do
  config "$shim" qemu "nvrc.smi.srs=1" 1200
done
config remote remote "" 60
config openvmm-azure-runtime-rs openvmm "" 60

# Guest kernel and image placeholders; --size-mib pads them so the payload totals about N MiB.
pad_kib=$(( size_mib * 1024 ))
kernel_kib=$(( pad_kib / 4 )); image_kib=$(( pad_kib - kernel_kib ))
ver=6.12.47-kata-test
kernel="$out/share/kata-containers/vmlinux-$ver.container"; image="$out/share/kata-containers/kata-containers-$ver.img"
printf 'vmlinux.container placeholder\n' >"$kernel"
printf 'kata-containers.img placeholder\n' >"$image"
if [ "$kernel_kib" -gt 0 ]; then
  head -c "$(( kernel_kib * 1024 ))" /dev/zero | tr '\0' 'k' >>"$kernel"
fi
if [ "$image_kib" -gt 0 ]; then
  head -c "$(( image_kib * 1024 ))" /dev/zero >>"$image"
fi
ln -sfn "vmlinux-$ver.container" "$out/share/kata-containers/vmlinux.container"
ln -sfn "kata-containers-$ver.img" "$out/share/kata-containers/kata-containers.img"

( cd "$out" && find . -type l | sed 's|^\./||' | LC_ALL=C sort | while read -r l; do printf '%s -> %s\n' "$l" "$(readlink "$l")"; done >SYMLINKS )
( cd "$out" && find . -type f ! -name SHA256SUMS ! -name SYMLINKS | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum >SHA256SUMS )
echo "payload written to $out ($(du -sk "$out" | cut -f1) KiB, $(wc -l <"$out/SHA256SUMS") files)"
