// finch — Finch (Corallo & Papotti, arXiv 2408.00167, TACL 2024; giulio98/context-compression
// LlamaForCompressedCausalLM.generate; kvpress FinchPress): prompt-guided chunked prefill.
//
// For each document chunk: run [chunk ; question] on top of the already compressed cache,
// observe the question rows' attention over the cached + chunk keys, weight the row of the
// question token that sees m keys by m / (keys the last question token sees) (Finch's
// normalisation by the count of non-zero attention weights), average over the question rows
// and the GQA group (kvpress; per_layer averages over all heads like the original's sum),
// keep the top entries of the union of old survivors and the new chunk, drop the question.
// The budget is split across chunks cumulatively (after the chunk ending at token e, keep
// ceil(budget * e / n)), so the final cache holds exactly the budget per head.
//
// Positions: when document + question fit the model's window, keys keep their original
// positions (like every other method here, so contexts compose the same way). Otherwise the
// survivors are re-rotated after every chunk to compact positions 0..k-1 (Finch's
// _rerotate_cos_sin / kvpress KeyRerotationPress, an exact RoPE shift by i - p_i), so the
// next chunk starts at k and arbitrarily long documents stay inside the window; the context's
// next_position is then the kept count. spec.max_positions can make the window smaller than
// the model's (bounded working memory; also how the tests exercise this path cheaply).
// Deviation: sinks are always kept (shared selector).
//
// head_budget "adaptive" makes every chunk's selection Ada-KV's (select.h): the heads then
// carry different numbers of survivors into the next chunk, so the row weights above are per
// KV head, and a compacted head may span up to budget * n_kv_heads positions.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "engine/compress/scorer.h"

namespace ctxcache {

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
  const bool adaptive = spec.head_budget == "adaptive";
  const int64_t span = adaptive ? budget * c.n_kv_heads : budget;
  if (compact && span + chunk + nq > n_ctx) {
    return absl::OutOfRangeError(absl::StrCat(
        "finch on a ", n, "-token document needs ",
        adaptive ? absl::StrCat("budget x KV heads (", budget, " x ", c.n_kv_heads, ")")
                 : absl::StrCat("budget (", budget, ")"),
        " + chunk (", chunk, ") + question (", nq, ") <= the ", n_ctx,
        "-position window; raise the ratio or lower the chunk"));
  }
  KvCache cache = model.NewKvCache();
  if (budget >= n) return PrefillDocument(runner, doc, progress);  // nothing to prune (fits)
  const RopeParams rope = RopeParamsFor(c);
  if (progress) progress("finch", 0, n);
  for (int64_t b = 0; b < n; b += chunk) {
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
    const int64_t target = static_cast<int64_t>(
        std::ceil(static_cast<double>(budget) * static_cast<double>(e) / static_cast<double>(n)));
    if (target < cache.MaxEntries()) {
      SelectOptions select;
      select.budget = target;
      select.per_layer = spec.per_layer;
      select.adaptive = adaptive;
      select.alpha_safeguard = spec.head_budget_alpha;
      select.n_sink = spec.n_sink;
      ASSIGN_OR_RETURN(cache, Select(cache, scores, select));
    }
    if (compact) CompactPositions(cache, rope);
    if (progress) progress("finch", e, n);
  }
  if (!compact) cache.next_position = static_cast<int32_t>(n);
  return cache;
}

}  // namespace ctxcache
