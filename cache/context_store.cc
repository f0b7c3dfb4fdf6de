// The two-tier store behind ContextStore (see context_store.h): memory tier, then Redis tier,
// then the caller's compute function, under single flight per (tenant, key).
//
// Every Redis outcome other than a hit is turned into a counter and, for the ones an operator
// should hear about (unreachable, slow, damaged, wrong model, write refused), a warning that
// is rate-limited per kind: a Redis outage must not turn into one log line per request.
#include "cache/context_store.h"

#include <atomic>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cache/memory_tier.h"
#include "cache/redis_tier.h"
#include "cache/single_flight.h"
#include "common/status.h"
#include "spdlog/spdlog.h"

namespace ctxcache {
namespace {

// One warning per period; the next one says how many were swallowed in between.
class RateLimitedWarning {
 public:
  explicit RateLimitedWarning(absl::Duration period) : period_(period) {}

  void Log(const std::string& message) {
    int64_t suppressed = 0;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      if (now < next_) {
        ++suppressed_;
        return;
      }
      next_ = now + period_;
      suppressed = suppressed_;
      suppressed_ = 0;
    }
    if (suppressed > 0) {
      spdlog::warn("{} ({} similar warnings suppressed)", message, suppressed);
    } else {
      spdlog::warn("{}", message);
    }
  }

 private:
  const absl::Duration period_;
  absl::Mutex mu_;
  absl::Time next_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int64_t suppressed_ ABSL_GUARDED_BY(mu_) = 0;
};

bool IsLowerHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

class TwoTierStore final : public ContextStore {
 public:
  TwoTierStore(const ContextStoreOptions& options, std::unique_ptr<RedisTier> redis)
      : memory_(options.memory_bytes), redis_(std::move(redis)),
        observer_(options.redis_observer) {}

  absl::StatusOr<StoreResult> GetOrCompute(const std::string& tenant, const std::string& key,
                                           const FlightComputeFn& compute,
                                           const StopFn& stop) override {
    if (!compute) return absl::InvalidArgumentError("GetOrCompute: no compute function");
    if (auto context = memory_.Get(tenant, key)) {
      return StoreResult{std::move(context), CacheTier::kMemory, 0};
    }
    auto flight = [&](const StopFn& flight_stop) -> absl::StatusOr<StoreResult> {
      // A flight that ended between our miss and now may have filled the memory tier.
      if (auto context = memory_.Get(tenant, key, /*record=*/false)) {
        return StoreResult{std::move(context), CacheTier::kMemory, 0};
      }
      RETURN_IF_ERROR(CheckStop(flight_stop));
      // TODO(redis owner, issue 14 item 5): bound this lookup by an operation deadline, the
      // smaller of the flight's remaining time and command_timeout_ms (RedisTier::Get takes
      // none yet: its timeouts bound each syscall). Until then a slow Redis delays the flight
      // by up to its per-command timeouts; the waiters still leave on their own deadlines.
      if (auto context = RedisGet(tenant, key)) {
        memory_.Put(tenant, key, context);
        return StoreResult{std::move(context), CacheTier::kRedis, 0};
      }
      RETURN_IF_ERROR(CheckStop(flight_stop));
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<CompressedContext> computed = compute(flight_stop);
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!computed.ok()) return computed.status();
      auto context = std::make_shared<const CompressedContext>(*std::move(computed));
      memory_.Put(tenant, key, context);
      // TODO(redis owner, issue 14 item 5): the write belongs off the engine worker, with its
      // own operation deadline; it runs here, inside the flight, after the result is known.
      RedisPut(tenant, key, *context);
      return StoreResult{std::move(context), CacheTier::kComputed, seconds};
    };
    return flights_.Do(FlightKey(tenant, key), flight, stop);
  }

  absl::StatusOr<StoreResult> Get(const std::string& tenant, const std::string& key) override {
    if (auto context = memory_.Get(tenant, key)) {
      return StoreResult{std::move(context), CacheTier::kMemory, 0};
    }
    absl::Status redis_error;
    if (auto context = RedisGet(tenant, key, &redis_error)) {
      memory_.Put(tenant, key, context);
      return StoreResult{std::move(context), CacheTier::kRedis, 0};
    }
    if (!redis_error.ok()) {
      // Not "not found": the entry may well be in Redis, and asking again later may find it.
      return absl::UnavailableError(
          absl::StrCat("context not in the memory tier and the Redis tier is unavailable: ",
                       redis_error.message()));
    }
    return absl::NotFoundError("context not found");
  }

