// Server assembly and life cycle (see server.h).
#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "cache/redis_client.h"
#include "common/status.h"
#include "engine/icformer.h"
#include "server/devices.h"
#include "server/http_api.h"
#include "server/wire.h"

namespace ctxcache::server {

void ResolveWorkers(const ServerConfig& config, int cores, int* workers, int* threads) {
  cores = std::max(1, cores);
  *workers = config.workers > 0 ? config.workers : std::min(4, cores);
  *threads = config.threads_per_worker > 0 ? config.threads_per_worker
                                           : std::max(1, cores / *workers);
}

absl::StatusOr<std::unique_ptr<ServerInstance>> ServerInstance::Start(const ServerConfig& config,
                                                                      const Model* model) {
  RETURN_IF_ERROR(ValidateServerConfig(config));
  AuthSettings auth_settings;
  auth_settings.tokens_file = config.auth_tokens_file;
  auth_settings.client_tenants_file = config.tls_client_tenants;
  auth_settings.failure_limit = config.auth_failure_limit;
  ASSIGN_OR_RETURN(std::shared_ptr<Authenticator> auth, Authenticator::Create(auth_settings));
  std::unique_ptr<TlsCredentials> tls;
  if (!config.tls_cert.empty()) {
    // Never a silent fallback to plaintext: a certificate that cannot be served stops the
    // start-up, naming the file and the problem.
    ASSIGN_OR_RETURN(
        tls, TlsCredentials::Create({config.tls_cert, config.tls_key, config.tls_client_ca}));
  }
  std::unique_ptr<ServerInstance> s(new ServerInstance());
  s->config_ = config;
  s->model_ = model;
  s->tls_ = std::move(tls);
  s->auth_ = auth;
  s->metrics_ = std::make_unique<ServerMetrics>(CTXCACHE_VERSION);
  s->service_ = std::make_unique<ContextCacheService>(auth, s->metrics_.get());
  s->metrics_->SetThrottledPeersSource([auth] { return auth->ThrottledPeers(); });
  if (s->tls_ != nullptr) s->metrics_->SetTlsExpiry(s->tls_->current()->not_after_unix());

  InstallProtobufLogHandler();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(
      config.listen,
      s->tls_ != nullptr ? s->tls_->GrpcServerCredentials() : grpc::InsecureServerCredentials(),
      &s->port_);
  builder.RegisterService(s->service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", config.listen,
        ": the address is in use or not local (choose another with --listen HOST:PORT)"));
  }
  s->SetServing(false);
  const std::string tls_text =
      s->tls_ == nullptr
          ? std::string("off")
          : absl::StrCat(s->tls_->mutual() ? "mutual, " : "", s->tls_->current()->summary());
  spdlog::info("listening on {} (auth: {}; TLS: {}), loading...", s->address(), auth->Describe(),
               tls_text);
  if (const std::string warning = AuthOffWarning(config.listen, auth->enabled());
      !warning.empty()) {
    spdlog::warn("{}", warning);
  }
  const char* scheme = s->tls_ != nullptr ? "https" : "http";
  if (!config.metrics_listen.empty()) {
    ServerMetrics* metrics = s->metrics_.get();
    ContextCacheService* service = s->service_.get();
    MetricsHttpServer::Options mo;
    mo.render = [metrics] { return metrics->Render(); };
    mo.serving = [service] { return service->handlers() != nullptr && !service->draining(); };
    mo.tls = s->tls_.get();
    ASSIGN_OR_RETURN(s->metrics_http_, MetricsHttpServer::Start(config.metrics_listen, mo));
    spdlog::info("serving Prometheus metrics on {}://{}:{}/metrics (and /health)", scheme,
                 config.metrics_listen.substr(0, config.metrics_listen.rfind(':')),
                 s->metrics_http_->port());
  }
  if (!config.http_listen.empty()) {
    ASSIGN_OR_RETURN(s->http_, HttpApi::Start(config.http_listen, s->service_.get(),
                                              config.max_message_bytes, s->tls_.get()));
    spdlog::info("serving the OpenAI-compatible HTTP API on {}://{}:{}/v1", scheme,
                 config.http_listen.substr(0, config.http_listen.rfind(':')), s->http_->port());
  }
  if (s->tls_ != nullptr || auth->enabled()) {
    s->watcher_ = std::thread([p = s.get()] {
      std::unique_lock<std::mutex> lock(p->watcher_mu_);
      const auto every = std::chrono::seconds(p->config_.tls_reload_seconds);
      while (!p->watcher_cv_.wait_for(lock, every, [p] { return p->watcher_stop_; })) {
        lock.unlock();
        p->ReloadFiles(/*force=*/false);
        lock.lock();
      }
    });
  }
  return s;
}

