// The gRPC service: edge conversion, admission and reactors (see service.h).
#include "server/service.h"

#include <grpc/grpc_security_constants.h>
#include <spdlog/spdlog.h>

#include <deque>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/redis_client.h"
#include "engine/icformer.h"
#include "server/convert.h"
#include "server/logging.h"
#include "server/status_map.h"
#include "server/tls.h"
#include "server/wire.h"

namespace ctxcache::server {

namespace pb = ::ctxcache::v1;
using Clock = std::chrono::steady_clock;

// A few threads for cache-only calls (GetContext, DeleteContext), which may wait on Redis and
// so must not run on gRPC's callback threads nor queue behind generations.
class IoExecutor {
 public:
  explicit IoExecutor(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~IoExecutor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  // False when the queue is full.
  bool Submit(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.size() >= kMaxQueue) return false;
      queue_.push_back(std::move(fn));
    }
    cv_.notify_one();
    return true;
  }

 private:
  static constexpr size_t kMaxQueue = 1024;
  void Loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

namespace {

// The call's gRPC deadline on the steady clock (time_point::max() for none).
Clock::time_point SteadyDeadline(const grpc::CallbackServerContext* ctx) {
  const auto deadline = ctx->deadline();
  const auto now = std::chrono::system_clock::now();
  if (deadline - now > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(deadline - now);
}

absl::Status DeadlineStatus() {
  return absl::DeadlineExceededError(
      "the call's deadline passed before the work finished; allow more time or ask for fewer "
      "tokens");
}

// An I/O pool call's stop, asked when a pool thread reaches it.
absl::Status IoStop(grpc::CallbackServerContext* ctx, Clock::time_point deadline) {
  if (deadline != Clock::time_point::max() && Clock::now() >= deadline) {
    return absl::DeadlineExceededError(
        "the deadline passed while the request waited for a cache I/O thread; the server is "
        "busy: retry with a longer deadline or later");
  }
  if (ctx->IsCancelled()) return absl::CancelledError("the client cancelled the call");
  return absl::OkStatus();
}

// Why a call that gRPC cancelled ended: its deadline passed (gRPC's timer fires at the
// deadline; 5 ms absorb the skew of converting it to the steady clock), or the client
// cancelled (or the server shut down).
absl::Status CancelReason(Clock::time_point deadline) {
  if (deadline != Clock::time_point::max() &&
      Clock::now() + std::chrono::milliseconds(5) >= deadline) {
    return DeadlineStatus();
  }
  return absl::CancelledError("the client cancelled the call");
}

std::string Metadata(const grpc::CallbackServerContext* ctx, const char* key) {
  const auto& md = ctx->client_metadata();
  auto it = md.find(key);
  if (it == md.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

}  // namespace

class ContextCacheService::Call {
 public:
  Call(ContextCacheService* service, const char* rpc, std::string rid, std::string tenant)
      : service_(service), rpc_(rpc), rid_(std::move(rid)), tenant_(std::move(tenant)),
        start_(Clock::now()) {}
  ~Call() { Done(absl::InternalError("call dropped without a status"), ""); }

  const std::string& tenant() const { return tenant_; }
  const std::string& rid() const { return rid_; }

  // Unary calls: log, finish, leave the in-flight count.
  void Finish(grpc::ServerUnaryReactor* reactor, const absl::Status& status,
              std::string_view extra = "") {
    Log(status, extra);
    // Out of the in-flight count first: once Finish is called the client may see the end, and
    // a drain that follows must not count this call.
    Leave();
    reactor->Finish(ToGrpcStatus(status));
  }
  // Streams: log and leave after the reactor called Finish.
  void Done(const absl::Status& status, std::string_view extra) {
    if (left_.load()) return;
    Log(status, extra);
    Leave();
  }

 private:
  void Log(const absl::Status& status, std::string_view extra) {
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start_).count();
    if (service_->metrics_ != nullptr) {
      service_->metrics_->RecordCall(rpc_, static_cast<int>(ToGrpcStatus(status).error_code()),
                                     ms / 1e3);
    }
    const std::string line = absl::StrFormat(
        "rid=%s rpc=%s tenant=%s code=%s ms=%.1f%s%s%s", rid_, rpc_, tenant_,
        absl::StatusCodeToString(status.code()), ms, extra.empty() ? "" : " ",
        std::string(extra), status.ok() ? "" : absl::StrCat(" error=\"", status.message(), "\""));
    if (status.ok() || absl::IsNotFound(status) || absl::IsInvalidArgument(status) ||
        absl::IsCancelled(status)) {
      spdlog::info("{}", line);
    } else {
      spdlog::warn("{}", line);
    }
  }
  void Leave() {
    if (!left_.exchange(true)) service_->EndCall();
  }

  ContextCacheService* service_;
  const char* rpc_;
  std::string rid_, tenant_;
  Clock::time_point start_;
  std::atomic<bool> left_{false};
};

ContextCacheService::ContextCacheService(std::shared_ptr<Authenticator> auth,
                                         ServerMetrics* metrics)
    : auth_(std::move(auth)), metrics_(metrics), io_(std::make_unique<IoExecutor>(2)) {
  UseCheckedParsing();
}

// The method indices are the order of the rpcs in ctxcache.proto, as the generated
// WithCallbackMethod_* classes use them.
void ContextCacheService::UseCheckedParsing() {
  using grpc::CallbackServerContext;
  using grpc::internal::CallbackServerStreamingHandler;
  using grpc::internal::CallbackUnaryHandler;
  MarkMethodCallback(
      0, new CallbackUnaryHandler<CheckedRequest<pb::CompressRequest>, pb::CompressResponse>(
             [this](CallbackServerContext* ctx, const CheckedRequest<pb::CompressRequest>* req,
                    pb::CompressResponse* resp) {
               return req->status.ok() ? Compress(ctx, &req->message, resp)
                                       : RefuseUnary(ctx, "Compress", req->status);
             }));
  MarkMethodCallback(
      1,
      new CallbackServerStreamingHandler<CheckedRequest<pb::GenerateRequest>, pb::GenerateResponse>(
          [this](CallbackServerContext* ctx, const CheckedRequest<pb::GenerateRequest>* req) {
            return req->status.ok() ? Generate(ctx, &req->message)
                                    : RefuseGenerate(ctx, req->status);
          }));
  MarkMethodCallback(
      2, new CallbackUnaryHandler<CheckedRequest<pb::GetContextRequest>, pb::GetContextResponse>(
             [this](CallbackServerContext* ctx, const CheckedRequest<pb::GetContextRequest>* req,
                    pb::GetContextResponse* resp) {
               return req->status.ok() ? GetContext(ctx, &req->message, resp)
                                       : RefuseUnary(ctx, "GetContext", req->status);
             }));
  MarkMethodCallback(
      3,
      new CallbackUnaryHandler<CheckedRequest<pb::DeleteContextRequest>, pb::DeleteContextResponse>(
          [this](CallbackServerContext* ctx, const CheckedRequest<pb::DeleteContextRequest>* req,
                 pb::DeleteContextResponse* resp) {
            return req->status.ok() ? DeleteContext(ctx, &req->message, resp)
                                    : RefuseUnary(ctx, "DeleteContext", req->status);
          }));
  MarkMethodCallback(
      4,
      new CallbackUnaryHandler<CheckedRequest<pb::GetModelInfoRequest>, pb::GetModelInfoResponse>(
          [this](CallbackServerContext* ctx, const CheckedRequest<pb::GetModelInfoRequest>* req,
                 pb::GetModelInfoResponse* resp) {
            return req->status.ok() ? GetModelInfo(ctx, &req->message, resp)
                                    : RefuseUnary(ctx, "GetModelInfo", req->status);
          }));
}

grpc::ServerUnaryReactor* ContextCacheService::RefuseUnary(grpc::CallbackServerContext* ctx,
                                                           const char* rpc,
                                                           const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, rpc);
  if (!call.ok()) {
    reactor->Finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  (*call)->Finish(reactor, status);
  return reactor;
}

ContextCacheService::~ContextCacheService() = default;

void ContextCacheService::Attach(const Handlers* handlers, Scheduler* scheduler,
                                 const ServiceInfo& info) {
  scheduler_ = scheduler;
  info_ = info;
  handlers_.store(handlers, std::memory_order_release);
}

void ContextCacheService::BeginDrain() { draining_.store(true); }

void ContextCacheService::StopRunning() { stop_running_.store(true); }

StopCheck ContextCacheService::MakeStop(const std::atomic<bool>* cancelled,
                                        Clock::time_point deadline) const {
  const std::atomic<bool>* stop_running = &stop_running_;
  return [cancelled, deadline, stop_running]() -> absl::Status {
    if (deadline != Clock::time_point::max() && Clock::now() >= deadline) return DeadlineStatus();
    // gRPC cancels a call whose deadline passed too: say which it was.
    if (cancelled->load(std::memory_order_relaxed)) return CancelReason(deadline);
    if (stop_running->load(std::memory_order_relaxed)) {
      return absl::UnavailableError(
          "the server is shutting down and its drain timeout passed; retry on another replica");
    }
    return absl::OkStatus();
  };
}

bool ContextCacheService::WaitIdle(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_until(lock, deadline, [&] { return in_flight_ == 0; });
}

int ContextCacheService::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_flight_;
}

void ContextCacheService::EndCall() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--in_flight_ == 0) idle_cv_.notify_all();
}

