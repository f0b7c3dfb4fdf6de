// The interface every single-pass KV-form method implements: given the document's prefill,
// score each cache entry (running whatever the method appends and removes again); the shared
// selector (select.h) then keeps the top budget. Finch selects while it prefills (chunk by
// chunk), so it has its own entry point here instead of a Scorer.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/compress/compress.h"
#include "engine/compress/select.h"
#include "engine/kv_cache.h"
#include "engine/model.h"

namespace ctxcache {

class Scorer {
 public:
  virtual ~Scorer() = default;
  // `cache` holds the document's plain prefill (positions 0..n-1). The scorer may append
  // (and must remove again) its own tokens; on return the cache holds exactly the document's
  // entries and the result has one score per entry (select.h HeadScores).
  virtual absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                           const CompressionSpec& spec, KvCache& cache) = 0;
  // Entries at positions >= this are always kept (the method's recent window); none by default.
  virtual int32_t RecentFrom(int64_t n_doc, const CompressionSpec& spec) const {
    (void)n_doc;
    (void)spec;
    return std::numeric_limits<int32_t>::max();
  }
  // Tokens the method appends after the document in the same window (to check the fit).
  virtual int64_t ExtraTokens(const Model& model, const CompressionSpec& spec) const {
    (void)model;
    (void)spec;
    return 0;
  }
};

// One factory per method family (the files named after them).
std::unique_ptr<Scorer> MakeStreamingScorer();          // streaming_anchor.cc
std::unique_ptr<Scorer> MakeAnchorScorer();             // streaming_anchor.cc
std::unique_ptr<Scorer> MakeSnapKvScorer();             // snapkv_kvzip.cc
std::unique_ptr<Scorer> MakeKvzipScorer();              // snapkv_kvzip.cc
std::unique_ptr<Scorer> MakeExpectedAttentionScorer();  // expected_attention.cc

// Finch (finch.cc): chunked prompt-guided prefill + selection, `budget` entries per head.
absl::StatusOr<KvCache> RunFinch(Runner& runner, absl::Span<const int32_t> doc,
                                 const CompressionSpec& spec, int64_t budget,
                                 const CompressProgress& progress);

// Digest form (digest.cc): the document's chunks through the model's digest compressor.
// FailedPrecondition when the model has none attached.
absl::StatusOr<CompressedContext> CompressDigest(Runner& runner,
                                                 absl::Span<const int32_t> doc_tokens,
                                                 const CompressionSpec& spec,
                                                 const CompressProgress& progress);

// ---- Shared by the methods ------------------------------------------------------------------

// The observation window of prompt-guided methods: the question's tokens, or the generic
// instruction's when the spec has no question (no BOS; the document precedes them).
std::vector<int32_t> WindowTokens(const Model& model, const CompressionSpec& spec);

// Runs `tokens` on top of `cache` observing every row and calls `on_layer(layer, probs,
// n_rows, max_keys)` per layer (the AttentionObserver contract of model.h).
absl::Status ForwardObserved(Runner& runner, absl::Span<const int32_t> tokens, KvCache& cache,
                             const AttentionObserver& on_layer);

// SnapKV scores of one layer's entries as seen by the rows just observed: mean over the rows
// and the GQA group, then pooled. n_keys[g] = entries of KV head g to score; out[g] (one per KV
// head) is overwritten. Used by snapkv and SelectForQuery.
void WindowScores(const float* probs, int n_heads, int n_rows, int64_t max_keys,
                  absl::Span<const int64_t> n_keys, int kernel, bool max_pool,
                  std::vector<float>* out);

// Recovers attention queries from the probabilities they produced. Softmax logits are
// q.k_j * scale + c (c a per-row constant), and p_j > 0 gives log p_j exactly, so q is the
// least-squares solution of [k_j, 1] . [q * scale, c] = log p_j over keys whose span is the
// full head dimension (a tiny ridge term keeps directions the keys never visit at ~0).
// keys [n_keys, head_dim]; rows[r] points at row r's probabilities over those same keys;
// q_out [n_rows, head_dim]. Used by expected_attention, whose statistics need queries that
// the Runner does not expose.
void RecoverQueries(const float* keys, int64_t n_keys, int head_dim,
                    absl::Span<const float* const> rows, float scale, float* q_out);

}  // namespace ctxcache