std::string ServerInstance::address() const {
  const size_t colon = config_.listen.rfind(':');
  return absl::StrCat(config_.listen.substr(0, colon), ":", port_);
}

void ServerInstance::ReloadFiles(bool force) {
  std::lock_guard<std::mutex> lock(reload_mu_);
  // A refusal is logged and counted once per distinct problem, not at every check.
  auto refused = [&](const std::string& file, const absl::Status& status) {
    std::string& last = last_refusal_[file];
    const std::string message(status.message());
    const bool is_new = force || message != last;
    last = message;
    return is_new;
  };
  for (const Authenticator::Reloaded& r : auth_->Reload(force)) {
    if (!r.refused.ok()) {
      if (refused(r.file, r.refused)) {
        spdlog::error("{} file {} not reloaded, still using the previous {} entries: {}", r.file,
                      r.path, r.entries, std::string(r.refused.message()));
        metrics_->RecordAuthReload(r.file, false);
      }
      continue;
    }
    last_refusal_.erase(r.file);
    if (r.changed) {
      spdlog::info("{} file {} reloaded: {} entries", r.file, r.path, r.entries);
      metrics_->RecordAuthReload(r.file, true);
    }
  }
  if (tls_ == nullptr) return;
  const TlsReload r = tls_->Reload();
  if (!r.refused.ok()) {
    if (refused("tls", r.refused)) {
      spdlog::error("certificate files changed but are not served, still serving {}: {}",
                    tls_->current()->summary(), std::string(r.refused.message()));
      metrics_->RecordTlsReload(false);
    }
    return;
  }
  last_refusal_.erase("tls");
  if (r.changed) {
    spdlog::info("certificate reloaded: new connections get {}", tls_->current()->summary());
    metrics_->RecordTlsReload(true);
    metrics_->SetTlsExpiry(tls_->current()->not_after_unix());
  }
}

void ServerInstance::StopWatcher() {
  {
    std::lock_guard<std::mutex> lock(watcher_mu_);
    watcher_stop_ = true;
  }
  watcher_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

void ServerInstance::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  health->SetServingStatus(kServiceName, serving);
}