absl::StatusOr<std::shared_ptr<ContextCacheService::Call>> ContextCacheService::BeginCall(
    grpc::CallbackServerContext* ctx, const char* rpc) {
  const std::string rid = RequestId(Metadata(ctx, "x-request-id"));
  ctx->AddInitialMetadata("x-request-id", rid);
  Peer peer;
  peer.address = ctx->peer();
  // With mutual TLS the handshake verified the client's certificate; gRPC reports it as PEM.
  if (const std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context();
      auth != nullptr && auth->IsPeerAuthenticated()) {
    for (const grpc::string_ref& pem : auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME)) {
      peer.has_certificate = true;
      peer.identities = PemCertificateIdentities(std::string_view(pem.data(), pem.size()));
      break;
    }
  }
  return BeginCall(Metadata(ctx, "authorization"), peer, rid, rpc);
}

absl::StatusOr<std::shared_ptr<ContextCacheService::Call>> ContextCacheService::BeginExternalCall(
    std::string_view authorization, const Peer& peer, std::string_view request_id,
    const char* rpc) {
  return BeginCall(authorization, peer, RequestId(std::string(request_id)), rpc);
}

void ContextCacheService::EndExternalCall(Call& call, const absl::Status& status,
                                          std::string_view extra) {
  call.Done(status, extra);
}

