#!/usr/bin/env bash
# Stage benchmarks (release build): artifacts install of a synthetic payload compared with
# `cp -a` of the same payload on the same disk in the same run, and a no-op re-run of the whole
# install on an already installed host. Prints a Markdown table.
#
#   hack/bench-stage.sh [SIZE_MIB]      (default 256)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size=${1:-256}
cargo build --release --locked -p kata-deploy-stage >&2
bin=target/release/kata-deploy-stage
work=$(mktemp -d "${TMPDIR:-/var/tmp}/kata-bench-stage.XXXXXX")
trap 'rm -rf "$work"' EXIT
bash hack/make-test-payload.sh "$work/payload" --size-mib "$size" >/dev/null
cat >"$work/config.yaml" <<'CFG'
restart: none
shims:
  - {name: qemu}
  - {name: qemu-runtime-rs}
  - {name: clh}
CFG
mkdir -p "$work/host/etc/containerd" "$work/host/dev"
containerd config default >"$work/host/etc/containerd/config.toml" 2>/dev/null || printf 'version = 2\n' >"$work/host/etc/containerd/config.toml"
: >"$work/host/dev/kvm"
stage() { env -u KATA_NODE_NAME "$bin" --config "$work/config.yaml" --host-root "$work/host" --payload "$work/payload" "$@" >/dev/null; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }

sync
t0=$(now); cp -a "$work/payload" "$work/cp-copy"; sync; t1=$(now)
cp_s=$(secs "$t0" "$t1")
t0=$(now); stage artifacts; sync; t1=$(now)
art_s=$(secs "$t0" "$t1")
stage cri
noop=()
for _ in 1 2 3; do t0=$(now); stage install; t1=$(now); noop+=("$(secs "$t0" "$t1")"); done
payload_mib=$(du -sm "$work/payload" | cut -f1)
echo "| payload | cp -a | artifacts install | ratio | no-op re-run of install (3 runs) |"
echo "|---|---|---|---|---|"
echo "| ${payload_mib} MiB | ${cp_s}s | ${art_s}s | $(python3 -c "print(f'{$art_s / $cp_s:.2f}')") | ${noop[*]} s |"
