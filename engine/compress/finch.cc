// finch — Finch (Corallo & Papotti, arXiv 2408.00167, TACL 2024; giulio98/context-compression
// LlamaForCompressedCausalLM.generate; kvpress FinchPress): prompt-guided chunked prefill.
//
// For each document chunk: run [chunk ; question] on top of the already compressed cache,
// observe the question rows' attention over the cached + chunk keys, weight the row of the
// question token that sees m keys by m / (keys the last question token sees) (Finch's
// normalisation by the count of non-zero attention weights), average over the question rows
// and the GQA group (kvpress; per_layer averages over all heads like the original's sum),
// pool over positions (below), keep the top `budget` entries of the candidates, drop the
// question. The final cache holds exactly the budget per head.
//
// Three deviations from the paper's loop, each measured against snapkv on the same document
// and question (Qwen2.5-Coder-0.5B and SmolLM2-135M, RULER niah_single_prose + qa_prose at
// 2K tokens, chunk 512; "needle share" = fraction of (layer, KV head) pairs that keep each
// answer token; numbers below are Qwen on 24 samples at 8x unless said otherwise):
//  1. The full budget after every chunk. The paper keeps |chunk| / cf more entries per chunk
//     (cumulatively ceil(budget * e / n) after the chunk ending at e). That gave the first of
//     four chunks a quarter of the budget, and a fixed part of any chunk's share goes to the
//     sinks / instruction and to the chunk's last tokens (below): a needle in the first chunk
//     was dropped at its own chunk, not evicted later (on a traced sample, keeping earlier
//     survivors unconditionally changed nothing): needle share 0.12-0.18 where snapkv has
//     0.36-0.60 (the four samples with the needle in the first chunk).
//     Keeping the budget at every step needs no more memory than the last step already
//     needs (budget + chunk + question).
//  2. Each chunk is judged in the next chunk's pass (the last chunk in its own). The question
//     rows attend to the tokens just before them whatever they say: after the first chunk of
//     the traced sample, 26% of the kept entries (8x) sat in its last 64 tokens; a single
//     pass gives that attention to the document's end only. A chunk's entries are therefore
//     all kept (Select's recent window) in their own pass and compete in the next, when a
//     whole chunk separates them from the question. Deferring the last 64 / 128 / 256
//     / 512 tokens raised the overlap with snapkv's kept set monotonically (Qwen 8 samples,
//     8x: 0.864 / 0.879 / 0.905 / 0.939; SmolLM2 24 samples: 0.874 / 0.888 / 0.914 / 0.945),
//     and the needle share rose with it on SmolLM2 (0.318 -> 0.330; snapkv 0.329) while
//     staying at snapkv's on Qwen (0.51-0.53; snapkv 0.52). Memory: one more chunk in the
//     working cache; beyond the window the deferral shrinks to what fits, so every document
//     that compressed before still does.
//  3. Scores are average-pooled over positions with kernel 5, like snapkv's default (kvpress
//     FinchPress does not pool): a multi-token answer (a 7-digit number is 7 tokens on Qwen)
//     keeps its neighbours. Alone, pooling took the needle share from 0.36 to 0.45 and the
//     overlap from 0.52 to 0.71 (Qwen 8 samples, 8x).
// Together (Qwen, 24 samples): needle share 0.41 -> 0.55 at 8x (snapkv 0.55) and 0.12 -> 0.18
// at 32x (snapkv 0.17); overlap with snapkv's kept set 0.55 -> 0.94 (8x), 0.43 -> 0.92 (32x).
// The normalisation, the GQA mean and the question window already matched snapkv's: on the
// traced sample one finch chunk covering the whole document, pooled, selected snapkv's set
// (overlap 0.999), and dropping the normalisation changed no needle token's share. Cost: the
// passes see a larger cache; compression took 9% longer at 2K tokens, 25% at 6K and 52% at
// 48K (Qwen, 1 thread; the 48K document is the compact path below).
//
// Positions: when document + question fit the model's window, keys keep their original
// positions (like every other method here, so contexts compose the same way). Otherwise the
// survivors are re-rotated after every chunk to compact positions 0..k-1 (Finch's
// _rerotate_cos_sin / kvpress KeyRerotationPress, an exact RoPE shift by i - p_i), so the
// next chunk starts at k and arbitrarily long documents stay inside the window; the context's
// next_position is then the kept count. spec.max_positions can make the window smaller than
// the model's (bounded working memory; also how the tests exercise this path cheaply).
// Sinks are always kept (shared selector).
//
// head_budget "adaptive" makes every chunk's selection Ada-KV's (select.h): the heads then
// carry different numbers of survivors into the next chunk, so the row weights above are per
// KV head, and a compacted head may span up to budget * n_kv_heads positions (plus the
// deferred chunk, which every head keeps).
#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "engine/compress/scorer.h"

