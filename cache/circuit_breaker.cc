// The Redis tier's circuit breaker (see circuit_breaker.h).
#include "cache/circuit_breaker.h"

#include <utility>

namespace ctxcache {

const char* CircuitStateName(CircuitState state) {
  switch (state) {
    case CircuitState::kClosed:
      return "closed";
    case CircuitState::kOpen:
      return "open";
    case CircuitState::kHalfOpen:
      return "half_open";
  }
  return "unknown";
}

CircuitBreaker::CircuitBreaker(CircuitBreakerOptions options,
                               std::function<Clock::time_point()> now)
    : options_(options), now_(std::move(now)) {}

bool CircuitBreaker::Allow() {
  if (options_.failure_threshold <= 0) return true;
  absl::MutexLock lock(&mu_);
  switch (state_) {
    case CircuitState::kClosed:
      return true;
    case CircuitState::kOpen:
      if (now_() < open_until_) {
        ++short_circuited_;
        return false;
      }
      state_ = CircuitState::kHalfOpen;
      probe_out_ = true;
      return true;
    case CircuitState::kHalfOpen:
      // One probe at a time: the others keep skipping Redis until it has answered.
      if (probe_out_) {
        ++short_circuited_;
        return false;
      }
      probe_out_ = true;
      return true;
  }
  return true;
}

void CircuitBreaker::Record(bool failed, std::chrono::nanoseconds duration) {
  if (options_.failure_threshold <= 0) return;
  const bool slow = options_.slow_threshold.count() > 0 && duration > options_.slow_threshold;
  const bool bad = failed || slow;
  absl::MutexLock lock(&mu_);
  if (slow && !failed) ++slow_;
  if (state_ == CircuitState::kHalfOpen) {
    probe_out_ = false;
    if (bad) {
      Open();
    } else {
      state_ = CircuitState::kClosed;
      consecutive_bad_ = 0;
    }
    return;
  }
  if (state_ == CircuitState::kOpen) return;  // an operation allowed before it opened
  consecutive_bad_ = bad ? consecutive_bad_ + 1 : 0;
  if (consecutive_bad_ >= options_.failure_threshold) Open();
}

void CircuitBreaker::Open() {
  state_ = CircuitState::kOpen;
  open_until_ = now_() + options_.cool_down;
  consecutive_bad_ = 0;
  ++opens_;
}

CircuitBreakerStats CircuitBreaker::Stats() const {
  absl::MutexLock lock(&mu_);
  CircuitBreakerStats s;
  s.state = state_;
  // Open past its cool-down reads as half-open: the next operation will probe.
  if (state_ == CircuitState::kOpen && now_() >= open_until_) s.state = CircuitState::kHalfOpen;
  s.opens = opens_;
  s.short_circuited = short_circuited_;
  s.slow = slow_;
  return s;
}

}  // namespace ctxcache
