#!/usr/bin/env bash
# Image tests: both images build (hack/build-images.sh), their configuration is right (user,
# entrypoint, labels), the dispatcher image holds nothing but its binary (no shell), the stage
# image holds its payload with a valid SHA256SUMS, each binary answers --version and --help inside
# its image (buildah run --isolation chroot), the dispatcher fits the 15 MB budget, and the chart's
# default image names are exactly what the build script tags. The TEST release image
# (hack/build-release-test-image.sh: upstream's layout, no shell) builds, and the stage binary,
# copied out of the stage image by copy-self, installs from it as the chart runs it.
#
#   hack/test-images.sh [--no-build]     # --no-build: test the images already built
#
# The last line is "N passed, M failed"; the exit status is non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
build=true
[ "${1:-}" = --no-build ] && build=false
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
DISPATCHER_BUDGET=$((15 * 1000 * 1000))   # bytes, uncompressed root filesystem
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "PASS $1"; }
ko() { fail=$((fail + 1)); echo "FAIL $1${2:+: $2}"; }
check() { local name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else ko "$name"; fi; }
bud() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }

if ! command -v buildah >/dev/null; then ko "buildah is installed"; finish; fi

app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' chart/kata-deploy/Chart.yaml)
values=chart/kata-deploy/values.yaml
dispatcher_image=quay.io/kata-containers/kata-deploy-job-dispatcher:$app_version
stage_image=quay.io/kata-containers/kata-deploy-stage:$app_version

# ---- the chart's defaults are what the build tags ---------------------------------------------
chart_default() { # <yaml path as python subscripts> -> image reference from values.yaml
  python3 -c "import yaml,sys; v=yaml.safe_load(open('$values')); print(v$1['reference'] + ':' + (v$1.get('tag') or '$app_version'))"
}
d=$(chart_default "['job']['dispatcherImage']" 2>&1); s=$(chart_default "['image']" 2>&1)
[ "$d" = "$dispatcher_image" ] && ok "chart default dispatcher image = build tag ($d)" || ko "chart default dispatcher image = build tag" "$d != $dispatcher_image"
[ "$s" = "$stage_image" ] && ok "chart default stage image = build tag ($s)" || ko "chart default stage image = build tag" "$s != $stage_image"
tags=$(grep -o 'kata-deploy-job-dispatcher:$app_version\|kata-deploy-stage:$app_version' hack/build-images.sh | sort -u | wc -l)
[ "$tags" -eq 2 ] && ok "build-images.sh tags both images with the chart appVersion" || ko "build-images.sh tags both images with the chart appVersion" "$tags"

# ---- build ---------------------------------------------------------------------------------------
if $build; then
  if out=$(hack/build-images.sh 2>&1); then ok "hack/build-images.sh builds both images"; else ko "hack/build-images.sh builds both images" "$(tail -5 <<<"$out")"; fi
  echo "$out" | sed -n '/^built/,$p'
fi
for img in "$dispatcher_image" "$stage_image"; do
  if ! bud inspect --type image "$img" >/dev/null 2>&1; then ko "image $img exists"; finish; fi
  ok "image $img exists"
done

cfg() { bud inspect --type image --format "$2" "$1" 2>&1; }
[ "$(cfg "$dispatcher_image" '{{.OCIv1.Config.User}}')" = "65532:65532" ] && ok "dispatcher image: USER 65532:65532" || ko "dispatcher image: USER 65532:65532" "$(cfg "$dispatcher_image" '{{.OCIv1.Config.User}}')"
[ "$(cfg "$dispatcher_image" '{{.OCIv1.Config.Entrypoint}}')" = '[/usr/local/bin/kata-deploy-job-dispatcher]' ] && ok "dispatcher image: entrypoint is the binary" || ko "dispatcher image: entrypoint" "$(cfg "$dispatcher_image" '{{.OCIv1.Config.Entrypoint}}')"
[ "$(cfg "$stage_image" '{{.OCIv1.Config.Entrypoint}}')" = '[/usr/local/bin/kata-deploy-stage]' ] && ok "stage image: entrypoint is the binary" || ko "stage image: entrypoint" "$(cfg "$stage_image" '{{.OCIv1.Config.Entrypoint}}')"
[ "$(cfg "$stage_image" '{{.OCIv1.Config.User}}')" = "0:0" ] && ok "stage image: USER 0:0 (host stages; the chart sets non-root where possible)" || ko "stage image: USER" "$(cfg "$stage_image" '{{.OCIv1.Config.User}}')"
[ "$(cfg "$dispatcher_image" '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}')" = "$app_version" ] && ok "dispatcher image: version label = appVersion" || ko "dispatcher image: version label"

