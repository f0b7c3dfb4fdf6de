#!/usr/bin/env bash
# The long fuzzing campaign (docs/reliability.md): every fuzz target in turn for 10 million
# inputs (the goal: no crash, leak, timeout or OOM in 10M executions per target), one process
# at a time, with exec counts, coverage and findings written to
# bench/results/fuzz_<UTC date>.json. Extra arguments go to tools/fuzz.sh, e.g. a time cap per
# target when the machine cannot give it hours (whichever limit comes first ends a target):
#   tools/fuzz_long.sh                      10M executions per target (hours on 2 cores: the
#                                           tokenizer target runs ~1-2k inputs/s)
#   tools/fuzz_long.sh --time 300           at most 5 minutes per target
#   tools/fuzz_long.sh --time 3600 gguf     one target
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec tools/fuzz.sh --runs 10000000 --results "bench/results/fuzz_$(date -u +%Y%m%d_%H%M).json" "$@"
