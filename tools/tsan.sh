#!/usr/bin/env bash
# ThreadSanitizer run of the concurrent parts (issue 14): the server, scheduler, cache tiers
# and Redis client, built with -fsanitize=thread against an Abseil built the same way
# (tools/tsan_absl.sh), then their tests; any report fails the run (TSAN exit code 66).
#   tools/tsan.sh            build (build-tsan/) and run
# Suppressions: tools/tsan.supp (third-party internals only, each with its reason).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="$(nproc)"
absl_prefix="$(tools/tsan_absl.sh)"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCTXCACHE_TSAN=ON \
  -DCMAKE_PREFIX_PATH="$absl_prefix" -DCTXCACHE_CUDA=OFF -DCTXCACHE_BUILD_BENCH=OFF >/dev/null
tests=(common_test cache_tier_test redis_fault_test server_unit_test server_cancel_test
       server_e2e_test)
cmake --build build-tsan -j"$jobs" --target "${tests[@]}"

# gRPC's libraries call absl too: they must load the instrumented copy, not Debian's.
export LD_LIBRARY_PATH="$absl_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 suppressions=$root/tools/tsan.supp"
# The model tests run 5-15x slower under TSan: the end-to-end suite runs its concurrent
# cases (load races, cancellation, single flight, Redis faults, drain), not every answer check.
e2e_filter='*RacingTheModelLoad*:*Concurrent*:*Cancel*:*Deadline*:*Tenant*:*Health*:*SlowRedis*:*RedisKilled*:*Scheduler*'
status=0
for t in "${tests[@]}"; do
  args=(--gtest_brief=1)
  [[ "$t" == server_e2e_test ]] && args+=("--gtest_filter=$e2e_filter")
  echo "== tsan: $t" >&2
  start=$SECONDS
  if ! "build-tsan/tests/$t" "${args[@]}"; then
    echo "tsan: $t FAILED (exit $?; 66 = a ThreadSanitizer report)" >&2
    status=1
  fi
  echo "tsan: $t took $((SECONDS - start)) s" >&2
done
exit $status
