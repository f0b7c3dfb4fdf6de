// The forward pass: embeddings -> n_layers x (RMSNorm, QKV, RoPE, causal GQA attention over
// the KV cache, output projection, RMSNorm, SwiGLU FFN) -> final norm -> logits.
//
// Prefill and decode share one path: a batch of T tokens (T == 1 for decode). Weight products
// go through MatMul/MatVec (quantized weights, matmul.h). The KV cache holds fp16 (kv_cache.h).
// A decode step, Recycled Attention's full steps included, attends with the fused kernel
// (DecodeAttention, cpu/attention.h: each K/V row read once per KV head, keys split over the
// pool; fp16 rows or int8/int4 segments read in place). Prefill and observed rows convert each
// KV head's visible K/V to fp32 once per layer and run per (query head, block of query rows)
// on OpenBLAS with one BLAS thread per pool thread, so the two pools never fight over the
// cores.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"
#include "engine/model.h"

namespace ctxcache {
namespace {

// Query rows per attention task. Small enough that a task's scores ([rows, n_keys] floats)
// stay in L2 at 8K keys, large enough that the score GEMM runs near peak.
constexpr int64_t kQueryBlock = 64;

void Linear(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, ThreadPool* pool) {
  if (n_tok == 1) {
    MatVec(w, x, y, pool);
  } else {
    MatMul(w, x, n_tok, y, pool);
  }
}

void AddBias(float* y, const std::vector<float>& b, int64_t n_rows) {
  if (b.empty()) return;
  const int64_t d = static_cast<int64_t>(b.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t i = 0; i < d; ++i) y[r * d + i] += b[i];
  }
}

}  // namespace

struct Runner::Scratch {
  std::vector<float> x;       // [T, d_model] residual stream
  std::vector<float> xn;      // [T, d_model] normed
  std::vector<float> q;       // [T, n_heads*head_dim]
  std::vector<float> k, v;    // [T, n_kv_heads*head_dim]
  std::vector<float> attn;    // [T, n_heads*head_dim]
  std::vector<float> tmp;     // [T, d_model]
  std::vector<float> gate;    // [T, d_ff]
  std::vector<float> up;      // [T, d_ff]
  std::vector<int32_t> pos;   // [T]
  std::vector<std::vector<float>> scores;  // per thread: [kQueryBlock, n_keys]
  std::vector<float> obs;     // [n_heads, n_obs_rows, max_keys]
  std::vector<int> obs_index; // [T]: row -> index in observe_rows, or -1
  std::vector<float> full_probs;  // [n_heads, max_keys]: a recycled policy's full step
  std::vector<std::vector<float>> kf, vf;  // per KV head: visible K/V as fp32 [n_vis, hd]
  std::vector<std::vector<float>> rows;    // per thread: gathered K and V rows as fp32
  KvCache recycled_view;                   // a recycled step's keys: recycled + new rows
  DecodeAttention decode;
};

Runner::Runner(const Model& model, ThreadPool* pool) : model_(model), pool_(pool) {
  // Our pool provides the parallelism; BLAS calls run inside its tasks.
  openblas_set_num_threads(1);
  ReleaseScratch();
}

void Runner::ReleaseScratch() {
  scratch_ = std::make_unique<Scratch>();
  scratch_->scores.resize(pool_->n_threads());
  scratch_->rows.resize(pool_->n_threads());
  scratch_->kf.resize(model_.config().n_kv_heads);
  scratch_->vf.resize(model_.config().n_kv_heads);
}

int64_t Runner::ScratchBytes() const {
  const Scratch& s = *scratch_;
  int64_t bytes = 0;
  auto add = [&](const auto& v) {
    bytes += static_cast<int64_t>(v.capacity() * sizeof(v[0]));
  };
  for (const std::vector<float>* v : {&s.x, &s.xn, &s.q, &s.k, &s.v, &s.attn, &s.tmp, &s.gate,
                                      &s.up, &s.obs, &s.full_probs}) {
    add(*v);
  }
  add(s.pos);
  add(s.obs_index);
  for (const auto* vv : {&s.scores, &s.kf, &s.vf, &s.rows}) {
    for (const std::vector<float>& v : *vv) add(v);
  }
  // The recycled view's rows and the decode kernel's tiles are small next to these (one
  // decode step's keys, per-thread tiles): not counted.
  return bytes;
}