const std::string& ContextCacheService::CallTenant(const Call& call) { return call.tenant(); }
const std::string& ContextCacheService::CallRequestId(const Call& call) { return call.rid(); }

absl::StatusOr<std::shared_ptr<ContextCacheService::Call>> ContextCacheService::BeginCall(
    std::string_view authorization, const Peer& peer, std::string_view rid_view, const char* rpc) {
  const std::string rid(rid_view);
  absl::Status refuse;
  if (draining_.load()) {
    refuse = absl::UnavailableError("the server is shutting down; retry on another replica");
  } else if (handlers_.load(std::memory_order_acquire) == nullptr) {
    refuse = absl::UnavailableError(
        "the model is still loading (health: NOT_SERVING); retry in a few seconds");
  }
  AuthRefusal refusal = AuthRefusal::kMissingCredentials;
  absl::StatusOr<std::string> tenant =
      refuse.ok() ? auth_->Authenticate(authorization, peer, &refusal) : refuse;
  if (refuse.ok() && !tenant.ok() && metrics_ != nullptr) {
    metrics_->RecordAuthRefused(refusal);
    spdlog::debug("auth refused for {} ({}): {}", peer.address, AuthRefusalName(refusal),
                  std::string(tenant.status().message()));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++in_flight_;
  }
  auto call = std::make_shared<Call>(this, rpc, rid, tenant.ok() ? *tenant : "-");
  if (!tenant.ok()) {
    call->Done(tenant.status(), "");
    return tenant.status();
  }
  return call;
}

