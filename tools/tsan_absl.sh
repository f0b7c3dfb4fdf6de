#!/usr/bin/env bash
# Builds Debian's own Abseil (the exact source and patches of the installed libabsl-dev) with
# ThreadSanitizer, into a prefix the TSan build of ctxcache links and runs against:
#   tools/tsan_absl.sh [PREFIX]     (default: build-tsan-absl/prefix; prints the prefix)
#
# Why: absl::Mutex is implemented in libabsl_synchronization, and TSan only sees the
# happens-before of a lock it can observe. Against Debian's uninstrumented library every
# access guarded by an absl::Mutex is reported as a race. Built with -fsanitize=thread, the
# library annotates its locks, and the same version (and inline namespace) keeps the ABI that
# libgrpc++ was built for, so gRPC's own absl calls go through it too (LD_LIBRARY_PATH).
#
# Fetches the source with apt-get source through a temporary deb-src entry for the same
# Debian archive (root or sudo); idempotent, about a minute of CPU on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build-tsan-absl"
prefix="${1:-$work/prefix}"
version="$(dpkg-query -W -f='${Version}' libabsl-dev)"
stamp="$prefix/.built-$version"
if [[ -f "$stamp" ]]; then
  echo "$prefix"
  exit 0
fi
mkdir -p "$work/src"
cd "$work/src"
sudo_cmd=()
[[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
if ! ls abseil_*.orig.tar.gz >/dev/null 2>&1; then
  list=/etc/apt/sources.list.d/ctxcache-tsan-src.sources
  # The same archive and suite as the binary packages, source only.
  uri="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
  suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  "${sudo_cmd[@]}" tee "$list" >/dev/null <<EOF
Types: deb-src
URIs: ${uri:-http://deb.debian.org/debian}
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  trap '"${sudo_cmd[@]}" rm -f "$list"' EXIT
  echo "tsan-absl: fetching the source of libabsl-dev $version" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  apt-get source --download-only -qq "abseil=$version" 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2 || true
  "${sudo_cmd[@]}" rm -f "$list"
  trap - EXIT
fi
ls abseil_*.orig.tar.gz abseil_*.debian.tar.* >/dev/null
rm -rf tree && mkdir tree
tar -xzf abseil_*.orig.tar.gz -C tree --strip-components=1
tar -xJf abseil_*.debian.tar.xz -C tree
(cd tree && while read -r p; do
  [[ -z "$p" || "$p" == \#* ]] && continue
  patch -p1 -s < "debian/patches/$p"
done < debian/patches/series)
# Debian's options (inline namespace, std:: vs absl:: types) must match the installed headers.
if ! diff -q <(grep '^#define ABSL_OPTION' tree/absl/base/options.h) \
             <(grep '^#define ABSL_OPTION' /usr/include/absl/base/options.h) >/dev/null; then
  echo "tsan-absl: the source's absl/base/options.h differs from the installed one" >&2
  exit 1
fi
echo "tsan-absl: building with -fsanitize=thread" >&2
cmake -S tree -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON -DBUILD_TESTING=OFF \
  -DCMAKE_CXX_FLAGS=-fsanitize=thread \
  -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread -DCMAKE_INSTALL_PREFIX="$prefix" \
  >"$work/configure.log" 2>&1 || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" -j"$(nproc)" >/dev/null
cmake --install "$work/build" >/dev/null
touch "$stamp"
echo "$prefix"
