#!/usr/bin/env bash
# The main job. Until the gRPC server lands, this is the streaming generation demo: install
# what is missing, build the CLI, fetch the default model and stream a chat answer.
# Extra arguments go to `ctxcache generate` (e.g. --prompt "..." --max-tokens 64).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target ctxcache
case " $* " in
  *" --prompt "* | *" --prompt="* | *" --prompt-file"*) ;;
  *) set -- --chat --prompt "In two sentences: why do language-model servers cache the KV state of documents?" "$@" ;;
esac
exec build/server/ctxcache generate "$@"
