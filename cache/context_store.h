// The two-tier compressed-context cache the service uses: an in-process memory tier (LRU,
// bounded by bytes, holds decoded contexts) in front of an optional Redis tier (shared by
// every replica, holds codec blobs), with single flight per key so concurrent requests for
// the same missing context compute it once. The server sees only this class.
//
// Keys are computed by the caller (server: hex SHA-256 of tenant, model fingerprint,
// method+params+version, tokens, question) and are opaque here; tenants partition them (a
// tenant never sees another's entries, in either tier).
//
// Failure policy: the Redis tier is an optimisation. When it is unreachable, slow or returns
// damaged bytes, the store logs, counts and carries on from the memory tier or the compute
// function; only the compute function's own error fails a GetOrCompute.
//  * Every Redis operation ends by a deadline: the smaller of the caller's (passed in, steady
//    clock) and redis.command_timeout_ms, all its round trips together (redis_client.h).
//  * Writes never run on the caller's thread: a computed context goes to the memory tier and
//    into a bounded queue, and GetOrCompute returns; one background writer stores it in
//    Redis, where it succeeds or fails on its own. A full queue drops the write (counted).
//  * A circuit breaker (circuit_breaker.h) skips Redis for a cool-down after repeated errors
//    or slow operations, so a sick Redis costs requests nothing while it is open.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cache/circuit_breaker.h"
#include "cache/redis_client.h"
#include "common/stop.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache {

// Where a context came from.
enum class CacheTier : uint8_t { kComputed = 0, kMemory = 1, kRedis = 2 };
const char* CacheTierName(CacheTier tier);  // "computed", "memory", "redis"

struct RedisOptions {
  // redis://[user:pass@]host:port[/db], or redis-cluster://[user:pass@]host:port[,host:port...]
  // (cache/redis_cluster.h); empty = no Redis tier.
  std::string url;
  int pool_size = 4;                 // connections
  int connect_timeout_ms = 500;
  int command_timeout_ms = 1000;     // per operation, capped by the caller's deadline
  int64_t ttl_seconds = 24 * 3600;   // per entry; 0 = no expiry
  int64_t tenant_quota_bytes = 0;    // per tenant in Redis; 0 = unlimited
  std::string key_prefix = "ctxcache:";
  int64_t max_part_bytes = 4 << 20;  // values are split into parts of at most this
  // Reconnection: after a failed connect or a timed-out command, calls fail fast for a
  // backoff that doubles from the initial value up to the max (with +-20% jitter).
  int backoff_initial_ms = 100;
  int backoff_max_ms = 5000;
  // Circuit breaker (circuit_breaker.h): this many errors or slow reads in a row open it
  // (0: never); a read slower than circuit_slow_ms (plus, for a hit, the entry's transfer time
  // at 100 MB/s) counts as bad (0: only errors); open for
  // circuit_cool_down_ms before one probe. Writes count their errors only: they run in the
  // background, where their latency costs no request.
  int circuit_failures = 5;
  int circuit_slow_ms = 250;
  int circuit_cool_down_ms = 5000;
  // Writes waiting for the background writer, by count and by the contexts' resident bytes
  // (MemoryTier::EntryBytes); a write beyond either is dropped (counted). A context larger
  // than write_queue_bytes is still queued when nothing else waits, so that every size can be
  // stored. The bytes bound keeps a slow Redis from holding more than this much memory in
  // contexts the memory tier has already evicted.
  int write_queue_entries = 64;
  int64_t write_queue_bytes = int64_t{256} << 20;
  // Subscribe to the other replicas' invalidations (cache/invalidation.h), so that a context
  // deleted or replaced on any replica leaves every memory tier. Off only for tests and tools
  // that run one store alone.
  bool invalidation = true;
};

// The Redis commands the store issues, for RedisObserver.
enum class RedisOp : uint8_t { kGet = 0, kPut = 1, kDelete = 2 };
inline constexpr int kRedisOpCount = 3;
const char* RedisOpName(RedisOp op);  // "get", "put", "delete"

// Called after every Redis tier operation, on the thread that ran it (a request's, or the
// background writer's for puts): the operation, whether it
// failed on transport or with an error reply (what ContextStoreStats::redis_errors counts; a
// miss, a damaged or other-model entry and a quota skip are not errors), and its duration.
// Must be cheap and thread-safe (the server feeds its metrics from it).
using RedisObserver = std::function<void(RedisOp op, bool error, double seconds)>;

struct ContextStoreOptions {
  int64_t memory_bytes = 1LL << 30;  // memory tier budget, resident bytes (MemoryTier::EntryBytes)
  // Each tenant's share of the memory tier; 0 = none (MemoryTier: a tenant over its share
  // evicts its own contexts; a context larger than the share stays out of memory).
  int64_t memory_tenant_bytes = 0;
  RedisOptions redis;
  std::string model_fingerprint;     // blobs made by another model are misses (and replaced)
  RedisObserver redis_observer;      // optional
};

struct StoreResult {
  std::shared_ptr<const CompressedContext> context;
  CacheTier tier = CacheTier::kComputed;
  double compute_seconds = 0;  // time spent in the compute function (0 on a hit)
  // Which tiers held the context when the call returned: a context larger than the memory
  // tier's whole budget, with no Redis tier (or a full write queue), is in neither, and its
  // id will not be found later. in_redis: read from Redis, or its write queued (the write
  // finishes after the call returns and may still fail; counted).
  bool in_memory = false;
  bool in_redis = false;
};

