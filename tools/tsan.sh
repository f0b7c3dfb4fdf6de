#!/usr/bin/env bash
# ThreadSanitizer run of the concurrent parts (issue 14): the server, scheduler, cache tiers
# and Redis client, built with -fsanitize=thread against an Abseil built the same way
# (tools/tsan_absl.sh), then their tests; a failing test or a ThreadSanitizer report in
# ctxcache's code fails the run (tools/tsan_triage.py sorts the reports).
#   tools/tsan.sh            build (build-tsan/) and run
# Suppressions: tools/tsan.supp (third-party internals only, each with its reason).
# Reports: build-tsan/tsan-logs/tsan.<pid>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="$(nproc)"
absl_prefix="$(tools/tsan_absl.sh)"
# No build RPATH: at run time only the instrumented libabsl_synchronization is put first
# (LD_LIBRARY_PATH, below); every other library, absl's included, is Debian's.
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCTXCACHE_TSAN=ON \
  -DCMAKE_PREFIX_PATH="$absl_prefix" -DCMAKE_SKIP_BUILD_RPATH=ON -DCTXCACHE_CUDA=OFF \
  -DCTXCACHE_BUILD_BENCH=OFF >/dev/null
tests=(common_test cache_tier_test redis_fault_test redis_cluster_test server_unit_test server_cancel_test
       server_e2e_test tls_test)
cmake --build build-tsan -j"$jobs" --target "${tests[@]}"

# Only absl::Mutex must be instrumented (its lock annotations are how TSan sees ctxcache's
# locks, and gRPC's, which are absl::Mutex too): the instrumented libabsl_synchronization
# goes first, for this process and for libgrpc. Everything else stays Debian's and
# uninstrumented, and ignore_noninstrumented_modules keeps TSan from judging what those
# libraries do inside (it sees their memcpy and operator new, not their atomics).
sync_dir="$root/build-tsan/absl-sync"
mkdir -p "$sync_dir"
for f in "$absl_prefix"/lib/libabsl_synchronization.so*; do
  ln -sf "$f" "$sync_dir/"
done
export LD_LIBRARY_PATH="$sync_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Reports go to files (one per process, the spawned servers' too), judged at the end by
# tools/tsan_triage.py: a race between two of gRPC's own accesses inside its uninstrumented
# core is printed and not counted; anything touching ctxcache's code fails the run.
logs="$root/build-tsan/tsan-logs"
rm -rf "$logs" && mkdir -p "$logs"
export TSAN_OPTIONS="halt_on_error=0 exitcode=0 second_deadlock_stack=1 ignore_noninstrumented_modules=1 suppressions=$root/tools/tsan.supp log_path=$logs/tsan"
# As under ctest: whatever would load the default model (Qwen) loads SmolLM2, the fast one.
export CTXCACHE_MODEL="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# The model tests run 5-15x slower under TSan: the end-to-end suite runs its concurrent
# cases (load races, cancellation, single flight, Redis faults, drain), not every answer check.
e2e_filter='*RacingTheModelLoad*:*Concurrent*:*KeepStreaming*:*Cancel*:*Deadline*:*Tenant*:*Health*:*SlowRedis*:*RedisKilled*:*Scheduler*:*DrainFinishes*'
status=0
for t in "${tests[@]}"; do
  args=(--gtest_brief=1)
  [[ "$t" == server_e2e_test ]] && args+=("--gtest_filter=$e2e_filter")
  # The cluster suite's concurrent parts: the invalidation listener against lookups and
  # writes, and the cluster client's shared slot map under redirections.
  [[ "$t" == redis_cluster_test ]] &&
    args+=("--gtest_filter=*Invalidation*:*Resubscription*:*Subscription*:*StoreComputes*:*Migration*")
  # Transport security: certificate and token reloads on the watcher thread while calls
  # authenticate and handshake; the throttle under concurrent failures.
  [[ "$t" == tls_test ]] && args+=("--gtest_filter=*Rotated*:*TokenFileChanges*:*Throttled*:*Tenants*")
  echo "== tsan: $t" >&2
  start=$SECONDS
  rc=0
  "build-tsan/tests/$t" "${args[@]}" || rc=$?
  if ((rc != 0)); then
    echo "tsan: $t FAILED (exit $rc)" >&2
    status=1
  fi
  echo "tsan: $t took $((SECONDS - start)) s" >&2
done
python3 tools/tsan_triage.py "$logs" || status=1
exit $status
