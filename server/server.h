// One running ctxcache server: the gRPC server (ContextCache service, grpc.health.v1,
// reflection) bound to its address, and once loaded the model, the context store and the
// engine scheduler behind it. main.cc and the end-to-end tests both drive this class.
//
// Life cycle: Start (binds; health NOT_SERVING, calls UNAVAILABLE) -> Load (model, cache,
// workers; health SERVING) -> Drain (health NOT_SERVING, new calls refused, in-flight ones
// finish up to a timeout) -> destruction (remaining calls cancelled, workers joined).
#pragma once

#include <grpcpp/server.h>

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "cache/context_store.h"
#include "engine/model.h"
#include "server/config.h"
#include "server/handlers.h"
#include "server/http_api.h"
#include "server/metrics_http.h"
#include "server/scheduler.h"
#include "server/server_metrics.h"
#include "server/service.h"
#include "server/tls.h"

namespace ctxcache::server {

// The service name health reports for (besides the overall "" entry).
inline constexpr char kServiceName[] = "ctxcache.v1.ContextCache";

class ServerInstance {
 public:
  // Validates the config, reads the token file, binds and starts serving health (and /metrics
  // when config.metrics_listen is set). `model`, when
  // given, is used instead of loading config.model (tests share one loaded model); it must
  // outlive the instance.
  static absl::StatusOr<std::unique_ptr<ServerInstance>> Start(const ServerConfig& config,
                                                               const Model* model = nullptr);
  ~ServerInstance();

  // Loads the model (unless borrowed), creates the context store and the workers, and starts
  // answering (health SERVING).
  absl::Status Load();
  // Graceful stop: health NOT_SERVING, new calls UNAVAILABLE, waits up to timeout_seconds for
  // in-flight calls, then cancels what is left. Returns true when everything finished in time.
  bool Drain(double timeout_seconds);
  // The first half of Drain: health NOT_SERVING and new calls refused, without waiting.
  void BeginDrain();
  // Waits until no call is in flight, up to timeout_seconds; true when idle.
  bool WaitIdle(double timeout_seconds);

  int port() const { return port_; }
  // "host:port" with the bound port (for clients).
  std::string address() const;
  ContextStore* store() { return store_.get(); }
  Scheduler* scheduler() { return scheduler_.get(); }
  ServerMetrics& metrics() { return *metrics_; }
  // The bound /metrics port; 0 when metrics_listen is empty (not served).
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }
  int http_port() const { return http_ ? http_->port() : 0; }
  const ServerConfig& config() const { return config_; }

  // Re-reads the token file, the client-certificate tenants file and the certificates now
  // (SIGHUP). The same runs every tls_reload_seconds for files that changed. A file that does
  // not validate is refused with an error log line and counted; the old set stays in use.
  void Reload() { ReloadFiles(/*force=*/true); }
  // Whether the listeners speak TLS.
  bool tls() const { return tls_ != nullptr; }

 private:
  ServerInstance() = default;
  void SetServing(bool serving);
  void ReloadFiles(bool force);
  void StopWatcher();

  ServerConfig config_;
  // Outlive every listener that hands out their certificates or asks them who calls.
  std::unique_ptr<TlsCredentials> tls_;
  std::shared_ptr<Authenticator> auth_;
  // Checks the certificate and auth files every tls_reload_seconds (with TLS or an auth file).
  std::thread watcher_;
  std::mutex watcher_mu_;
  std::condition_variable watcher_cv_;
  bool watcher_stop_ = false;                        // guarded by watcher_mu_
  std::mutex reload_mu_;                             // one reload at a time (watcher, SIGHUP)
  std::map<std::string, std::string> last_refusal_;  // per file, guarded by reload_mu_
  const Model* model_ = nullptr;
  std::unique_ptr<Model> owned_model_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<HttpApi> http_;  // --http-listen
  std::unique_ptr<ContextStore> store_;
  std::unique_ptr<Handlers> handlers_;
  std::vector<std::unique_ptr<DeviceForward>> gpus_;  // outlive the scheduler's workers
  std::vector<std::string> worker_devices_;           // per worker: "cpu", "cuda:0 (...)"
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<ContextCacheService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool shut_down_ = false;
};

// Worker layout for `cores` usable cores: workers = min(4, cores), threads = cores / workers,
// unless the config sets them.
void ResolveWorkers(const ServerConfig& config, int cores, int* workers, int* threads);

}  // namespace ctxcache::server
