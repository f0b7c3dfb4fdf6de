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
# The digest compressor shipped for the default model (method "digest", docs/digest.md), unless
# the arguments name another model or compressor.
compressor=train/compressors/qwen2.5-coder-0.5b-instruct-q4_k_m.icformer.gguf
extra=()
if [[ -f "$compressor" && " $* " != *" --model"* && " $* " != *"--digest-compressor"* &&
      -z "${CTXCACHE_MODEL:-}" ]]; then
  extra=(--digest-compressor "$compressor")
fi
exec build/server/ctxcache-server "${extra[@]}" "$@"
