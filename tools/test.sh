#!/usr/bin/env bash
# Builds ctxcache and runs every test: the parsers of untrusted input (GGUF, tokenizer data)
# under AddressSanitizer + UndefinedBehaviorSanitizer first, then the whole suite with ctest.
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
asan_tests=(gguf_test tokenizer_conformance_test quant_test codec_test)
cmake --build build-asan -j"$jobs" --target "${asan_tests[@]}" gguf_fuzz_replay \
  codec_fuzz_replay codec_seeds
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
for t in "${asan_tests[@]}"; do
  "build-asan/tests/$t" --gtest_brief=1
done
suite=tests/data/tokenizer/suite
build-asan/tests/gguf_fuzz_replay --iterations 300 "$suite/ggml-vocab-gpt-2.gguf" \
  "$suite/ggml-vocab-llama-spm.gguf" "$suite/ggml-vocab-phi-3.gguf"
build-asan/tests/codec_seeds build-asan/tests/codec_seed_corpus
build-asan/tests/codec_fuzz_replay --iterations 3000 build-asan/tests/codec_seed_corpus/*.ctxc
unset ASAN_OPTIONS UBSAN_OPTIONS

echo "== release build and full test suite" >&2
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs" "$@"
