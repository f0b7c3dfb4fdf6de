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
#include "server/server_metrics.h"

namespace ctxcache::server {
namespace {

using json = nlohmann::json;
namespace pb = ::ctxcache::v1;
using Clock = std::chrono::steady_clock;

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

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// ---- JSON fields: absent (or null) is "not given"; a wrong type names the field ---------------

const json* Find(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

absl::StatusOr<std::optional<std::string>> OptString(const json& obj, const char* key,
                                                     const std::string& where) {
  const json* v = Find(obj, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_string()) return Invalid(absl::StrCat(where, key, " must be a string"));
  return v->get<std::string>();
}

absl::StatusOr<std::optional<double>> OptNumber(const json& obj, const char* key,
                                                const std::string& where) {
  const json* v = Find(obj, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) return Invalid(absl::StrCat(where, key, " must be a number"));
  return v->get<double>();
}

absl::StatusOr<std::optional<int64_t>> OptInt(const json& obj, const char* key,
                                              const std::string& where, int64_t lo, int64_t hi) {
  const json* v = Find(obj, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number_integer()) return Invalid(absl::StrCat(where, key, " must be an integer"));
  const bool is_unsigned = v->is_number_unsigned();
  const int64_t x = is_unsigned ? static_cast<int64_t>(std::min<uint64_t>(
                                      v->get<uint64_t>(), static_cast<uint64_t>(INT64_MAX)))
                                : v->get<int64_t>();
  if (x < lo || x > hi) {
    return Invalid(
        absl::StrCat(where, key, " = ", v->dump(), " is out of range; allowed: ", lo, " to ", hi));
  }
  return x;
}

absl::StatusOr<std::optional<bool>> OptBool(const json& obj, const char* key,
                                            const std::string& where) {
  const json* v = Find(obj, key);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) return Invalid(absl::StrCat(where, key, " must be true or false"));
  return v->get<bool>();
}

// A protobuf message from a JSON object (its fields by proto name or lowerCamel name); unknown
// fields are an error naming them.
absl::Status ProtoFromJson(const json& v, const std::string& field,
                           google::protobuf::Message* msg) {
  if (!v.is_object()) return Invalid(absl::StrCat(field, " must be an object"));
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto st = google::protobuf::util::JsonStringToMessage(v.dump(), msg, options);
  if (!st.ok()) return Invalid(absl::StrCat(field, ": ", st.message().ToString()));
  return absl::OkStatus();
}

absl::StatusOr<json> ParseBody(const httplib::Request& req) {
  json body;
  try {
    body = json::parse(req.body);
  } catch (const json::parse_error& e) {
    // e.what(): "[json.exception.parse_error.101] parse error at line 1, column 9: ..."
    return Invalid(absl::StrCat("the request body is not valid JSON: ", e.what()));
  }
  if (!body.is_object()) return Invalid("the request body must be a JSON object");
  return body;
}

// ---- request translation ----------------------------------------------------------------------

// `document`: a string (text), {"text": string} or {"tokens": [ids]}.
absl::Status DocumentFromJson(const json& v, const std::string& field, pb::Document* doc) {
  if (v.is_string()) {
    doc->set_text(v.get<std::string>());
    return absl::OkStatus();
  }
  if (!v.is_object()) {
    return Invalid(
        absl::StrCat(field, " must be a string or {\"text\": ...} / {\"tokens\": [...]}"));
  }
  for (const auto& [key, value] : v.items()) {
    if (key == "text") {
      if (!value.is_string()) return Invalid(absl::StrCat(field, ".text must be a string"));
      doc->set_text(value.get<std::string>());
    } else if (key == "tokens") {
      if (!value.is_array()) return Invalid(absl::StrCat(field, ".tokens must be an array"));
      for (const json& id : value) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return Invalid(absl::StrCat(field, ".tokens must hold token ids (integers >= 0)"));
        }
        doc->mutable_tokens()->add_ids(static_cast<int32_t>(id.get<int64_t>()));
      }
    } else {
      return Invalid(absl::StrCat(field, ": unknown field \"", key, "\" (text or tokens)"));
    }
  }
  return absl::OkStatus();
}

