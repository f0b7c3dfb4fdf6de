// The OpenAI-compatible HTTP API (http_api.h): JSON in, the gRPC request it means, the same
// handlers, JSON (or Server-Sent Events) out.
#include "server/http_api.h"

#include <google/protobuf/util/json_util.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "server/convert.h"
#include "server/handlers.h"
#include "server/openai_json.h"
#include "server/server_metrics.h"

namespace ctxcache::server {
namespace {

using json = nlohmann::json;
namespace pb = ::ctxcache::v1;
using Clock = std::chrono::steady_clock;

// server/playground.html, embedded at build time (server/CMakeLists.txt).
constexpr char kPlaygroundHtml[] =
#include "server/playground.inc"
    ;

// ---- errors -----------------------------------------------------------------------------------

const char* ErrorType(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return "invalid_request_error";
    case absl::StatusCode::kUnauthenticated:
      return "authentication_error";
    case absl::StatusCode::kPermissionDenied:
      return "permission_error";
    case absl::StatusCode::kNotFound:
      return "not_found_error";
    case absl::StatusCode::kResourceExhausted:
      return "rate_limit_error";
    case absl::StatusCode::kUnavailable:
      return "service_unavailable";
    case absl::StatusCode::kDeadlineExceeded:
      return "timeout";
    case absl::StatusCode::kCancelled:
      return "cancelled";
    default:
      return "server_error";
  }
}

json ErrorJson(const absl::Status& s) {
  return {{"error",
           {{"message", std::string(s.message())},
            {"type", ErrorType(s.code())},
            {"param", nullptr},
            {"code", absl::AsciiStrToLower(absl::StatusCodeToString(s.code()))}}}};
}

void SendJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void SendError(httplib::Response& res, const absl::Status& s) {
  SendJson(res, HttpStatusFor(s.code()), ErrorJson(s));
}

// ---- response translation --------------------------------------------------------------------

const char* TierName(pb::CacheTier t) {
  switch (t) {
    case pb::CACHE_TIER_COMPUTED:
      return "computed";
    case pb::CACHE_TIER_MEMORY:
      return "memory";
    case pb::CACHE_TIER_REDIS:
      return "redis";
    default:
      return "unspecified";
  }
}

const char* FinishName(pb::FinishReason r) {
  switch (r) {
    case pb::FINISH_REASON_STOP:
    case pb::FINISH_REASON_END_OF_GENERATION:
      return "stop";
    default:
      return "length";  // max_tokens, or the model's window
  }
}

json UsageJson(const pb::Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens()},
          {"completion_tokens", u.completion_tokens()},
          {"total_tokens", u.prompt_tokens() + u.completion_tokens()}};
}

// What the contexts saved, next to usage (ctxcache's extension).
json SavingsJson(const pb::Usage& u) {
  json contexts = json::array();
  for (const pb::ContextUsage& c : u.contexts()) {
    contexts.push_back({{"context_id", c.context_id()},
                        {"tier", TierName(c.tier())},
                        {"original_tokens", c.original_tokens()},
                        {"kept_entries", c.kept_entries()},
                        {"full_entries", c.full_entries()},
                        {"kv_bytes", c.kv_bytes()},
                        {"full_kv_bytes", c.full_kv_bytes()},
                        {"kv_bytes_attended", c.kv_bytes_attended()},
                        {"compute_ms", c.compute_ms()}});
  }
  return {{"kv_bytes_full", u.kv_bytes_full()},
          {"kv_bytes_used", u.kv_bytes_used()},
          {"kv_bytes_saved", u.kv_bytes_saved()},
          {"kv_bytes_attended", u.kv_bytes_attended()},
          {"context_tokens_original", u.context_tokens_original()},
          {"context_tokens_kept", u.context_tokens_kept()},
          {"queue_ms", u.queue_ms()},
          {"context_ms", u.context_ms()},
          {"ttft_ms", u.ttft_ms()},
          {"decode_tokens_per_second", u.decode_tokens_per_second()},
          {"contexts", contexts}};
}