Runner::~Runner() = default;

absl::Status Runner::Forward(absl::Span<const int32_t> tokens, KvCache& cache,
                             const ForwardOptions& options, std::vector<float>* logits) {
  const ModelConfig& c = model_.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ",
                                                     c.n_vocab, ")"));
    }
  }
  std::vector<float>& emb = scratch_->tmp;
  emb.resize(std::max<size_t>(emb.size(), n * c.d_model));
  const WeightMatrix& te = model_.token_embd();
  for (int64_t i = 0; i < n; ++i) {
    RETURN_IF_ERROR(DequantizeRow(te.type, te.data + tokens[i] * te.row_bytes,
                                  emb.data() + i * c.d_model, c.d_model));
  }
  // ForwardEmbeddings copies the embeddings into x before tmp is reused.
  return ForwardEmbeddings(emb.data(), n, cache, options, logits);
}

absl::Status Runner::ForwardEmbeddings(const float* embeddings, int64_t n, KvCache& cache,
                                       const ForwardOptions& options,
                                       std::vector<float>* logits) {
  const ModelConfig& c = model_.config();
  if (n <= 0) return absl::InvalidArgumentError("forward pass needs at least one token");
  if (cache.n_layers() != c.n_layers || cache.n_kv_heads() != c.n_kv_heads ||
      cache.head_dim() != c.head_dim) {
    return absl::InvalidArgumentError("KV cache shape does not match the model");
  }
  if (cache.next_position < 0 || cache.next_position + n > c.n_ctx_train) {
    return absl::OutOfRangeError(absl::StrCat(
        "positions ", cache.next_position, "..", cache.next_position + n - 1,
        " exceed the model's context window of ", c.n_ctx_train, " tokens"));
  }
  if (!options.observe_rows.empty() && !options.observer) {
    return absl::InvalidArgumentError("observe_rows given without an observer");
  }
  Scratch& s = *scratch_;
  s.obs_index.assign(n, -1);
  for (size_t i = 0; i < options.observe_rows.size(); ++i) {
    const int r = options.observe_rows[i];
    if (r < 0 || r >= n) {
      return absl::InvalidArgumentError(absl::StrCat("observed row ", r, " is outside the batch"));
    }
    s.obs_index[r] = static_cast<int>(i);
  }

  const int64_t d = c.d_model, hd = c.head_dim;
  const int64_t dq = c.n_heads * hd, dkv = c.n_kv_heads * hd;
  s.x.assign(embeddings, embeddings + n * d);
  s.xn.resize(n * d);
  s.q.resize(n * dq);
  s.k.resize(n * dkv);
  s.v.resize(n * dkv);
  s.attn.resize(n * dq);
  s.tmp.resize(n * d);
  s.gate.resize(n * c.d_ff);
  s.up.resize(n * c.d_ff);
  s.pos.resize(n);
  for (int64_t i = 0; i < n; ++i) s.pos[i] = cache.next_position + static_cast<int32_t>(i);

  const RopeParams rope = RopeParamsFor(c);

  for (int l = 0; l < c.n_layers; ++l) {
    RETURN_IF_ERROR(CheckStop());
    const LayerWeights& L = model_.layer(l);
    RmsNorm(s.x.data(), L.attn_norm, n, c.d_model, c.rms_eps, s.xn.data());
    Linear(L.wq, s.xn.data(), n, s.q.data(), pool_);
    Linear(L.wk, s.xn.data(), n, s.k.data(), pool_);
    Linear(L.wv, s.xn.data(), n, s.v.data(), pool_);
    AddBias(s.q.data(), L.bq, n);
    AddBias(s.k.data(), L.bk, n);
    AddBias(s.v.data(), L.bv, n);
    ApplyRope(s.q.data(), s.pos.data(), n, c.n_heads, rope);
    ApplyRope(s.k.data(), s.pos.data(), n, c.n_kv_heads, rope);
    cache.Append(l, s.k.data(), s.v.data(), s.pos.data(), n);  // rounds K/V to fp16
    // Between the heavy stages too (attention, the feed-forward's products): at 2048 tokens a
    // layer of the 0.5B model is ~60 GFLOP, so one check per layer would react in a whole
    // layer's time on a few cores; a check costs one call.
    RETURN_IF_ERROR(CheckStop());
    RETURN_IF_ERROR(Attention(l, n, cache, options));  // asks the stop between slices too
    RETURN_IF_ERROR(CheckStop());
    Linear(L.wo, s.attn.data(), n, s.tmp.data(), pool_);
    for (int64_t i = 0; i < n * d; ++i) s.x[i] += s.tmp[i];
    RETURN_IF_ERROR(CheckStop());

    RmsNorm(s.x.data(), L.ffn_norm, n, c.d_model, c.rms_eps, s.xn.data());
    Linear(L.w_gate, s.xn.data(), n, s.gate.data(), pool_);
    RETURN_IF_ERROR(CheckStop());
    Linear(L.w_up, s.xn.data(), n, s.up.data(), pool_);
    RETURN_IF_ERROR(CheckStop());
    SwiGlu(s.gate.data(), s.up.data(), n * c.d_ff);
    Linear(L.w_down, s.gate.data(), n, s.tmp.data(), pool_);
    for (int64_t i = 0; i < n * d; ++i) s.x[i] += s.tmp[i];
  }
  cache.next_position += static_cast<int32_t>(n);

  if (logits != nullptr) {
    const int64_t first = options.all_logits ? 0 : n - 1;
    const int64_t rows = n - first;
    RmsNorm(s.x.data() + first * d, model_.output_norm(), rows, c.d_model, c.rms_eps,
            s.xn.data());
    logits->resize(rows * c.n_vocab);
    Linear(model_.output(), s.xn.data(), rows, logits->data(), pool_);
  }
  return absl::OkStatus();
}