absl::Status ServerInstance::Load() {
  const auto t0 = std::chrono::steady_clock::now();
  if (model_ == nullptr) {
    std::string path = config_.model;
    if (path.empty()) {
      ASSIGN_OR_RETURN(path, FindDefaultModel());
    }
    ASSIGN_OR_RETURN(owned_model_, Model::Load(path));
    if (!config_.digest_compressor.empty()) {
      ASSIGN_OR_RETURN(std::unique_ptr<IcFormer> compressor,
                       IcFormer::Load(config_.digest_compressor, *owned_model_));
      spdlog::info("digest compressor {} loaded ({} layers, chunk {}, up to {} digests per "
                   "chunk, trained {} steps)",
                   config_.digest_compressor, compressor->config().n_layers,
                   compressor->config().chunk_length, compressor->config().digest_count,
                   compressor->config().train_steps);
      owned_model_->AttachDigestCompressor(std::move(compressor));
    }
    model_ = owned_model_.get();
    spdlog::info("model {} loaded from {}", model_->config().name, path);
  } else if (!config_.digest_compressor.empty()) {
    return absl::FailedPreconditionError(
        "digest_compressor is set but the model was handed in loaded: attach it to the model");
  }
  ContextStoreOptions so;
  so.memory_bytes = config_.memory_cache_bytes;
  so.memory_tenant_bytes = config_.tenant_memory_cache_bytes;
  so.model_fingerprint = model_->fingerprint();
  so.redis.url = config_.redis_url;
  so.redis.pool_size = config_.redis_pool_size;
  so.redis.connect_timeout_ms = config_.redis_connect_timeout_ms;
  so.redis.command_timeout_ms = config_.redis_command_timeout_ms;
  so.redis.ttl_seconds = config_.redis_ttl_seconds;
  so.redis.tenant_quota_bytes = config_.redis_tenant_quota_bytes;
  so.redis.key_prefix = config_.redis_key_prefix;
  so.redis.circuit_failures = config_.redis_circuit_failures;
  so.redis.circuit_slow_ms = config_.redis_circuit_slow_ms;
  so.redis.circuit_cool_down_ms = config_.redis_circuit_cool_down_ms;
  so.redis.write_queue_entries = config_.redis_write_queue_entries;
  so.redis.write_queue_bytes = config_.redis_write_queue_bytes;
  so.redis_observer = metrics_->MakeRedisObserver();
  ASSIGN_OR_RETURN(store_, ContextStore::Create(so));

  SchedulerOptions sched;
  ResolveWorkers(config_, ThreadPool::HardwareThreads(), &sched.workers,
                 &sched.threads_per_worker);
  // GPUs load here, before the health check says SERVING: one engine worker each, first in
  // the worker list; the CPU workers after them when the device list has cpu.
  ASSIGN_OR_RETURN(const DeviceSpec spec, ParseDevices(config_.device));
  ASSIGN_OR_RETURN(OpenedDevices opened, OpenDevices(spec, *model_));
  if (!opened.note.empty()) {
    spdlog::warn("device = {}: no GPU serves ({}); the CPU workers serve instead", config_.device,
                 opened.note);
  }
  gpus_ = std::move(opened.gpus);
  worker_devices_.clear();
  for (const auto& gpu : gpus_) {
    sched.devices.push_back(gpu.get());
    worker_devices_.push_back(gpu->name());
  }
  const int cpu_workers = opened.cpu ? sched.workers : 0;
  for (int i = 0; i < cpu_workers; ++i) worker_devices_.push_back("cpu");
  sched.workers = static_cast<int>(gpus_.size()) + cpu_workers;
  sched.max_batch = config_.max_batch;
  sched.step_prompt_tokens = config_.step_prompt_tokens;
  sched.max_queue_depth = config_.max_queue_depth;
  sched.max_kv_bytes = config_.max_kv_bytes;
  sched.tenant_max_inflight = config_.tenant_max_inflight;
  if (sched.max_kv_bytes == 0) {
    const int64_t ram = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    sched.max_kv_bytes = std::max<int64_t>(ram / 4, int64_t{256} << 20);
  }
  RequestLimits limits;
  limits.max_document_tokens = config_.max_document_tokens;
  limits.max_document_bytes = config_.max_document_bytes;
  limits.max_contexts_per_request = config_.max_contexts_per_request;
  handlers_ = std::make_unique<Handlers>(*model_, *store_, limits, metrics_.get());
  scheduler_ = std::make_unique<Scheduler>(*model_, sched);
  ServerMetrics::Sources sources;
  sources.store = [store = store_.get()] { return store->Stats(); };
  sources.scheduler = [scheduler = scheduler_.get()] { return scheduler->Stats(); };
  sources.redis_enabled = !config_.redis_url.empty();
  sources.model = model_->config().name;
  sources.worker_devices = worker_devices_;
  metrics_->SetSources(std::move(sources));
  service_->Attach(
      handlers_.get(), scheduler_.get(),
      ServiceInfo{!config_.redis_url.empty(), sched.workers, config_.tenant_max_inflight,
                  config_.tenant_memory_cache_bytes, worker_devices_});
  SetServing(true);
  if (config_.tenant_max_inflight > 0 || config_.tenant_memory_cache_bytes > 0) {
    spdlog::info(
        "per-tenant limits (0 = none): {} requests queued or running (tenant_max_inflight), "
        "{:.1f} MiB of the memory tier (tenant_memory_cache_bytes)",
        config_.tenant_max_inflight,
        static_cast<double>(config_.tenant_memory_cache_bytes) / (1 << 20));
    if (!auth_->enabled()) {
      spdlog::warn(
          "per-tenant limits are set but authentication is off (auth_tokens): every call is "
          "tenant \"default\", so the limits bound all calls together");
    }
  }
  spdlog::info(
      "serving {} on {}: {} worker(s) x {} thread(s) on {}, up to {} request(s) batched per "
      "worker, memory cache {} MB, redis {}, KV budget {} MB, ready in {:.2f} s",
      model_->config().name, address(), sched.workers, sched.threads_per_worker,
      gpus_.empty() ? std::string("the CPU")
                    : absl::StrCat(gpus_.size(), " GPU(s)", cpu_workers > 0 ? " and the CPU" : ""),
      sched.max_batch, config_.memory_cache_bytes >> 20,
      config_.redis_url.empty() ? "off" : RedactRedisUrl(config_.redis_url),  // no password
      sched.max_kv_bytes >> 20,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return absl::OkStatus();
}

void ServerInstance::BeginDrain() {
  SetServing(false);
  service_->BeginDrain();
}

bool ServerInstance::WaitIdle(double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  return service_->WaitIdle(deadline);
}

bool ServerInstance::Drain(double timeout_seconds) {
  if (shut_down_) return true;
  shut_down_ = true;
  const auto start = std::chrono::steady_clock::now();
  BeginDrain();
  const bool idle = WaitIdle(timeout_seconds);
  if (!idle) {
    spdlog::warn("drain timeout ({} s): stopping {} call(s) still in flight", timeout_seconds,
                 service_->in_flight());
    // Running work ends at its next stop check (a layer of a forward pass at most), so the
    // Shutdown below, which waits for every call to finish, is bounded too.
    service_->StopRunning();
  }
  // Queued jobs end now (UNAVAILABLE) rather than wait for a worker.
  if (scheduler_) scheduler_->Shutdown();
  // HTTP requests still open end with their jobs (finished, stopped or abandoned above).
  if (http_) http_->Stop();
  if (!idle) {
    // A short grace for the stopped calls to finish on their own, with UNAVAILABLE (which
    // clients retry elsewhere), before Shutdown cancels what is left (CANCELLED): a stop
    // check is at most a layer away, milliseconds in a release build.
    constexpr double kStopGraceSeconds = 2.0;
    WaitIdle(kStopGraceSeconds);
  }
  // A call leaves the in-flight count just before its Finish, so "idle" can come while the
  // last calls' final messages and statuses are still on their way out: Shutdown gives
  // those up to kFlushSeconds (within the drain time) and returns as soon as they are out.
  // With an immediate deadline it cancelled them: a stream that had produced its whole
  // answer reached its client as CANCELLED ("Cancelling all calls"; the e2e test
  // BinaryServesTheCliAndDrainsOnSigterm, on a loaded machine). Past the deadline Shutdown
  // cancels whatever is left and returns once every call has finished.
  constexpr double kFlushSeconds = 5.0;
  const double drain_left =
      timeout_seconds -
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flush = idle ? std::clamp(drain_left, 0.0, kFlushSeconds) : 0.0;
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(
                        std::chrono::duration<double>(flush)));
  // Contexts computed before or during the drain may still be on their way to Redis, where
  // other replicas would find them: the writes get what is left of the drain time.
  bool flushed = true;
  if (store_) {
    const double left = timeout_seconds - std::chrono::duration<double>(
                                              std::chrono::steady_clock::now() - start).count();
    flushed = store_->WaitForWrites(absl::Seconds(std::max(0.0, left)));
    if (!flushed) {
      spdlog::warn("drain timeout ({} s): {} Redis write(s) not finished; they are dropped",
                   timeout_seconds, store_->Stats().redis_write_queue_depth);
    }
  }
  spdlog::info("server stopped");
  return idle && flushed;
}

ServerInstance::~ServerInstance() {
  StopWatcher();
  if (!shut_down_) Drain(0);
  server_->Wait();
  // Scrapes read the store and the scheduler: stop them before those go.
  metrics_http_.reset();
  http_.reset();
  if (metrics_) {
    metrics_->ClearSources();
    metrics_->SetThrottledPeersSource(nullptr);
  }
  // Workers finish their current job (each ends its call) before the service goes away.
  scheduler_.reset();
  server_.reset();
  service_.reset();
  handlers_.reset();
  store_.reset();
  tls_.reset();
}

}  // namespace ctxcache::server
