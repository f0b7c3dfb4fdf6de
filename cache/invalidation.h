// Cross-replica invalidation of the memory tiers: what one replica announces on Redis pub/sub
// when it deletes or stores a context, and the subscriber every replica runs to hear it.
//
// Why pub/sub: a message reaches every replica subscribed at that moment within milliseconds,
// on one node or a cluster (a cluster forwards PUBLISH to every node, so a replica may
// subscribe on any of them). It is not durable: a replica whose subscription broke misses what
// was published meanwhile. So, as Redis's own client-side caching does when its invalidation
// connection drops, a replica forgets what it may have missed: every (re)subscription calls
// on_subscribed, where the store drops its memory tier (it refills from Redis).
//
// Messages come from a shared Redis and are parsed as untrusted input (fuzzed):
//   "ctxinv1 d <tenant> <key> -"         the context was deleted
//   "ctxinv1 s <tenant> <key> <write id>"  the context in Redis is now this write
// tenant and key escaped as in the Redis key layout (RedisTier::Escape); write ids are 32
// lowercase hex digits.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cache/redis_client.h"

namespace ctxcache {

struct Invalidation {
  enum class Kind : uint8_t { kDeleted = 0, kStored = 1 };
  Kind kind = Kind::kDeleted;
  std::string tenant, key;  // as the store names them (not escaped)
  std::string write_id;     // kStored: the entry Redis holds now
};
std::string FormatInvalidation(const Invalidation& invalidation);
// DataLoss unless `text` is exactly what FormatInvalidation writes.
absl::StatusOr<Invalidation> ParseInvalidation(std::string_view text);
// The inverse of RedisTier::Escape; DataLoss for anything Escape cannot have written.
absl::StatusOr<std::string> UnescapeRedisName(std::string_view escaped);

struct InvalidationListenerOptions {
  std::string channel;
  // Where to subscribe, preferred first; asked again at every reconnection (a cluster's
  // primaries change). Each carries the credentials.
  std::function<std::vector<RedisUrl>()> nodes;
  // Called on the listener's thread, in order; must not block for long.
  std::function<void(const Invalidation&)> on_message;
  // Called after every successful SUBSCRIBE, before the messages that follow it.
  std::function<void(bool first)> on_subscribed;
  int connect_timeout_ms = 500;
  // A PING on the subscription this often; a connection that does not answer within the
  // next interval is dropped and opened again (a node that vanished without a FIN).
  int ping_interval_ms = 2000;
  int backoff_initial_ms = 100;
  int backoff_max_ms = 5000;
};

class InvalidationListener {
 public:
  // Starts the subscriber thread at once.
  explicit InvalidationListener(InvalidationListenerOptions options);
  ~InvalidationListener();  // stops it (within ~kPollMs plus a connect timeout) and joins
  InvalidationListener(const InvalidationListener&) = delete;
  InvalidationListener& operator=(const InvalidationListener&) = delete;

  static constexpr int kPollMs = 50;

  bool subscribed() const { return subscribed_.load(std::memory_order_relaxed); }
  int64_t messages() const { return messages_.load(std::memory_order_relaxed); }
  int64_t malformed() const { return malformed_.load(std::memory_order_relaxed); }
  // Subscriptions after the first: each may have missed messages.
  int64_t resubscriptions() const { return resubscriptions_.load(std::memory_order_acquire); }
  // Waits until subscribed (true), or the first attempt failed, or the timeout passed.
  bool WaitFirstAttempt(absl::Duration timeout) const;

 private:
  void Run();
  // One connection's life: connect, subscribe, read until it fails or the listener stops.
  // The reason it ended; *subscribed when it got as far as subscribing (and *ever_subscribed
  // from then on).
  std::string Session(const RedisUrl& node, bool* ever_subscribed, bool* subscribed);
  bool SleepUnlessStopping(int64_t ms);

  const InvalidationListenerOptions options_;
  std::atomic<bool> subscribed_{false};
  std::atomic<int64_t> messages_{0}, malformed_{0}, resubscriptions_{0}, attempts_{0};
  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace ctxcache
