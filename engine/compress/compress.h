// The public entry points of KV-form context compression: what to run (CompressionSpec), one
// call that turns a document into a CompressedContext (Compress), composition of several
// contexts into one KV cache (ComposeContexts), and "prefill once, select per query"
// (SelectForQuery). Scoring lives in scorer.h and the method files; selection in select.h.
//
// Methods (sources cited in each method's file):
//   none                full context, nothing pruned (composition reference, "no compression")
//   streaming           sinks + most recent tokens (StreamingLLM)
//   snapkv              question (or generic instruction) window's attention (SnapKV / kvpress)
//   finch               prompt-guided chunked prefill; documents longer than the window (Finch)
//   expected_attention  query-agnostic expected attention of future queries (kvpress)
//   kvzip               query-agnostic context-reconstruction attention (KVzip)
//   anchor              separator/anchor tokens + sinks + recent window (AnLLM / SepLLM)
// and digest form:
//   digest              the model's digest compressor (icformer.h, IC-Former): each chunk of
//                       the document becomes ceil(chunk / ratio) digest vectors (or `budget`
//                       per chunk), read by the model as input embeddings at generation
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/compress/compressed_context.h"
#include "engine/compress/select.h"
#include "engine/kv_cache.h"
#include "engine/model.h"

namespace ctxcache {

// Upper bounds of CompressionSpec's knobs (Validate; GetModelInfo reports them). Far above
// any useful value, they cap the work one request can ask for: expected_attention costs about
// 27 us per n_future unit, pooling and chunks scale with kernel and chunk, and the counts
// must not overflow when multiplied by layers and heads.
inline constexpr int64_t kMaxCompressBudget = int64_t{1} << 24;  // entries per head
inline constexpr int kMaxNSink = 1 << 20;                        // tokens
inline constexpr int kMaxWindow = 1 << 20;                       // tokens
inline constexpr int kMaxChunk = 8192;                           // tokens
inline constexpr int kMaxKernel = 63;                            // odd
inline constexpr int kMaxNFuture = 16384;                        // positions
inline constexpr int64_t kMaxPositions = int64_t{1} << 24;       // finch max_positions
inline constexpr int kMaxSeparatorsBytes = 256;
inline constexpr double kMaxRatio = 1e6;
inline constexpr int64_t kMaxDigestsPerChunk = 65536;            // digest budget

struct CompressionSpec {
  std::string method;
  // Exactly one of: a compression factor > 1 (keep ceil(n / ratio) entries per head), or a
  // token budget > 0 (entries per head; for digest, digest tokens per chunk). Method "none"
  // takes neither.
  double ratio = 0;
  int64_t budget = 0;
  // Select one token set per layer (shared by its KV heads) instead of one per KV head.
  bool per_layer = false;
  // How a layer's budget is split over its KV heads: "uniform" (each keeps the budget) or
  // "adaptive" (Ada-KV, select.h SelectOptions::adaptive: the same total per layer, each head
  // guaranteed its forced entries plus head_budget_alpha of the rest of its budget, the
  // remainder to the best scores of all heads together). Adaptive compares raw scores across
  // heads, which every method it accepts produces in common units: snapkv and finch score
  // attention probabilities (AdaKV's own input), kvzip the max attention probability (KVzip
  // thresholds these across heads itself), expected_attention expected probability times
  // ||v|| (each entry's term of the bound on its head's output error). streaming and anchor
  // score by position alike in every head (adaptive would change nothing) and none selects
  // nothing: they reject it. Not with per_layer. "global" (KVzip's one threshold, select.h
  // SelectOptions::global): the same sharing over every head of every layer at once, the
  // model's total budget unchanged; not for finch (it selects chunk by chunk). Empty: the
  // method's default (DefaultHeadBudget: "global" for kvzip, measured best there, else
  // "uniform"); read it through HeadBudget().
  std::string head_budget;
  double head_budget_alpha = 0.2;  // adaptive and global: kvpress AdaKVPress's alpha_safeguard
  int n_sink = 4;   // first tokens always kept (attention sinks)
  int window = 64;  // recent tokens always kept (anchor; streaming keeps budget - n_sink)
  // The question for prompt-guided methods (snapkv, finch); empty means a generic
  // instruction. Not part of CanonicalParams: the cache key hashes the question separately.
  std::string question;
  // Method-specific knobs.
  int chunk = 512;              // finch: document chunk; kvzip: reconstruction chunk
  int kernel = 5;               // snapkv / SelectForQuery: 1-D pooling kernel (odd, 1 = off)
  std::string pooling = "avg";  // snapkv: "avg" | "max"
  int n_future = 512;           // expected_attention: future positions averaged over
  // finch: positions it may use while compressing (0 = the model's window). Documents longer
  // than this (plus the question) are compressed with compact re-rotated positions; a smaller
  // value bounds the working cache's memory.
  int64_t max_positions = 0;
  // anchor: bytes that make a token a separator when the token is made of them (plus spaces).
  std::string separators = ".,?!;:\n";
  // How the kept entries are stored (every method): "fp16", or KIVI-style "int8" / "int4"
  // (kv_cache.h), which the cache tiers and decode attention read without expanding.
  std::string kv_dtype = "fp16";
  // digest: the compressor's file SHA-256 (IcFormer::file_sha256), part of the cache key so
  // that a retrained compressor never serves another's digests. Set by whoever holds the
  // compressor (Compress fills it in when empty), never taken from a client.
  std::string compressor;

