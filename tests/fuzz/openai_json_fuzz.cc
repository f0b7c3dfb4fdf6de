// Fuzz target for the HTTP API's request translation (server/openai_json.h): an OpenAI-style
// JSON body -> the GenerateRequest / CompressRequest it means -> FromProto. Invariants:
//  * ParseJsonObject answers OK or INVALID_ARGUMENT (never throws: nlohmann's exceptions stop
//    inside it);
//  * CompletionFromJson answers OK, INVALID_ARGUMENT or NOT_FOUND (the model), and the same
//    request twice (deterministic: the same serialized GenerateRequest);
//  * FromProto of what it produced answers OK or INVALID_ARGUMENT; so does CompressFromJson.
// Input: the body; its first byte picks chat (even) or text completion (odd). Replayed with
// mutations over corpus/openai_json (gcc and ASan builds); not in the libFuzzer build, which
// has no gRPC / protobuf.
#include <cstdint>
#include <string>
#include <string_view>

#include "server/convert.h"
#include "server/openai_json.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

bool OneOf(const absl::Status& s, absl::StatusCode a, absl::StatusCode b = absl::StatusCode::kOk) {
  return s.ok() || s.code() == a || s.code() == b;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ctxcache::server::CompletionRequest;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const bool chat = size == 0 || data[0] % 2 == 0;
  absl::StatusOr<nlohmann::json> body = ctxcache::server::ParseJsonObject(text);
  FUZZ_CHECK(OneOf(body.status(), absl::StatusCode::kInvalidArgument));
  if (!body.ok()) return 0;

  absl::StatusOr<CompletionRequest> a = ctxcache::server::CompletionFromJson(*body, chat, "m");
  absl::StatusOr<CompletionRequest> b = ctxcache::server::CompletionFromJson(*body, chat, "m");
  FUZZ_CHECK(OneOf(a.status(), absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound));
  FUZZ_CHECK(a.status() == b.status());
  if (a.ok()) {
    FUZZ_CHECK(a->req.SerializeAsString() == b->req.SerializeAsString());
    FUZZ_CHECK(a->stream == b->stream && a->include_usage == b->include_usage);
    FUZZ_CHECK(a->chat == chat);
    FUZZ_CHECK(
        OneOf(ctxcache::server::FromProto(a->req).status(), absl::StatusCode::kInvalidArgument));
  }
  ctxcache::v1::CompressRequest creq;
  const absl::Status c = ctxcache::server::CompressFromJson(*body, "", &creq);
  FUZZ_CHECK(OneOf(c, absl::StatusCode::kInvalidArgument));
  if (c.ok()) {
    FUZZ_CHECK(
        OneOf(ctxcache::server::FromProto(creq).status(), absl::StatusCode::kInvalidArgument));
  }
  return 0;
}