  absl::Status Delete(const std::string& tenant, const std::string& key) override {
    bool found = memory_.Erase(tenant, key);
    if (redis_ != nullptr) {
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<bool> deleted = redis_->Delete(tenant, key);
      Observe(RedisOp::kDelete, !deleted.ok(), start);
      if (!deleted.ok()) {
        redis_errors_.fetch_add(1, std::memory_order_relaxed);
        read_warning_.Log(absl::StrCat("redis tier: delete failed: ", deleted.status().message()));
        return absl::UnavailableError(absl::StrCat(
            found ? "context removed from memory, but " : "",
            "the Redis tier is unavailable, so the context may still be stored there: ",
            deleted.status().message()));
      }
      found = found || *deleted;
    }
    if (!found) return absl::NotFoundError("context not found");
    return absl::OkStatus();
  }

  void ClearMemory() override { memory_.Clear(); }

  ContextStoreStats Stats() const override {
    const MemoryTier::Stats m = memory_.GetStats();
    ContextStoreStats s;
    s.memory_bytes = m.bytes;
    s.memory_entries = m.entries;
    s.memory_evictions = m.evictions;
    s.memory_hits = m.hits;
    s.memory_misses = m.misses;
    s.redis_hits = redis_hits_.load(std::memory_order_relaxed);
    s.redis_misses = redis_misses_.load(std::memory_order_relaxed);
    s.redis_errors = redis_errors_.load(std::memory_order_relaxed);
    s.redis_read_errors = redis_read_errors_.load(std::memory_order_relaxed);
    s.redis_corrupt = redis_corrupt_.load(std::memory_order_relaxed);
    s.redis_wrong_model = redis_wrong_model_.load(std::memory_order_relaxed);
    s.redis_writes = redis_writes_.load(std::memory_order_relaxed);
    s.redis_quota_skips = redis_quota_skips_.load(std::memory_order_relaxed);
    s.redis_connected = redis_ != nullptr && redis_->connected();
    return s;
  }

 private:
  // Length-prefixed, so that no (tenant, key) pair collides with another.
  static std::string FlightKey(const std::string& tenant, const std::string& key) {
    return absl::StrCat(tenant.size(), ":", tenant, key);
  }

  // A usable entry, or nullptr (miss, damage, wrong model, Redis trouble: all counted).
  // `error` receives transport and server errors, which say nothing about the entry.
  std::shared_ptr<const CompressedContext> RedisGet(const std::string& tenant,
                                                    const std::string& key,
                                                    absl::Status* error = nullptr) {
    if (redis_ == nullptr) return nullptr;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<CompressedContext> got = redis_->Get(tenant, key);
    const absl::StatusCode code = got.status().code();
    Observe(RedisOp::kGet,
            code != absl::StatusCode::kOk && code != absl::StatusCode::kNotFound &&
                code != absl::StatusCode::kDataLoss &&
                code != absl::StatusCode::kFailedPrecondition,
            start);
    if (got.ok()) {
      redis_hits_.fetch_add(1, std::memory_order_relaxed);
      return std::make_shared<const CompressedContext>(*std::move(got));
    }
    const absl::Status& status = got.status();
    switch (status.code()) {
      case absl::StatusCode::kNotFound:
        redis_misses_.fetch_add(1, std::memory_order_relaxed);
        break;
      case absl::StatusCode::kDataLoss:
        redis_misses_.fetch_add(1, std::memory_order_relaxed);
        redis_corrupt_.fetch_add(1, std::memory_order_relaxed);
        corrupt_warning_.Log(
            absl::StrCat("redis tier: damaged entry treated as a miss: ", status.message()));
        break;
      case absl::StatusCode::kFailedPrecondition:
        redis_misses_.fetch_add(1, std::memory_order_relaxed);
        redis_wrong_model_.fetch_add(1, std::memory_order_relaxed);
        corrupt_warning_.Log(absl::StrCat(
            "redis tier: entry from another model treated as a miss: ", status.message()));
        break;
      default:
        redis_errors_.fetch_add(1, std::memory_order_relaxed);
        redis_read_errors_.fetch_add(1, std::memory_order_relaxed);
        read_warning_.Log(
            absl::StrCat("redis tier: read failed, serving without it: ", status.message()));
        if (error != nullptr) *error = status;
        break;
    }
    return nullptr;
  }

