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

// Recent window SelectForQuery always keeps (question-independent, like SnapKV's window).
constexpr int32_t kQuerySinks = 4;
constexpr int32_t kQueryRecent = 64;

absl::StatusOr<std::unique_ptr<Scorer>> ScorerFor(const std::string& method) {
  if (method == "streaming") return MakeStreamingScorer();
  if (method == "anchor") return MakeAnchorScorer();
  if (method == "snapkv") return MakeSnapKvScorer();
  if (method == "kvzip") return MakeKvzipScorer();
  if (method == "expected_attention") return MakeExpectedAttentionScorer();
  return absl::InvalidArgumentError(absl::StrCat(
      "method ", method, " has no single-pass scorer (finch selects while it prefills; none keeps all)"));
}

// Chunked so that scratch memory stays bounded and progress can be reported; the chunking is
// fixed (never depends on `progress`), so a document always prefills to the same bytes.
absl::Status Prefill(Runner& runner, absl::Span<const int32_t> doc, KvCache& cache,
                     const CompressProgress& progress) {
  const int64_t n = static_cast<int64_t>(doc.size());
  if (progress) progress("prefill", 0, n);
  for (int64_t b = 0; b < n; b += kPrefillChunk) {
    const int64_t e = std::min(n, b + kPrefillChunk);
    RETURN_IF_ERROR(runner.Forward(doc.subspan(b, e - b), cache, ForwardOptions{}, nullptr));
    if (progress) progress("prefill", e, n);
  }
  return absl::OkStatus();
}

// The last step of every method: the kept entries in the spec's kv_dtype. fp16 stays plain
// rows (what the codec has always stored); int8 / int4 become one frozen segment per head.
// Either way the context keeps no spare capacity (a prefill's rows grow by doubling): caches
// charge it its StoredBytes.
absl::Status StoreAs(const CompressionSpec& spec, KvCache& kv) {
  ASSIGN_OR_RETURN(const KvDtype dtype, ParseKvDtype(spec.kv_dtype));
  if (dtype != KvDtype::kF16) RETURN_IF_ERROR(kv.Freeze(dtype));
  kv.ShrinkToFit();
  return absl::OkStatus();
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

namespace {

// What every method's output carries besides the entries.
CompressedContext ContextHeader(const Model& model, const CompressionSpec& spec, int64_t n) {
  CompressedContext out;
  out.kind = ContextKind::kKv;
  out.model_fingerprint = model.fingerprint();
  out.method = spec.method;
  out.params = spec.CanonicalParams();
  out.method_version = MethodVersion(spec.method);
  out.source_tokens = n;
  return out;
}

int64_t BudgetFor(const CompressionSpec& spec, int64_t n) {
  if (spec.method == "none") return n;
  const int64_t budget =
      spec.budget > 0 ? spec.budget
                      : static_cast<int64_t>(std::ceil(static_cast<double>(n) / spec.ratio));
  return std::min(budget, n);
}

absl::Status CheckFits(const ModelConfig& c, int64_t n, int64_t extra) {
  if (n + extra <= c.n_ctx_train) return absl::OkStatus();
  return absl::OutOfRangeError(
      absl::StrCat("document of ", n, " tokens",
                   extra > 0 ? absl::StrCat(" plus ", extra, " tokens the method appends") : "",
                   " exceeds the model's ", c.n_ctx_train,
                   "-token window; method \"finch\" compresses "
                   "longer documents chunk by chunk"));
}

absl::Status CheckQuestion(const Model& model, const CompressionSpec& spec) {
  if (spec.question.empty()) return absl::OkStatus();
  const int64_t n_ctx = model.config().n_ctx_train;
  const int64_t nq = static_cast<int64_t>(WindowTokens(model, spec).size());
  if (nq <= n_ctx / 4) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("question of ", nq, " tokens is too long: at most a quarter of the model's ",
                   n_ctx, "-token window (", n_ctx / 4, ")"));
}

}  // namespace

absl::StatusOr<KvCache> PrefillDocument(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                        const CompressProgress& progress) {
  const Model& model = runner.model();
  if (doc_tokens.empty()) return absl::InvalidArgumentError("cannot compress an empty document");
  RETURN_IF_ERROR(CheckFits(model.config(), static_cast<int64_t>(doc_tokens.size()), 0));
  KvCache cache = model.NewKvCache();
  RETURN_IF_ERROR(Prefill(runner, doc_tokens, cache, progress));
  return cache;
}