absl::Status Runner::Attention(int layer, int64_t n, const KvCache& cache,
                               const ForwardOptions& options) {
  const ModelConfig& c = model_.config();
  Scratch& s = *scratch_;
  const int64_t hd = c.head_dim, dq = int64_t{c.n_heads} * hd;
  const int group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t n_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int n_obs = static_cast<int>(options.observe_rows.size());
  int64_t max_keys = 0;
  for (int g = 0; g < c.n_kv_heads; ++g) max_keys = std::max(max_keys, cache.head(layer, g).n());
  if (n_obs > 0) s.obs.assign(static_cast<size_t>(c.n_heads) * n_obs * max_keys, 0.f);
  // Recycled Attention applies to plain decode steps (one row, nothing observed).
  RecycledAttentionState* rec = n == 1 && n_obs == 0 ? options.recycled : nullptr;
  const bool recycled_step = rec != nullptr && !rec->WantsFullStep(layer, s.q.data());
  if (recycled_step) {
    RecycledAttention(layer, cache, *rec);
    rec->RecordRecycledStep(layer);
    return absl::OkStatus();
  }
  // Not cleared: the decode kernel writes the probability of every visible entry, and a decode
  // step's query is the newest position, so every entry is visible.
  if (rec != nullptr) s.full_probs.resize(static_cast<size_t>(c.n_heads) * max_keys);
  if (n == 1 && n_obs == 0) {
    // A plain decode step, or Recycled Attention's full step: the fused kernel, which also
    // hands the full step its attention probabilities.
    s.decode.Run(cache, layer, c.n_heads, s.pos[0], s.q.data(), scale, s.attn.data(), pool_,
                 rec != nullptr ? s.full_probs.data() : nullptr, max_keys);
    if (rec != nullptr) {
      std::vector<int64_t> n_keys(c.n_kv_heads);
      for (int g = 0; g < c.n_kv_heads; ++g) n_keys[g] = cache.head(layer, g).n();
      rec->RecordFullStep(layer, s.q.data(), s.full_probs.data(), max_keys, n_keys);
      // The recycled keys' rows, gathered once for the steps until the next full one.
      std::vector<float> k, v;
      for (int g = 0; g < c.n_kv_heads; ++g) {
        const KvHead& kv = cache.head(layer, g);
        const std::vector<int64_t>& idx = rec->recycled(layer, g);
        const int64_t m = static_cast<int64_t>(idx.size());
        k.resize(m * hd);
        v.resize(m * hd);
        for (int64_t j = 0; j < m; ++j) {
          kv.LoadRows(idx[j], idx[j] + 1, static_cast<int>(hd), k.data() + j * hd,
                      v.data() + j * hd);
        }
        // fp16 rows in, fp16 rows out: exact (dequantized int rows round to nearest).
        absl::StatusOr<KvSegment> rows =
            QuantizeRows(k.data(), v.data(), m, static_cast<int>(hd), KvDtype::kF16);
        rec->set_recycled_rows(layer, g, std::make_shared<const KvSegment>(*std::move(rows)));
      }
    }
    return absl::OkStatus();
  }

  // The K/V every row of the batch may see (fp16 rows, or frozen int8 / int4 segments), as
  // fp32 for sgemm: converted once per layer (not per query block), one task per (KV head,
  // half of its entries).
  for (int g = 0; g < c.n_kv_heads; ++g) {
    const KvHead& kv = cache.head(layer, g);
    const size_t n_vis = std::upper_bound(kv.pos.begin(), kv.pos.end(), s.pos[n - 1]) - kv.pos.begin();
    s.kf[g].resize(std::max(s.kf[g].size(), n_vis * hd));
    s.vf[g].resize(std::max(s.vf[g].size(), n_vis * hd));
  }
  pool_->ParallelFor(int64_t{c.n_kv_heads} * 2, [&](int64_t begin, int64_t end, int) {
    for (int64_t task = begin; task < end; ++task) {
      const int g = static_cast<int>(task / 2);
      const KvHead& kv = cache.head(layer, g);
      const int64_t n_vis =
          std::upper_bound(kv.pos.begin(), kv.pos.end(), s.pos[n - 1]) - kv.pos.begin();
      const int64_t b = task % 2 == 0 ? 0 : n_vis / 2, e = task % 2 == 0 ? n_vis / 2 : n_vis;
      kv.LoadRows(b, e, static_cast<int>(hd), s.kf[g].data() + b * hd, s.vf[g].data() + b * hd);
    }
  });

  // The (head, query block) tasks in slices with a stop check between them: over a long
  // cache one layer's attention is the largest stage of a prefill (at 8K tokens, hundreds of
  // GFLOP). Tasks are independent, so the slicing changes no result.
  const int64_t n_tasks = int64_t{c.n_heads} * n_blocks;
  const int64_t slice = std::max<int64_t>(int64_t{pool_->n_threads()} * 4, (n_tasks + 31) / 32);
  for (int64_t first = 0; first < n_tasks; first += slice) {
    if (first > 0) RETURN_IF_ERROR(CheckStop());
    pool_->ParallelFor(std::min(slice, n_tasks - first), [&](int64_t begin, int64_t end, int tid) {
      std::vector<float>& sc = s.scores[tid];
      sc.resize(std::max<size_t>(sc.size(), kQueryBlock * max_keys));
      for (int64_t task = first + begin; task < first + end; ++task) {
        const int h = static_cast<int>(task / n_blocks);
        const int64_t t0 = (task % n_blocks) * kQueryBlock;
        const int64_t t1 = std::min(n, t0 + kQueryBlock);
        const int64_t rows = t1 - t0;
        const KvHead& kv = cache.head(layer, h / group);
        const float* kf = s.kf[h / group].data();
        const float* vf = s.vf[h / group].data();
        // Entries are sorted by position, so the keys any row of this block may see form a
        // prefix; rows see a shorter prefix each (causal by position).
        const int64_t n_vis =
            std::upper_bound(kv.pos.begin(), kv.pos.end(), s.pos[t1 - 1]) - kv.pos.begin();
        const float* q = s.q.data() + t0 * dq + h * hd;
        float* out = s.attn.data() + t0 * dq + h * hd;
        if (rows == 1) {
          cblas_sgemv(CblasRowMajor, CblasNoTrans, n_vis, hd, scale, kf, hd, q, 1, 0.f, sc.data(),
                      1);
        } else {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_vis, hd, scale, q, dq,
                      kf, hd, 0.f, sc.data(), n_vis);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* row = sc.data() + r * n_vis;
          const int64_t vis =
              std::upper_bound(kv.pos.begin(), kv.pos.begin() + n_vis, s.pos[t0 + r]) -
              kv.pos.begin();
          Softmax(row, vis);
          std::fill(row + vis, row + n_vis, 0.f);
          if (const int oi = s.obs_index[t0 + r]; oi >= 0) {
            std::copy_n(row, n_vis, s.obs.data() + (int64_t{h} * n_obs + oi) * max_keys);
          }
        }
        if (rows == 1) {
          cblas_sgemv(CblasRowMajor, CblasTrans, n_vis, hd, 1.f, vf, hd, sc.data(), 1, 0.f, out,
                      1);
        } else {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, n_vis, 1.f, sc.data(),
                      n_vis, vf, hd, 0.f, out, dq);
        }
      }
    });
  }
  if (n_obs > 0) options.observer(layer, s.obs.data(), n_obs, max_keys);
  return absl::OkStatus();
}

