#!/usr/bin/env bash
# Builds ctxcache and runs every test: the parsers of untrusted input (GGUF, tokenizer data)
# under AddressSanitizer + UndefinedBehaviorSanitizer first, a short coverage-guided fuzzing
# run of every fuzz target (tools/fuzz.sh, clang + libFuzzer), then the whole suite with ctest.
# Tests that need hardware this machine lacks (a GPU) report as skipped with the reason.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="$(nproc)"

tools/setup.sh
# The models were just fetched: a test that cannot find one must fail, not skip.
export CTXCACHE_REQUIRE_MODEL=1
# redis-server was just installed: the Redis integration tests must run, not skip.
export CTXCACHE_REQUIRE_REDIS=1
# promtool (package prometheus) was just installed: the metrics exposition check must run.
export CTXCACHE_REQUIRE_PROMTOOL=1
# promtool, yamllint, kubectl and kubernetes-validate were just installed: the deploy checks
# (tests/deploy_test.sh) must run, not skip.
export CTXCACHE_REQUIRE_DEPLOY_TOOLS=1

echo "== sanitizer build (ASan + UBSan): untrusted-input parsers" >&2
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCTXCACHE_SANITIZE=ON \
  -DCTXCACHE_CUDA=OFF -DCTXCACHE_BUILD_BENCH=OFF >/dev/null
asan_tests=(gguf_test tokenizer_conformance_test quant_test codec_test icformer_test)
replay_targets=(tokenizer chat_template utf8 stop redis_meta redis_url redis_cluster config icformer
  openai_json)
cmake --build build-asan -j"$jobs" --target "${asan_tests[@]}" gguf_fuzz_replay gguf_seeds \
  codec_fuzz_replay codec_seeds "${replay_targets[@]/%/_fuzz_replay}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
for t in "${asan_tests[@]}"; do
  "build-asan/tests/$t" --gtest_brief=1
done
suite=tests/data/tokenizer/suite
fuzz=build-asan/tests/fuzz
"$fuzz/gguf_seeds" "$fuzz/gguf_seed_corpus"
"$fuzz/gguf_fuzz_replay" --iterations 300 "$suite/ggml-vocab-gpt-2.gguf" \
  "$suite/ggml-vocab-llama-spm.gguf" "$suite/ggml-vocab-phi-3.gguf" "$fuzz/gguf_seed_corpus" \
  tests/fuzz/corpus/gguf
"$fuzz/codec_seeds" "$fuzz/codec_seed_corpus"
"$fuzz/codec_fuzz_replay" --iterations 3000 "$fuzz/codec_seed_corpus" tests/fuzz/corpus/codec
for t in "${replay_targets[@]}"; do
  "$fuzz/${t}_fuzz_replay" --iterations 300 "tests/fuzz/corpus/$t"
done
unset ASAN_OPTIONS UBSAN_OPTIONS

# Any crash, invariant break, leak, timeout or OOM fails CI (about 5 minutes on 2 cores from a
# cold build folder: ~3 to build the instrumented libraries, 15 s per target).
echo "== coverage-guided fuzzing (libFuzzer, clang): every target, 15 s each" >&2
tools/fuzz.sh --time 15

echo "== release build and full test suite" >&2
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs" "$@"

echo "== ThreadSanitizer build: server, scheduler, cache tiers, Redis client" >&2
tools/tsan.sh