// A call's job on the scheduler, as its reactor holds it. The scheduler and ticket arrive
// together when the job is submitted (not when the reactor is made: a call may arrive while
// the model loads, before Attach has published a scheduler); a cancellation, before or
// after, takes the job back out (a queued one leaves the queue with its reservation, a
// running one's stop check fires through the flag).
class ScheduledJob {
 public:
  explicit ScheduledJob(Clock::time_point deadline) : deadline_(deadline) {}

  const std::atomic<bool>* cancelled_flag() const { return &cancelled_; }
  bool cancelled() const { return cancelled_.load(); }

  void Submitted(Scheduler* scheduler, uint64_t ticket) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      scheduler_ = scheduler;
      ticket_ = ticket;
    }
    if (cancelled_.load()) TakeBack();
  }
  void Cancel() {
    cancelled_.store(true);
    TakeBack();
  }

 private:
  void TakeBack() {
    uint64_t ticket = 0;
    Scheduler* scheduler = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ticket = ticket_;
      scheduler = scheduler_;
    }
    if (ticket != 0) scheduler->Cancel(ticket, CancelReason(deadline_));
  }

  const Clock::time_point deadline_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  Scheduler* scheduler_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t ticket_ ABSL_GUARDED_BY(mu_) = 0;
};

// A unary call queued on the scheduler: OnCancel (client cancel, deadline, server shutdown)
// takes a queued job back out at once (its slot and reservation with it) and makes a running
// one's stop check fire. Finish, called once by the job or its abandon, ends it; OnDone
// deletes it.
class CompressReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit CompressReactor(Clock::time_point deadline) : job_(deadline) {}

  const std::atomic<bool>* cancelled() const { return job_.cancelled_flag(); }
  void SetTicket(Scheduler* scheduler, uint64_t ticket) { job_.Submitted(scheduler, ticket); }

  void OnCancel() override { job_.Cancel(); }
  void OnDone() override { delete this; }

 private:
  ScheduledJob job_;
};

grpc::ServerUnaryReactor* ContextCacheService::Compress(grpc::CallbackServerContext* ctx,
                                                        const pb::CompressRequest* req,
                                                        pb::CompressResponse* resp) {
  const Clock::time_point deadline = SteadyDeadline(ctx);
  auto* reactor = new CompressReactor(deadline);
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "Compress");
  if (!call.ok()) {
    reactor->Finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  const Handlers* handlers = handlers_.load(std::memory_order_acquire);
  absl::StatusOr<CompressInput> in = FromProto(*req);
  absl::Status valid = in.ok() ? handlers->ValidateCompress(*in, "") : in.status();
  if (!valid.ok()) {
    (*call)->Finish(reactor, valid);
    return reactor;
  }
  auto input = std::make_shared<CompressInput>(*std::move(in));
  std::shared_ptr<Call> c = *call;
  const StopCheck stop = MakeStop(reactor->cancelled(), deadline);
  auto work = [=](EngineWorker& worker, Reservation& reservation, double queue_seconds) {
    absl::StatusOr<CompressOutcome> out =
        handlers->Compress(worker, reservation, c->tenant(), *input, stop, deadline);
    // The working cache is gone: release its reservation (and the tenant's slot) before the
    // client can see the end.
    reservation.Release();
    if (!out.ok()) {
      c->Finish(reactor, out.status());
      return;
    }
    ToProto(out->context, resp->mutable_context());
    resp->set_compute_ms(out->context.compute_seconds * 1e3);
    resp->set_total_ms(out->total_seconds * 1e3);
    resp->set_queue_ms(queue_seconds * 1e3);
    if (out->context.in_memory) resp->add_retained_in(pb::CACHE_TIER_MEMORY);
    if (out->context.in_redis) resp->add_retained_in(pb::CACHE_TIER_REDIS);
    const bool kept = out->context.in_memory || out->context.in_redis;
    c->Finish(
        reactor, absl::OkStatus(),
        absl::StrFormat(
            "tier=%s context=%s tokens=%d retained=%s", CacheTierName(out->context.tier),
            out->context.context_id, out->context.context->source_tokens,
            kept ? (out->context.in_memory ? (out->context.in_redis ? "memory,redis" : "memory")
                                           : "redis")
                 : "none"));
  };
  auto abandon = [=](const absl::Status& reason) { c->Finish(reactor, reason); };
  absl::StatusOr<uint64_t> ticket =
      scheduler_->Submit(c->tenant(), handlers->EstimateKvBytes(*input), deadline, work, abandon);
  if (!ticket.ok()) {
    c->Finish(reactor, ticket.status());
  } else {
    reactor->SetTicket(scheduler_, *ticket);
  }
  return reactor;
}

