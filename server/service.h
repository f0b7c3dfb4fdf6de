// The ctxcache.v1.ContextCache gRPC service (callback API). Each handler authenticates the
// call, converts and validates the request on the network thread, and hands the work to the
// engine scheduler (Compress, Generate) or to a small I/O pool (GetContext, DeleteContext:
// cache lookups that may wait on Redis); reactors only enqueue and write. Streams coalesce
// text written while a previous write is in flight, so a slow client never blocks a worker.
//
// Before Attach (model loading) every call is UNAVAILABLE; after BeginDrain new calls are
// UNAVAILABLE while in-flight ones finish.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "ctxcache/v1/ctxcache.grpc.pb.h"
#include "server/auth.h"
#include "server/handlers.h"
#include "server/scheduler.h"
#include "server/server_metrics.h"

namespace ctxcache::server {

class IoExecutor;

struct ServiceInfo {
  bool redis_enabled = false;
  int workers = 0;
  int tenant_max_inflight = 0;            // reported in GetModelInfo limits
  int64_t tenant_memory_cache_bytes = 0;
  std::vector<std::string> worker_devices;  // per engine worker: "cpu", "cuda:0 (...)"
};

class ContextCacheService final : public ctxcache::v1::ContextCache::CallbackService {
 public:
  // `metrics` (optional) must outlive the service.
  // `auth` is shared with the server, which reloads its files.
  explicit ContextCacheService(std::shared_ptr<Authenticator> auth,
                               ServerMetrics* metrics = nullptr);
  ~ContextCacheService() override;

  // Makes the service ready (the objects outlive the service's calls).
  void Attach(const Handlers* handlers, Scheduler* scheduler, const ServiceInfo& info);
  // New calls are refused (UNAVAILABLE) from now on.
  void BeginDrain();
  // Waits until no call is in flight or `deadline`; true when idle.
  bool WaitIdle(std::chrono::steady_clock::time_point deadline);
  // The drain ran out of time: every running call's stop check fires (UNAVAILABLE), so the
  // work ends at its next check (a layer of a forward pass at most) and frees its worker.
  void StopRunning();
  int in_flight() const;

  grpc::ServerUnaryReactor* Compress(grpc::CallbackServerContext* ctx,
                                     const ctxcache::v1::CompressRequest* req,
                                     ctxcache::v1::CompressResponse* resp) override;
  grpc::ServerWriteReactor<ctxcache::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const ctxcache::v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* GetContext(grpc::CallbackServerContext* ctx,
                                       const ctxcache::v1::GetContextRequest* req,
                                       ctxcache::v1::GetContextResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteContext(grpc::CallbackServerContext* ctx,
                                          const ctxcache::v1::DeleteContextRequest* req,
                                          ctxcache::v1::DeleteContextResponse* resp) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const ctxcache::v1::GetModelInfoRequest* req,
                                         ctxcache::v1::GetModelInfoResponse* resp) override;

  // One call's bookkeeping (request id, tenant, timing, in-flight count, final log line).
  class Call;

  // For another front end on the same engine, rules and accounting (the HTTP API,
  // server/http_api.h). BeginExternalCall: a call of `rpc` (counted in flight for the drain,
  // logged and metered like a gRPC call of that name when it ends with EndExternalCall),
  // authenticated from an "authorization" header value; else the status to answer with
  // (UNAVAILABLE while loading or draining, UNAUTHENTICATED).
  absl::StatusOr<std::shared_ptr<Call>> BeginExternalCall(std::string_view authorization,
                                                          const Peer& peer,
                                                          std::string_view request_id,
                                                          const char* rpc);
  static void EndExternalCall(Call& call, const absl::Status& status, std::string_view extra);
  static const std::string& CallTenant(const Call& call);
  static const std::string& CallRequestId(const Call& call);
  // Set once the model has loaded (Attach): null before.
  const Handlers* handlers() const { return handlers_.load(std::memory_order_acquire); }
  Scheduler* scheduler() const { return scheduler_; }  // valid once handlers() is set
  const ServiceInfo& info() const { return info_; }    // valid once handlers() is set
  bool draining() const { return draining_.load(); }
  ServerMetrics* metrics() const { return metrics_; }
  // The stop check of a call whose cancellation `cancelled` reports and whose deadline is
  // `deadline`; it also fires after StopRunning.
  StopCheck MakeStop(const std::atomic<bool>* cancelled,
                     std::chrono::steady_clock::time_point deadline) const;

 private:
  friend class Call;
  friend class GenerateReactor;
  // Request id, readiness, drain and auth checks; on success a Call (in flight until its
  // Finish), else the status to end the call with.
  absl::StatusOr<std::shared_ptr<Call>> BeginCall(grpc::CallbackServerContext* ctx,
                                                  const char* rpc);
  absl::StatusOr<std::shared_ptr<Call>> BeginCall(std::string_view authorization, const Peer& peer,
                                                  std::string_view request_id, const char* rpc);
  void EndCall();
  // Registers every method with a CheckedRequest (wire.h): a request that does not parse
  // (a string field that is not UTF-8, malformed bytes) reaches the Refuse* handlers below,
  // which answer INVALID_ARGUMENT naming the problem, instead of gRPC's bare UNIMPLEMENTED.
  void UseCheckedParsing();
  grpc::ServerUnaryReactor* RefuseUnary(grpc::CallbackServerContext* ctx, const char* rpc,
                                        const absl::Status& status);
  grpc::ServerWriteReactor<ctxcache::v1::GenerateResponse>* RefuseGenerate(
      grpc::CallbackServerContext* ctx, const absl::Status& status);

  const std::shared_ptr<Authenticator> auth_;
  ServerMetrics* const metrics_;
  std::atomic<const Handlers*> handlers_{nullptr};
  Scheduler* scheduler_ = nullptr;  // set with handlers_ (release/acquire)
  ServiceInfo info_;
  std::unique_ptr<IoExecutor> io_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> stop_running_{false};  // StopRunning
  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ctxcache::server
