// Compress (dispatch to the method, budget, checks, output metadata), ComposeContexts and
// SelectForQuery, plus the helpers the methods share (scorer.h).
#include "engine/compress/compress.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "engine/compress/scorer.h"
#include "engine/compress/select.h"

namespace ctxcache {
namespace {

// Output version of every method; bump a method's entry when its output changes for the
// same input and params (cached contexts of the old version then miss).
constexpr uint32_t kMethodVersion = 1;

// Recent window SelectForQuery always keeps (question-independent, like SnapKV's window).
constexpr int32_t kQuerySinks = 4;
constexpr int32_t kQueryRecent = 64;

absl::StatusOr<std::unique_ptr<Scorer>> ScorerFor(const std::string& method) {
  if (method == "streaming") return MakeStreamingScorer();
  if (method == "anchor") return MakeAnchorScorer();
  if (method == "snapkv") return MakeSnapKvScorer();
  if (method == "kvzip") return MakeKvzipScorer();
  if (method == "expected_attention") return MakeExpectedAttentionScorer();
  return absl::InvalidArgumentError(absl::StrCat("no scorer for method ", method));
}

absl::Status Prefill(Runner& runner, absl::Span<const int32_t> doc, KvCache& cache) {
  return runner.Forward(doc, cache, ForwardOptions{}, nullptr);
}

}  // namespace

std::vector<int32_t> WindowTokens(const Model& model, const CompressionSpec& spec) {
  const std::string& text = spec.question.empty() ? kGenericInstruction : spec.question;
  return model.tokenizer().Encode(text, /*add_bos=*/false, /*parse_special=*/false);
}

absl::Status ForwardObserved(Runner& runner, absl::Span<const int32_t> tokens, KvCache& cache,
                             const AttentionObserver& on_layer) {
  ForwardOptions options;
  options.observe_rows.resize(tokens.size());
  std::iota(options.observe_rows.begin(), options.observe_rows.end(), 0);
  options.observer = on_layer;
  return runner.Forward(tokens, cache, options, nullptr);
}

void WindowScores(const float* probs, int n_heads, int n_rows, int64_t max_keys,
                  absl::Span<const int64_t> n_keys, int kernel, bool max_pool,
                  std::vector<float>* out) {
  for (size_t g = 0; g < n_keys.size(); ++g) out[g].assign(n_keys[g], 0.f);
  const std::vector<float> weights(n_rows, 1.0f / static_cast<float>(n_rows));
  AccumulateGroupMean(probs, n_heads, n_rows, max_keys, weights, n_keys, out);
  for (size_t g = 0; g < n_keys.size(); ++g) Pool1d(out[g], kernel, max_pool);
}

absl::StatusOr<CompressedContext> Compress(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                           const CompressionSpec& spec) {
  RETURN_IF_ERROR(spec.Validate());
  const Model& model = runner.model();
  const ModelConfig& c = model.config();
  const int64_t n = static_cast<int64_t>(doc_tokens.size());
  if (n == 0) return absl::InvalidArgumentError("cannot compress an empty document");
  if (!spec.question.empty()) {
    const int64_t nq = static_cast<int64_t>(WindowTokens(model, spec).size());
    if (nq > c.n_ctx_train / 4) {
      return absl::InvalidArgumentError(
          absl::StrCat("question of ", nq, " tokens is too long: at most a quarter of the model's ",
                       c.n_ctx_train, "-token window (", c.n_ctx_train / 4, ")"));
    }
  }
  int64_t budget = spec.budget > 0
                       ? spec.budget
                       : static_cast<int64_t>(std::ceil(static_cast<double>(n) / spec.ratio));
  if (spec.method == "none") budget = n;
  budget = std::min(budget, n);

  CompressedContext out;
  out.kind = ContextKind::kKv;
  out.model_fingerprint = model.fingerprint();
  out.method = spec.method;
  out.params = spec.CanonicalParams();
  out.method_version = kMethodVersion;
  out.source_tokens = n;

  if (spec.method == "finch") {
    ASSIGN_OR_RETURN(out.kv, RunFinch(runner, doc_tokens, spec, budget));
    return out;
  }

  std::unique_ptr<Scorer> scorer;
  int64_t extra = 0;
  if (spec.method != "none" && budget < n) {
    ASSIGN_OR_RETURN(scorer, ScorerFor(spec.method));
    extra = scorer->ExtraTokens(model, spec);
  }
  if (n + extra > c.n_ctx_train) {
    return absl::OutOfRangeError(
        absl::StrCat("document of ", n, " tokens",
                     extra > 0 ? absl::StrCat(" plus ", extra, " tokens the method appends") : "",
                     " exceeds the model's ", c.n_ctx_train,
                     "-token window; method \"finch\" compresses "
                     "longer documents chunk by chunk"));
  }
  KvCache cache = model.NewKvCache();
  if (scorer == nullptr) {  // nothing to prune
    RETURN_IF_ERROR(Prefill(runner, doc_tokens, cache));
    out.kv = std::move(cache);
    return out;
  }
  ASSIGN_OR_RETURN(HeadScores scores, scorer->Score(runner, doc_tokens, spec, cache));
  SelectOptions select;
  select.budget = budget;
  select.per_layer = spec.per_layer;
  select.n_sink = spec.n_sink;
  select.recent_from = scorer->RecentFrom(n, spec);
  ASSIGN_OR_RETURN(out.kv, Select(cache, scores, select));
  out.kv.next_position = static_cast<int32_t>(n);
  return out;
}

absl::StatusOr<KvCache> ComposeContexts(absl::Span<const CompressedContext* const> contexts,
                                        const Model& model) {
  const ModelConfig& c = model.config();
  KvCache out = model.NewKvCache();
  const RopeParams rope = RopeParamsFor(c);
  int64_t offset = 0;
  for (size_t i = 0; i < contexts.size(); ++i) {
    const CompressedContext* ctx = contexts[i];
    if (ctx == nullptr) return absl::InvalidArgumentError(absl::StrCat("context ", i, " is null"));
    if (ctx->model_fingerprint != model.fingerprint()) {
      return absl::FailedPreconditionError(
          absl::StrCat("context ", i, " was made by model ", ctx->model_fingerprint,
                       ", not by the serving model ", model.fingerprint(), "; recompress it"));
    }
    if (ctx->kind != ContextKind::kKv) {
      return absl::InvalidArgumentError(
          absl::StrCat("context ", i, " is a digest context; only KV contexts compose here"));
    }
    const KvCache& kv = ctx->kv;
    if (kv.n_layers() != c.n_layers || kv.n_kv_heads() != c.n_kv_heads ||
        kv.head_dim() != c.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("context ", i, " has shape [", kv.n_layers(), " layers, ", kv.n_kv_heads(),
                       " KV heads, head_dim ", kv.head_dim(), "], the model [", c.n_layers, ", ",
                       c.n_kv_heads, ", ", c.head_dim, "]"));
    }
    if (kv.next_position < 0 || offset + kv.next_position > c.n_ctx_train) {
      return absl::OutOfRangeError(
          absl::StrCat("composed contexts need ", offset + kv.next_position, " positions (context ",
                       i, "), more than the model's ", c.n_ctx_train, "-token window"));
    }
    KvCache shifted = kv;
    ShiftPositions(shifted, static_cast<int32_t>(offset), rope);
    for (int l = 0; l < c.n_layers; ++l) {
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const KvHead& src = shifted.head(l, h);
        KvHead& dst = out.head(l, h);
        if (!src.pos.empty() && !dst.pos.empty() && src.pos.front() <= dst.pos.back()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "context ", i, " holds positions before its next_position of the previous ones"));
        }
        dst.k.insert(dst.k.end(), src.k.begin(), src.k.end());
        dst.v.insert(dst.v.end(), src.v.begin(), src.v.end());
        dst.pos.insert(dst.pos.end(), src.pos.begin(), src.pos.end());
      }
    }
    offset += kv.next_position;
  }
  out.next_position = static_cast<int32_t>(offset);
  return out;
}