absl::StatusOr<DocumentScores> ScoreDocument(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                             KvCache& prefill, const CompressionSpec& spec) {
  RETURN_IF_ERROR(spec.Validate());
  const Model& model = runner.model();
  RETURN_IF_ERROR(CheckQuestion(model, spec));
  const int64_t n = static_cast<int64_t>(doc_tokens.size());
  if (n == 0) return absl::InvalidArgumentError("cannot compress an empty document");
  if (prefill.next_position != n || prefill.MaxEntries() != n ||
      prefill.TotalEntries() != n * prefill.n_layers() * prefill.n_kv_heads()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ScoreDocument needs the plain prefill of the ", n, "-token document"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Scorer> scorer, ScorerFor(spec.method));
  RETURN_IF_ERROR(CheckFits(model.config(), n, scorer->ExtraTokens(model, spec)));
  DocumentScores out;
  out.method = spec.method;
  ASSIGN_OR_RETURN(out.scores, scorer->Score(runner, doc_tokens, spec, prefill));
  out.recent_from = scorer->RecentFrom(n, spec);
  prefill.next_position = static_cast<int32_t>(n);
  return out;
}

absl::StatusOr<CompressedContext> SelectScored(const Model& model, const KvCache& prefill,
                                               const DocumentScores& scores,
                                               const CompressionSpec& spec) {
  RETURN_IF_ERROR(spec.Validate());
  if (scores.method != spec.method) {
    return absl::InvalidArgumentError(absl::StrCat("scores of method ", scores.method,
                                                   " cannot select for method ", spec.method));
  }
  const int64_t n = prefill.next_position;
  CompressedContext out = ContextHeader(model, spec, n);
  SelectOptions select;
  select.budget = BudgetFor(spec, n);
  select.per_layer = spec.per_layer;
  select.adaptive = spec.HeadBudget() != "uniform";
  select.global = spec.HeadBudget() == "global";
  select.alpha_safeguard = spec.head_budget_alpha;
  select.n_sink = spec.n_sink;
  select.recent_from = scores.recent_from;
  ASSIGN_OR_RETURN(out.kv, Select(prefill, scores.scores, select));
  out.kv.next_position = static_cast<int32_t>(n);
  RETURN_IF_ERROR(StoreAs(spec, out.kv));
  return out;
}

absl::StatusOr<CompressedContext> Compress(Runner& runner, absl::Span<const int32_t> doc_tokens,
                                           const CompressionSpec& spec,
                                           const CompressProgress& progress) {
  RETURN_IF_ERROR(spec.Validate());
  const Model& model = runner.model();
  const int64_t n = static_cast<int64_t>(doc_tokens.size());
  if (n == 0) return absl::InvalidArgumentError("cannot compress an empty document");
  RETURN_IF_ERROR(CheckQuestion(model, spec));
  if (spec.method == "digest") return CompressDigest(runner, doc_tokens, spec, progress);
  const int64_t budget = BudgetFor(spec, n);
  if (spec.method == "finch") {
    CompressedContext out = ContextHeader(model, spec, n);
    ASSIGN_OR_RETURN(out.kv, RunFinch(runner, doc_tokens, spec, budget, progress));
    RETURN_IF_ERROR(StoreAs(spec, out.kv));
    return out;
  }
  if (spec.method == "none" || budget >= n) {  // nothing to prune
    CompressedContext out = ContextHeader(model, spec, n);
    ASSIGN_OR_RETURN(out.kv, PrefillDocument(runner, doc_tokens, progress));
    RETURN_IF_ERROR(StoreAs(spec, out.kv));
    return out;
  }
  // Fail on the window before spending a prefill.
  ASSIGN_OR_RETURN(std::unique_ptr<Scorer> scorer, ScorerFor(spec.method));
  RETURN_IF_ERROR(CheckFits(model.config(), n, scorer->ExtraTokens(model, spec)));
  ASSIGN_OR_RETURN(KvCache prefill, PrefillDocument(runner, doc_tokens, progress));
  RETURN_IF_ERROR(runner.CheckStop());
  if (progress) progress("score", 0, 1);
  ASSIGN_OR_RETURN(DocumentScores scores, ScoreDocument(runner, doc_tokens, prefill, spec));
  RETURN_IF_ERROR(runner.CheckStop());
  if (progress) progress("score", 1, 1);
  return SelectScored(model, prefill, scores, spec);
}

namespace {

// A digest context read by the model at positions out.next_position..: its K/V rows become
// one frozen fp16 segment per head, so that later contexts (segments) and the request's own
// tokens (rows) follow it in order.
absl::Status ReadDigest(Runner& runner, const CompressedContext& ctx, size_t i, KvCache& out) {
  const ModelConfig& c = runner.model().config();
  if (ctx.digest_tokens <= 0 ||
      ctx.digest.size() != static_cast<size_t>(ctx.digest_tokens) * c.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(
        "context ", i, " is a digest of ", ctx.digest_tokens, " tokens holding ",
        ctx.digest.size(), " values, not ", ctx.digest_tokens, " x d_model ", c.d_model));
  }
  RETURN_IF_ERROR(runner.ForwardEmbeddings(ctx.digest.data(), ctx.digest_tokens, out,
                                           ForwardOptions{}, nullptr));
  for (int l = 0; l < c.n_layers; ++l) {
    for (int h = 0; h < c.n_kv_heads; ++h) {
      KvHead& dst = out.head(l, h);
      KvSegment seg;
      seg.n = dst.n() - dst.n_frozen();
      seg.head_dim = c.head_dim;
      seg.k16 = std::move(dst.k);
      seg.v16 = std::move(dst.v);
      dst.k.clear();
      dst.v.clear();
      dst.segments.push_back(std::make_shared<const KvSegment>(std::move(seg)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCache> Compose(absl::Span<const CompressedContext* const> contexts,
                                const Model& model, Runner* runner, const StopFn& stop) {
  const ModelConfig& c = model.config();
  KvCache out = model.NewKvCache();
  const RopeParams rope = RopeParamsFor(c);
  int64_t offset = 0;
  for (size_t i = 0; i < contexts.size(); ++i) {
    RETURN_IF_ERROR(CheckStop(stop));
    const CompressedContext* ctx = contexts[i];
    if (ctx == nullptr) return absl::InvalidArgumentError(absl::StrCat("context ", i, " is null"));
    if (ctx->model_fingerprint != model.fingerprint()) {
      return absl::FailedPreconditionError(
          absl::StrCat("context ", i, " was made by model ", ctx->model_fingerprint,
                       ", not by the serving model ", model.fingerprint(), "; recompress it"));
    }
    if (ctx->kind == ContextKind::kDigest) {
      if (runner == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            "context ", i, " is a digest context: composing it runs the model (ComposeContexts "
            "with a Runner)"));
      }
      if (offset + ctx->digest_tokens > c.n_ctx_train) {
        return absl::OutOfRangeError(absl::StrCat(
            "composed contexts need ", offset + ctx->digest_tokens, " positions (context ", i,
            "), more than the model's ", c.n_ctx_train, "-token window"));
      }
      out.next_position = static_cast<int32_t>(offset);
      RETURN_IF_ERROR(ReadDigest(*runner, *ctx, i, out));
      offset += ctx->digest_tokens;
      continue;
    }
    if (ctx->kind != ContextKind::kKv) {
      return absl::InvalidArgumentError(absl::StrCat("context ", i, " has an unknown kind"));
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
    // The first context is read in place (its frozen segments shared, not copied). A later
    // one's keys are re-rotated to follow the previous ones, through fp32, and a quantized
    // context is quantized again at its dtype (its keys rounded a second time).
    KvCache shifted = kv;
    if (offset != 0) {
      const KvDtype dtype = shifted.StoredDtype();
      ShiftPositions(shifted, static_cast<int32_t>(offset), rope);
      if (dtype != KvDtype::kF16) RETURN_IF_ERROR(shifted.Freeze(dtype));
    }
    for (int l = 0; l < c.n_layers; ++l) {
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const KvHead& src = shifted.head(l, h);
        KvHead& dst = out.head(l, h);
        if (!src.pos.empty() && !dst.pos.empty() && src.pos.front() <= dst.pos.back()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "context ", i, " holds positions before its next_position of the previous ones"));
        }
        // Every context becomes frozen segments of the result, so the request's own tokens
        // (appended as fp16 rows) come after all of them. fp16 rows are copied once here.
        dst.segments.insert(dst.segments.end(), src.segments.begin(), src.segments.end());
        if (!src.k.empty()) {
          KvSegment seg;
          seg.n = src.n() - src.n_frozen();
          seg.head_dim = c.head_dim;
          seg.k16 = src.k;
          seg.v16 = src.v;
          dst.segments.push_back(std::make_shared<const KvSegment>(std::move(seg)));
        }
        dst.pos.insert(dst.pos.end(), src.pos.begin(), src.pos.end());
      }
    }
    offset += kv.next_position;
  }
  out.next_position = static_cast<int32_t>(offset);
  return out;
}

}  // namespace

absl::StatusOr<KvCache> ComposeContexts(absl::Span<const CompressedContext* const> contexts,
                                        const Model& model, const StopFn& stop) {
  return Compose(contexts, model, nullptr, stop);
}

absl::StatusOr<KvCache> ComposeContexts(absl::Span<const CompressedContext* const> contexts,
                                        Runner& runner, const StopFn& stop) {
  return Compose(contexts, runner.model(), &runner, stop);
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
