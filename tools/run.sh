#!/usr/bin/env bash
# The main job: install what is missing, build, fetch the default model, and serve it --
# ctxcache-server on 127.0.0.1:50051 with the embedded memory cache (no Redis), until
# Ctrl-C / SIGTERM (which drains in-flight calls first).
# Extra arguments go to ctxcache-server (e.g. --listen 0.0.0.0:50051 --redis-url redis://...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target ctxcache-server ctxcache
exec build/server/ctxcache-server "$@"
