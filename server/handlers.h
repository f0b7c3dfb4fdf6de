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
#include "absl/types/span.h"
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
  // The prompt's own text: the text prompt, or a chat prompt's contents and system message
  // together; and a compression's question. Tokenized and prefilled on the request's worker.
  int64_t max_prompt_bytes = 1 << 20;
  int max_chat_messages = 1024;
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

// "Prefill once, select per query" (ContextRef.select): exactly one of ratio (> 1) and
// budget (> 0 entries per KV head).
struct QuerySelect {
  double ratio = 0;
  int64_t budget = 0;
};

// A context to place before the prompt: by id (context_id set) or inline (compressed and
// cached on the way); with select, only the entries this request's prompt selects from it.
struct ContextInput {
  std::string context_id;
  std::optional<CompressInput> inline_doc;
  std::optional<QuerySelect> select;
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
  // The tiers that held the context when the call returned (StoreResult): neither means its
  // id will not be found later.
  bool in_memory = false;
  bool in_redis = false;
  // Generate with select: the entries the prompt selected from `context` (null otherwise).
  std::shared_ptr<const CompressedContext> selected;

  // What a generation attends over: the selected entries, else the whole stored context.
  const CompressedContext& attended() const { return selected ? *selected : *context; }
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
  // fp16 K+V: the composed cache's entries (attended()) + prompt + generated tokens.
  int64_t kv_bytes_attended = 0;
  double context_seconds = 0;  // loading/compressing, selecting and composing the contexts
};

// Why a call's work must stop (common/stop.h): OK to continue, else the status the call ends
// with (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE when a drain runs out of time). The
// handlers hand it to the engine (Runner::set_stop: every layer of prefill, compression and
// decode), to composition, and to the store (its single flight and Redis lookups).
using StopCheck = StopFn;

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
  // The worker's runner is taken only for the engine work (compression, selection,
  // composition: EngineWorker::Exclusive); a generation's passes join its batched steps.
  absl::StatusOr<CompressOutcome> Compress(EngineWorker& worker, Reservation& reservation,
                                           const std::string& tenant, const CompressInput& in,
                                           const StopCheck& stop,
                                           RedisDeadline deadline = kNoRedisDeadline) const;
  absl::StatusOr<GenerateOutcome> Generate(EngineWorker& worker, Reservation& reservation,
                                           const std::string& tenant, const GenerateInput& in,
                                           const StopCheck& stop, const TextCallback& on_text,
                                           RedisDeadline deadline = kNoRedisDeadline) const;
  // `deadline` (steady clock; the call's) bounds every Redis operation, together with
  // redis.command_timeout_ms.
  // Cache only (no engine work).
  absl::StatusOr<ContextOutcome> GetContext(const std::string& tenant,
                                            const std::string& context_id,
                                            RedisDeadline deadline = kNoRedisDeadline) const;
  absl::Status DeleteContext(const std::string& tenant, const std::string& context_id,
                             RedisDeadline deadline = kNoRedisDeadline) const;

  // The prompt's tokens as the model reads them after the contexts, and the part of them
  // that per-query selection (ContextRef.select) scores the contexts by: all but the preamble
  // every request shares (BOS, and a chat prompt's system turn).
  absl::StatusOr<std::vector<int32_t>> PromptTokens(const GenerateInput& in) const;
  absl::Span<const int32_t> SelectionQuery(const GenerateInput& in,
                                           absl::Span<const int32_t> prompt) const;

  const Model& model() const { return model_; }
  const RequestLimits& limits() const { return limits_; }

 private:
  absl::Status ValidateDocument(const DocumentInput& doc, const std::string& field) const;
  absl::StatusOr<std::vector<int32_t>> Tokenize(const DocumentInput& doc,
                                                const std::string& field) const;
  // Looks up or computes one context (the store's single flight dedupes concurrent calls).
  absl::StatusOr<ContextOutcome> LoadOrCompress(EngineWorker& worker, const std::string& tenant,
                                                const CompressInput& in, const std::string& field,
                                                Reservation& reservation, int64_t reserved_base,
                                                const StopCheck& stop,
                                                RedisDeadline deadline) const;
  // Sets `selected` of every context the request selects from (ContextRef.select), and the
  // reservation to the selected cache plus `own_bytes` (prompt and answer).
  absl::Status SelectByPrompt(EngineWorker& worker, Reservation& reservation, int64_t own_bytes,
                              const GenerateInput& in, absl::Span<const int32_t> prompt,
                              const StopCheck& stop, std::vector<ContextOutcome>& contexts) const;
  int64_t WorkingBytesPerToken() const { return model_.KvBytesPerToken(sizeof(float)); }
  // Tokens of working cache compressing n_tokens with `spec` needs: all of them for a
  // prefill-based method, the digest tokens for "digest".
  int64_t CompressWorkingTokens(int64_t n_tokens, const CompressionSpec& spec) const;
  // One kept entry (K and V rows of one layer and KV head) in the working cache.
  int64_t WorkingBytesPerEntry() const {
    return int64_t{2} * model_.config().head_dim * static_cast<int64_t>(sizeof(float));
  }

  const Model& model_;
  ContextStore& store_;
  RequestLimits limits_;
  ServerMetrics* metrics_;
  ChatTemplate chat_template_;
  absl::Status chat_template_status_;
};

}  // namespace ctxcache::server
