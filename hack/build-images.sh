#!/usr/bin/env bash
# Build the two job-mode images with buildah (no container engine or registry needed):
#   quay.io/kata-containers/kata-deploy-job-dispatcher:<appVersion>   static dispatcher, FROM scratch
#   quay.io/kata-containers/kata-deploy-stage:<appVersion>            static stage binary + payload dir
# <appVersion> is read from chart/kata-deploy/Chart.yaml, so the chart's defaults match the tags.
# The Kata release the chart installs is NOT built here: by default the chart pulls the official
# release image (payload.image, quay.io/kata-containers/kata-deploy:<Kata version>). The stage
# image's /opt/kata-payload is installed only with payload.image.reference: "" (air-gapped bundles).
#
#   hack/build-images.sh [--payload DIR] [--skip-cargo] [--registry REG]
#
#   --payload DIR   payload for /opt/kata-payload (must hold SHA256SUMS). Default: a SYNTHETIC TEST
#                   payload (shell scripts in place of the shims) made by hack/make-test-payload.sh
#                   into .cache/images/test-payload; the build says so loudly.
#   --skip-cargo    use the release binaries already built for the target.
#   --registry REG  tag as REG/kata-deploy-*:<appVersion> instead of quay.io/kata-containers.
# Environment: KATA_RUST_TARGET (default x86_64-unknown-linux-musl; if that target cannot be
# installed, x86_64-unknown-linux-gnu with +crt-static), STORAGE_DRIVER (default vfs),
# CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

payload="" skip_cargo=false registry=quay.io/kata-containers test_payload=false
while [ $# -gt 0 ]; do
  case "$1" in
    --payload) payload=$2; shift 2 ;;
    --skip-cargo) skip_cargo=true; shift ;;
    --registry) registry=${2%/}; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "build-images: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v buildah >/dev/null || die "buildah is not installed (apt-get install -y buildah)"
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
bud() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' chart/kata-deploy/Chart.yaml)
[ -n "$app_version" ] || die "no appVersion in chart/kata-deploy/Chart.yaml"
dispatcher_image="$registry/kata-deploy-job-dispatcher:$app_version"
stage_image="$registry/kata-deploy-stage:$app_version"

# ---- static release binaries ------------------------------------------------------------------
target=${KATA_RUST_TARGET:-x86_64-unknown-linux-musl}
rustflags=${RUSTFLAGS:-}
if [ "$target" = x86_64-unknown-linux-musl ] && ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  log "installing the $target target"
  if ! rustup target add "$target" >&2; then
    log "cannot install $target: falling back to a static glibc build (x86_64-unknown-linux-gnu, +crt-static)"
    target=x86_64-unknown-linux-gnu
  fi
fi
if [ "$target" = x86_64-unknown-linux-gnu ]; then
  rustflags="$rustflags -C target-feature=+crt-static"
fi
bindir="${CARGO_TARGET_DIR:-$repo/target}/$target/release"
if ! $skip_cargo; then
  log "cargo build --release --target $target (dispatcher + stage)"
  RUSTFLAGS="$rustflags" cargo build --release --locked --target "$target" \
    -p kata-deploy-job-dispatcher -p kata-deploy-stage >&2
fi
for b in kata-deploy-job-dispatcher kata-deploy-stage; do
  [ -x "$bindir/$b" ] || die "$bindir/$b is missing (run without --skip-cargo)"
  # A FROM scratch image has no loader and no libc: the binary must be static.
  if readelf -l "$bindir/$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$bindir/$b is dynamically linked; it cannot run FROM scratch"
  fi
done

# ---- payload -------------------------------------------------------------------------------------
if [ -z "$payload" ]; then
  payload=$repo/.cache/images/test-payload
  [ -x hack/make-test-payload.sh ] || die "hack/make-test-payload.sh is missing; pass --payload DIR"
  test_payload=true
  log "################################################################################################"
  log "# no --payload: the stage image gets a SYNTHETIC TEST PAYLOAD (shell scripts in place of the   #"
  log "# Kata shims, placeholder kernel and image), made by hack/make-test-payload.sh. It is installed #"
  log "# only with payload.image.reference=\"\"; the chart's default installs the official Kata release #"
  log "# image (payload.image). For an air-gapped bundle of a real release pass --payload DIR.        #"
  log "################################################################################################"
  rm -rf "$payload"
  hack/make-test-payload.sh "$payload" >&2
fi
[ -f "$payload/SHA256SUMS" ] || die "payload $payload has no SHA256SUMS"
(cd "$payload" && sha256sum --quiet -c SHA256SUMS) >&2 || die "payload $payload does not match its SHA256SUMS"

# ---- build contexts and images ---------------------------------------------------------------
ctx=$repo/.cache/images
rm -rf "$ctx/ctx-dispatcher" "$ctx/ctx-stage"
mkdir -p "$ctx/ctx-dispatcher" "$ctx/ctx-stage"
cp "$bindir/kata-deploy-job-dispatcher" "$ctx/ctx-dispatcher/"
cp "$bindir/kata-deploy-stage" "$ctx/ctx-stage/"
cp -a "$payload" "$ctx/ctx-stage/payload"
chmod -R a+rX "$ctx/ctx-stage/payload"

log "building $dispatcher_image"
bud bud --isolation chroot --layers=false --build-arg VERSION="$app_version" \
  -f images/dispatcher/Containerfile -t "$dispatcher_image" "$ctx/ctx-dispatcher" >&2
log "building $stage_image"
bud bud --isolation chroot --layers=false --build-arg VERSION="$app_version" \
  -f images/node-stages/Containerfile -t "$stage_image" "$ctx/ctx-stage" >&2

echo "built (target $target):"
for img in "$dispatcher_image" "$stage_image"; do
  printf '  %-70s %s\n' "$img" "$(bud images --format '{{.Size}}' "$img")"
done
if $test_payload; then
  printf '  WARNING: %s carries the SYNTHETIC TEST PAYLOAD in /opt/kata-payload (see above)\n' "$stage_image"
fi
printf '  binaries: dispatcher %s bytes, stage %s bytes\n' \
  "$(stat -c %s "$bindir/kata-deploy-job-dispatcher")" "$(stat -c %s "$bindir/kata-deploy-stage")"