json ContextJson(const pb::ContextInfo& c) {
  return {{"id", c.context_id()},
          {"object", "context"},
          {"method", c.method()},
          {"params", c.params()},
          {"method_version", c.method_version()},
          {"original_tokens", c.original_tokens()},
          {"kept_tokens", c.kept_tokens()},
          {"kept_entries", c.kept_entries()},
          {"full_entries", c.full_entries()},
          {"full_kv_bytes", c.full_kv_bytes()},
          {"kv_bytes", c.kv_bytes()},
          {"kv_bytes_saved", c.full_kv_bytes() - c.kv_bytes()},
          {"next_position", c.next_position()},
          {"tier", TierName(c.tier())}};
}

// The compression methods this server runs ("digest" only with a compressor), as GetModelInfo
// lists them.
std::vector<std::string> MethodsServed(const Model& model) {
  std::vector<std::string> out;
  for (const char* m : CompressionMethods()) {
    if (model.digest_compressor() != nullptr || std::string_view(m) != "digest") out.push_back(m);
  }
  return out;
}

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- a job on the scheduler, as an HTTP request waits for it ----------------------------------

struct HttpJob {
  std::mutex mu;
  std::condition_variable cv;
  std::string pending;  // text not yet sent
  std::string text;     // all of it (non-streaming)
  std::optional<absl::Status> status;
  pb::Usage usage;
  std::atomic<bool> cancelled{false};
  Scheduler* scheduler = nullptr;
  uint64_t ticket = 0;

  void Finish(const absl::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    if (!status) status = s;
    cv.notify_all();
  }
  // Queues `work` for `tenant` (a job the scheduler abandons finishes with the reason) and
  // keeps its ticket for Cancel; the refusal when the scheduler does not take it.
  static absl::Status Submit(const std::shared_ptr<HttpJob>& job, Scheduler* scheduler,
                             const std::string& tenant, int64_t kv_bytes,
                             Clock::time_point deadline, Scheduler::Work work) {
    absl::StatusOr<uint64_t> t =
        scheduler->Submit(tenant, kv_bytes, deadline, std::move(work),
                          [job](const absl::Status& reason) { job->Finish(reason); });
    if (!t.ok()) return t.status();
    std::lock_guard<std::mutex> lock(job->mu);
    job->scheduler = scheduler;
    job->ticket = *t;
    return absl::OkStatus();
  }
  // The client went away: a queued job leaves the queue, a running one's stop check fires.
  void Cancel() {
    cancelled.store(true);
    uint64_t t = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      t = ticket;
    }
    if (t != 0) scheduler->Cancel(t, absl::CancelledError("the client went away"));
  }
};

}  // namespace

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string ModelIdFor(const std::string& name) {
  std::string id;
  for (char ch : name) {
    const unsigned char u = static_cast<unsigned char>(ch);
    if (std::isalnum(u) || ch == '.' || ch == '_' || ch == '-') {
      id += static_cast<char>(std::tolower(u));
    } else if (!id.empty() && id.back() != '-') {
      id += '-';
    }
  }
  while (!id.empty() && id.back() == '-') id.pop_back();
  return id.empty() ? "model" : id;
}