# ---- file systems: exactly what should be there --------------------------------------------------
containers=()
cleanup() { for c in "${containers[@]}"; do bud umount "$c" >/dev/null 2>&1; bud rm "$c" >/dev/null 2>&1; done; }
trap cleanup EXIT
new_ctr() { local c; c=$(bud from --pull-never "$1") || return 1; containers+=("$c"); echo "$c"; }

dc=$(new_ctr "$dispatcher_image") || { ko "buildah from $dispatcher_image"; finish; }
sc=$(new_ctr "$stage_image") || { ko "buildah from $stage_image"; finish; }
dm=$(bud mount "$dc") && sm=$(bud mount "$sc") || { ko "buildah mount"; finish; }
files=$(cd "$dm" && find . -type f -o -type l | sort | tr '\n' ' ')
[ "$files" = "./usr/local/bin/kata-deploy-job-dispatcher " ] && ok "dispatcher image holds only its binary" || ko "dispatcher image holds only its binary" "$files"
[ ! -e "$dm/bin/sh" ] && [ ! -e "$dm/usr/bin/sh" ] && [ ! -e "$dm/bin/busybox" ] && ok "dispatcher image: no shell" || ko "dispatcher image: no shell"
check "dispatcher binary is statically linked" bash -c "! readelf -l '$dm/usr/local/bin/kata-deploy-job-dispatcher' | grep -q 'program interpreter'"
check "stage binary is statically linked" bash -c "! readelf -l '$sm/usr/local/bin/kata-deploy-stage' | grep -q 'program interpreter'"
size=$(du -sb "$dm" | cut -f1)
[ "$size" -le "$DISPATCHER_BUDGET" ] && ok "dispatcher image size $size bytes <= 15 MB budget" || ko "dispatcher image size <= 15 MB" "$size bytes"
echo "     stage image root filesystem: $(du -sb "$sm" | cut -f1) bytes"
check "stage image: /opt/kata-payload/SHA256SUMS present" test -f "$sm/opt/kata-payload/SHA256SUMS"
check "stage image: payload matches its SHA256SUMS" bash -c "cd '$sm/opt/kata-payload' && sha256sum --quiet -c SHA256SUMS"
check "stage image: payload readable by non-root (label runs as 65532)" bash -c "[ -z \"\$(find '$sm/opt/kata-payload' ! -perm -o+r)\" ]"
check "stage image: binary executable by non-root" test "$(stat -c %a "$sm/usr/local/bin/kata-deploy-stage")" = 555
others=$(cd "$sm" && find . -type f ! -path './opt/kata-payload/*' | sort | tr '\n' ' ')
[ "$others" = "./usr/local/bin/kata-deploy-stage " ] && ok "stage image holds only its binary and the payload" || ko "stage image holds only its binary and the payload" "$others"

