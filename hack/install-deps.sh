#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine with Go and Rust (rustup):
# Debian packages (containerd to prove the config we write, buildah for images, openssl/curl for
# the test bed) and the Rust musl target for the static dispatcher image. Idempotent.
set -euo pipefail
log() { printf '[install-deps %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
need_apt=()
# debootstrap, systemd-container (systemd-nspawn), iptables, busybox-static: the real nodes
# (hack/testenv/realnode/: their rootfs, the node containers, the Service IP, the pause image).
# zstd: the test release images' kata-static-<component>.tar.zst (hack/make-release-payload.sh).
for pkg in containerd buildah openssl curl python3-yaml musl-tools debootstrap systemd-container iptables busybox-static zstd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "need root to install: ${need_apt[*]} (run: sudo apt-get install -y ${need_apt[*]})"; exit 1; }
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
else
  log "Debian packages already installed"
fi
command -v go >/dev/null || { log "Go is missing: install Go 1.24+ (the test bed is built from Go modules)"; exit 1; }
command -v cargo >/dev/null || { log "Rust is missing: install it with rustup"; exit 1; }
if command -v rustup >/dev/null && ! rustup target list --installed | grep -q x86_64-unknown-linux-musl; then
  log "rustup target add x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl
fi
log "done"
