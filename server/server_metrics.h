// The server's Prometheus metrics (names and meanings: server/README.md, "Metrics"; the
// Grafana dashboard and alert rules depend on the names, so do not rename). One ServerMetrics
// per ServerInstance, so servers run in one process (tests) count separately.
//
// Hot paths hold handles: per-RPC histograms and a per-RPC table of status-code counters that
// is filled on first use of a code (an atomic pointer load per call afterwards), Redis
// operation handles per op, and the token and byte counters. Label lookups happen only for
// the per-request labels whose values are not known in advance (compression method, tenant),
// once per compression or per Generate. Store and scheduler figures are read at scrape time.
#pragma once

#include <array>
#include <atomic>
#include <functional>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "cache/context_store.h"
#include "common/metrics.h"
#include "engine/compress/compressed_context.h"
#include "server/auth.h"
#include "server/scheduler.h"

namespace ctxcache::server {

struct GenerateOutcome;

// Tenants with their own ctxcache_tenant_* series; the rest share tenant="other".
inline constexpr size_t kMaxTenantSeries = 50;

// The label value of a gRPC status code ("OK", "INVALID_ARGUMENT", ...).
const char* GrpcCodeName(int code);

class ServerMetrics {
 public:
  // `version`: the build's version (ctxcache_build_info).
  explicit ServerMetrics(const std::string& version);

  metrics::Registry& registry() { return registry_; }
  // Text exposition (runs the collectors).
  std::string Render() const { return registry_.Render(); }

  // One finished call: `grpc_code` is the code the client receives (after ToGrpcStatus).
  // `rpc` is one of the service's method names.
  void RecordCall(const char* rpc, int grpc_code, double seconds);
  // A successful Generate: tokens, KV bytes, time to first token, bytes saved (overall and for
  // the tenant).
  void RecordGenerate(const GenerateOutcome& out, const std::string& tenant);
  // A compression that was actually computed (not served from a cache tier).
  void RecordCompression(const std::string& method, double seconds,
                         const CompressedContext& context);
  // Feeds ctxcache_redis_* (ContextStoreOptions::redis_observer).
  void RecordRedis(RedisOp op, bool error, double seconds);
  RedisObserver MakeRedisObserver();

  // The sources read at scrape time; set once loaded, cleared before they are destroyed.
  struct Sources {
    std::function<ContextStoreStats()> store;
    std::function<SchedulerStats()> scheduler;
    bool redis_enabled = false;
    std::string model;
    std::vector<std::string> worker_devices;  // per engine worker (ctxcache_workers_by_device)
  };
  void SetSources(Sources sources);
  void ClearSources();

  // Authentication and TLS (server/auth.h, server/tls.h).
  void RecordAuthRefused(AuthRefusal reason);
  void RecordAuthReload(const char* file, bool ok);
  void RecordTlsReload(bool ok);
  void SetTlsExpiry(int64_t not_after_unix);
  // Read at scrape time for ctxcache_auth_throttled_peers; an empty function clears it.
  void SetThrottledPeersSource(std::function<size_t()> source);

 private:
  static constexpr int kCodes = 17;
  struct Rpc {
    const char* name;
    metrics::Histogram* duration;
    std::array<std::atomic<metrics::Counter*>, kCodes> codes{};
  };
  Rpc* FindRpc(const char* rpc);
  void Collect();

  metrics::Registry registry_;
  metrics::CounterFamily& requests_;
  metrics::HistogramFamily& request_duration_;
  std::array<Rpc, 5> rpcs_;
  metrics::Histogram& ttft_;
  metrics::HistogramFamily& compression_duration_;
  metrics::HistogramFamily& compression_ratio_;
  metrics::Counter &prompt_tokens_, &context_tokens_original_, &context_tokens_kept_,
      &generated_tokens_, &kv_bytes_full_, &kv_bytes_used_, &kv_bytes_attended_;
  metrics::Histogram& kv_bytes_saved_;
  metrics::CounterFamily& tenant_saved_;
  std::array<metrics::Counter*, kRedisOpCount> redis_ops_{}, redis_errors_{};
  std::array<metrics::Histogram*, kRedisOpCount> redis_duration_{};
  // Scrape-time families.
  metrics::CounterFamily& lookups_;
  metrics::GaugeFamily &cache_bytes_, &cache_entries_;
  metrics::CounterFamily& evictions_;
  metrics::GaugeFamily& redis_up_;
  // Redis circuit breaker and background writer (ContextStoreStats).
  metrics::GaugeFamily &redis_circuit_, &redis_write_queue_;
  metrics::CounterFamily &redis_circuit_opens_, &redis_short_circuited_, &redis_slow_,
      &redis_writes_dropped_;
  // Cross-replica invalidation (cache/invalidation.h).
  metrics::GaugeFamily& invalidation_subscribed_;
  metrics::CounterFamily &invalidations_, &invalidation_resyncs_, &invalidations_malformed_,
      &deleted_while_computing_;
  metrics::Gauge &queue_depth_, &running_, &workers_, &worker_scratch_, &rss_,
      &heap_in_use_;
  // Per tenant (tenant capacity), read from the scheduler and the memory tier.
  metrics::CounterFamily& tenant_refused_;
  metrics::GaugeFamily &tenant_in_flight_, &tenant_memory_bytes_;
  metrics::Counter& busy_seconds_;
  metrics::Counter& batch_steps_;
  metrics::Counter& batch_sequences_;
  metrics::Counter& batch_interleaved_steps_;
  metrics::GaugeFamily& build_info_;
  metrics::GaugeFamily& workers_by_device_;
  metrics::CounterFamily &auth_refused_, &auth_reloads_, &tls_reloads_;
  metrics::GaugeFamily& tls_expiry_;
  metrics::Gauge& auth_throttled_;
  const std::string version_;

  std::mutex sources_mu_;
  Sources sources_;                          // guarded by sources_mu_
  std::function<size_t()> throttled_peers_;  // guarded by sources_mu_
};

}  // namespace ctxcache::server
