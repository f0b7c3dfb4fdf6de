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

// The method version Compress stamps on its output (CompressedContext::method_version). The
// engine keeps its version private, so the server states the one it expects and checks every
// computed context against it (a mismatch is an internal error that names both, never a
// silently wrong key).
uint32_t ExpectedMethodVersion(std::string_view method);

std::string ContextId(std::string_view tenant, std::string_view model_fingerprint,
                      const CompressionSpec& spec, uint32_t method_version,
                      absl::Span<const int32_t> tokens);

// InvalidArgument unless `id` is 64 lowercase hex characters.
absl::Status ValidateContextId(std::string_view id);

}  // namespace ctxcache::server
