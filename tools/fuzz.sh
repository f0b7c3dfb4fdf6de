#!/usr/bin/env bash
# Coverage-guided fuzzing of every target in tests/fuzz with libFuzzer (clang, ASan + UBSan):
# builds the fuzz-only configuration in its own folder, then runs each target in turn from its
# seeds (tests/fuzz/corpus/T, plus the generated ones for gguf and codec), one process each.
# Any crash, invariant break, leak, timeout (> 10 s on one input) or OOM (> 2 GiB) fails the
# run; the input that caused it is left in BUILD/artifacts/T/ (add it to tests/fuzz/corpus/T
# with the fix, so the replay test keeps it fixed).
#   tools/fuzz.sh                        CI: 20 s per target
#   tools/fuzz.sh --time 300 gguf codec  longer, some targets
#   tools/fuzz.sh --runs 10000000 --results FILE.json   a fixed number of inputs per target
#                                        (with --time too: whichever comes first), exec counts
#                                        and coverage written to FILE.json (tools/fuzz_long.sh)
# New inputs the fuzzer finds interesting go to BUILD/corpus/T (kept between runs, so a run
# continues where the last stopped; never written into the source tree).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build=build-fuzz
seconds=""
runs=-1
results=""
targets=()
while (($#)); do
  case "$1" in
    --time) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(codec gguf icformer tokenizer chat_template utf8 stop redis_meta redis_url redis_cluster
  config)
((${#targets[@]})) || targets=("${all[@]}")
((runs >= 0)) || [[ -n "$seconds" ]] || seconds=20

for tool in clang clang++; do
  command -v "$tool" >/dev/null || { echo "fuzz.sh: $tool not found (tools/setup.sh installs it)" >&2; exit 2; }
done
# Two cores shared with everything else: build with at most two jobs, fuzz with one process
# (no -jobs/-workers: libFuzzer runs in-process).
mkdir -p "$build"
if [[ ! -f "$build/build.ninja" ]]; then
  CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCTXCACHE_FUZZ=ON -DCTXCACHE_CUDA=OFF >"$build/configure.log" 2>&1 ||
    { tail -30 "$build/configure.log" >&2; exit 1; }
fi
build_targets=(gguf_seeds codec_seeds)
for t in "${targets[@]}"; do build_targets+=("${t}_fuzz"); done
cmake --build "$build" -j2 --target "${build_targets[@]}" >"$build/build.log" 2>&1 ||
  { grep -E -A5 'error|FAILED' "$build/build.log" | head -60 >&2; exit 1; }
bin="$build/tests/fuzz"
mkdir -p "$build/seeds"
"$bin/gguf_seeds" "$build/seeds/gguf"
"$bin/codec_seeds" "$build/seeds/codec"

export ASAN_OPTIONS="detect_leaks=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
failed=()
rows=()
# Writes FILE.json with the rows so far (after every target, so that a run cut short still
# leaves the targets it finished).
write_results() {
  [[ -n "$results" ]] || return 0
  mkdir -p "$(dirname "$results")"
  {
    printf '{\n  "date": "%s",\n  "commit": "%s",\n  "cpu": "%s",\n  "clang": "%s",\n' \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(git rev-parse --short HEAD)" \
      "$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" \
      "$(clang --version | head -1)"
    printf '  "limits": {"runs": %s, "seconds": %s, "rss_limit_mb": 2048, "timeout_s": 10},\n' \
      "$( ((runs >= 0)) && echo "$runs" || echo null)" "${seconds:-null}"
    printf '  "targets": [\n'
    for i in "${!rows[@]}"; do
      printf '    %s%s\n' "${rows[$i]}" "$( ((i + 1 < ${#rows[@]})) && echo ,)"
    done
    printf '  ]\n}\n'
  } >"$results"
}

for t in "${targets[@]}"; do
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t" "$build/logs"
  dirs=("$build/corpus/$t")
  for d in "tests/fuzz/corpus/$t" "$build/seeds/$t"; do [[ -d "$d" ]] && dirs+=("$d"); done
  flags=(-rss_limit_mb=2048 -timeout=10 -print_final_stats=1
         "-artifact_prefix=$build/artifacts/$t/")
  [[ -f "tests/fuzz/$t.dict" ]] && flags+=("-dict=tests/fuzz/$t.dict")
  ((runs >= 0)) && flags+=("-runs=$runs")
  [[ -n "$seconds" ]] && flags+=("-max_total_time=$seconds")
  log="$build/logs/$t.log"
  start=$(date +%s)
  rc=0
  "$bin/${t}_fuzz" "${flags[@]}" "${dirs[@]}" >"$log" 2>&1 || rc=$?
  wall=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$( (grep -oE '(DONE|pulse|NEW|REDUCE|INITED) +cov: [0-9]+ ft: [0-9]+' "$log" || true) |
        tail -1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+)/\1 \2/')
  read -r edges features <<<"${cov:-0 0}"
  corpus=$(find "$build/corpus/$t" -type f | wc -l)
  # What this run left in artifacts/: crash-, leak-, timeout-, oom- files (inputs to keep).
  findings=$(find "$build/artifacts/$t" -type f -newermt "@$start" -printf '"%f", ' | sed 's/, $//')
  status=ok
  if ((rc != 0)); then
    status=failed
    failed+=("$t")
    echo "== $t: FAILED (exit $rc); the log's end and the input:" >&2
    tail -40 "$log" >&2
    ls "$build/artifacts/$t" >&2
  fi
  printf '%-14s %-6s %10s execs %5ss  cov %5s  ft %6s  corpus %5s\n' \
    "$t" "$status" "${execs:-?}" "$wall" "$edges" "$features" "$corpus" >&2
  rows+=("$(printf '{"target": "%s", "status": "%s", "execs": %s, "seconds": %s, "edges": %s, "features": %s, "corpus": %s, "findings": [%s]}' \
    "$t" "$status" "${execs:-0}" "$wall" "$edges" "$features" "$corpus" "$findings")")
  write_results
done

[[ -n "$results" ]] && echo "fuzz.sh: results in $results" >&2
if ((${#failed[@]})); then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, no crash, leak, timeout or OOM" >&2