// A server stream: the worker pushes text (Push) and ends the call (Complete); gRPC reactions
// (OnWriteDone, OnCancel) continue from there. Decisions are taken under mu_, gRPC is called
// outside it, and Finish is the reactor's last use of itself: OnDone (which deletes it) may
// run as soon as Finish has been called.
class GenerateReactor final : public grpc::ServerWriteReactor<pb::GenerateResponse> {
 public:
  GenerateReactor(grpc::CallbackServerContext* ctx, Clock::time_point deadline)
      : ctx_(ctx), job_(deadline) {}

  void Begin(std::shared_ptr<ContextCacheService::Call> call) { call_ = std::move(call); }
  grpc::CallbackServerContext* context() const { return ctx_; }
  bool cancelled() const { return job_.cancelled(); }
  const std::atomic<bool>* cancelled_flag() const { return job_.cancelled_flag(); }

  void SetTicket(Scheduler* scheduler, uint64_t ticket) { job_.Submitted(scheduler, ticket); }

  // Worker: append a text delta. False once the client is gone.
  bool Push(std::string_view delta) {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_ || job_.cancelled()) return false;
    pending_text_.append(delta.data(), delta.size());
    Pump(lock);
    return true;
  }

  // Worker (or abandon): the final message (when OK) and status; called exactly once.
  void Complete(const absl::Status& status, std::optional<pb::GenerateResponse> last,
                std::string log_extra) {
    std::unique_lock<std::mutex> lock(mu_);
    final_status_ = status;
    if (status.ok() && last) last_ = std::move(last);
    log_extra_ = std::move(log_extra);
    Pump(lock);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    write_in_flight_ = false;
    if (!ok) broken_ = true;
    Pump(lock);
  }

  void OnCancel() override { job_.Cancel(); }

  void OnDone() override { delete this; }

 private:
  // Starts the next write, or finishes once the worker completed and nothing is left to write.
  // Releases the lock before calling into gRPC.
  void Pump(std::unique_lock<std::mutex>& lock) {
    if (write_in_flight_ || finishing_) return;
    if (!broken_ && !pending_text_.empty()) {
      writing_.Clear();
      writing_.set_text(std::move(pending_text_));
      pending_text_.clear();
      write_in_flight_ = true;
      lock.unlock();
      StartWrite(&writing_);
      return;
    }
    if (!final_status_) return;
    if (!broken_ && last_) {
      writing_ = std::move(*last_);
      last_.reset();
      write_in_flight_ = true;
      lock.unlock();
      StartWrite(&writing_);
      return;
    }
    finishing_ = true;
    absl::Status status = *final_status_;
    if (status.ok() && broken_) status = absl::CancelledError("the client went away");
    std::shared_ptr<ContextCacheService::Call> call = std::move(call_);
    const std::string extra = log_extra_;
    lock.unlock();
    if (call) call->Done(status, extra);
    Finish(ToGrpcStatus(status));
  }

  grpc::CallbackServerContext* ctx_;
  ScheduledJob job_;
  std::shared_ptr<ContextCacheService::Call> call_;
  std::mutex mu_;
  pb::GenerateResponse writing_;  // owned by gRPC while write_in_flight_
  std::string pending_text_ ABSL_GUARDED_BY(mu_);
  std::optional<pb::GenerateResponse> last_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> final_status_ ABSL_GUARDED_BY(mu_);
  std::string log_extra_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerWriteReactor<pb::GenerateResponse>* ContextCacheService::Generate(
    grpc::CallbackServerContext* ctx, const pb::GenerateRequest* req) {
  const Clock::time_point deadline = SteadyDeadline(ctx);
  auto* reactor = new GenerateReactor(ctx, deadline);
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "Generate");
  if (!call.ok()) {
    reactor->Complete(call.status(), std::nullopt, "");
    return reactor;
  }
  reactor->Begin(*call);
  const Handlers* handlers = handlers_.load(std::memory_order_acquire);
  absl::StatusOr<GenerateInput> in = FromProto(*req);
  absl::Status valid = in.ok() ? handlers->ValidateGenerate(*in) : in.status();
  if (!valid.ok()) {
    reactor->Complete(valid, std::nullopt, "");
    return reactor;
  }
  auto input = std::make_shared<GenerateInput>(*std::move(in));
  const std::string tenant = (*call)->tenant();
  ServerMetrics* const metrics = metrics_;
  const StopCheck stop = MakeStop(reactor->cancelled_flag(), deadline);
  auto work = [=](EngineWorker& worker, Reservation& reservation, double queue_seconds) {
    absl::StatusOr<GenerateOutcome> out = handlers->Generate(
        worker, reservation, tenant, *input, stop,
        [reactor](std::string_view delta) { return reactor->Push(delta); }, deadline);
    reservation.Release();  // KV freed: release it and the slot before the client sees the end
    if (!out.ok()) {
      reactor->Complete(out.status(), std::nullopt, "");
      return;
    }
    // Before the client can see the end, so a scrape after the call includes it.
    if (metrics != nullptr) metrics->RecordGenerate(*out, tenant);
    pb::GenerateResponse last;
    ToProto(*out, queue_seconds, last.mutable_usage());
    std::string tiers;
    for (const ContextOutcome& c : out->contexts) {
      absl::StrAppend(&tiers, tiers.empty() ? "" : ",", CacheTierName(c.tier));
    }
    const std::string extra = absl::StrFormat(
        "contexts=%d tiers=%s prompt_tokens=%d completion_tokens=%d kv_saved=%d "
        "kv_attended=%d finish=%s",
        out->contexts.size(), tiers.empty() ? "-" : tiers, out->result.prompt_tokens,
        out->result.tokens.size(), out->kv_bytes_full - out->kv_bytes_used, out->kv_bytes_attended,
        std::string(FinishReasonName(out->result.finish)));
    reactor->Complete(absl::OkStatus(), std::move(last), extra);
  };
  auto abandon = [reactor](const absl::Status& reason) {
    reactor->Complete(reason, std::nullopt, "");
  };
  absl::StatusOr<uint64_t> ticket =
      scheduler_->Submit(tenant, handlers->EstimateKvBytes(*input), deadline, work, abandon);
  if (!ticket.ok()) {
    reactor->Complete(ticket.status(), std::nullopt, "");
  } else {
    reactor->SetTicket(scheduler_, *ticket);
  }
  return reactor;
}