  // InvalidArgument, with a message a person can act on, for unknown methods, a missing or
  // doubled budget, and knobs out of range.
  absl::Status Validate() const;
  // "key=value;..." with sorted keys, only the knobs the method reads: part of cache keys.
  std::string CanonicalParams() const;
  // head_budget, or the method's default when it is empty.
  std::string HeadBudget() const;
};

// The head budget a method uses when none is given: "global" for kvzip (KVzip's own one
// threshold; docs/quality.md: at 2K, 8x bytes, 100% of the full score against 62% uniform),
// "uniform" for every other method (and for kvzip with per_layer, which keeps one set per layer).
std::string_view DefaultHeadBudget(std::string_view method);

// The methods Compress knows, in a stable order.
absl::Span<const char* const> CompressionMethods();
// The output version of `method` (0 for an unknown method): stamped on every context it
// produces (CompressedContext::method_version) and part of every context id. Bumped when the
// method's output changes for the same input and params (spec.cc keeps the table).
uint32_t MethodVersion(std::string_view method);

// Progress of a long compression, for progress bars and streamed progress: the stage
// ("prefill", "score", or "finch" for its chunked pass) and how much of it is done, in
// document tokens (score: 0 of 1 when it starts, 1 of 1 when it ends). Called on the
// compressing thread; must be cheap. Results never depend on whether it is given.
using CompressProgress =
    std::function<void(std::string_view stage, int64_t done, int64_t total)>;

// Generic observation window for prompt-guided methods when no question is given.
inline constexpr char kGenericInstruction[] = "\nSummarize the document above.";

// Prefills `doc_tokens` as the method needs, scores and prunes the KV entries, and returns
// the kept entries per (layer, KV head) with their positions. next_position is the document
// length, except for finch on documents that do not fit the window, whose kept keys are
// re-rotated to compact positions 0..k-1 (next_position k). Every stage (prefill, scoring
// passes, finch's chunks, kvzip's reconstruction, expected_attention's statistics) asks the
// runner's stop (Runner::set_stop) and ends with its status when it fires.
absl::StatusOr<CompressedContext> Compress(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                           const CompressionSpec& spec,
                                           const CompressProgress& progress = nullptr);

// The same work split in three, so that callers that compress one document several ways
// (the quality harness: every method at every ratio) prefill it once and score it once per
// method. Compress(doc, spec) == SelectScored(prefill, ScoreDocument(prefill, spec), spec)
// for every method except finch (which selects while it prefills) and none.
//
// The document's plain prefill, positions 0..n-1, in chunks of kPrefillChunk tokens (bounded
// scratch memory, progress). OutOfRange when it does not fit the window.
inline constexpr int64_t kPrefillChunk = 2048;
absl::StatusOr<KvCache> PrefillDocument(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                        const CompressProgress& progress = nullptr);

// One method's scores of every entry of a prefilled document (spec's budget is not used).
struct DocumentScores {
  std::string method;
  HeadScores scores;
  int32_t recent_from = 0;  // entries at positions >= this are always kept
};
// `prefill` must hold exactly PrefillDocument(doc_tokens); the method may append its own
// tokens (question window, reconstruction) and removes them again, so on return it holds the
// document's entries only (recomputed ones are bit-identical to a plain prefill's).
absl::StatusOr<DocumentScores> ScoreDocument(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                             KvCache& prefill, const CompressionSpec& spec);

// Keeps spec's budget (ratio or token count) of `prefill`'s entries by `scores`.
absl::StatusOr<CompressedContext> SelectScored(const Model& model, const KvCache& prefill,
                                               const DocumentScores& scores,
                                               const CompressionSpec& spec);

// One cache with the contexts placed one after another: context i's keys are re-rotated by
// the exact RoPE shift of the sum of the previous next_positions. FailedPrecondition for a
// context made by another model, InvalidArgument for a wrong kind or shape, OutOfRange when
// the total does not fit the model's window.
// `stop` (common/stop.h) is asked before each context's copy and re-rotation; its status ends
// the composition. This form takes KV contexts only (InvalidArgument for a digest).
absl::StatusOr<KvCache> ComposeContexts(absl::Span<const CompressedContext* const> contexts,
                                        const Model& model, const StopFn& stop = nullptr);
// Any kinds, in any order: a digest context is read by the model (Runner::ForwardEmbeddings)
// at the positions after the contexts before it, attending to them, and its K/V entries are
// placed like a KV context's. The runner's own stop is asked inside those passes.
absl::StatusOr<KvCache> ComposeContexts(absl::Span<const CompressedContext* const> contexts,
                                        Runner& runner, const StopFn& stop = nullptr);

// "Prefill once, select per query": runs `question` on top of a copy of `full`, scores the
// cached entries by the question's attention (SnapKV-style), and returns a cache of at most
// `budget` entries per head (always the 4 sinks and the 64 most recent positions). The
// question's own entries are not kept: the caller prefills the question on the result.
absl::StatusOr<KvCache> SelectForQuery(Runner& runner, const KvCache& full,
                                       absl::Span<const int32_t> question, int64_t budget);

}  // namespace ctxcache
