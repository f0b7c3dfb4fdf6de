// The two-tier store behind ContextStore (see context_store.h): memory tier, then Redis tier,
// then the caller's compute function, under single flight per (tenant, key).
//
// Every Redis outcome other than a hit is turned into a counter and, for the ones an operator
// should hear about (unreachable, slow, damaged, wrong model, write refused), a warning that
// is rate-limited per kind: a Redis outage must not turn into one log line per request.
#include "cache/context_store.h"

#include <malloc.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cache/invalidation.h"
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

// Transfer rate below which a Redis read counts as slow for the circuit breaker, on top of
// circuit_slow_ms: 100 MB/s, about what one connection moves on a 1 Gb/s network.
constexpr double kSlowAllowanceBytesPerSecond = 100e6;

bool IsLowerHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

CircuitBreakerOptions BreakerOptions(const RedisOptions& r) {
  CircuitBreakerOptions o;
  o.failure_threshold = r.circuit_failures;
  o.slow_threshold = std::chrono::milliseconds(r.circuit_slow_ms);
  o.cool_down = std::chrono::milliseconds(r.circuit_cool_down_ms);
  return o;
}

class TwoTierStore final : public ContextStore {
 public:
  TwoTierStore(const ContextStoreOptions& options, std::unique_ptr<RedisTier> redis)
      : memory_(options.memory_bytes, options.memory_tenant_bytes),
        redis_(std::move(redis)),
        observer_(options.redis_observer),
        breaker_(BreakerOptions(options.redis)),
        max_queued_writes_(options.redis.write_queue_entries),
        max_queued_bytes_(options.redis.write_queue_bytes) {
    if (redis_ != nullptr) writer_ = std::thread([this] { WriterLoop(); });
    if (redis_ != nullptr && options.redis.invalidation) {
      InvalidationListenerOptions l;
      l.channel = redis_->InvalidationChannel();
      l.nodes = [this] { return redis_->router().SubscribeNodes(); };
      l.on_message = [this](const Invalidation& v) { OnInvalidation(v); };
      l.on_subscribed = [this](bool first) { OnSubscribed(first); };
      l.connect_timeout_ms = options.redis.connect_timeout_ms;
      l.backoff_initial_ms = options.redis.backoff_initial_ms;
      l.backoff_max_ms = options.redis.backoff_max_ms;
      listener_ = std::make_unique<InvalidationListener>(std::move(l));
      // A replica that starts with Redis up hears every invalidation from its first request on.
      // (Unreachable Redis: the first subscription, whenever it comes, clears the memory tier.)
      listener_->WaitFirstAttempt(absl::Milliseconds(options.redis.connect_timeout_ms + 100));
    }
  }

  ~TwoTierStore() override {
    listener_.reset();  // no invalidation runs against a store being torn down
    {
      absl::MutexLock lock(&write_mu_);
      stopping_ = true;
      // Not written: dropping is this tier's failure mode, and shutdown must not wait on Redis.
      writes_dropped_.fetch_add(static_cast<int64_t>(queue_.size()), std::memory_order_relaxed);
      queue_.clear();
      queued_bytes_ = 0;
    }
    if (writer_.joinable()) writer_.join();
  }