void Runner::RecycledAttention(int layer, const KvCache& cache,
                               const RecycledAttentionState& rec) {
  // One query row against the recycled keys (their rows gathered at the full step) plus
  // everything appended since: a small cache of those, attended with the fused decode kernel,
  // so a recycled step reads top_k + new rows once per KV head.
  const ModelConfig& c = model_.config();
  Scratch& s = *scratch_;
  const int64_t hd = c.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  KvCache& view = s.recycled_view;
  if (view.n_kv_heads() != c.n_kv_heads || view.head_dim() != c.head_dim) {
    view = KvCache(1, c.n_kv_heads, c.head_dim);
  }
  std::vector<float>& buf = s.rows[0];
  for (int g = 0; g < c.n_kv_heads; ++g) {
    const KvHead& kv = cache.head(layer, g);
    const std::vector<int64_t>& idx = rec.recycled(layer, g);
    const int64_t first_new = rec.first_new(layer, g);
    const int64_t n_new = kv.n() - first_new;
    KvHead& h = view.head(0, g);
    h.segments = {rec.recycled_rows(layer, g)};
    h.pos.resize(idx.size() + n_new);
    for (size_t j = 0; j < idx.size(); ++j) h.pos[j] = kv.pos[idx[j]];
    std::copy(kv.pos.begin() + first_new, kv.pos.end(), h.pos.begin() + idx.size());
    buf.resize(2 * n_new * hd);
    kv.LoadRows(first_new, kv.n(), static_cast<int>(hd), buf.data(), buf.data() + n_new * hd);
    h.k.resize(n_new * hd);
    h.v.resize(n_new * hd);
    Fp32ToFp16Row(buf.data(), h.k.data(), n_new * hd);
    Fp32ToFp16Row(buf.data() + n_new * hd, h.v.data(), n_new * hd);
  }
  s.decode.Run(view, 0, c.n_heads, s.pos[0], s.q.data(), scale, s.attn.data(), pool_);
}

}  // namespace ctxcache
