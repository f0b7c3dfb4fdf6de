// What each RPC does, in native types: the gRPC layer (service.cc) converts requests into
// these structs at the edge, validates them cheaply on the network thread (Validate*), and runs
// the work (Compress, Generate, ...) on an engine worker. Nothing here knows protobuf, so the
// logic is testable without a network and the wire format can change without touching it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/context_store.h"
#include "engine/chat_template.h"
#include "engine/compress/compress.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "server/scheduler.h"

namespace ctxcache::server {

struct RequestLimits {
  int64_t max_document_tokens = 32768;
  int64_t max_document_bytes = 4 << 20;
  int max_contexts_per_request = 16;
};

struct DocumentInput {
  bool is_text = true;
  std::string text;             // UTF-8 (checked)
  std::vector<int32_t> tokens;  // ids of the served model's vocabulary
};

struct CompressInput {
  DocumentInput document;
  CompressionSpec spec;  // spec.question: the question, for the methods that use it
};

// A context to place before the prompt: by id (context_id set) or inline (compressed and
// cached on the way).
struct ContextInput {
  std::string context_id;
  std::optional<CompressInput> inline_doc;
};

struct GenerateInput {
  std::vector<ContextInput> contexts;
  bool chat = false;
  std::string text;                   // !chat: the raw prompt
  std::vector<ChatMessage> messages;  // chat
  std::string system;                 // chat: system message when none is given
  GenerateParams params;
};

struct ContextOutcome {
  std::string context_id;
  std::shared_ptr<const CompressedContext> context;
  CacheTier tier = CacheTier::kComputed;
  double compute_seconds = 0;
};

struct CompressOutcome {
  ContextOutcome context;
  double total_seconds = 0;
};

struct GenerateOutcome {
  GenerateResult result;
  std::vector<ContextOutcome> contexts;
  int64_t kv_bytes_full = 0;  // fp16 K+V: contexts uncompressed + prompt + generated tokens
  int64_t kv_bytes_used = 0;  // fp16 K+V: kept context entries + prompt + generated tokens
  double context_seconds = 0;  // loading/compressing and composing the contexts
};

// Why a generation stopped early, asked between steps: OK to continue, else the status the
// call ends with (CANCELLED, DEADLINE_EXCEEDED).
using StopCheck = std::function<absl::Status()>;

// InvalidArgument naming `field` and the byte offset of the first invalid sequence.
absl::Status CheckUtf8(std::string_view text, const std::string& field);

class ServerMetrics;

class Handlers {
 public:
  // `metrics` (optional) receives the compressions actually computed; it must outlive this.
  Handlers(const Model& model, ContextStore& store, const RequestLimits& limits,
           ServerMetrics* metrics = nullptr);

  // Cheap checks that need no engine work (sizes, encodings, ids, parameter ranges).
  absl::Status ValidateCompress(const CompressInput& in, const std::string& field) const;
  absl::Status ValidateGenerate(const GenerateInput& in) const;
  // KV bytes (fp32 working caches) to reserve at admission, before tokenizing; a running job
  // corrects its reservation once it knows the real sizes.
  int64_t EstimateKvBytes(const CompressInput& in) const;
  int64_t EstimateKvBytes(const GenerateInput& in) const;

  // On an engine worker.
  absl::StatusOr<CompressOutcome> Compress(Runner& runner, Reservation& reservation,
                                           const std::string& tenant, const CompressInput& in,
                                           const StopCheck& stop) const;
  absl::StatusOr<GenerateOutcome> Generate(Runner& runner, Reservation& reservation,
                                           const std::string& tenant, const GenerateInput& in,
                                           const StopCheck& stop,
                                           const TextCallback& on_text) const;
  // Cache only (no engine work).
  absl::StatusOr<ContextOutcome> GetContext(const std::string& tenant,
                                            const std::string& context_id) const;
  absl::Status DeleteContext(const std::string& tenant, const std::string& context_id) const;

  const Model& model() const { return model_; }
  const RequestLimits& limits() const { return limits_; }

 private:
  absl::Status ValidateDocument(const DocumentInput& doc, const std::string& field) const;
  absl::StatusOr<std::vector<int32_t>> Tokenize(const DocumentInput& doc,
                                                const std::string& field) const;
  // Looks up or computes one context (the store's single flight dedupes concurrent calls).
  absl::StatusOr<ContextOutcome> LoadOrCompress(Runner& runner, const std::string& tenant,
                                                const CompressInput& in, const std::string& field,
                                                Reservation& reservation, int64_t reserved_base,
                                                const StopCheck& stop) const;
  absl::StatusOr<std::vector<int32_t>> PromptTokens(const GenerateInput& in) const;
  int64_t WorkingBytesPerToken() const { return model_.KvBytesPerToken(sizeof(float)); }

  const Model& model_;
  ContextStore& store_;
  RequestLimits limits_;
  ServerMetrics* metrics_;
  ChatTemplate chat_template_;
  absl::Status chat_template_status_;
};

}  // namespace ctxcache::server