absl::StatusOr<std::unique_ptr<HttpApi>> HttpApi::Start(const std::string& listen,
                                                        ContextCacheService* service,
                                                        int64_t max_body_bytes,
                                                        const TlsCredentials* tls) {
  std::unique_ptr<HttpApi> api(new HttpApi());
  api->service_ = service;
  if (tls != nullptr) {
    auto https = std::make_unique<httplib::SSLServer>(
        [tls](SSL_CTX& ctx) { return tls->SetUpSslCtx(&ctx, /*verify_clients=*/true); });
    if (!https->is_valid()) {
      return absl::InternalError("http_listen: OpenSSL refused the TLS settings");
    }
    api->server_ = std::move(https);
  } else {
    api->server_ = std::make_unique<httplib::Server>();
  }
  httplib::Server& svr = *api->server_;
  // A streaming answer holds its thread for the whole generation: room for every worker slot
  // and the waiting queue's worth of streams.
  svr.new_task_queue = [] { return new httplib::ThreadPool(64); };
  svr.set_payload_max_length(static_cast<size_t>(max_body_bytes));
  svr.set_keep_alive_max_count(1000);
  svr.set_read_timeout(30, 0);
  api->Routes();
  const size_t colon = listen.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("http_listen = \"", listen, "\": expected HOST:PORT"));
  }
  const std::string host = listen.substr(0, colon);
  api->port_ = port == 0 ? svr.bind_to_any_port(host) : (svr.bind_to_port(host, port) ? port : -1);
  if (api->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen for HTTP on ", listen,
        ": the address is in use or not local (choose another with --http-listen HOST:PORT)"));
  }
  api->thread_ = std::thread([&svr] { svr.listen_after_bind(); });
  return api;
}

HttpApi::~HttpApi() { Stop(); }

void HttpApi::Stop() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

