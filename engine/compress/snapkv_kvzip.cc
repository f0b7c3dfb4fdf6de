// The two methods that score by attention observed after a plain document prefill.
//
// snapkv — SnapKV (Li et al., arXiv 2404.14469; FasterDecoding/SnapKV snapkv_utils.py) as
//   kvpress SnapKVPress computes it: the observation window (here the question's tokens, or
//   kGenericInstruction) is run after the document; each document key's score is its
//   attention probability averaged over the window rows and over the query heads of its GQA
//   group, then 1-D pooled (kernel 5, avg by default, zero padding). Deviations: the window
//   is not kept (it belongs to the request, which prefills the question itself), and sinks
//   are always kept (the shared selector's rule; SnapKV's top-k rarely drops them anyway).
//
// kvzip — KVzip (Kim et al., arXiv 2505.23416; snu-mllab/KVzip attention/score.py; kvpress
//   KVzipPress): after the document, a repeat prompt and the document itself (teacher
//   forced) are run chunk by chunk; each document key of chunk c scores the max, over the
//   reconstruction rows of chunk c and the query heads of its GQA group, of the attention it
//   receives. Chunk c > 0 uses "Repeat the part of the previous context exactly, starting
//   with" + the last 8 tokens of chunk c-1, as KVzip does. The reconstruction entries are
//   removed again. Selection: KVzip's one threshold over every layer and head is the default
//   (head_budget "global", select.h), with a floor per head that KVzip does not have
//   (head_budget_alpha of the budget, 0.2). Measured on Qwen2.5-0.5B, 2K documents, int4, 60
//   samples (docs/quality.md): share of the full score at 4x / 8x / 32x bytes 100% / 98% /
//   65% with it, 91% / 61% / 32% with a uniform budget per head. Deviations: (1) the softmax
//   runs over all keys (document + prompt + reconstruction so far) instead of KVzip's subset
//   [sinks, chunk c, repeat]; the max over chunk c's keys is then scaled by a per-row
//   constant, which moves scores between rows but keeps the order within one row; (2) chunks
//   are 512 tokens by default (KVzip: 2048) to bound the observed attention ([n_heads,
//   chunk, n_keys] floats) on CPU memory; (3) no chat template around the prompt, and only
//   the reconstruction rows are observed (KVzip also takes the prompt's rows). (1) and (3)
//   together, tried on the same 2K samples (27 of them): global 100% / 100% / 67% against
//   100% / 100% / 64%, uniform 96% / 67% / 35% against 88% / 59% / 28%: small gains, inside
//   the intervals, not adopted yet.
#include <algorithm>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "engine/compress/scorer.h"

namespace ctxcache {
namespace {

constexpr char kRepeatFirst[] = "\n\nRepeat the previous context exactly.\n";
constexpr char kRepeatNext[] = "\n\nRepeat the part of the previous context exactly, starting with";
constexpr int kOverlap = 8;  // KVzip: last tokens of the previous chunk that start the next

class SnapKvScorer : public Scorer {
 public:
  absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                   const CompressionSpec& spec, KvCache& cache) override {
    const ModelConfig& c = runner.model().config();
    const std::vector<int64_t> lengths = HeadLengths(cache);
    const std::vector<int32_t> window = WindowTokens(runner.model(), spec);
    HeadScores scores(lengths.size());
    RETURN_IF_ERROR(ForwardObserved(
        runner, window, cache, [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
          const size_t base = static_cast<size_t>(layer) * c.n_kv_heads;
          WindowScores(probs, c.n_heads, n_rows, max_keys,
                       absl::MakeConstSpan(lengths).subspan(base, c.n_kv_heads), spec.kernel,
                       spec.pooling == "max", &scores[base]);
        }));
    TruncateHeads(cache, lengths);
    cache.next_position = static_cast<int32_t>(doc.size());
    return scores;
  }
  int64_t ExtraTokens(const Model& model, const CompressionSpec& spec) const override {
    return static_cast<int64_t>(WindowTokens(model, spec).size());
  }
};

class KvzipScorer : public Scorer {
 public:
  absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                   const CompressionSpec& spec, KvCache& cache) override {
    const Model& model = runner.model();
    const ModelConfig& c = model.config();
    const Tokenizer& tok = model.tokenizer();
    const int64_t n = static_cast<int64_t>(doc.size());
    const std::vector<int64_t> lengths = HeadLengths(cache);
    const std::vector<int32_t> first = tok.Encode(kRepeatFirst, false, false);
    const std::vector<int32_t> next = tok.Encode(kRepeatNext, false, false);
    const int64_t prompt_max =
        std::max<int64_t>(first.size(), static_cast<int64_t>(next.size()) + kOverlap);
    // The reconstruction must fit the window on top of the document: shrink the chunk.
    const int64_t chunk = std::min<int64_t>(spec.chunk, c.n_ctx_train - n - prompt_max);
    if (chunk < 16) {
      return absl::OutOfRangeError(
          absl::StrCat("kvzip needs room for the repeat prompt and a 16-token chunk after the ", n,
                       "-token document in the ", c.n_ctx_train, "-token window"));
    }
    const int group = c.n_heads / c.n_kv_heads;
    HeadScores scores = ZeroScores(cache);
    for (int64_t b = 0; b < n; b += chunk) {
      RETURN_IF_ERROR(runner.CheckStop());  // each reconstruction chunk (Forward checks layers)
      const int64_t e = std::min(n, b + chunk);
      std::vector<int32_t> tokens = b == 0 ? first : next;
      if (b > 0)
        tokens.insert(tokens.end(), doc.begin() + std::max<int64_t>(0, b - kOverlap),
                      doc.begin() + b);
      const int prompt_len = static_cast<int>(tokens.size());
      tokens.insert(tokens.end(), doc.begin() + b, doc.begin() + e);
      ForwardOptions options;
      options.observe_rows.resize(e - b);
      std::iota(options.observe_rows.begin(), options.observe_rows.end(), prompt_len);
      options.observer = [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
        for (int h = 0; h < c.n_heads; ++h) {
          std::vector<float>& s = scores[static_cast<size_t>(layer) * c.n_kv_heads + h / group];
          for (int r = 0; r < n_rows; ++r) {
            const float* row = probs + (static_cast<int64_t>(h) * n_rows + r) * max_keys;
            for (int64_t j = b; j < e; ++j) s[j] = std::max(s[j], row[j]);
          }
        }
      };
      RETURN_IF_ERROR(runner.Forward(tokens, cache, options, nullptr));
      TruncateHeads(cache, lengths);
      cache.next_position = static_cast<int32_t>(n);
    }
    return scores;
  }
  int64_t ExtraTokens(const Model& model, const CompressionSpec& spec) const override {
    (void)spec;
    const Tokenizer& tok = model.tokenizer();
    return std::max<int64_t>(tok.Encode(kRepeatFirst, false, false).size(),
                             tok.Encode(kRepeatNext, false, false).size() + kOverlap) +
           16;
  }
};

}  // namespace

std::unique_ptr<Scorer> MakeSnapKvScorer() { return std::make_unique<SnapKvScorer>(); }
std::unique_ptr<Scorer> MakeKvzipScorer() { return std::make_unique<KvzipScorer>(); }

}  // namespace ctxcache