grpc::ServerWriteReactor<pb::GenerateResponse>* ContextCacheService::RefuseGenerate(
    grpc::CallbackServerContext* ctx, const absl::Status& status) {
  auto* reactor = new GenerateReactor(ctx, SteadyDeadline(ctx));
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "Generate");
  if (call.ok()) reactor->Begin(*call);
  reactor->Complete(call.ok() ? status : call.status(), std::nullopt, "");
  return reactor;
}

grpc::ServerUnaryReactor* ContextCacheService::GetContext(grpc::CallbackServerContext* ctx,
                                                          const pb::GetContextRequest* req,
                                                          pb::GetContextResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "GetContext");
  if (!call.ok()) {
    reactor->Finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  const Handlers* handlers = handlers_.load(std::memory_order_acquire);
  std::shared_ptr<Call> c = *call;
  const std::string id = req->context_id();
  const Clock::time_point deadline = SteadyDeadline(ctx);
  const bool queued = io_->Submit([=] {
    // A call that ended while queued here (cancelled, expired) is not looked up.
    if (absl::Status s = IoStop(ctx, deadline); !s.ok()) {
      c->Finish(reactor, s);
      return;
    }
    // The Redis lookup ends by the smaller of `deadline` and command_timeout_ms, or when the
    // call is cancelled.
    const StopFn stop = [ctx, deadline] { return IoStop(ctx, deadline); };
    ScopedRedisStop redis_stop(&stop);
    absl::StatusOr<ContextOutcome> out = handlers->GetContext(c->tenant(), id, deadline);
    if (out.ok()) ToProto(*out, resp->mutable_context());
    c->Finish(reactor, out.status(), out.ok() ? absl::StrCat("tier=", CacheTierName(out->tier)) : "");
  });
  if (!queued) {
    c->Finish(reactor, absl::ResourceExhaustedError("server busy: too many cache lookups "
                                                    "queued; retry with backoff"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* ContextCacheService::DeleteContext(grpc::CallbackServerContext* ctx,
                                                             const pb::DeleteContextRequest* req,
                                                             pb::DeleteContextResponse* /*resp*/) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "DeleteContext");
  if (!call.ok()) {
    reactor->Finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  const Handlers* handlers = handlers_.load(std::memory_order_acquire);
  std::shared_ptr<Call> c = *call;
  const std::string id = req->context_id();
  const Clock::time_point deadline = SteadyDeadline(ctx);
  const bool queued = io_->Submit([=] {
    if (absl::Status s = IoStop(ctx, deadline); !s.ok()) {
      c->Finish(reactor, s);
      return;
    }
    const StopFn stop = [ctx, deadline] { return IoStop(ctx, deadline); };
    ScopedRedisStop redis_stop(&stop);
    c->Finish(reactor, handlers->DeleteContext(c->tenant(), id, deadline));
  });
  if (!queued) {
    c->Finish(reactor, absl::ResourceExhaustedError("server busy: too many cache operations "
                                                    "queued; retry with backoff"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* ContextCacheService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                            const pb::GetModelInfoRequest* /*req*/,
                                                            pb::GetModelInfoResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::shared_ptr<Call>> call = BeginCall(ctx, "GetModelInfo");
  if (!call.ok()) {
    reactor->Finish(ToGrpcStatus(call.status()));
    return reactor;
  }
  const Handlers* handlers = handlers_.load(std::memory_order_acquire);
  const Model& model = handlers->model();
  const ModelConfig& mc = model.config();
  resp->set_name(mc.name);
  resp->set_architecture(mc.arch);
  resp->set_fingerprint(model.fingerprint());
  resp->set_n_layers(mc.n_layers);
  resp->set_n_heads(mc.n_heads);
  resp->set_n_kv_heads(mc.n_kv_heads);
  resp->set_head_dim(mc.head_dim);
  resp->set_d_model(mc.d_model);
  resp->set_n_vocab(mc.n_vocab);
  resp->set_context_length(mc.n_ctx_train);
  resp->set_kv_bytes_per_token(model.KvBytesPerToken(2));
  const IcFormer* digest = model.digest_compressor();
  for (const char* m : CompressionMethods()) {
    if (digest != nullptr || std::string_view(m) != "digest") resp->add_methods(m);
  }
  if (digest != nullptr) {
    v1::DigestCompressorInfo* d = resp->mutable_digest_compressor();
    d->set_sha256(digest->file_sha256());
    d->set_layers(digest->config().n_layers);
    d->set_chunk_length(digest->config().chunk_length);
    d->set_digest_count(digest->config().digest_count);
    d->set_train_steps(digest->config().train_steps);
    d->set_source(digest->config().source);
  }
  resp->set_workers(info_.workers);
  for (const std::string& d : info_.worker_devices) resp->add_devices(d);
  resp->set_max_document_tokens(handlers->limits().max_document_tokens);
  resp->set_max_document_bytes(handlers->limits().max_document_bytes);
  resp->set_tenant((*call)->tenant());
  resp->set_redis_enabled(info_.redis_enabled);
  ToProto(handlers->limits(), resp->mutable_limits());
  resp->mutable_limits()->set_tenant_max_inflight(info_.tenant_max_inflight);
  resp->mutable_limits()->set_tenant_memory_cache_bytes(info_.tenant_memory_cache_bytes);
  (*call)->Finish(reactor, absl::OkStatus());
  return reactor;
}

}  // namespace ctxcache::server