void HttpApi::Routes() {
  httplib::Server& svr = *server_;
  ContextCacheService* const service = service_;

  // A body over the limit (413), a route that does not exist (404): OpenAI-shaped too.
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    absl::Status s = absl::NotFoundError(absl::StrCat("no route ", req.method, " ", req.path));
    if (res.status == 413) {
      s = absl::InvalidArgumentError("the request body is over the server's max_message_bytes");
    } else if (res.status == 405) {
      s = absl::InvalidArgumentError(absl::StrCat(req.method, " is not allowed on ", req.path));
    } else if (res.status != 404) {
      s = absl::UnknownError(absl::StrCat("HTTP status ", res.status));
    }
    res.set_content(ErrorJson(s).dump(), "application/json");
  });
  svr.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("http: request failed with an exception: {}", what);
        SendError(res, absl::InternalError("the server failed on this request"));
      });

  // The playground: a static page on the endpoints below (no token needed to load it; its
  // calls carry the token typed into it).
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("Content-Security-Policy",
                   "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                   "script-src 'self' 'unsafe-inline'");
    res.set_content(kPlaygroundHtml, sizeof(kPlaygroundHtml) - 1, "text/html; charset=utf-8");
  });

  svr.Get("/health", [service](const httplib::Request&, httplib::Response& res) {
    if (service->draining()) {
      SendJson(res, 503, {{"status", "draining"}});
    } else if (service->handlers() == nullptr) {
      SendJson(res, 503, {{"status", "loading"}});
    } else {
      SendJson(res, 200, {{"status", "serving"}});
    }
  });

  // Begins a call as the gRPC method `rpc`; answers and returns null when refused.
  auto begin = [service](const httplib::Request& req, httplib::Response& res,
                         const char* rpc) -> std::shared_ptr<ContextCacheService::Call> {
    Peer peer;
    peer.address = req.remote_addr;
    // With mutual TLS the handshake verified the client's certificate.
    if (req.ssl != nullptr) {
      if (X509* cert = SSL_get1_peer_certificate(req.ssl); cert != nullptr) {
        peer.has_certificate = SSL_get_verify_result(req.ssl) == X509_V_OK;
        peer.identities = CertificateIdentities(cert);
        X509_free(cert);
      }
    }
    absl::StatusOr<std::shared_ptr<ContextCacheService::Call>> call = service->BeginExternalCall(
        req.get_header_value("Authorization"), peer, req.get_header_value("X-Request-Id"), rpc);
    if (!call.ok()) {
      SendError(res, call.status());
      return nullptr;
    }
    res.set_header("X-Request-Id", ContextCacheService::CallRequestId(**call));
    return *call;
  };
  // Ends a call that answers in one body.
  auto end = [](ContextCacheService::Call& call, httplib::Response& res, const absl::Status& s,
                const json& body, std::string_view extra = "") {
    if (s.ok()) {
      SendJson(res, 200, body);
    } else {
      SendError(res, s);
    }
    ContextCacheService::EndExternalCall(
        call, s, absl::StrCat("via=http", extra.empty() ? "" : " ", std::string(extra)));
  };

  svr.Get("/v1/models", [=](const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "GetModelInfo");
    if (call == nullptr) return;
    const Model& model = service->handlers()->model();
    const ModelConfig& c = model.config();
    json entry = {{"id", ModelIdFor(c.name)},
                  {"object", "model"},
                  {"created", 0},
                  {"owned_by", "ctxcache"},
                  {"ctxcache",
                   {{"name", c.name},
                    {"architecture", c.arch},
                    {"fingerprint", model.fingerprint()},
                    {"context_length", c.n_ctx_train},
                    {"kv_bytes_per_token", model.KvBytesPerToken(2)},
                    {"devices", service->info().worker_devices},
                    {"methods", MethodsServed(model)}}}};
    end(*call, res, absl::OkStatus(), {{"object", "list"}, {"data", json::array({entry})}});
  });

  // POST /v1/chat/completions and /v1/completions.
  auto completion = [=](const httplib::Request& req, httplib::Response& res, bool chat) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "Generate");
    if (call == nullptr) return;
    const Handlers* handlers = service->handlers();
    const std::string model_id = ModelIdFor(handlers->model().config().name);
    absl::StatusOr<json> body = ParseJsonObject(req.body);
    absl::StatusOr<CompletionRequest> parsed =
        body.ok() ? CompletionFromJson(*body, chat, model_id) : body.status();
    absl::StatusOr<GenerateInput> in = parsed.ok() ? FromProto(parsed->req) : parsed.status();
    absl::Status valid = in.ok() ? handlers->ValidateGenerate(*in) : in.status();
    if (!valid.ok()) {
      end(*call, res, valid, {});
      return;
    }
    auto input = std::make_shared<GenerateInput>(*std::move(in));
    auto job = std::make_shared<HttpJob>();
    const std::string tenant = ContextCacheService::CallTenant(*call);
    const Clock::time_point deadline = Clock::time_point::max();
    const StopCheck stop = service->MakeStop(&job->cancelled, deadline);
    ServerMetrics* const metrics = service->metrics();
    auto work = [=](EngineWorker& worker, Reservation& reservation, double queue_seconds) {
      absl::StatusOr<GenerateOutcome> out = handlers->Generate(
          worker, reservation, tenant, *input, stop,
          [job](std::string_view delta) {
            if (job->cancelled.load()) return false;
            std::lock_guard<std::mutex> lock(job->mu);
            job->pending.append(delta.data(), delta.size());
            job->text.append(delta.data(), delta.size());
            job->cv.notify_all();
            return true;
          },
          deadline);
      reservation.Release();
      if (out.ok()) {
        if (metrics != nullptr) metrics->RecordGenerate(*out, tenant);
        std::lock_guard<std::mutex> lock(job->mu);
        ToProto(*out, queue_seconds, &job->usage);
      }
      job->Finish(out.status());
    };
    if (absl::Status queued = HttpJob::Submit(job, service->scheduler(), tenant,
                                              handlers->EstimateKvBytes(*input), deadline, work);
        !queued.ok()) {
      end(*call, res, queued, {});
      return;
    }
    const std::string id =
        absl::StrCat(chat ? "chatcmpl-" : "cmpl-", ContextCacheService::CallRequestId(*call));
    const int64_t created = UnixSeconds();
    // Until the first text (or the end): an error found by the worker (a context id that is
    // not there, a prompt over the window) still gets its own HTTP status.
    {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->status.has_value() || !job->pending.empty(); });
      if (job->status && !job->status->ok()) {
        const absl::Status s = *job->status;
        lock.unlock();
        end(*call, res, s, {});
        return;
      }
    }
    auto answer = [=](const pb::Usage& usage, const std::string& text) {
      json choice = {{"index", 0}, {"finish_reason", FinishName(usage.finish_reason())}};
      if (chat) {
        choice["message"] = {{"role", "assistant"}, {"content", text}};
      } else {
        choice["text"] = text;
        choice["logprobs"] = nullptr;
      }
      return json{{"id", id},
                  {"object", chat ? "chat.completion" : "text_completion"},
                  {"created", created},
                  {"model", model_id},
                  {"choices", json::array({choice})},
                  {"usage", UsageJson(usage)},
                  {"ctxcache", SavingsJson(usage)}};
    };
    if (!parsed->stream) {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->status.has_value(); });
      const absl::Status s = *job->status;
      const json body_out = s.ok() ? answer(job->usage, job->text) : json{};
      lock.unlock();
      end(*call, res, s, body_out,
          absl::StrCat("completion_tokens=", job->usage.completion_tokens()));
      return;
    }
    // Server-Sent Events: a chunk per text delta, the finish reason, the usage chunk when asked
    // (stream_options.include_usage), then [DONE]. An error after the first text is a last
    // data line in the error shape. A client that goes away cancels the job.
    const bool include_usage = parsed->include_usage;
    auto chunk = [=](const json& delta_or_text, const json& finish) {
      json choice = {{"index", 0}, {"finish_reason", finish}};
      if (chat) {
        choice["delta"] = delta_or_text;
      } else {
        choice["text"] = delta_or_text;
        choice["logprobs"] = nullptr;
      }
      return json{{"id", id},
                  {"object", chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", created},
                  {"model", model_id},
                  {"choices", json::array({choice})}};
    };
    auto final_status =
        std::make_shared<absl::Status>(absl::CancelledError("the client went away"));
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [=](size_t /*offset*/, httplib::DataSink& sink) {
          auto send = [&](const json& j) {
            const std::string line = absl::StrCat("data: ", j.dump(), "\n\n");
            return sink.write(line.data(), line.size());
          };
          if (chat && !send(chunk({{"role", "assistant"}, {"content", ""}}, nullptr))) {
            job->Cancel();
            return false;
          }
          for (;;) {
            std::string text;
            bool done = false;
            {
              std::unique_lock<std::mutex> lock(job->mu);
              job->cv.wait_for(lock, std::chrono::milliseconds(100),
                               [&] { return job->status.has_value() || !job->pending.empty(); });
              text.swap(job->pending);
              done = job->status.has_value();
            }
            if (!text.empty()) {
              if (!send(chunk(chat ? json{{"content", text}} : json(text), nullptr))) {
                job->Cancel();
                return false;
              }
            } else if (!done && !sink.is_writable()) {
              job->Cancel();
              return false;
            }
            if (done) break;
          }
          absl::Status s;
          pb::Usage usage;
          {
            std::lock_guard<std::mutex> lock(job->mu);
            s = *job->status;
            usage = job->usage;
          }
          bool ok = true;
          if (s.ok()) {
            ok = send(chunk(chat ? json::object() : json(""), FinishName(usage.finish_reason())));
            if (ok && include_usage) {
              json u = chunk(nullptr, nullptr);
              u["choices"] = json::array();
              u["usage"] = UsageJson(usage);
              u["ctxcache"] = SavingsJson(usage);
              ok = send(u);
            }
          } else {
            ok = send(ErrorJson(s));
          }
          const std::string done_line = "data: [DONE]\n\n";
          ok = ok && sink.write(done_line.data(), done_line.size());
          *final_status = ok ? s : absl::CancelledError("the client went away");
          sink.done();
          return true;
        },
        [call, job, final_status](bool /*success*/) {
          if (final_status->code() == absl::StatusCode::kCancelled) job->Cancel();
          ContextCacheService::EndExternalCall(
              *call, *final_status,
              absl::StrCat("via=http stream=sse completion_tokens=",
                           job->usage.completion_tokens()));
        });
  };
  svr.Post("/v1/chat/completions",
           [completion](const httplib::Request& req, httplib::Response& res) {
             completion(req, res, true);
           });
  svr.Post("/v1/completions", [completion](const httplib::Request& req, httplib::Response& res) {
    completion(req, res, false);
  });

  // POST /v1/contexts: compress (the body mirrors CompressRequest).
  svr.Post("/v1/contexts", [=](const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "Compress");
    if (call == nullptr) return;
    const Handlers* handlers = service->handlers();
    absl::StatusOr<json> body = ParseJsonObject(req.body);
    pb::CompressRequest creq;
    absl::Status st = body.ok() ? CompressFromJson(*body, "", &creq) : body.status();
    if (st.ok() && body->contains("model") && !(*body)["model"].is_null()) {
      const std::string model_id = ModelIdFor(handlers->model().config().name);
      if (!(*body)["model"].is_string() || (*body)["model"].get<std::string>() != model_id) {
        st = absl::NotFoundError(absl::StrCat("this server serves the model \"", model_id, "\""));
      }
    }
    absl::StatusOr<CompressInput> in = st.ok() ? FromProto(creq) : st;
    absl::Status valid = in.ok() ? handlers->ValidateCompress(*in, "") : in.status();
    if (!valid.ok()) {
      end(*call, res, valid, {});
      return;
    }
    auto input = std::make_shared<CompressInput>(*std::move(in));
    auto job = std::make_shared<HttpJob>();
    const std::string tenant = ContextCacheService::CallTenant(*call);
    const Clock::time_point deadline = Clock::time_point::max();
    const StopCheck stop = service->MakeStop(&job->cancelled, deadline);
    auto result = std::make_shared<json>();
    auto work = [=](EngineWorker& worker, Reservation& reservation, double queue_seconds) {
      absl::StatusOr<CompressOutcome> out =
          handlers->Compress(worker, reservation, tenant, *input, stop, deadline);
      reservation.Release();
      if (out.ok()) {
        pb::ContextInfo info;
        ToProto(out->context, &info);
        json j = ContextJson(info);
        json retained = json::array();
        if (out->context.in_memory) retained.push_back("memory");
        if (out->context.in_redis) retained.push_back("redis");
        j["retained_in"] = retained;
        j["compute_ms"] = out->context.compute_seconds * 1e3;
        j["total_ms"] = out->total_seconds * 1e3;
        j["queue_ms"] = queue_seconds * 1e3;
        std::lock_guard<std::mutex> lock(job->mu);
        *result = std::move(j);
      }
      job->Finish(out.status());
    };
    if (absl::Status queued = HttpJob::Submit(job, service->scheduler(), tenant,
                                              handlers->EstimateKvBytes(*input), deadline, work);
        !queued.ok()) {
      end(*call, res, queued, {});
      return;
    }
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->status.has_value(); });
    const absl::Status s = *job->status;
    const json out = *result;
    lock.unlock();
    end(*call, res, s, out, s.ok() ? absl::StrCat("tier=", out.value("tier", "")) : "");
  });

  // GET and DELETE /v1/contexts/{id}: the cache only.
  svr.Get(R"(/v1/contexts/([^/]+))", [=](const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "GetContext");
    if (call == nullptr) return;
    absl::StatusOr<ContextOutcome> out = service->handlers()->GetContext(
        ContextCacheService::CallTenant(*call), req.matches[1].str());
    json body;
    if (out.ok()) {
      pb::ContextInfo info;
      ToProto(*out, &info);
      body = ContextJson(info);
    }
    end(*call, res, out.status(), body);
  });
  svr.Delete(R"(/v1/contexts/([^/]+))", [=](const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "DeleteContext");
    if (call == nullptr) return;
    const std::string id = req.matches[1].str();
    const absl::Status s =
        service->handlers()->DeleteContext(ContextCacheService::CallTenant(*call), id);
    end(*call, res, s, {{"id", id}, {"object", "context"}, {"deleted", true}});
  });
}

}  // namespace ctxcache::server
