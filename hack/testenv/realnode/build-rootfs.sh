#!/usr/bin/env bash
# Builds the base root filesystem of the real-node flavour: Debian bookworm (debootstrap from
# Debian's archive, minbase) with systemd, D-Bus, containerd 1.6 + runc and the CNI plugins from
# Debian. Every real node boots this rootfs read-only under an overlay of its own
# (hack/testenv/realnode/node.sh). Idempotent: stamped by the package list below.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,iproute2,procps,kmod,containerd,runc,containernetworking-plugins,util-linux,mount
rootfs="$TESTENV_CACHE/realnode/rootfs"
stamp="$SUITE:$PACKAGES:v1"
if [ "$(cat "$rootfs.stamp" 2>/dev/null)" = "$stamp" ] && [ -x "$rootfs/lib/systemd/systemd" ]; then
  log "real-node rootfs ($SUITE) already built, nothing to do"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "building the real-node rootfs needs root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap is missing: run hack/install-deps.sh"
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
log "real-node rootfs: debootstrap $SUITE (minbase + $PACKAGES) from $mirror"
t0=$(date +%s)
rm -rf "$rootfs.tmp" && mkdir -p "$rootfs.tmp"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.tmp" "$mirror" >"$TESTENV_CACHE/realnode/debootstrap.log" 2>&1 ||
  die "debootstrap failed: see $TESTENV_CACHE/realnode/debootstrap.log"
# The distribution's containerd unit stays disabled: node.sh enables the flavour's own unit.
rm -f "$rootfs.tmp"/etc/systemd/system/multi-user.target.wants/containerd.service
# No getty or other noise on a node's console; a node is only containerd + kubelet.
for u in getty.target console-getty.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
  ln -sf /dev/null "$rootfs.tmp/etc/systemd/system/$u"
done
rm -rf "$rootfs.tmp/var/cache/apt/archives"/*.deb
rm -rf "$rootfs" && mv "$rootfs.tmp" "$rootfs"
echo "$stamp" >"$rootfs.stamp"
log "real-node rootfs ready in $(( $(date +%s) - t0 ))s ($(du -sh "$rootfs" | cut -f1))"