absl::StatusOr<KvCache> SelectForQuery(Runner& runner, const KvCache& full,
                                       absl::Span<const int32_t> question, int64_t budget) {
  const ModelConfig& c = runner.model().config();
  if (budget <= 0) return absl::InvalidArgumentError("budget must be > 0 entries per head");
  if (question.empty()) return absl::InvalidArgumentError("SelectForQuery needs a question");
  if (static_cast<int64_t>(question.size()) > c.n_ctx_train / 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "question of ", question.size(), " tokens is longer than a quarter of the window"));
  }
  if (full.n_layers() != c.n_layers || full.n_kv_heads() != c.n_kv_heads ||
      full.head_dim() != c.head_dim) {
    return absl::InvalidArgumentError("KV cache shape does not match the model");
  }
  const std::vector<int64_t> lengths = HeadLengths(full);
  KvCache work = full;
  HeadScores scores(lengths.size());
  RETURN_IF_ERROR(ForwardObserved(
      runner, question, work, [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
        const auto n_keys = absl::MakeConstSpan(lengths).subspan(
            static_cast<size_t>(layer) * c.n_kv_heads, c.n_kv_heads);
        WindowScores(probs, c.n_heads, n_rows, max_keys, n_keys, /*kernel=*/5,
                     /*max_pool=*/false, &scores[static_cast<size_t>(layer) * c.n_kv_heads]);
      }));
  TruncateHeads(work, lengths);
  work.next_position = full.next_position;
  SelectOptions select;
  select.budget = budget;
  select.n_sink = kQuerySinks;
  select.recent_from = full.next_position - kQueryRecent;
  return Select(work, scores, select);
}

}  // namespace ctxcache