namespace ctxcache {
namespace {

// Average pooling of the scores over positions (snapkv's default kernel; see 3. above).
constexpr int kPoolKernel = 5;

}  // namespace

absl::StatusOr<KvCache> RunFinch(Runner& runner, absl::Span<const int32_t> doc,
                                 const CompressionSpec& spec, int64_t budget,
                                 const CompressProgress& progress) {
  const Model& model = runner.model();
  const ModelConfig& c = model.config();
  const int64_t n = static_cast<int64_t>(doc.size());
  const std::vector<int32_t> question = WindowTokens(model, spec);
  const int64_t nq = static_cast<int64_t>(question.size());
  const int64_t n_ctx =
      spec.max_positions > 0 ? std::min<int64_t>(spec.max_positions, c.n_ctx_train) : c.n_ctx_train;
  const bool compact = n + nq > n_ctx;
  const int64_t chunk = spec.chunk;
  // The most survivors one head can hold (adaptive: a whole layer's budget, when alpha is 0).
  const bool adaptive = spec.HeadBudget() == "adaptive";
  const int64_t span = adaptive ? budget * c.n_kv_heads : budget;
  if (compact && span + chunk + nq > n_ctx) {
    return absl::OutOfRangeError(absl::StrCat(
        "finch on a ", n, "-token document needs ",
        adaptive ? absl::StrCat("budget x KV heads (", budget, " x ", c.n_kv_heads, ")")
                 : absl::StrCat("budget (", budget, ")"),
        " + chunk (", chunk, ") + question (", nq, ") <= the ", n_ctx,
        "-position window; raise the ratio or lower the chunk"));
  }
  // Entries of a chunk kept unjudged until the next pass (2. above): the whole chunk, or in
  // compact mode what fits beside budget + chunk + question (the working cache's peak).
  // Adaptive: a head may hold span + deferred entries (the other heads keep their deferred
  // chunks), so the deferral is what fits beside span + chunk + question.
  const int64_t defer = compact ? std::min(chunk, n_ctx - span - chunk - nq) : chunk;
  KvCache cache = model.NewKvCache();
  if (budget >= n) return PrefillDocument(runner, doc, progress);  // nothing to prune (fits)
  const RopeParams rope = RopeParamsFor(c);
  if (progress) progress("finch", 0, n);
  for (int64_t b = 0; b < n; b += chunk) {
    RETURN_IF_ERROR(runner.CheckStop());  // the selection below runs outside Forward's checks
    const int64_t e = std::min(n, b + chunk);
    const int64_t clen = e - b;
    std::vector<int64_t> lengths = HeadLengths(cache);
    for (int64_t& len : lengths) len += clen;  // the entries to score: survivors + chunk
    // Per KV head: after adaptive selection the heads hold different numbers of survivors.
    std::vector<std::vector<float>> weights(lengths.size(), std::vector<float>(nq));
    for (size_t i = 0; i < lengths.size(); ++i) {
      const int64_t keys_last = lengths[i] + nq;  // keys the last question row sees
      for (int64_t j = 0; j < nq; ++j) {
        weights[i][j] = static_cast<float>(lengths[i] + j + 1) / static_cast<float>(keys_last) /
                        static_cast<float>(nq);
      }
    }
    std::vector<int32_t> tokens(doc.begin() + b, doc.begin() + e);
    tokens.insert(tokens.end(), question.begin(), question.end());
    HeadScores scores(lengths.size());
    for (size_t i = 0; i < lengths.size(); ++i) scores[i].assign(lengths[i], 0.f);
    ForwardOptions options;
    options.observe_rows.resize(nq);
    std::iota(options.observe_rows.begin(), options.observe_rows.end(), static_cast<int>(clen));
    const int group = c.n_heads / c.n_kv_heads;
    options.observer = [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
      for (int g = 0; g < c.n_kv_heads; ++g) {  // one GQA group at a time, with its weights
        const size_t i = static_cast<size_t>(layer) * c.n_kv_heads + g;
        AccumulateGroupMean(probs + static_cast<int64_t>(g) * group * n_rows * max_keys, group,
                            n_rows, max_keys, weights[i],
                            absl::MakeConstSpan(lengths).subspan(i, 1), &scores[i]);
      }
    };
    const int32_t chunk_end_position = cache.next_position + static_cast<int32_t>(clen);
    RETURN_IF_ERROR(runner.Forward(tokens, cache, options, nullptr));
    TruncateHeads(cache, lengths);
    cache.next_position = chunk_end_position;
    // The last chunk is judged now, next to the question as the document's end will be.
    const int64_t deferred = e < n ? std::min(defer, clen) : 0;
    if (budget + deferred < cache.MaxEntries()) {
      for (int l = 0; l < c.n_layers; ++l) {
        for (int h = 0; h < c.n_kv_heads; ++h) {
          PoolByPosition(scores[static_cast<size_t>(l) * c.n_kv_heads + h], cache.head(l, h).pos,
                         kPoolKernel);
        }
      }
      SelectOptions select;
      select.budget = budget + deferred;
      select.per_layer = spec.per_layer;
      select.adaptive = adaptive;
      select.alpha_safeguard = spec.head_budget_alpha;
      select.n_sink = spec.n_sink;
      select.recent_from = chunk_end_position - static_cast<int32_t>(deferred);
      ASSIGN_OR_RETURN(cache, Select(cache, scores, select));
    }
    if (compact) CompactPositions(cache, rope);
    if (progress) progress("finch", e, n);
  }
  if (!compact) cache.next_position = static_cast<int32_t>(n);
  return cache;
}

}  // namespace ctxcache
