// Context ids: the hex SHA-256 that names a compressed context in the API and in every cache
// tier. It covers everything that changes the compressed bytes — tenant (isolation), model
// fingerprint, method, canonical parameters, method version, the document's token ids, and
// the question for the methods that read it — and nothing else, so equal inputs share one
// entry across requests, processes and replicas.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/compress/compress.h"

namespace ctxcache::server {

// Methods whose output depends on CompressionSpec::question (prompt-guided).
bool MethodUsesQuestion(std::string_view method);

// `method_version` is ctxcache::MethodVersion(spec.method) (compress.h).
std::string ContextId(std::string_view tenant, std::string_view model_fingerprint,
                      const CompressionSpec& spec, uint32_t method_version,
                      absl::Span<const int32_t> tokens);

// InvalidArgument unless `id` is 64 lowercase hex characters.
absl::Status ValidateContextId(std::string_view id);

}  // namespace ctxcache::server