// POST /v1/contexts and an inline context: document, compression, question.
absl::Status CompressFromJson(const json& v, const std::string& where, pb::CompressRequest* req) {
  const json* doc = Find(v, "document");
  if (doc == nullptr) return Invalid(absl::StrCat(where, "document is required"));
  RETURN_IF_ERROR(DocumentFromJson(*doc, where + "document", req->mutable_document()));
  if (const json* c = Find(v, "compression"); c != nullptr) {
    RETURN_IF_ERROR(ProtoFromJson(*c, where + "compression", req->mutable_compression()));
  }
  ASSIGN_OR_RETURN(std::optional<std::string> q, OptString(v, "question", where));
  if (q) req->set_question(*q);
  return absl::OkStatus();
}

absl::Status ContextsFromJson(const json& v, pb::GenerateRequest* req) {
  if (!v.is_array()) return Invalid("contexts must be an array");
  for (size_t i = 0; i < v.size(); ++i) {
    const json& item = v[i];
    const std::string where = absl::StrCat("contexts[", i, "].");
    if (!item.is_object()) return Invalid(absl::StrCat("contexts[", i, "] must be an object"));
    for (const auto& [key, value] : item.items()) {
      if (key != "context_id" && key != "document" && key != "compression" && key != "question" &&
          key != "select") {
        return Invalid(absl::StrCat(where, key,
                                    " is not a context field; allowed: context_id, or document "
                                    "with compression and question; and select"));
      }
    }
    pb::ContextRef* ref = req->add_contexts();
    ASSIGN_OR_RETURN(std::optional<std::string> id, OptString(item, "context_id", where));
    if (id && Find(item, "document") != nullptr) {
      return Invalid(absl::StrCat(where, "give either context_id or document, not both"));
    }
    if (id) {
      if (Find(item, "compression") != nullptr || Find(item, "question") != nullptr) {
        return Invalid(absl::StrCat(where, "compression and question go with a document"));
      }
      ref->set_context_id(*id);
    } else if (Find(item, "document") != nullptr) {
      RETURN_IF_ERROR(CompressFromJson(item, where, ref->mutable_inline_()));
    } else {
      return Invalid(absl::StrCat(where, "needs context_id or document"));
    }
    if (const json* sel = Find(item, "select"); sel != nullptr) {
      RETURN_IF_ERROR(ProtoFromJson(*sel, where + "select", ref->mutable_select()));
    }
  }
  return absl::OkStatus();
}