# ---- the binaries answer inside their images -----------------------------------------------------
run_in() { # <container> <args...>: runs the image's entrypoint binary inside it
  local c=$1; shift
  local bin; bin=$(bud inspect --format '{{index .OCIv1.Config.Entrypoint 0}}' "$c")
  timeout 60 buildah --storage-driver "$STORAGE_DRIVER" run --isolation chroot --user "$(bud inspect --format '{{.OCIv1.Config.User}}' "$c")" "$c" -- "$bin" "$@" 2>&1
}
for pair in "$dc:kata-deploy-job-dispatcher" "$sc:kata-deploy-stage"; do
  c=${pair%%:*} name=${pair#*:}
  out=$(run_in "$c" --version); rc=$?
  if [ $rc -eq 0 ] && grep -q "$app_version" <<<"$out"; then ok "$name --version in its image: $out"
  else ko "$name --version in its image reports $app_version" "rc=$rc: $(head -3 <<<"$out")"; fi
  out=$(run_in "$c" --help); rc=$?
  if [ $rc -eq 0 ] && grep -qi "usage" <<<"$out"; then ok "$name --help in its image"
  else ko "$name --help in its image prints usage" "rc=$rc: $(head -3 <<<"$out")"; fi
done
out=$(run_in "$dc" --help)
for flag in --template --name-prefix --parallelism --owner-job --selector --nodes --deadline --max-failures --settle --require-nodes --log-format; do
  grep -q -- "$flag" <<<"$out" && ok "dispatcher --help lists $flag (used by the chart)" || ko "dispatcher --help lists $flag (used by the chart)"
done
out=$(run_in "$sc" --help)
for word in --config --host-root host-check artifacts cri label unlabel revert-cri remove-artifacts; do
  grep -q -- "$word" <<<"$out" && ok "stage --help lists $word (used by the chart)" || ko "stage --help lists $word (used by the chart)"
done
check "no shell runs in the dispatcher image" bash -c "! timeout 60 buildah --storage-driver $STORAGE_DRIVER run --isolation chroot $dc -- /bin/sh -c true"

# ---- the TEST release image (upstream's layout) and the stage binary run inside it --------------
release_image=$(hack/build-release-test-image.sh 2>/dev/null | tail -1)
if [ -n "$release_image" ] && rc_=$(new_ctr "$release_image") && rm_=$(bud mount "$rc_"); then
  ok "test release image $release_image builds"
  art=$rm_/opt/kata-artifacts
  check "release image: no shell" bash -c "[ ! -e '$rm_/bin/sh' ] && [ ! -e '$rm_/usr/bin/sh' ] && [ ! -e '$rm_/bin/busybox' ]"
  check "release image: shim-components.json and versions.yaml (4.x layout)" test -f "$art/shim-components.json" -a -f "$art/versions.yaml"
  check "release image: every x86_64 component of shim-components.json has its kata-static-<component>.tar.zst" python3 -c "
import json,os,sys; d=json.load(open('$art/shim-components.json'))
need={c for s in d['shims'].values() for c in s.get('x86_64',[])}
sys.exit(0 if need and all(os.path.isfile('$art/tarballs/kata-static-%s.tar.zst' % c) for c in need) else 1)"
  check "release image: nydus-snapshotter binaries" test -x "$art/nydus-snapshotter/containerd-nydus-grpc" -a -x "$art/nydus-snapshotter/nydus-overlayfs"
  # The chart's way: copy-stage (stage image) copies the binary into an emptyDir, the artifacts
  # container runs it inside the release image. Here: a directory shared by both buildah runs.
  work=$(mktemp -d); mkdir -p "$work/stage" "$work/host/run/lock" "$work/host/etc" "$work/cfg"; chmod 0777 "$work/stage"
  printf 'restart: none\nshims:\n  - name: qemu\n' >"$work/cfg/config.yaml"
  out=$(timeout 60 buildah --storage-driver "$STORAGE_DRIVER" run --isolation chroot --user 65532:65532 -v "$work/stage:/kata-stage" "$sc" -- /usr/local/bin/kata-deploy-stage copy-self --copy-to /kata-stage/kata-deploy-stage 2>&1)
  [ -x "$work/stage/kata-deploy-stage" ] && ok "copy-self as 65532 in the stage image writes the binary to the shared directory" || ko "copy-self in the stage image" "$out"
  out=$(timeout 120 buildah --storage-driver "$STORAGE_DRIVER" run --isolation chroot --user 0:0 -v "$work/stage:/kata-stage:ro" \
        -v "$work/host:/host" -v "$work/cfg:/etc/kata-deploy:ro" "$rc_" -- /kata-stage/kata-deploy-stage \
        --config /etc/kata-deploy/config.yaml --host-root /host --payload /opt/kata-artifacts artifacts 2>&1); rc=$?
  if [ $rc -eq 0 ] && [ -x "$work/host/opt/kata/bin/containerd-shim-kata-v2" ] && [ -L "$work/host/opt/kata/share/kata-containers/vmlinux.container" ] \
     && [ ! -e "$work/host/opt/kata/share/kata-test-components/firecracker" ]; then
    ok "the copied stage binary runs in the release image and installs qemu's components only ($(grep -o '^artifacts: [0-9]* written' <<<"$out"))"
  else ko "the copied stage binary installs from the release image" "rc=$rc: $(tail -3 <<<"$out")"; fi
  rm -rf "$work"
else
  ko "test release image builds (hack/build-release-test-image.sh)" "$release_image"
fi

finish