  absl::StatusOr<StoreResult> GetOrCompute(const std::string& tenant, const std::string& key,
                                           const FlightComputeFn& compute,
                                           const StopFn& stop, RedisDeadline deadline) override {
    if (!compute) return absl::InvalidArgumentError("GetOrCompute: no compute function");
    if (auto context = memory_.Get(tenant, key)) {
      return StoreResult{std::move(context), CacheTier::kMemory, 0, /*in_memory=*/true};
    }
    auto flight = [&](const StopFn& flight_stop) -> absl::StatusOr<StoreResult> {
      // A flight that ended between our miss and now may have filled the memory tier.
      if (auto context = memory_.Get(tenant, key, /*record=*/false)) {
        return StoreResult{std::move(context), CacheTier::kMemory, 0, /*in_memory=*/true};
      }
      RETURN_IF_ERROR(CheckStop(flight_stop));
      // Invalidations (a delete on any replica) from here on keep what this flight finds or
      // computes out of the tiers: a deleted context is not brought back.
      FlightEpoch epoch(this, tenant, key);
      // Bounded by the leading caller's deadline and command_timeout_ms (an operation
      // deadline) and by the flight's stop (every caller gone); the waiters leave on their
      // own stops.
      RedisFound found;
      {
        ScopedRedisStop redis_stop(&flight_stop);
        found = RedisGet(tenant, key, deadline);
      }
      if (found.context != nullptr) {
        const bool in_memory = epoch.Store(found.context, found.write_id, /*computed=*/false);
        return StoreResult{std::move(found.context), CacheTier::kRedis, 0, in_memory, true};
      }
      RETURN_IF_ERROR(CheckStop(flight_stop));
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<CompressedContext> computed = compute(flight_stop);
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!computed.ok()) return computed.status();
      auto context = std::make_shared<const CompressedContext>(*std::move(computed));
      const bool in_memory = epoch.Store(context, "", /*computed=*/true);
      // Returns at once: the writer thread stores it. in_redis then means "queued for Redis".
      // A context deleted meanwhile is neither kept nor written (the caller still gets it).
      const bool in_redis =
          !epoch.invalidated() && EnqueueWrite(tenant, key, context, found.deletes);
      return StoreResult{std::move(context), CacheTier::kComputed, seconds, in_memory, in_redis};
    };
    return flights_.Do(FlightKey(tenant, key), flight, stop);
  }

  absl::StatusOr<StoreResult> Get(const std::string& tenant, const std::string& key,
                                  RedisDeadline deadline) override {
    if (auto context = memory_.Get(tenant, key)) {
      return StoreResult{std::move(context), CacheTier::kMemory, 0, /*in_memory=*/true};
    }
    absl::Status redis_error;
    FlightEpoch epoch(this, tenant, key);
    if (RedisFound found = RedisGet(tenant, key, deadline, &redis_error); found.context) {
      const bool in_memory = epoch.Store(found.context, found.write_id, /*computed=*/false);
      return StoreResult{std::move(found.context), CacheTier::kRedis, 0, in_memory, true};
    }
    if (!redis_error.ok() && !CurrentRedisStop().ok()) return redis_error;  // the caller left
    if (!redis_error.ok()) {
      // Not "not found": the entry may well be in Redis, and asking again later may find it.
      return absl::UnavailableError(
          absl::StrCat("context not in the memory tier and the Redis tier is unavailable: ",
                       redis_error.message()));
    }
    return absl::NotFoundError("context not found");
  }

  absl::Status Delete(const std::string& tenant, const std::string& key,
                      RedisDeadline deadline) override {
    bool found = Invalidate(tenant, key);
    if (redis_ != nullptr) {
      found = CancelWrite(tenant, key) || found;
      if (!breaker_.Allow()) {
        return absl::UnavailableError(
            absl::StrCat(found ? "context removed from memory, but " : "", CircuitOpenMessage(),
                         ", so the context may still be stored there; retry later"));
      }
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<bool> deleted = redis_->Delete(tenant, key, deadline);
      if (!deleted.ok() && !CurrentRedisStop().ok()) {
        // The caller left while Redis was asked: neither Redis's fault nor an answer.
        return absl::Status(deleted.status().code(),
                            absl::StrCat(found ? "context removed from memory; " : "",
                                         deleted.status().message()));
      }
      breaker_.Record(IsRedisFailure(deleted.status()), std::chrono::steady_clock::now() - start);
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

  bool WaitForWrites(absl::Duration timeout) override {
    absl::MutexLock lock(&write_mu_);
    return write_mu_.AwaitWithTimeout(absl::Condition(
                                          +[](TwoTierStore* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                            return self->queue_.empty() && self->in_flight_.empty();
                                          },
                                          this),
                                      timeout);
  }

  ContextStoreStats Stats() const override {
    const MemoryTier::Stats m = memory_.GetStats();
    ContextStoreStats s;
    s.memory_bytes = m.bytes;
    s.memory_entries = m.entries;
    s.memory_evictions = m.evictions;
    s.memory_hits = m.hits;
    s.memory_misses = m.misses;
    s.memory_tenant_bytes = memory_.TenantBytes();
    s.redis_hits = redis_hits_.load(std::memory_order_relaxed);
    s.redis_misses = redis_misses_.load(std::memory_order_relaxed);
    s.redis_errors = redis_errors_.load(std::memory_order_relaxed);
    s.redis_read_errors = redis_read_errors_.load(std::memory_order_relaxed);
    s.redis_corrupt = redis_corrupt_.load(std::memory_order_relaxed);
    s.redis_wrong_model = redis_wrong_model_.load(std::memory_order_relaxed);
    s.redis_writes = redis_writes_.load(std::memory_order_relaxed);
    s.redis_quota_skips = redis_quota_skips_.load(std::memory_order_relaxed);
    s.redis_connected = redis_ != nullptr && redis_->connected();
    {
      absl::MutexLock lock(&write_mu_);
      s.redis_write_queue_depth = static_cast<int64_t>(queue_.size());
    }
    s.redis_writes_dropped = writes_dropped_.load(std::memory_order_relaxed);
    const CircuitBreakerStats b = breaker_.Stats();
    s.redis_circuit = b.state;
    s.redis_circuit_opens = b.opens;
    s.redis_short_circuited = b.short_circuited;
    s.redis_slow = b.slow;
    s.flights = flights_.InFlight();
    s.invalidations_received = invalidations_received_.load(std::memory_order_relaxed);
    s.deleted_while_computing = deleted_while_computing_.load(std::memory_order_relaxed);
    if (listener_ != nullptr) {
      s.invalidation_subscribed = listener_->subscribed();
      s.invalidation_resubscriptions = listener_->resubscriptions();
      s.invalidation_malformed = listener_->malformed();
    }
    return s;
  }

 private:
  // Length-prefixed, so that no (tenant, key) pair collides with another.
  static std::string FlightKey(const std::string& tenant, const std::string& key) {
    return absl::StrCat(tenant.size(), ":", tenant, key);
  }

  // Errors that say Redis is failing (for the breaker), as opposed to answers about an entry:
  // a miss, a damaged or other-model entry, a full quota.
  static bool IsRedisFailure(const absl::Status& s) {
    return !s.ok() && !absl::IsNotFound(s) && !absl::IsDataLoss(s) &&
           !absl::IsFailedPrecondition(s) && !absl::IsResourceExhausted(s);
  }

  std::string CircuitOpenMessage() const {
    return absl::StrCat("the Redis tier is skipped for up to ",
                        breaker_.options().cool_down.count(),
                        " ms after repeated failed or slow operations (circuit open)");
  }

  // What a Redis lookup found: a usable entry and its write id, or no context (miss, damage,
  // wrong model, Redis trouble: all counted); and the context's delete counter as read, which
  // a write of a context computed after this lookup must still find (RedisTier::Write).
  struct RedisFound {
    std::shared_ptr<const CompressedContext> context;
    std::string write_id;
    std::optional<int64_t> deletes;
  };
  // `error` receives transport and server errors, which say nothing about the entry.
  RedisFound RedisGet(const std::string& tenant, const std::string& key, RedisDeadline deadline,
                      absl::Status* error = nullptr) {
    RedisFound found;
    if (redis_ == nullptr) return found;
    if (!breaker_.Allow()) {
      // Counted by the breaker (short_circuited), not as a Redis error: nothing was asked.
      if (error != nullptr) *error = absl::UnavailableError(CircuitOpenMessage());
      return found;
    }
    const auto start = std::chrono::steady_clock::now();
    RedisTier::ReadResult read = redis_->Read(tenant, key, deadline);
    absl::StatusOr<CompressedContext>& got = read.context;
    found.deletes = read.deletes;
    if (!got.ok()) {
      if (absl::Status stop = CurrentRedisStop(); !stop.ok()) {
        // The caller gave up while Redis was asked (ScopedRedisStop): nothing is known about
        // the entry or about Redis; not counted, the breaker not told.
        if (error != nullptr) *error = got.status();
        found.deletes.reset();
        return found;
      }
    }
    // A hit moved the whole entry: its transfer time at kSlowAllowanceBytesPerSecond is not
    // slowness, so that large contexts do not open the circuit on a healthy Redis.
    const auto allowance = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double>(got.ok() ? static_cast<double>(got->KvBytes()) /
                                                     kSlowAllowanceBytesPerSecond
                                               : 0.0));
    breaker_.Record(IsRedisFailure(got.status()),
                    std::chrono::steady_clock::now() - start - allowance);
    const absl::StatusCode code = got.status().code();
    Observe(RedisOp::kGet,
            code != absl::StatusCode::kOk && code != absl::StatusCode::kNotFound &&
                code != absl::StatusCode::kDataLoss &&
                code != absl::StatusCode::kFailedPrecondition,
            start);
    if (got.ok()) {
      redis_hits_.fetch_add(1, std::memory_order_relaxed);
      found.context = std::make_shared<const CompressedContext>(*std::move(got));
      found.write_id = std::move(read.write_id);
      return found;
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
    return found;
  }

  // Queues a write for the writer thread (true); false when there is no Redis tier or the
  // queue is full (counted). A queued write may still fail or be dropped later (counted).
  bool EnqueueWrite(const std::string& tenant, const std::string& key,
                    std::shared_ptr<const CompressedContext> context,
                    std::optional<int64_t> expected_deletes) {
    if (redis_ == nullptr) return false;
    const int64_t bytes = MemoryTier::EntryBytes(tenant, key, *context);
    int64_t waiting = 0, waiting_bytes = 0;
    {
      absl::MutexLock lock(&write_mu_);
      waiting = static_cast<int64_t>(queue_.size());
      waiting_bytes = queued_bytes_;
      if (waiting < max_queued_writes_ &&
          (waiting == 0 || queued_bytes_ + bytes <= max_queued_bytes_)) {
        queue_.push_back(PendingWrite{tenant, key, std::move(context), bytes, expected_deletes});
        queued_bytes_ += bytes;
        return true;
      }
    }
    writes_dropped_.fetch_add(1, std::memory_order_relaxed);
    write_warning_.Log(absl::StrCat(
        "redis tier: write queue full (", waiting, " writes, ", waiting_bytes,
        " bytes waiting; limits ", max_queued_writes_, " writes, ", max_queued_bytes_,
        " bytes): a computed context of ", bytes,
        " bytes was not stored in Redis (raise redis_write_queue_entries or "
        "redis_write_queue_bytes, or Redis is slow)"));
    return false;
  }

  // Drops a queued write of (tenant, key) and waits for one in progress (it ends by its own
  // deadline), so that a Delete is not undone by a write that lands after it. True when a
  // queued write was dropped.
  bool CancelWrite(const std::string& tenant, const std::string& key) {
    const std::string flight = FlightKey(tenant, key);
    absl::MutexLock lock(&write_mu_);
    const size_t before = queue_.size();
    std::erase_if(queue_, [&](const PendingWrite& w) {
      const bool match = w.tenant == tenant && w.key == key;
      if (match) queued_bytes_ -= w.bytes;
      return match;
    });
    const bool dropped = queue_.size() != before;
    std::pair<TwoTierStore*, const std::string*> arg(this, &flight);
    write_mu_.Await(absl::Condition(
        +[](std::pair<TwoTierStore*, const std::string*>* a)
             ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->first->in_flight_ != *a->second; },
        &arg));
    return dropped;
  }

  // Invalidation epochs. Every invalidation (a Delete here, or one announced by another
  // replica) bumps epoch_ and, while lookups are in progress, leaves a tombstone for its key;
  // a resubscription (messages may have been missed) clears the memory tier and marks the
  // epoch. A lookup (Redis read, then maybe a computation) notes the epoch it started at and
  // stores what it got only if its key was not invalidated since, checked and stored under
  // epoch_mu_, which Invalidate also holds while it erases: so a delete either comes after the
  // store (and erases it) or before it (and prevents it). After a resubscription a copy read
  // from Redis before it is not kept (a delete may have been missed); a computed context is
  // kept and written, since Redis refuses the write when the context was deleted meanwhile
  // (the delete counter), and the refused write then takes it out of memory too.
  class FlightEpoch {
   public:
    FlightEpoch(TwoTierStore* store, const std::string& tenant, const std::string& key)
        : store_(store), tenant_(tenant), key_(key) {
      absl::MutexLock lock(&store_->epoch_mu_);
      start_ = store_->epoch_;
      store_->flight_epochs_.insert(start_);
    }
    ~FlightEpoch() {
      absl::MutexLock lock(&store_->epoch_mu_);
      auto& epochs = store_->flight_epochs_;
      epochs.erase(epochs.find(start_));
      // Tombstones older than every lookup still in progress can no longer matter.
      auto& tombstones = store_->tombstones_;
      if (epochs.empty()) {
        tombstones.clear();
      } else if (!tombstones.empty()) {
        const uint64_t oldest = *epochs.begin();
        absl::erase_if(tombstones, [oldest](const auto& t) { return t.second <= oldest; });
      }
    }
    FlightEpoch(const FlightEpoch&) = delete;
    FlightEpoch& operator=(const FlightEpoch&) = delete;

    // Puts the context in the memory tier unless its key was invalidated since the lookup
    // began (see above; `computed`: made by this lookup, not read from Redis). True when it
    // is in memory.
    bool Store(std::shared_ptr<const CompressedContext> context, std::string write_id,
               bool computed) {
      absl::MutexLock lock(&store_->epoch_mu_);
      auto it = store_->tombstones_.find(FlightKey(tenant_, key_));
      if (it != store_->tombstones_.end() && it->second > start_) {
        invalidated_ = true;  // a delete heard: neither tier gets it
        store_->deleted_while_computing_.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      if (!computed && store_->cleared_epoch_ > start_) return false;
      return store_->memory_.Put(tenant_, key_, std::move(context), std::move(write_id));
    }
    // Whether Store found a delete of the key since the lookup began.
    bool invalidated() const { return invalidated_; }

   private:
    TwoTierStore* const store_;
    const std::string& tenant_;
    const std::string& key_;
    uint64_t start_ = 0;
    bool invalidated_ = false;
  };

  // Erases (tenant, key) from the memory tier and keeps lookups in progress from storing it
  // again. True when the memory tier held it.
  bool Invalidate(const std::string& tenant, const std::string& key) {
    absl::MutexLock lock(&epoch_mu_);
    ++epoch_;
    if (!flight_epochs_.empty()) tombstones_[FlightKey(tenant, key)] = epoch_;
    return memory_.Erase(tenant, key);
  }

  // Another replica's announcement (or our own, echoed: harmless).
  void OnInvalidation(const Invalidation& v) {
    invalidations_received_.fetch_add(1, std::memory_order_relaxed);
    if (v.kind == Invalidation::Kind::kDeleted) {
      Invalidate(v.tenant, v.key);
      DropQueuedWrite(v.tenant, v.key);
    } else {
      // Redis holds write v.write_id now: a copy of any other write is older (or unknown).
      memory_.EraseUnlessWriteId(v.tenant, v.key, v.write_id);
    }
  }

  // Subscribed (again): whatever was announced while not subscribed is lost, so forget every
  // context a missed announcement could have concerned (the memory tier refills from Redis).
  void OnSubscribed(bool first) {
    {
      absl::MutexLock lock(&epoch_mu_);
      ++epoch_;
      cleared_epoch_ = epoch_;
      memory_.Clear();
    }
    if (!first) {
      spdlog::warn(
          "redis tier: invalidation subscription re-established; the memory tier was cleared "
          "(deletes announced meanwhile may have been missed)");
    }
  }

  // Drops a queued write of (tenant, key) without waiting for one in progress (which the
  // delete counter stops, RedisTier::Write).
  void DropQueuedWrite(const std::string& tenant, const std::string& key) {
    absl::MutexLock lock(&write_mu_);
    std::erase_if(queue_, [&](const PendingWrite& w) {
      const bool match = w.tenant == tenant && w.key == key;
      if (match) queued_bytes_ -= w.bytes;
      return match;
    });
  }

  void WriterLoop() {
    while (true) {
      PendingWrite w;
      {
        absl::MutexLock lock(&write_mu_);
        write_mu_.Await(absl::Condition(
            +[](TwoTierStore* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
              return self->stopping_ || !self->queue_.empty();
            },
            this));
        if (stopping_) return;
        w = std::move(queue_.front());
        queue_.pop_front();
        queued_bytes_ -= w.bytes;
        in_flight_ = FlightKey(w.tenant, w.key);
      }
      if (breaker_.Allow()) {
        const absl::Status status = RedisPut(w);
        // Errors only: a slow write delays no request (see RedisOptions::circuit_slow_ms).
        breaker_.Record(IsRedisFailure(status), std::chrono::nanoseconds(0));
      } else {
        writes_dropped_.fetch_add(1, std::memory_order_relaxed);
      }
      bool drained;
      {
        absl::MutexLock lock(&write_mu_);
        in_flight_.clear();
        drained = queue_.empty();
      }
      // The encoded blob is freed by now, and the context too when no tier holds it: once
      // the queue is empty, give that memory back to the system. Workers trim after each job
      // (scheduler.cc), but a write finishes after its job's trim: in the memory soak the idle
      // RSS kept ~100 MiB of such freed memory (heap in use was tier + scratch + ~26 MiB).
      w = PendingWrite{};
      if (drained) malloc_trim(0);
    }
  }

  struct PendingWrite;
  absl::Status RedisPut(const PendingWrite& w) {
    const std::string& tenant = w.tenant;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::string> written =
        redis_->Write(tenant, w.key, *w.context, w.expected_deletes);
    const absl::Status& status = written.status();
    Observe(RedisOp::kPut,
            !status.ok() && !absl::IsResourceExhausted(status) && !absl::IsAborted(status), start);
    if (status.ok()) {
      redis_writes_.fetch_add(1, std::memory_order_relaxed);
      // The memory copy, if it is still this context, is now known to be that write; then
      // replicas holding another version drop theirs (our own echo finds ours current).
      memory_.SetWriteId(tenant, w.key, w.context.get(), *written);
      redis_->Announce(FormatInvalidation({Invalidation::Kind::kStored, tenant, w.key, *written}))
          .IgnoreError();
    } else if (absl::IsAborted(status)) {
      // Deleted (on some replica) while it was computed: not stored again, as it should be,
      // and not kept in memory either (a replica that missed the announcement kept it).
      deleted_while_computing_.fetch_add(1, std::memory_order_relaxed);
      memory_.EraseIfHolds(tenant, w.key, w.context.get());
    } else if (absl::IsResourceExhausted(status)) {
      redis_quota_skips_.fetch_add(1, std::memory_order_relaxed);
      quota_warning_.Log(absl::StrCat("redis tier: write skipped for tenant \"", tenant,
                                      "\": ", status.message()));
    } else {
      redis_errors_.fetch_add(1, std::memory_order_relaxed);
      write_warning_.Log(absl::StrCat("redis tier: write failed: ", status.message()));
    }
    return status;
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
  CircuitBreaker breaker_;

  struct PendingWrite {
    std::string tenant, key;
    std::shared_ptr<const CompressedContext> context;
    int64_t bytes = 0;  // MemoryTier::EntryBytes
    std::optional<int64_t> expected_deletes;  // the delete counter its lookup read
  };
  const int64_t max_queued_writes_;
  const int64_t max_queued_bytes_;
  mutable absl::Mutex write_mu_;
  std::deque<PendingWrite> queue_ ABSL_GUARDED_BY(write_mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(write_mu_) = 0;
  std::string in_flight_ ABSL_GUARDED_BY(write_mu_);  // FlightKey of the write in progress
  bool stopping_ ABSL_GUARDED_BY(write_mu_) = false;
  std::atomic<int64_t> writes_dropped_{0};
  std::thread writer_;  // only with a Redis tier
  std::atomic<int64_t> redis_hits_{0}, redis_misses_{0}, redis_errors_{0}, redis_corrupt_{0};
  std::atomic<int64_t> redis_wrong_model_{0}, redis_writes_{0}, redis_quota_skips_{0};
  std::atomic<int64_t> redis_read_errors_{0};
  std::atomic<int64_t> invalidations_received_{0}, deleted_while_computing_{0};
  absl::Mutex epoch_mu_ ABSL_ACQUIRED_BEFORE(write_mu_);
  uint64_t epoch_ ABSL_GUARDED_BY(epoch_mu_) = 0;
  uint64_t cleared_epoch_ ABSL_GUARDED_BY(epoch_mu_) = 0;
  absl::flat_hash_map<std::string, uint64_t> tombstones_ ABSL_GUARDED_BY(epoch_mu_);
  std::multiset<uint64_t> flight_epochs_ ABSL_GUARDED_BY(epoch_mu_);
  std::unique_ptr<InvalidationListener> listener_;  // with a Redis tier, unless disabled
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
  if (options.memory_tenant_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_tenant_bytes must be >= 0 (0 = no per-tenant share), got ",
                     options.memory_tenant_bytes));
  }
  if (!options.model_fingerprint.empty() && !IsLowerHex64(options.model_fingerprint)) {
    return absl::InvalidArgumentError(
        "model_fingerprint must be 64 lowercase hex characters (Model::fingerprint())");
  }
  const RedisOptions& r = options.redis;
  if (r.circuit_failures < 0 || r.circuit_slow_ms < 0 || r.circuit_cool_down_ms < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redis circuit settings must be >= 0 (failures ", r.circuit_failures, ", slow_ms ",
        r.circuit_slow_ms, ", cool_down_ms ", r.circuit_cool_down_ms, ")"));
  }
  if (r.write_queue_entries < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis write_queue_entries must be >= 1, got ", r.write_queue_entries));
  }
  if (r.write_queue_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis write_queue_bytes must be >= 1, got ", r.write_queue_bytes));
  }
  std::unique_ptr<RedisTier> redis;
  if (!options.redis.url.empty()) {
    ASSIGN_OR_RETURN(redis, RedisTier::Create(options.redis, options.model_fingerprint));
    // Connect now, so that the log says at start whether the shared tier works; an
    // unreachable Redis is not fatal (the client retries with backoff).
    if (absl::Status ping = redis->router().Ping(kNoRedisDeadline); ping.ok()) {
      spdlog::info("redis tier at {} (ttl {} s, quota {} bytes per tenant, prefix \"{}\")",
                   redis->router().endpoint(), options.redis.ttl_seconds,
                   options.redis.tenant_quota_bytes, options.redis.key_prefix);
    } else {
      spdlog::warn("redis tier at {} unreachable at start, serving without it until it is: {}",
                   redis->router().endpoint(), std::string(ping.message()));
    }
  }
  return std::unique_ptr<ContextStore>(new TwoTierStore(options, std::move(redis)));
}

}  // namespace ctxcache