// A chat message's content: a string, or an array of {"type": "text", "text": ...} parts.
absl::StatusOr<std::string> ContentFromJson(const json& v, const std::string& field) {
  if (v.is_string()) return v.get<std::string>();
  if (!v.is_array()) return Invalid(absl::StrCat(field, " must be a string or an array of parts"));
  std::string text;
  for (const json& part : v) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      return Invalid(absl::StrCat(field,
                                  ": only text parts ({\"type\": \"text\", \"text\": ...}) "
                                  "are supported"));
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

struct CompletionRequest {
  pb::GenerateRequest req;
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
};

absl::StatusOr<CompletionRequest> CompletionFromJson(const json& body, bool chat,
                                                     const std::string& model_id) {
  CompletionRequest out;
  out.chat = chat;
  pb::GenerateRequest& req = out.req;
  ASSIGN_OR_RETURN(std::optional<std::string> model, OptString(body, "model", ""));
  if (!model) return Invalid("model is required; GET /v1/models lists it");
  if (*model != model_id) {
    return absl::NotFoundError(absl::StrCat("the model \"", *model,
                                            "\" does not exist; this server "
                                            "serves \"",
                                            model_id, "\" (GET /v1/models)"));
  }
  if (chat) {
    const json* messages = Find(body, "messages");
    if (messages == nullptr || !messages->is_array() || messages->empty()) {
      return Invalid("messages must be a non-empty array");
    }
    for (size_t i = 0; i < messages->size(); ++i) {
      const json& m = (*messages)[i];
      const std::string where = absl::StrCat("messages[", i, "].");
      if (!m.is_object()) return Invalid(absl::StrCat("messages[", i, "] must be an object"));
      ASSIGN_OR_RETURN(std::optional<std::string> role, OptString(m, "role", where));
      if (!role) return Invalid(absl::StrCat(where, "role is required"));
      const json* content = Find(m, "content");
      if (content == nullptr) return Invalid(absl::StrCat(where, "content is required"));
      ASSIGN_OR_RETURN(std::string text, ContentFromJson(*content, where + "content"));
      pb::ChatMessage* cm = req.mutable_chat()->add_messages();
      cm->set_role(*role);
      cm->set_content(std::move(text));
    }
  } else {
    const json* prompt = Find(body, "prompt");
    if (prompt != nullptr && prompt->is_array() && prompt->size() == 1) prompt = &(*prompt)[0];
    if (prompt == nullptr || !prompt->is_string()) {
      return Invalid("prompt must be a string (one prompt per request)");
    }
    req.set_text(prompt->get<std::string>());
  }
  ASSIGN_OR_RETURN(std::optional<bool> stream, OptBool(body, "stream", ""));
  out.stream = stream.value_or(false);
  if (const json* so = Find(body, "stream_options"); so != nullptr) {
    if (!so->is_object()) return Invalid("stream_options must be an object");
    ASSIGN_OR_RETURN(std::optional<bool> usage, OptBool(*so, "include_usage", "stream_options."));
    out.include_usage = usage.value_or(false);
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> n, OptInt(body, "n", "", 1, 1'000'000));
  if (n && *n != 1) return Invalid("n must be 1: one answer per request");
  // Sampling: OpenAI's fields, then the engine's own (top_k, min_p, repetition_penalty,
  // repeat_last_n) as extensions, as llama.cpp's server accepts them.
  pb::SamplingParams* sp = req.mutable_sampling();
  ASSIGN_OR_RETURN(std::optional<double> temperature, OptNumber(body, "temperature", ""));
  if (temperature) sp->set_temperature(static_cast<float>(*temperature));
  ASSIGN_OR_RETURN(std::optional<double> top_p, OptNumber(body, "top_p", ""));
  if (top_p) sp->set_top_p(static_cast<float>(*top_p));
  ASSIGN_OR_RETURN(std::optional<int64_t> seed, OptInt(body, "seed", "", 0, INT64_MAX));
  if (seed) sp->set_seed(static_cast<uint64_t>(*seed));
  ASSIGN_OR_RETURN(std::optional<int64_t> top_k, OptInt(body, "top_k", "", 0, INT32_MAX));
  if (top_k) sp->set_top_k(static_cast<int32_t>(*top_k));
  ASSIGN_OR_RETURN(std::optional<double> min_p, OptNumber(body, "min_p", ""));
  if (min_p) sp->set_min_p(static_cast<float>(*min_p));
  ASSIGN_OR_RETURN(std::optional<double> rep, OptNumber(body, "repetition_penalty", ""));
  if (rep) sp->set_repetition_penalty(static_cast<float>(*rep));
  ASSIGN_OR_RETURN(std::optional<int64_t> last_n, OptInt(body, "repeat_last_n", "", 0, INT32_MAX));
  if (last_n) sp->set_repeat_last_n(static_cast<int32_t>(*last_n));
  for (const char* key : {"frequency_penalty", "presence_penalty"}) {
    ASSIGN_OR_RETURN(std::optional<double> p, OptNumber(body, key, ""));
    if (p && *p != 0) {
      return Invalid(absl::StrCat(key, " is not supported (use repetition_penalty)"));
    }
  }
  for (const char* key : {"tools", "functions", "logit_bias"}) {
    if (const json* v = Find(body, key); v != nullptr && !v->empty()) {
      return Invalid(absl::StrCat(key, " is not supported"));
    }
  }
  if (const json* lp = Find(body, "logprobs"); lp != nullptr && !(lp->is_boolean() && !*lp)) {
    return Invalid("logprobs is not supported");
  }
  if (const json* rf = Find(body, "response_format"); rf != nullptr) {
    if (!rf->is_object() || rf->value("type", "") != "text") {
      return Invalid("response_format: only {\"type\": \"text\"} is supported");
    }
  }
  // max_completion_tokens is the newer name of max_tokens.
  ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens,
                   OptInt(body, "max_completion_tokens", "", 0, INT32_MAX));
  if (!max_tokens) {
    ASSIGN_OR_RETURN(max_tokens, OptInt(body, "max_tokens", "", 0, INT32_MAX));
  }
  if (max_tokens) req.set_max_tokens(static_cast<int32_t>(*max_tokens));
  if (const json* stop = Find(body, "stop"); stop != nullptr) {
    if (stop->is_string()) {
      req.add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& s : *stop) {
        if (!s.is_string()) return Invalid("stop must be a string or an array of strings");
        req.add_stop(s.get<std::string>());
      }
    } else {
      return Invalid("stop must be a string or an array of strings");
    }
  }
  ASSIGN_OR_RETURN(std::optional<bool> ignore_eos, OptBool(body, "ignore_eos", ""));
  if (ignore_eos) req.set_ignore_eos(*ignore_eos);
  if (const json* d = Find(body, "decode"); d != nullptr) {
    RETURN_IF_ERROR(ProtoFromJson(*d, "decode", req.mutable_decode()));
  }
  if (const json* c = Find(body, "contexts"); c != nullptr) {
    RETURN_IF_ERROR(ContextsFromJson(*c, &req));
  }
  return out;
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
                                                        int64_t max_body_bytes) {
  std::unique_ptr<HttpApi> api(new HttpApi());
  api->service_ = service;
  api->server_ = std::make_unique<httplib::Server>();
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
    absl::StatusOr<std::shared_ptr<ContextCacheService::Call>> call = service->BeginExternalCall(
        req.get_header_value("Authorization"), req.get_header_value("X-Request-Id"), rpc);
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
                    {"devices", service->info().worker_devices}}}};
    end(*call, res, absl::OkStatus(), {{"object", "list"}, {"data", json::array({entry})}});
  });

  // POST /v1/chat/completions and /v1/completions.
  auto completion = [=](const httplib::Request& req, httplib::Response& res, bool chat) {
    std::shared_ptr<ContextCacheService::Call> call = begin(req, res, "Generate");
    if (call == nullptr) return;
    const Handlers* handlers = service->handlers();
    const std::string model_id = ModelIdFor(handlers->model().config().name);
    absl::StatusOr<json> body = ParseBody(req);
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
    auto abandon = [job](const absl::Status& reason) { job->Finish(reason); };
    absl::StatusOr<uint64_t> ticket = service->scheduler()->Submit(
        tenant, handlers->EstimateKvBytes(*input), deadline, work, abandon);
    if (!ticket.ok()) {
      end(*call, res, ticket.status(), {});
      return;
    }
    {
      std::lock_guard<std::mutex> lock(job->mu);
      job->scheduler = service->scheduler();
      job->ticket = *ticket;
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
    absl::StatusOr<json> body = ParseBody(req);
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
    auto abandon = [job](const absl::Status& reason) { job->Finish(reason); };
    absl::StatusOr<uint64_t> ticket = service->scheduler()->Submit(
        tenant, handlers->EstimateKvBytes(*input), deadline, work, abandon);
    if (!ticket.ok()) {
      end(*call, res, ticket.status(), {});
      return;
    }
    std::unique_lock<std::mutex> lock(job->mu);
    job->scheduler = service->scheduler();
    job->ticket = *ticket;
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
