#!/usr/bin/env bash
# Generate a small synthetic kata-deploy payload with the real layout, for images and tests.
#
#   hack/make-test-payload.sh <dir> [--size-mib N]
#
# Layout (relative to <dir>), mirroring what the stage image ships at /opt/kata-payload:
#   bin/containerd-shim-kata-v2, bin/qemu-system-x86_64          small executables
#   runtime-rs/bin/containerd-shim-kata-v2                       small executable
#   share/defaults/kata-containers/configuration-<shim>.toml     minimal but realistic configs
#   share/kata-containers/vmlinux.container, kata-containers.img placeholders (--size-mib pads them)
#   nydus-snapshotter/containerd-nydus-grpc                      small executable
#   SHA256SUMS                                                   "<hex>  <relative path>" (sha256sum format)
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

mkdir -p "$out"/bin "$out"/runtime-rs/bin "$out"/share/defaults/kata-containers \
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

# config <shim> <hypervisor table> <kernel_params> <create_container_timeout>
config() {
  local shim="$1" hv="$2" kp="$3" cct="$4"
  cat >"$out/share/defaults/kata-containers/configuration-$shim.toml" <<TOML
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

[runtime]
enable_debug = false
internetworking_model = "tcfilter"
disable_guest_seccomp = true
sandbox_cgroup_only = false
create_container_timeout = $cct
TOML
}
config qemu qemu "" 60
config qemu-runtime-rs qemu "" 60
config clh clh "" 60
config fc firecracker "" 60
config dragonball dragonball "" 60
config qemu-snp qemu "" 60
config qemu-tdx qemu "" 60
config qemu-coco-dev qemu "agent.guest_components_procs=none" 60
config qemu-nvidia-gpu qemu "nvrc.smi.srs=1" 1200
config qemu-nvidia-gpu-snp qemu "nvrc.smi.srs=1" 1200
config qemu-nvidia-gpu-tdx qemu "nvrc.smi.srs=1" 1200
# The rest of the shims a Kata release ships, so the chart's default values install as-is.
config cloud-hypervisor clh "" 60
config stratovirt stratovirt "" 60
config qemu-cca qemu "" 60
config qemu-se qemu "" 60
config qemu-coco-dev-runtime-rs qemu "agent.guest_components_procs=none" 60
config qemu-snp-runtime-rs qemu "" 60
config qemu-tdx-runtime-rs qemu "" 60
config qemu-se-runtime-rs qemu "" 60
config remote remote "" 60

# Guest kernel and image placeholders; --size-mib pads them so the payload totals about N MiB.
pad_kib=$(( size_mib * 1024 ))
kernel_kib=$(( pad_kib / 4 )); image_kib=$(( pad_kib - kernel_kib ))
printf 'vmlinux.container placeholder\n' >"$out/share/kata-containers/vmlinux.container"
printf 'kata-containers.img placeholder\n' >"$out/share/kata-containers/kata-containers.img"
if [ "$kernel_kib" -gt 0 ]; then
  head -c "$(( kernel_kib * 1024 ))" /dev/zero | tr '\0' 'k' >>"$out/share/kata-containers/vmlinux.container"
fi
if [ "$image_kib" -gt 0 ]; then
  head -c "$(( image_kib * 1024 ))" /dev/zero >>"$out/share/kata-containers/kata-containers.img"
fi

( cd "$out" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum >SHA256SUMS )
echo "payload written to $out ($(du -sk "$out" | cut -f1) KiB, $(wc -l <"$out/SHA256SUMS") files)"
