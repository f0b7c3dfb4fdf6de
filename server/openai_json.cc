// OpenAI-style JSON request bodies -> gRPC requests (openai_json.h).
#include "server/openai_json.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ctxcache::server {
namespace {

using json = nlohmann::json;
namespace pb = ::ctxcache::v1;

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

absl::StatusOr<json> ParseJsonObjectImpl(std::string_view text) {
  json body;
  try {
    body = json::parse(text);
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
absl::Status CompressFromJsonImpl(const json& v, const std::string& where,
                                  pb::CompressRequest* req) {
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
      RETURN_IF_ERROR(CompressFromJsonImpl(item, where, ref->mutable_inline_()));
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

absl::StatusOr<CompletionRequest> CompletionFromJsonImpl(const json& body, bool chat,
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

}  // namespace

absl::StatusOr<json> ParseJsonObject(std::string_view text) { return ParseJsonObjectImpl(text); }

absl::StatusOr<CompletionRequest> CompletionFromJson(const json& body, bool chat,
                                                     const std::string& model_id) {
  return CompletionFromJsonImpl(body, chat, model_id);
}

absl::Status CompressFromJson(const json& v, const std::string& where, pb::CompressRequest* req) {
  return CompressFromJsonImpl(v, where, req);
}

}  // namespace ctxcache::server
