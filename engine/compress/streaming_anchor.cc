// The two position/token-rule methods: no attention is observed, only the plain prefill.
//
// streaming — StreamingLLM (Xiao et al., arXiv 2309.17453; mit-han-lab/streaming-llm
//   kv_cache.py; kvpress StreamingLLMPress): keep the n_sink first tokens and the most recent
//   ones. Score = position, so the selector's top budget is exactly sinks + the last
//   (budget - n_sink) tokens. Deviation: keys keep their original RoPE positions (kvpress
//   default) instead of StreamingLLM's pre-RoPE cache re-rotated by cache index.
//
// anchor — AnLLM (Pang et al., arXiv 2402.07616, §3.3 anchor-based inference) and the
//   training-free SepLLM (HKUDS/SepLLM SepCache): keep the anchor tokens, the initial tokens
//   and the recent window (which also holds the unfinished last sentence AnLLM keeps).
//   Anchors are the model's anchor token "<AC>" when its vocabulary defines one (AnLLM-AC);
//   otherwise separator tokens (AnLLM-EP / SepLLM): tokens whose bytes, spaces removed, are
//   all in spec.separators (".", ",", "\n", ".\n\n", " ?" ... all count). The budget caps
//   the total; over the cap the most recent anchors win. Under the cap nothing else is added
//   (the method keeps fewer than the budget), as AnLLM keeps only anchors. Deviations: no
//   AnSAN mask at prefill (the served model was not trained with one; SepLLM's training-free
//   setting), and original positions are kept (AnLLM's code reuses compact positions).
#include <limits>
#include <optional>
#include <string>

#include "common/status.h"
#include "engine/compress/scorer.h"

namespace ctxcache {
namespace {

class StreamingScorer : public Scorer {
 public:
  absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                   const CompressionSpec& spec, KvCache& cache) override {
    (void)runner;
    (void)doc;
    (void)spec;
    HeadScores scores = ZeroScores(cache);
    for (int l = 0; l < cache.n_layers(); ++l) {
      for (int h = 0; h < cache.n_kv_heads(); ++h) {
        const KvHead& kh = cache.head(l, h);
        std::vector<float>& s = scores[l * cache.n_kv_heads() + h];
        for (int64_t i = 0; i < kh.n(); ++i) s[i] = static_cast<float>(kh.pos[i]);
      }
    }
    return scores;
  }
};

bool IsSeparatorToken(const std::string& bytes, const std::string& separators) {
  bool any = false;
  for (char ch : bytes) {
    if (ch == ' ') continue;
    if (separators.find(ch) == std::string::npos) return false;
    any = true;
  }
  return any;
}

class AnchorScorer : public Scorer {
 public:
  absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                   const CompressionSpec& spec, KvCache& cache) override {
    const Tokenizer& tok = runner.model().tokenizer();
    const std::optional<int32_t> anchor_token = tok.FindToken("<AC>");
    const int64_t n = static_cast<int64_t>(doc.size());
    // Per token: anchor score rising with position (recent anchors first), else -inf.
    std::vector<float> by_pos(n, -std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n; ++i) {
      const bool anchor = anchor_token.has_value()
                              ? doc[i] == *anchor_token
                              : IsSeparatorToken(tok.TokenBytes(doc[i]), spec.separators);
      if (anchor) by_pos[i] = static_cast<float>(i);
    }
    HeadScores scores = ZeroScores(cache);
    for (int l = 0; l < cache.n_layers(); ++l) {
      for (int h = 0; h < cache.n_kv_heads(); ++h) {
        const KvHead& kh = cache.head(l, h);
        std::vector<float>& s = scores[l * cache.n_kv_heads() + h];
        for (int64_t i = 0; i < kh.n(); ++i) s[i] = by_pos[kh.pos[i]];
      }
    }
    return scores;
  }
  int32_t RecentFrom(int64_t n_doc, const CompressionSpec& spec) const override {
    return static_cast<int32_t>(n_doc - spec.window);
  }
};

}  // namespace

std::unique_ptr<Scorer> MakeStreamingScorer() { return std::make_unique<StreamingScorer>(); }
std::unique_ptr<Scorer> MakeAnchorScorer() { return std::make_unique<AnchorScorer>(); }

}  // namespace ctxcache
