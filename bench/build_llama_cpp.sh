#!/usr/bin/env bash
# Builds llama.cpp natively (llama-bench, llama-server) for the engine speed comparison.
#
# The source is the llama.cpp that the llama-cpp-python sdist vendors, at the version
# tools/setup.sh pins, so the peer measured by bench/bench_engine.py is the same llama.cpp the
# parity tests use as an oracle, compiled for this CPU (-DGGML_NATIVE=ON) rather than the
# generic wheel.
#
# Usage:  bench/build_llama_cpp.sh            # prints the directory holding the binaries
#         bench/build_llama_cpp.sh --check    # prints it and exits 0 if built, else exits 1
#         LLAMA_CPP_DIR=/some/dir bench/build_llama_cpp.sh
# Env:    LLAMA_CPP_DIR   cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/ctxcache/
#                         llama.cpp-<version>); nothing is written inside the repository
#         LLAMA_CPP_JOBS  parallel compile jobs (default: all CPUs)
#         PYTHON          python used for `pip download` (default python3)
# Idempotent: when both binaries exist it prints the bin dir at once. Delete the folder to
# rebuild. Only the bin dir goes to stdout; every log line goes to stderr. The compile runs
# under `nice -n 10` so other builds on the machine keep priority (~10-15 min on 2 cores).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # keep in step with tools/setup.sh
DIR=${LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ctxcache/llama.cpp-$LLAMA_CPP_PYTHON_VERSION}
PY=${PYTHON:-python3}
JOBS=${LLAMA_CPP_JOBS:-$(nproc)}
TARGETS=(llama-bench llama-server)
BUILD=$DIR/build
BIN=$BUILD/bin
# LLAMA_BUILD_TOOLS holds llama-bench and llama-server in this version (LLAMA_BUILD_SERVER
# gates the server inside it). LLAMA_CURL is deprecated and ignored here (downloads go
# through cpp-httplib); LLAMA_OPENSSL=OFF drops their HTTPS support, which a benchmark does
# not need, and with it the libssl-dev dependency. LLAMA_USE_PREBUILT_UI=OFF: configure
# would otherwise try to download the server's web UI (the HTTP API needs none).
# Static libs: the binaries stand alone.
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF
             -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
             -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF)
STAMP=$BUILD/ctxcache-cmake-flags  # the flags the build was configured with

log() { printf '[build_llama_cpp] %s\n' "$*" >&2; }
die() { printf '[build_llama_cpp] error: %s\n' "$*" >&2; exit 1; }

built() {
  local t
  for t in "${TARGETS[@]}"; do [[ -x $BIN/$t ]] || return 1; done
}

# How it was built, for the results file (llama-bench itself reports its build commit).
write_info() {
  local fmt='{"llama_cpp_python": "%s", "source": "%s", "cmake_flags": "%s", "compiler": "%s"}\n'
  # shellcheck disable=SC2059  # the format is the local above
  printf "$fmt" "$LLAMA_CPP_PYTHON_VERSION" "vendor/llama.cpp of the llama-cpp-python sdist" \
    "${CMAKE_FLAGS[*]}" "$(c++ --version | head -1)" > "$DIR/build-info.json"
}

CHECK_ONLY=0
case ${1:-} in
  "") ;;
  --check) CHECK_ONLY=1 ;;
  *) die "unknown argument: $1 (usage: bench/build_llama_cpp.sh [--check])" ;;
esac

if built && [[ $(cat "$STAMP" 2>/dev/null) == "${CMAKE_FLAGS[*]}" ]]; then
  [[ -f $DIR/build-info.json ]] || write_info
  echo "$BIN"
  exit 0
fi
if (( CHECK_ONLY )); then
  log "not built yet (or built with other flags): $BIN"
  log "run bench/build_llama_cpp.sh (~10-15 min on 2 cores)"
  exit 1
fi

for tool in cmake ninja cc c++; do
  command -v "$tool" >/dev/null \
    || die "$tool not found (apt-get install cmake ninja-build build-essential)"
done
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY -m pip not available (set PYTHON=...)"
mkdir -p "$DIR" || die "cannot create $DIR"

# 1. The sdist (downloaded once, kept in $DIR/dist).
SDIST_NAME=llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
SRC=$DIR/src/$SDIST_NAME
if [[ ! -f $SRC/vendor/llama.cpp/CMakeLists.txt ]]; then
  ARCHIVE=$DIR/dist/$SDIST_NAME.tar.gz
  if [[ ! -f $ARCHIVE ]]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$DIR/dist" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2 \
      || die "pip download of llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed" \
             "(is PyPI reachable?)"
    [[ -f $ARCHIVE ]] || die "pip download left no $ARCHIVE (found: $(ls "$DIR/dist"))"
  fi
  log "unpacking $ARCHIVE"
  rm -rf "$DIR/src" && mkdir -p "$DIR/src"
  tar -xzf "$ARCHIVE" -C "$DIR/src" || die "cannot unpack $ARCHIVE"
  [[ -f $SRC/vendor/llama.cpp/CMakeLists.txt ]] \
    || die "the sdist has no vendor/llama.cpp/CMakeLists.txt (expected under $SRC)"
fi
LLAMA_SRC=$SRC/vendor/llama.cpp

# 2. Configure (again when the flags above changed).
if [[ ! -f $BUILD/build.ninja || $(cat "$STAMP" 2>/dev/null) != "${CMAKE_FLAGS[*]}" ]]; then
  log "configuring $LLAMA_SRC -> $BUILD"
  rm -f "$STAMP"
  cmake -S "$LLAMA_SRC" -B "$BUILD" -G Ninja "${CMAKE_FLAGS[@]}" -Wno-dev >&2 \
    || die "cmake configure failed (see above)"
  echo "${CMAKE_FLAGS[*]}" > "$STAMP"
fi

# 3. Build the two targets, at low priority.
log "building ${TARGETS[*]} with $JOBS jobs (nice -n 10): ~10-15 min on 2 cores"
start=$(date +%s)
nice -n 10 cmake --build "$BUILD" --parallel "$JOBS" --target "${TARGETS[@]}" >&2 \
  || die "cmake --build failed (see above); rerun to resume"
built || die "build finished but ${TARGETS[*]} are not all in $BIN"
log "built in $(( $(date +%s) - start )) s"
write_info
echo "$BIN"
