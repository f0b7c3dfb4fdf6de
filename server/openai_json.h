// OpenAI-style JSON request bodies -> the gRPC requests they mean (the HTTP API's translation,
// server/http_api.h). Untrusted input: every field is type-checked and named in its error, and
// the result goes through the same FromProto and Handlers validation as a gRPC request.
// Fuzzed by tests/fuzz/openai_json_fuzz.cc.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ctxcache/v1/ctxcache.pb.h"

namespace ctxcache::server {

// A JSON object from a request body; InvalidArgument with the parser's position otherwise.
absl::StatusOr<nlohmann::json> ParseJsonObject(std::string_view text);

struct CompletionRequest {
  ctxcache::v1::GenerateRequest req;
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
};

// /v1/chat/completions (chat) or /v1/completions: `model` must be model_id (NotFound
// otherwise); the sampling fields, stop, max_tokens / max_completion_tokens, stream options,
// the engine's extensions and ctxcache's `contexts`.
absl::StatusOr<CompletionRequest> CompletionFromJson(const nlohmann::json& body, bool chat,
                                                     const std::string& model_id);

// POST /v1/contexts and an inline context: document (text, {"text"} or {"tokens"}),
// compression (CompressionParams by field name), question. `where` prefixes field names in
// errors ("contexts[0].").
absl::Status CompressFromJson(const nlohmann::json& v, const std::string& where,
                              ctxcache::v1::CompressRequest* req);

}  // namespace ctxcache::server