  void RedisPut(const std::string& tenant, const std::string& key,
                const CompressedContext& context) {
    if (redis_ == nullptr) return;
    const auto start = std::chrono::steady_clock::now();
    const absl::Status status = redis_->Put(tenant, key, context);
    Observe(RedisOp::kPut, !status.ok() && !absl::IsResourceExhausted(status), start);
    if (status.ok()) {
      redis_writes_.fetch_add(1, std::memory_order_relaxed);
    } else if (absl::IsResourceExhausted(status)) {
      redis_quota_skips_.fetch_add(1, std::memory_order_relaxed);
      quota_warning_.Log(absl::StrCat("redis tier: write skipped for tenant \"", tenant,
                                      "\": ", status.message()));
    } else {
      redis_errors_.fetch_add(1, std::memory_order_relaxed);
      write_warning_.Log(absl::StrCat("redis tier: write failed: ", status.message()));
    }
  }

  void Observe(RedisOp op, bool error, std::chrono::steady_clock::time_point start) const {
    if (!observer_) return;
    observer_(op, error,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

  MemoryTier memory_;
  std::unique_ptr<RedisTier> redis_;  // null: no Redis tier
  const RedisObserver observer_;
  SingleFlight<StoreResult> flights_;
  std::atomic<int64_t> redis_hits_{0}, redis_misses_{0}, redis_errors_{0}, redis_corrupt_{0};
  std::atomic<int64_t> redis_wrong_model_{0}, redis_writes_{0}, redis_quota_skips_{0};
  std::atomic<int64_t> redis_read_errors_{0};
  RateLimitedWarning read_warning_{absl::Seconds(10)}, write_warning_{absl::Seconds(10)};
  RateLimitedWarning corrupt_warning_{absl::Seconds(10)}, quota_warning_{absl::Seconds(10)};
};

}  // namespace

const char* CacheTierName(CacheTier tier) {
  switch (tier) {
    case CacheTier::kComputed:
      return "computed";
    case CacheTier::kMemory:
      return "memory";
    case CacheTier::kRedis:
      return "redis";
  }
  return "unknown";
}

const char* RedisOpName(RedisOp op) {
  switch (op) {
    case RedisOp::kGet:
      return "get";
    case RedisOp::kPut:
      return "put";
    case RedisOp::kDelete:
      return "delete";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<ContextStore>> ContextStore::Create(
    const ContextStoreOptions& options) {
  if (options.memory_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory_bytes must be >= 0 (0 disables the memory tier), got ", options.memory_bytes));
  }
  if (!options.model_fingerprint.empty() && !IsLowerHex64(options.model_fingerprint)) {
    return absl::InvalidArgumentError(
        "model_fingerprint must be 64 lowercase hex characters (Model::fingerprint())");
  }
  std::unique_ptr<RedisTier> redis;
  if (!options.redis.url.empty()) {
    ASSIGN_OR_RETURN(redis, RedisTier::Create(options.redis, options.model_fingerprint));
    // Connect now, so that the log says at start whether the shared tier works; an
    // unreachable Redis is not fatal (the client retries with backoff).
    if (absl::Status ping = redis->client().Ping(); ping.ok()) {
      spdlog::info("redis tier at {} (ttl {} s, quota {} bytes per tenant, prefix \"{}\")",
                   redis->client().endpoint(), options.redis.ttl_seconds,
                   options.redis.tenant_quota_bytes, options.redis.key_prefix);
    } else {
      spdlog::warn("redis tier at {} unreachable at start, serving without it until it is: {}",
                   redis->client().endpoint(), std::string(ping.message()));
    }
  }
  return std::unique_ptr<ContextStore>(new TwoTierStore(options, std::move(redis)));
}

}  // namespace ctxcache
