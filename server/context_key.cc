// Context id derivation (see context_key.h).
#include "server/context_key.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace ctxcache::server {

bool MethodUsesQuestion(std::string_view method) {
  return method == "snapkv" || method == "finch";
}

std::string ContextId(std::string_view tenant, std::string_view model_fingerprint,
                      const CompressionSpec& spec, uint32_t method_version,
                      absl::Span<const int32_t> tokens) {
  // Every field is length-prefixed (UpdateField), so no two different field lists hash the
  // same bytes; the leading tag versions the derivation itself. v2 (issue 14): the model
  // fingerprint covers the hyper-parameters and float params are exact (shortest round-trip
  // decimal), so no id made under the old, coarser identity can name a new context.
  Sha256 h;
  h.UpdateField("ctxcache.context_id.v2");
  h.UpdateField(tenant);
  h.UpdateField(model_fingerprint);
  h.UpdateField(spec.method);
  h.UpdateField(spec.CanonicalParams());
  h.UpdateField(absl::StrCat(method_version));
  // Token ids as little-endian int32 (every platform we build for is little-endian).
  std::string token_bytes(tokens.size() * sizeof(int32_t), '\0');
  if (!tokens.empty()) std::memcpy(token_bytes.data(), tokens.data(), token_bytes.size());
  h.UpdateField(token_bytes);
  if (MethodUsesQuestion(spec.method)) {
    h.UpdateField("question");
    h.UpdateField(spec.question);
  } else {
    h.UpdateField("no-question");
  }
  return h.FinalHex();
}

absl::Status ValidateContextId(std::string_view id) {
  bool ok = id.size() == 64;
  for (char c : id) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "context_id '", std::string(id.substr(0, 80)),
      "' is not a context id (64 lowercase hex characters, as Compress returns)"));
}

}  // namespace ctxcache::server