struct ContextStoreStats {
  int64_t memory_bytes = 0, memory_entries = 0, memory_evictions = 0;
  int64_t memory_hits = 0, memory_misses = 0;
  // redis_misses counts every lookup that found nothing usable, including the corrupt and
  // wrong-model entries that redis_corrupt and redis_wrong_model count again by cause.
  // redis_errors: transport failures (unreachable, timeout, lost connection) and error
  // replies, on reads and writes alike.
  int64_t redis_hits = 0, redis_misses = 0, redis_errors = 0, redis_corrupt = 0;
  int64_t redis_read_errors = 0;   // the lookups among redis_errors (hits + misses + these = reads)
  int64_t redis_wrong_model = 0;   // entries made by another model (misses, then replaced)
  int64_t redis_writes = 0;        // entries stored
  int64_t redis_quota_skips = 0;   // writes skipped because the tenant's quota was full
  bool redis_connected = false;    // the last Redis command or connect succeeded
  // Background writes: waiting now, and dropped (queue full, circuit open, or shut down).
  int64_t redis_write_queue_depth = 0, redis_writes_dropped = 0;
  // Circuit breaker: state, times it opened, operations it skipped, slow reads it counted.
  CircuitState redis_circuit = CircuitState::kClosed;
  int64_t redis_circuit_opens = 0, redis_short_circuited = 0, redis_slow = 0;
  // Lookups in flight past the memory tier (Redis read or computation; single flight: one
  // per context however many callers wait on it).
  int64_t flights = 0;
  // Cross-replica invalidation (cache/invalidation.h): announcements heard (deletes and
  // stores, ours echoed included), whether the subscription is up, how often it was
  // re-established (each time the memory tier was cleared), messages that did not parse, and
  // lookups whose result was kept out of the tiers because the context was deleted meanwhile.
  int64_t invalidations_received = 0;
  bool invalidation_subscribed = false;
  int64_t invalidation_resubscriptions = 0, invalidation_malformed = 0;
  int64_t deleted_while_computing = 0;
  // Memory tier bytes per tenant (every tenant that stored a context; 0 when all evicted).
  std::map<std::string, int64_t> memory_tenant_bytes;
};

class ContextStore {
 public:
  using ComputeFn = std::function<absl::StatusOr<CompressedContext>()>;
  // Receives the flight's stop: it fires only when every caller waiting for this context
  // (single flight) has given up. The computation must ask it (Runner::set_stop).
  using FlightComputeFn = std::function<absl::StatusOr<CompressedContext>(const StopFn& stop)>;

  // Validates options (bad URL, negative sizes: InvalidArgument). An unreachable Redis is
  // not an error here: the store starts and keeps retrying with backoff.
  static absl::StatusOr<std::unique_ptr<ContextStore>> Create(const ContextStoreOptions& options);
  virtual ~ContextStore() = default;

  // Memory tier, then Redis tier (a hit is promoted to memory), else `compute` (the result is
  // put in memory and queued for Redis). Concurrent calls for the same (tenant, key) share
  // one lookup and one compute.
  //
  // `stop` is this caller's (its call's cancellation and deadline): it ends this caller's
  // wait with its status, and no sooner; a computation shared with other callers goes on
  // while any of them still waits (cache/single_flight.h). `deadline` (steady clock, the
  // call's) bounds the Redis lookup of a flight this caller leads, together with
  // redis.command_timeout_ms.
  virtual absl::StatusOr<StoreResult> GetOrCompute(const std::string& tenant,
                                                   const std::string& key,
                                                   const FlightComputeFn& compute,
                                                   const StopFn& stop,
                                                   RedisDeadline deadline = kNoRedisDeadline) = 0;
  // The same for a caller with no stop, whose computation ignores the flight's.
  absl::StatusOr<StoreResult> GetOrCompute(const std::string& tenant, const std::string& key,
                                           const ComputeFn& compute) {
    if (!compute) return absl::InvalidArgumentError("GetOrCompute: no compute function");
    return GetOrCompute(
        tenant, key, [&compute](const StopFn&) { return compute(); }, nullptr);
  }
  // Lookup only: NotFound when neither tier has it (a damaged or other-model entry in Redis
  // counts as absent). Unavailable when the memory tier misses and Redis cannot be asked: the
  // entry may exist, and asking again later may find it.
  virtual absl::StatusOr<StoreResult> Get(const std::string& tenant, const std::string& key,
                                          RedisDeadline deadline = kNoRedisDeadline) = 0;
  // Removes from both tiers; NotFound when neither had it. Unavailable when Redis cannot be
  // reached (the memory copy is gone, but Redis may still hold the entry).
  // A write still queued for the key is dropped, one in progress waited for.
  virtual absl::Status Delete(const std::string& tenant, const std::string& key,
                              RedisDeadline deadline = kNoRedisDeadline) = 0;
  // Waits until every queued Redis write has finished (stored or failed), up to `timeout`;
  // false when some were still pending. For tests, tools and an orderly shutdown.
  virtual bool WaitForWrites(absl::Duration timeout) = 0;
  // Drops the memory tier (tests and operators: "serve from Redis now").
  virtual void ClearMemory() = 0;
  virtual ContextStoreStats Stats() const = 0;
};

}  // namespace ctxcache
