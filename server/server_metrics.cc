// The server's metrics (see server_metrics.h and server/README.md, "Metrics").
#include "server/server_metrics.h"

#include <malloc.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <type_traits>

#include "server/handlers.h"

namespace ctxcache::server {
namespace {

using metrics::ExponentialBuckets;
using metrics::LatencyBuckets;

constexpr const char* kRpcNames[] = {"Compress", "Generate", "GetContext", "DeleteContext",
                                     "GetModelInfo"};

// Resident set size from /proc/self/statm (pages); 0 when unreadable.
double ResidentBytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long long size = 0, resident = 0;
  const int n = std::fscanf(f, "%lld %lld", &size, &resident);
  std::fclose(f);
  if (n != 2) return 0;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

// Bytes the allocator has handed out and not taken back (glibc's mallinfo2: arena chunks in
// use plus mmapped blocks): what RSS would be without the free memory malloc keeps; 0 where
// unknown. It walks every arena's free chunks under that arena's lock: measured ~25 ms with
// 100k free chunks on a loaded core (the memory soak's server had ~6k), once per scrape.
double HeapInUseBytes() {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 m = mallinfo2();
  return static_cast<double>(m.uordblks + m.hblkhd);
#else
  return 0;
#endif
}

// Mirrors a total kept elsewhere. Derived totals (redis misses less corrupt and wrong-model)
// come from separate loads and could step back by one for a scrape; a counter must never
// decrease (Prometheus would read a reset), so it holds its highest value.
void SetTotal(metrics::Counter& counter, double value) {
  if (value > counter.Value()) counter.Set(value);
}

}  // namespace

const char* GrpcCodeName(int code) {
  static constexpr const char* kNames[] = {
      "OK",        "CANCELLED",          "UNKNOWN",           "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",       "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (code < 0 || code >= static_cast<int>(std::size(kNames))) return "UNKNOWN";
  return kNames[code];
}

ServerMetrics::ServerMetrics(const std::string& version)
    : requests_(registry_.AddCounter("ctxcache_requests_total",
                                     "RPCs finished, by method and gRPC status code.",
                                     {"rpc", "code"})),
      request_duration_(registry_.AddHistogram(
          "ctxcache_request_duration_seconds",
          "Time from a call's arrival to its status (queueing and streaming included).", {"rpc"},
          LatencyBuckets())),
      ttft_(registry_
                .AddHistogram("ctxcache_ttft_seconds",
                              "Generate: time to first token from the start of work (contexts "
                              "loaded or compressed, composed, prompt prefilled).",
                              {}, LatencyBuckets())
                .Get()),
      compression_duration_(registry_.AddHistogram(
          "ctxcache_compression_duration_seconds",
          "Time to compress a document, when computed (cache hits are not observed).", {"method"},
          {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300})),
      compression_ratio_(registry_.AddHistogram(
          "ctxcache_compression_ratio",
          "Original KV entries over kept entries of each computed compression.", {"method"},
          {1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64})),
      prompt_tokens_(registry_
                         .AddCounter("ctxcache_prompt_tokens_total",
                                     "Generate: prompt tokens prefilled (contexts excluded).")
                         .Get()),
      context_tokens_original_(
          registry_
              .AddCounter("ctxcache_context_tokens_original_total",
                          "Generate: tokens of the original documents behind the contexts used.")
              .Get()),
      context_tokens_kept_(
          registry_
              .AddCounter("ctxcache_context_tokens_kept_total",
                          "Generate: context tokens kept (mean per layer and KV head, summed "
                          "over contexts; Usage.context_tokens_kept).")
              .Get()),
      generated_tokens_(
          registry_.AddCounter("ctxcache_generated_tokens_total", "Generate: tokens generated.")
              .Get()),
      kv_bytes_full_(registry_
                         .AddCounter("ctxcache_kv_bytes_full_total",
                                     "Generate: fp16 K+V bytes an uncompressed cache of the "
                                     "contexts, prompt and answer would hold.")
                         .Get()),
      kv_bytes_used_(registry_
                         .AddCounter("ctxcache_kv_bytes_used_total",
                                     "Generate: fp16 K+V bytes the request's cache held.")
                         .Get()),
      kv_bytes_attended_(registry_
                             .AddCounter("ctxcache_kv_bytes_attended_total",
                                         "Generate: fp16 K+V bytes the generation attended "
                                         "over (less than used when selected per query).")
                             .Get()),
      kv_bytes_saved_(registry_
                          .AddHistogram("ctxcache_kv_bytes_saved_per_request",
                                        "Generate: KV bytes saved per successful request "
                                        "(Usage.kv_bytes_saved).",
                                        {}, ExponentialBuckets(65536, 4, 9))
                          .Get()),
      tenant_saved_(registry_.AddCounter(
          "ctxcache_tenant_kv_bytes_saved_total",
          "Generate: KV bytes saved, by tenant (the first 50 tenants seen; the rest as \"other\").",
          {"tenant"}, kMaxTenantSeries)),
      lookups_(registry_.AddCounter(
          "ctxcache_cache_lookups_total",
          "Context cache lookups by tier and result (redis: miss excludes corrupt and "
          "wrong_model; error = Redis unreachable, slow or failing).",
          {"tier", "result"})),
      cache_bytes_(
          registry_.AddGauge("ctxcache_cache_bytes", "Bytes held by a cache tier.", {"tier"})),
      cache_entries_(
          registry_.AddGauge("ctxcache_cache_entries", "Entries held by a cache tier.", {"tier"})),
      evictions_(registry_.AddCounter("ctxcache_cache_evictions_total",
                                      "Entries evicted from a cache tier to make room.", {"tier"})),
      redis_up_(registry_.AddGauge(
          "ctxcache_redis_up",
          "1 when the last Redis command or connect succeeded, else 0 (only with a Redis tier).")),
      redis_circuit_(registry_.AddGauge(
          "ctxcache_redis_circuit_state",
          "Redis circuit breaker: 0 closed (Redis used), 1 open (skipped after repeated errors "
          "or slow operations), 2 half-open (the next operation probes).")),
      redis_write_queue_(
          registry_.AddGauge("ctxcache_redis_write_queue_depth",
                             "Computed contexts waiting for the background Redis writer.")),
      redis_circuit_opens_(registry_.AddCounter("ctxcache_redis_circuit_opens_total",
                                                "Times the Redis circuit breaker opened.")),
      redis_short_circuited_(
          registry_.AddCounter("ctxcache_redis_short_circuited_total",
                               "Redis operations skipped because the circuit breaker was open.")),
      redis_slow_(registry_.AddCounter(
          "ctxcache_redis_slow_operations_total",
          "Redis reads that succeeded but took longer than the breaker's slow threshold.")),
      redis_writes_dropped_(registry_.AddCounter(
          "ctxcache_redis_writes_dropped_total",
          "Computed contexts not written to Redis: write queue full, circuit open, or "
          "shutdown.")),
      invalidation_subscribed_(registry_.AddGauge(
          "ctxcache_redis_invalidation_subscribed",
          "1 while this replica hears the other replicas' deletes (Redis pub/sub), else 0.")),
      invalidations_(registry_.AddCounter(
          "ctxcache_redis_invalidations_total",
          "Delete and store announcements heard from the replicas (this one's included).")),
      invalidation_resyncs_(registry_.AddCounter(
          "ctxcache_redis_invalidation_resyncs_total",
          "Times the invalidation subscription was re-established and the memory tier cleared, "
          "since announcements may have been missed.")),
      invalidations_malformed_(
          registry_.AddCounter("ctxcache_redis_invalidations_malformed_total",
                               "Messages on the invalidation channel that did not parse.")),
      deleted_while_computing_(registry_.AddCounter(
          "ctxcache_cache_deleted_while_computing_total",
          "Contexts deleted (on any replica) while this one read or computed them: returned to "
          "the caller but kept out of both tiers.")),
      queue_depth_(
          registry_.AddGauge("ctxcache_queue_depth", "Requests waiting for an engine worker.")
              .Get()),
      running_(
          registry_.AddGauge("ctxcache_running_requests", "Requests running on engine workers.")
              .Get()),
      workers_(registry_.AddGauge("ctxcache_workers", "Engine workers.").Get()),
      worker_scratch_(registry_
                          .AddGauge("ctxcache_worker_scratch_bytes",
                                    "Scratch buffers the engine workers keep between requests "
                                    "(each up to 128 MiB), as of each worker's last request.")
                          .Get()),
      rss_(registry_
               .AddGauge("ctxcache_process_resident_memory_bytes",
                         "Resident memory of the server process (/proc/self/statm).")
               .Get()),
      heap_in_use_(registry_
                       .AddGauge("ctxcache_heap_in_use_bytes",
                                 "Heap memory in use (malloc's, glibc mallinfo2): resident "
                                 "memory less what the allocator keeps free and the mapped "
                                 "model.")
                       .Get()),
      tenant_refused_(registry_.AddCounter(
          "ctxcache_tenant_requests_refused_total",
          "Calls refused (RESOURCE_EXHAUSTED) because their tenant already had "
          "tenant_max_inflight requests queued or running.",
          {"tenant"}, kMaxTenantSeries)),
      tenant_in_flight_(registry_.AddGauge(
          "ctxcache_tenant_requests_in_flight",
          "Requests a tenant has queued or running (what tenant_max_inflight bounds).", {"tenant"},
          kMaxTenantSeries)),
      tenant_memory_bytes_(registry_.AddGauge(
          "ctxcache_tenant_memory_cache_bytes",
          "Memory tier bytes held by a tenant's contexts (what tenant_memory_cache_bytes "
          "bounds).",
          {"tenant"}, kMaxTenantSeries)),
      busy_seconds_(registry_
                        .AddCounter("ctxcache_worker_busy_seconds_total",
                                    "Time engine workers spent running batched steps and "
                                    "exclusive work (compression, selection, composition), "
                                    "summed over workers.")
                        .Get()),
      batch_steps_(registry_
                       .AddCounter("ctxcache_batch_steps_total",
                                   "Batched forward passes (continuous batching steps) run by "
                                   "the engine workers.")
                       .Get()),
      batch_sequences_(registry_
                           .AddCounter("ctxcache_batch_sequences_total",
                                       "Sequences those steps carried: divided by "
                                       "ctxcache_batch_steps_total, the mean batch size.")
                           .Get()),
      batch_interleaved_steps_(
          registry_
              .AddCounter("ctxcache_batch_interleaved_steps_total",
                          "Of the batched steps, those run between the layers of a worker's "
                          "exclusive work (a compression's passes), so that the worker's "
                          "generations kept going while it ran.")
              .Get()),
      build_info_(registry_.AddGauge("ctxcache_build_info",
                                     "Always 1: the server's version and served model.",
                                     {"version", "model"})),
      workers_by_device_(registry_.AddGauge(
          "ctxcache_workers_by_device",
          "Engine workers per device (--device): \"cpu\", or a GPU as \"cuda:N (name)\".",
          {"device"})),
      auth_refused_(registry_.AddCounter(
          "ctxcache_auth_refused_total",
          "Calls refused by authentication, by reason (missing_credentials, malformed_header, "
          "unknown_token, unmapped_certificate, tenant_mismatch, throttled).",
          {"reason"})),
      auth_reloads_(registry_.AddCounter(
          "ctxcache_auth_reloads_total",
          "Reloads of the token file (file=\"tokens\") and the client-certificate tenants file "
          "(file=\"client_tenants\"): ok = in use, refused = the old set was kept.",
          {"file", "result"})),
      tls_reloads_(registry_.AddCounter(
          "ctxcache_tls_reloads_total",
          "Certificate changes seen on disk: ok = served to new connections, refused = invalid, "
          "the old certificate is still served.",
          {"result"})),
      tls_expiry_(registry_.AddGauge(
          "ctxcache_tls_certificate_expiry_timestamp_seconds",
          "Expiry (notAfter, Unix seconds) of the certificate the server presents; absent "
          "without TLS.")),
      auth_throttled_(registry_
                          .AddGauge("ctxcache_auth_throttled_peers",
                                    "Peer addresses whose calls are refused for too many failed "
                                    "authentications in the last minute (auth_failure_limit).")
                          .Get()),
      version_(version) {
  for (int r = 0; r < kAuthRefusalCount; ++r) {
    auth_refused_.WithLabels({AuthRefusalName(static_cast<AuthRefusal>(r))});
  }
  for (size_t i = 0; i < rpcs_.size(); ++i) {
    rpcs_[i].name = kRpcNames[i];
    rpcs_[i].duration = &request_duration_.WithLabels({kRpcNames[i]});
  }
  auto& ops = registry_.AddCounter("ctxcache_redis_operations_total",
                                   "Redis tier operations issued by the context store.", {"op"});
  auto& errors = registry_.AddCounter(
      "ctxcache_redis_errors_total",
      "Redis tier operations that failed (transport, timeout, error reply).", {"op"});
  auto& duration = registry_.AddHistogram(
      "ctxcache_redis_operation_duration_seconds", "Duration of Redis tier operations.", {"op"},
      {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5});
  for (int i = 0; i < kRedisOpCount; ++i) {
    const std::string op = RedisOpName(static_cast<RedisOp>(i));
    redis_ops_[i] = &ops.WithLabels({op});
    redis_errors_[i] = &errors.WithLabels({op});
    redis_duration_[i] = &duration.WithLabels({op});
  }
  rss_.Set(ResidentBytes());
  heap_in_use_.Set(HeapInUseBytes());
  registry_.AddCollector([this] { Collect(); });
}

ServerMetrics::Rpc* ServerMetrics::FindRpc(const char* rpc) {
  for (Rpc& r : rpcs_) {
    if (r.name == rpc || std::strcmp(r.name, rpc) == 0) return &r;
  }
  return nullptr;
}

void ServerMetrics::RecordCall(const char* rpc, int grpc_code, double seconds) {
  Rpc* r = FindRpc(rpc);
  if (r == nullptr) {  // not one of ours: count it without the per-code cache
    requests_.WithLabels({rpc, GrpcCodeName(grpc_code)}).Inc();
    request_duration_.WithLabels({rpc}).Observe(seconds);
    return;
  }
  r->duration->Observe(seconds);
  const int c = grpc_code >= 0 && grpc_code < kCodes ? grpc_code : 2;  // UNKNOWN
  metrics::Counter* counter = r->codes[c].load(std::memory_order_acquire);
  if (counter == nullptr) {
    counter = &requests_.WithLabels({r->name, GrpcCodeName(c)});
    r->codes[c].store(counter, std::memory_order_release);
  }
  counter->Inc();
}

void ServerMetrics::RecordGenerate(const GenerateOutcome& out, const std::string& tenant) {
  const GenerateResult& r = out.result;
  // The same figures as the response's Usage (convert.cc).
  ttft_.Observe(out.context_seconds + r.prefill_seconds);
  prompt_tokens_.Add(static_cast<double>(r.prompt_tokens));
  generated_tokens_.Add(static_cast<double>(r.tokens.size()));
  double original = 0, kept = 0;
  for (const ContextOutcome& c : out.contexts) {
    const CompressedContext& ctx = *c.context;
    original += static_cast<double>(ctx.source_tokens);
    const int64_t heads = int64_t{ctx.kv.n_layers()} * ctx.kv.n_kv_heads();
    if (heads > 0) kept += static_cast<double>(ctx.KeptEntries()) / heads;
  }
  context_tokens_original_.Add(original);
  context_tokens_kept_.Add(kept);
  kv_bytes_full_.Add(static_cast<double>(out.kv_bytes_full));
  kv_bytes_used_.Add(static_cast<double>(out.kv_bytes_used));
  kv_bytes_attended_.Add(static_cast<double>(out.kv_bytes_attended));
  const double saved = static_cast<double>(out.kv_bytes_full - out.kv_bytes_used);
  kv_bytes_saved_.Observe(saved);
  tenant_saved_.WithLabels({tenant}).Add(saved);
}

void ServerMetrics::RecordCompression(const std::string& method, double seconds,
                                      const CompressedContext& context) {
  compression_duration_.WithLabels({method}).Observe(seconds);
  const int64_t kept = context.KeptEntries();
  if (kept > 0) {
    compression_ratio_.WithLabels({method}).Observe(static_cast<double>(context.FullEntries()) /
                                                    static_cast<double>(kept));
  }
}

void ServerMetrics::RecordRedis(RedisOp op, bool error, double seconds) {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= kRedisOpCount) return;
  redis_ops_[i]->Inc();
  if (error) redis_errors_[i]->Inc();
  redis_duration_[i]->Observe(seconds);
}

RedisObserver ServerMetrics::MakeRedisObserver() {
  return [this](RedisOp op, bool error, double seconds) { RecordRedis(op, error, seconds); };
}

void ServerMetrics::SetSources(Sources sources) {
  std::lock_guard<std::mutex> lock(sources_mu_);
  sources_ = std::move(sources);
}

void ServerMetrics::ClearSources() {
  std::lock_guard<std::mutex> lock(sources_mu_);
  sources_ = Sources{};
}

namespace {

// Sets per-tenant series from `values`; tenants past the family's cap share the "other"
// series, which gets their sum (one Set per series, so folded tenants do not overwrite each
// other). Counters mirror monotonic totals, and so does their sum.
template <typename Family, typename Map, typename Get>
void SetPerTenant(Family& family, const Map& values, Get get) {
  std::map<std::remove_reference_t<decltype(family.Get())>*, double> sums;
  for (const auto& [tenant, v] : values) sums[&family.WithLabels({tenant})] += get(v);
  for (const auto& [series, sum] : sums) {
    if constexpr (std::is_same_v<Family, metrics::CounterFamily>) {
      SetTotal(*series, sum);
    } else {
      series->Set(sum);
    }
  }
}

}  // namespace

void ServerMetrics::RecordAuthRefused(AuthRefusal reason) {
  auth_refused_.WithLabels({AuthRefusalName(reason)}).Inc();
}

void ServerMetrics::RecordAuthReload(const char* file, bool ok) {
  auth_reloads_.WithLabels({file, ok ? "ok" : "refused"}).Inc();
}

void ServerMetrics::RecordTlsReload(bool ok) {
  tls_reloads_.WithLabels({ok ? "ok" : "refused"}).Inc();
}

void ServerMetrics::SetTlsExpiry(int64_t not_after_unix) {
  tls_expiry_.Get().Set(static_cast<double>(not_after_unix));
}

void ServerMetrics::SetThrottledPeersSource(std::function<size_t()> source) {
  std::lock_guard<std::mutex> lock(sources_mu_);
  throttled_peers_ = std::move(source);
}

void ServerMetrics::Collect() {
  rss_.Set(ResidentBytes());
  heap_in_use_.Set(HeapInUseBytes());
  std::lock_guard<std::mutex> lock(sources_mu_);
  auth_throttled_.Set(throttled_peers_ ? static_cast<double>(throttled_peers_()) : 0);
  if (sources_.store) {
    const ContextStoreStats s = sources_.store();
    SetTotal(lookups_.WithLabels({"memory", "hit"}), static_cast<double>(s.memory_hits));
    SetTotal(lookups_.WithLabels({"memory", "miss"}), static_cast<double>(s.memory_misses));
    cache_bytes_.WithLabels({"memory"}).Set(static_cast<double>(s.memory_bytes));
    cache_entries_.WithLabels({"memory"}).Set(static_cast<double>(s.memory_entries));
    SetTotal(evictions_.WithLabels({"memory"}), static_cast<double>(s.memory_evictions));
    SetPerTenant(tenant_memory_bytes_, s.memory_tenant_bytes,
                 [](int64_t bytes) { return static_cast<double>(bytes); });
    if (sources_.redis_enabled) {
      auto redis = [&](const char* result, int64_t value) {
        SetTotal(lookups_.WithLabels({"redis", result}), static_cast<double>(value));
      };
      redis("hit", s.redis_hits);
      redis("miss", s.redis_misses - s.redis_corrupt - s.redis_wrong_model);
      redis("corrupt", s.redis_corrupt);
      redis("wrong_model", s.redis_wrong_model);
      redis("error", s.redis_read_errors);
      redis_up_.Get().Set(s.redis_connected ? 1 : 0);
      redis_circuit_.Get().Set(static_cast<double>(s.redis_circuit));
      redis_write_queue_.Get().Set(static_cast<double>(s.redis_write_queue_depth));
      SetTotal(redis_circuit_opens_.Get(), static_cast<double>(s.redis_circuit_opens));
      SetTotal(redis_short_circuited_.Get(), static_cast<double>(s.redis_short_circuited));
      SetTotal(redis_slow_.Get(), static_cast<double>(s.redis_slow));
      SetTotal(redis_writes_dropped_.Get(), static_cast<double>(s.redis_writes_dropped));
      invalidation_subscribed_.Get().Set(s.invalidation_subscribed ? 1 : 0);
      SetTotal(invalidations_.Get(), static_cast<double>(s.invalidations_received));
      SetTotal(invalidation_resyncs_.Get(), static_cast<double>(s.invalidation_resubscriptions));
      SetTotal(invalidations_malformed_.Get(), static_cast<double>(s.invalidation_malformed));
      SetTotal(deleted_while_computing_.Get(), static_cast<double>(s.deleted_while_computing));
    }
  }
  if (sources_.scheduler) {
    const SchedulerStats s = sources_.scheduler();
    queue_depth_.Set(s.queued);
    running_.Set(s.running);
    workers_.Set(s.workers);
    worker_scratch_.Set(static_cast<double>(s.scratch_bytes));
    SetTotal(busy_seconds_, s.busy_seconds);
    SetTotal(batch_steps_, static_cast<double>(s.steps));
    SetTotal(batch_sequences_, static_cast<double>(s.step_sequences));
    SetTotal(batch_interleaved_steps_, static_cast<double>(s.interleaved_steps));
    SetPerTenant(tenant_in_flight_, s.tenants,
                 [](const TenantSchedulerStats& t) { return static_cast<double>(t.in_flight); });
    SetPerTenant(tenant_refused_, s.tenants,
                 [](const TenantSchedulerStats& t) { return static_cast<double>(t.refused); });
  }
  if (!sources_.model.empty()) build_info_.WithLabels({version_, sources_.model}).Set(1);
  std::map<std::string, int> by_device;
  for (const std::string& d : sources_.worker_devices) ++by_device[d];
  for (const auto& [device, n] : by_device) workers_by_device_.WithLabels({device}).Set(n);
}

}  // namespace ctxcache::server
