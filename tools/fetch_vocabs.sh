#!/usr/bin/env bash
# Fetches llama.cpp's larger test vocabularies (vocabulary-only GGUFs with their test inputs
# and expected ids: llama-bpe, qwen2, starcoder, command-r, mpt, refact) from the source
# distribution of llama-cpp-python on PyPI, which vendors llama.cpp's models/ folder, into
# models/vocab/ (git-ignored). The small ones (llama-spm, phi-3, gpt-2) are checked in.
# Idempotent: does nothing when the files are there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/vocab"
version=0.3.36
names=(llama-bpe qwen2 starcoder command-r mpt refact)
have=1
for n in "${names[@]}"; do [[ -s "$dest/ggml-vocab-$n.gguf.out" ]] || have=0; done
((have)) && exit 0
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# pip prepares the sdist's metadata on download (about a minute); nothing is compiled.
PIP_ROOT_USER_ACTION=ignore python3 -m pip download --quiet --disable-pip-version-check \
  --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version" >&2
sdist="$(find "$tmp" -name 'llama_cpp_python-*.tar.gz' -print -quit)"
members=()
for n in "${names[@]}"; do
  for ext in "" .inp .out; do
    members+=("llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-$n.gguf$ext")
  done
done
tar -xzf "$sdist" -C "$tmp" "${members[@]}"
for m in "${members[@]}"; do mv "$tmp/$m" "$dest/"; done
echo "fetch_vocabs: ${#names[@]} vocabularies in $dest" >&2
