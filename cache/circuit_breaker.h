// A circuit breaker for the Redis tier: after `failure_threshold` bad operations in a row it
// opens, and the store skips Redis entirely (a miss; writes are dropped) for `cool_down`; then
// it half-opens and lets one probe through, which closes it when good and re-opens it when
// bad. "Bad" is an error (unreachable, lost connection, deadline) or slowness: an operation
// that succeeded but took longer than `slow_threshold` (issue 14: a slow-but-alive Redis
// answered every call just within its timeout, and every request paid for it). Answers that
// are not failures of Redis (a miss, a damaged entry, a full quota) count as good.
//
// Thread-safe. The clock is injectable for tests.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

#include "absl/synchronization/mutex.h"

namespace ctxcache {

enum class CircuitState : uint8_t { kClosed = 0, kOpen = 1, kHalfOpen = 2 };
const char* CircuitStateName(CircuitState state);  // "closed", "open", "half_open"

struct CircuitBreakerOptions {
  int failure_threshold = 5;  // consecutive bad operations that open it; 0 disables the breaker
  std::chrono::milliseconds slow_threshold{250};  // slower counts as bad; 0 = only errors
  std::chrono::milliseconds cool_down{5000};      // open this long before a probe
};

struct CircuitBreakerStats {
  CircuitState state = CircuitState::kClosed;
  int64_t opens = 0;            // closed/half-open -> open transitions
  int64_t short_circuited = 0;  // operations refused while open
  int64_t slow = 0;             // operations that counted as bad for their latency alone
};

class CircuitBreaker {
 public:
  using Clock = std::chrono::steady_clock;
  explicit CircuitBreaker(CircuitBreakerOptions options,
                          std::function<Clock::time_point()> now = Clock::now);

  // Whether an operation may go to Redis now. True when closed; when open, false until the
  // cool-down has passed, then true for exactly one caller (the probe, state half-open).
  // Every true must be followed by one Record.
  bool Allow();
  // The outcome of an allowed operation: `failed` for an error, and its duration.
  void Record(bool failed, std::chrono::nanoseconds duration);

  CircuitBreakerStats Stats() const;
  const CircuitBreakerOptions& options() const { return options_; }

 private:
  void Open() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CircuitBreakerOptions options_;
  const std::function<Clock::time_point()> now_;
  mutable absl::Mutex mu_;
  CircuitState state_ ABSL_GUARDED_BY(mu_) = CircuitState::kClosed;
  int consecutive_bad_ ABSL_GUARDED_BY(mu_) = 0;
  bool probe_out_ ABSL_GUARDED_BY(mu_) = false;
  Clock::time_point open_until_ ABSL_GUARDED_BY(mu_);
  int64_t opens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t short_circuited_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t slow_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ctxcache
