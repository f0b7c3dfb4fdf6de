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
  // ForwardBatch: the sequences in row order, their segments, options, logit rows, logits.
  std::vector<size_t> batch_order;
  std::vector<Segment> batch_segments;
  std::vector<ForwardOptions> batch_options;
  std::vector<int64_t> batch_rows;
  std::vector<float> batch_logits;
};

Runner::Runner(const Model& model, ThreadPool* pool) : model_(model), pool_(pool) {
  // Our pool provides the parallelism; BLAS calls run inside its tasks.
  openblas_set_num_threads(1);
  ReleaseScratch();
}

std::unique_ptr<Runner::Scratch> Runner::NewScratch() const {
  auto s = std::make_unique<Scratch>();
  s->scores.resize(pool_->n_threads());
  s->rows.resize(pool_->n_threads());
  s->kf.resize(model_.config().n_kv_heads);
  s->vf.resize(model_.config().n_kv_heads);
  return s;
}

void Runner::ReleaseScratch() {
  scratch_ = NewScratch();
  interleaved_scratch_.reset();
}

int64_t Runner::ScratchBytes() const {
  int64_t bytes = 0;
  auto add = [&](const auto& v) {
    bytes += static_cast<int64_t>(v.capacity() * sizeof(v[0]));
  };
  for (const Scratch* p : {scratch_.get(), interleaved_scratch_.get()}) {
    if (p == nullptr) continue;
    const Scratch& s = *p;
    for (const std::vector<float>* v : {&s.x, &s.xn, &s.q, &s.k, &s.v, &s.attn, &s.tmp, &s.gate,
                                        &s.up, &s.obs, &s.full_probs, &s.batch_logits}) {
      add(*v);
    }
    add(s.pos);
    add(s.obs_index);
    for (const auto* vv : {&s.scores, &s.kf, &s.vf, &s.rows}) {
      for (const std::vector<float>& v : *vv) add(v);
    }
  }
  // The recycled view's rows and the decode kernel's tiles are small next to these (one
  // decode step's keys, per-thread tiles): not counted.
  return bytes;
}

void Runner::RunInterleaved(int64_t rows) {
  if (!interleave_ || interleaving_) return;
  if (interleaved_scratch_ == nullptr) interleaved_scratch_ = NewScratch();
  // The interrupted pass holds references to its buffers' object (Layers' `s`), not to
  // scratch_: swapping the owners hands the nested passes the other object and leaves the
  // interrupted one's untouched. stop_ and device_ are restored by whoever changes them.
  interleaving_ = true;
  std::swap(scratch_, interleaved_scratch_);
  interleave_(rows);
  std::swap(scratch_, interleaved_scratch_);
  interleaving_ = false;
}

Runner::~Runner() = default;

absl::Status Runner::CheckTokens(absl::Span<const int32_t> tokens) const {
  const int n_vocab = model_.config().n_vocab;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", n_vocab,
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status Runner::CheckCache(const KvCache& cache, int64_t n) const {
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
  return absl::OkStatus();
}

void Runner::EmbedTokens(absl::Span<const int32_t> tokens, float* out) const {
  const int64_t d = model_.config().d_model;
  const WeightMatrix& te = model_.token_embd();
  for (size_t i = 0; i < tokens.size(); ++i) {
    // Cannot fail: the ids were checked and the embedding matrix validated at load.
    DequantizeRow(te.type, te.data + tokens[i] * te.row_bytes, out + i * d, d).IgnoreError();
  }
}

absl::Status Runner::Forward(absl::Span<const int32_t> tokens, KvCache& cache,
                             const ForwardOptions& options, std::vector<float>* logits) {
  RETURN_IF_ERROR(CheckTokens(tokens));
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<float>& emb = scratch_->tmp;
  emb.resize(std::max<size_t>(emb.size(), n * model_.config().d_model));
  EmbedTokens(tokens, emb.data());
  // ForwardEmbeddings copies the embeddings into x before tmp is reused.
  return ForwardEmbeddings(emb.data(), n, cache, options, logits);
}

absl::Status Runner::ForwardEmbeddings(const float* embeddings, int64_t n, KvCache& cache,
                                       const ForwardOptions& options, std::vector<float>* logits) {
  const ModelConfig& c = model_.config();
  RETURN_IF_ERROR(CheckCache(cache, n));
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
  if (device_ != nullptr && device_->Supports(options)) {
    const DeviceForward::Sequence seq{&cache, 0, n, &options, logits};
    return device_->Run(embeddings, n, absl::MakeConstSpan(&seq, 1), stop_);
  }
  s.x.assign(embeddings, embeddings + n * c.d_model);
  const Segment seg{&cache, 0, n, &options};
  RETURN_IF_ERROR(Layers(n, absl::MakeConstSpan(&seg, 1), /*n_decode_rows=*/0));

  if (logits != nullptr) {
    const int64_t first = options.all_logits ? 0 : n - 1;
    const int64_t rows = n - first;
    RmsNorm(s.x.data() + first * c.d_model, model_.output_norm(), rows, c.d_model, c.rms_eps,
            s.xn.data());
    logits->resize(rows * c.n_vocab);
    Linear(model_.output(), s.xn.data(), rows, logits->data(), pool_);
  }
  return absl::OkStatus();
}

absl::Status Runner::ForwardBatch(absl::Span<const BatchSequence> seqs) {
  const ModelConfig& c = model_.config();
  if (seqs.empty()) return absl::InvalidArgumentError("a batch needs at least one sequence");
  for (size_t i = 0; i < seqs.size(); ++i) {
    const BatchSequence& q = seqs[i];
    absl::Status st = q.cache == nullptr
                          ? absl::InvalidArgumentError("no KV cache")
                          : CheckCache(*q.cache, static_cast<int64_t>(q.tokens.size()));
    if (st.ok()) st = CheckTokens(q.tokens);
    if (st.ok() && q.recycled != nullptr && q.tokens.size() != 1) {
      st = absl::InvalidArgumentError("Recycled Attention applies to decode steps (one token)");
    }
    for (size_t j = 0; st.ok() && j < i; ++j) {
      if (seqs[j].cache == q.cache) st = absl::InvalidArgumentError("a KV cache appears twice");
    }
    if (!st.ok())
      return absl::Status(st.code(), absl::StrCat("batch sequence ", i, ": ", st.message()));
  }
  // Decode steps (one token) first, then prompt chunks: the two groups of rows go through
  // the weight products separately, so a decode token's arithmetic is that of a decode step
  // alone whatever else shares the batch (see ForwardBatch in model.h).
  Scratch& s = *scratch_;
  std::vector<size_t>& order = s.batch_order;
  order.clear();
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < seqs.size(); ++i) {
      if ((seqs[i].tokens.size() == 1) == (pass == 0)) order.push_back(i);
    }
  }
  std::vector<Segment>& segs = s.batch_segments;
  std::vector<ForwardOptions>& opts = s.batch_options;
  segs.clear();
  opts.assign(seqs.size(), ForwardOptions{});
  int64_t n = 0, n_decode = 0;
  for (size_t i : order) {
    const int64_t len = static_cast<int64_t>(seqs[i].tokens.size());
    opts[i].recycled = seqs[i].recycled;
    segs.push_back(Segment{seqs[i].cache, n, len, &opts[i]});
    n += len;
    if (len == 1) ++n_decode;
  }
  s.x.resize(std::max<size_t>(s.x.size(), n * c.d_model));
  for (const Segment& g : segs) {
    const BatchSequence& q = seqs[order[&g - segs.data()]];
    EmbedTokens(q.tokens, s.x.data() + g.row0 * c.d_model);
  }
  int on_device = 0;
  for (const ForwardOptions& o : opts) on_device += device_ != nullptr && device_->Supports(o);
  if (on_device > 0 && on_device < static_cast<int>(seqs.size())) {
    // Some on the device, the rest (Recycled Attention steps) on the CPU: two passes.
    std::vector<BatchSequence> dev, host;
    for (size_t i = 0; i < seqs.size(); ++i) {
      (device_->Supports(opts[i]) ? dev : host).push_back(seqs[i]);
    }
    RETURN_IF_ERROR(ForwardBatch(dev));
    DeviceForward* const device = device_;
    device_ = nullptr;
    const absl::Status st = ForwardBatch(host);
    device_ = device;
    return st;
  }
  if (on_device > 0) {
    std::vector<DeviceForward::Sequence> dev(segs.size());
    for (size_t j = 0; j < segs.size(); ++j) {
      const BatchSequence& q = seqs[order[j]];
      dev[j] = {segs[j].cache, segs[j].row0, segs[j].n, segs[j].options, q.logits};
    }
    return device_->Run(s.x.data(), n, dev, stop_);
  }
  s.obs_index.assign(n, -1);
  RETURN_IF_ERROR(Layers(n, segs, n_decode));

  // The last row of every sequence that wants logits, decode steps first: one product per
  // group of at most MatMulDotMaxTokens() rows, which computes each row as a lone one would.
  std::vector<int64_t>& rows = s.batch_rows;
  rows.clear();
  for (const Segment& g : segs) {
    if (seqs[order[&g - segs.data()]].logits != nullptr) rows.push_back(g.row0 + g.n - 1);
  }
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  if (n_rows == 0) return absl::OkStatus();
  s.tmp.resize(std::max<size_t>(s.tmp.size(), n_rows * c.d_model));
  for (int64_t r = 0; r < n_rows; ++r) {
    RmsNorm(s.x.data() + rows[r] * c.d_model, model_.output_norm(), 1, c.d_model, c.rms_eps,
            s.tmp.data() + r * c.d_model);
  }
  std::vector<float>& out = s.batch_logits;
  out.resize(std::max<size_t>(out.size(), n_rows * c.n_vocab));
  const int64_t group = MatMulDotMaxTokens();
  for (int64_t r0 = 0; r0 < n_rows; r0 += group) {
    const int64_t m = std::min(group, n_rows - r0);
    Linear(model_.output(), s.tmp.data() + r0 * c.d_model, m, out.data() + r0 * c.n_vocab, pool_);
  }
  int64_t r = 0;
  for (const Segment& g : segs) {
    std::vector<float>* logits = seqs[order[&g - segs.data()]].logits;
    if (logits == nullptr) continue;
    logits->assign(out.begin() + r * c.n_vocab, out.begin() + (r + 1) * c.n_vocab);
    ++r;
  }
  return absl::OkStatus();
}

absl::Status Runner::Layers(int64_t n, absl::Span<const Segment> segs, int64_t n_decode_rows) {
  const ModelConfig& c = model_.config();
  Scratch& s = *scratch_;
  const int64_t d = c.d_model, hd = c.head_dim;
  const int64_t dq = c.n_heads * hd, dkv = c.n_kv_heads * hd;
  s.xn.resize(n * d);
  s.q.resize(n * dq);
  s.k.resize(n * dkv);
  s.v.resize(n * dkv);
  s.attn.resize(n * dq);
  s.tmp.resize(n * d);
  s.gate.resize(n * c.d_ff);
  s.up.resize(n * c.d_ff);
  s.pos.resize(n);
  for (const Segment& g : segs) {
    for (int64_t i = 0; i < g.n; ++i)
      s.pos[g.row0 + i] = g.cache->next_position + static_cast<int32_t>(i);
  }
  // The rows' weight products: decode rows [0, n_decode_rows) in groups a dot kernel computes
  // exactly as lone rows, then the rest (prompt rows) in one product.
  auto linear = [&](const WeightMatrix& w, const float* x, float* y) {
    const int64_t group = MatMulDotMaxTokens();
    for (int64_t r0 = 0; r0 < n_decode_rows; r0 += group) {
      const int64_t m = std::min(group, n_decode_rows - r0);
      Linear(w, x + r0 * w.n_in, m, y + r0 * w.n_out, pool_);
    }
    if (n > n_decode_rows) {
      Linear(w, x + n_decode_rows * w.n_in, n - n_decode_rows, y + n_decode_rows * w.n_out, pool_);
    }
  };

  const RopeParams rope = RopeParamsFor(c);

  for (int l = 0; l < c.n_layers; ++l) {
    RETURN_IF_ERROR(CheckStop());
    const LayerWeights& L = model_.layer(l);
    RmsNorm(s.x.data(), L.attn_norm, n, c.d_model, c.rms_eps, s.xn.data());
    linear(L.wq, s.xn.data(), s.q.data());
    linear(L.wk, s.xn.data(), s.k.data());
    linear(L.wv, s.xn.data(), s.v.data());
    AddBias(s.q.data(), L.bq, n);
    AddBias(s.k.data(), L.bk, n);
    AddBias(s.v.data(), L.bv, n);
    ApplyRope(s.q.data(), s.pos.data(), n, c.n_heads, rope);
    ApplyRope(s.k.data(), s.pos.data(), n, c.n_kv_heads, rope);
    for (const Segment& g : segs) {  // rounds K/V to fp16
      g.cache->Append(l, s.k.data() + g.row0 * dkv, s.v.data() + g.row0 * dkv,
                      s.pos.data() + g.row0, g.n);
    }
    // Between the heavy stages too (attention, the feed-forward's products): at 2048 tokens a
    // layer of the 0.5B model is ~60 GFLOP, so one check per layer would react in a whole
    // layer's time on a few cores; a check costs one call.
    RETURN_IF_ERROR(CheckStop());
    for (const Segment& g : segs) {  // asks the stop between slices too
      RETURN_IF_ERROR(Attention(l, g.row0, g.n, *g.cache, *g.options));
    }
    RETURN_IF_ERROR(CheckStop());
    linear(L.wo, s.attn.data(), s.tmp.data());
    for (int64_t i = 0; i < n * d; ++i) s.x[i] += s.tmp[i];
    RETURN_IF_ERROR(CheckStop());

    RmsNorm(s.x.data(), L.ffn_norm, n, c.d_model, c.rms_eps, s.xn.data());
    linear(L.w_gate, s.xn.data(), s.gate.data());
    RETURN_IF_ERROR(CheckStop());
    linear(L.w_up, s.xn.data(), s.up.data());
    RETURN_IF_ERROR(CheckStop());
    SwiGlu(s.gate.data(), s.up.data(), n * c.d_ff);
    linear(L.w_down, s.gate.data(), s.tmp.data());
    for (int64_t i = 0; i < n * d; ++i) s.x[i] += s.tmp[i];
    RunInterleaved(n);  // others' steps, between this pass's layers (set_interleave)
  }
  for (const Segment& g : segs) g.cache->next_position += static_cast<int32_t>(g.n);
  return absl::OkStatus();
}

absl::Status Runner::Attention(int layer, int64_t row0, int64_t n, const KvCache& cache,
                               const ForwardOptions& options) {
  const ModelConfig& c = model_.config();
  Scratch& s = *scratch_;
  const int64_t hd = c.head_dim, dq = int64_t{c.n_heads} * hd;
  // This sequence's rows of the pass: queries, outputs, positions, observed-row indices.
  float* const q_rows = s.q.data() + row0 * dq;
  float* const attn_rows = s.attn.data() + row0 * dq;
  const int32_t* const pos = s.pos.data() + row0;
  const int* const obs_index = s.obs_index.data() + row0;
  const int group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t n_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  const int n_obs = static_cast<int>(options.observe_rows.size());
  int64_t max_keys = 0;
  for (int g = 0; g < c.n_kv_heads; ++g) max_keys = std::max(max_keys, cache.head(layer, g).n());
  if (n_obs > 0) s.obs.assign(static_cast<size_t>(c.n_heads) * n_obs * max_keys, 0.f);
  // Recycled Attention applies to plain decode steps (one row, nothing observed).
  RecycledAttentionState* rec = n == 1 && n_obs == 0 ? options.recycled : nullptr;
  const bool recycled_step = rec != nullptr && !rec->WantsFullStep(layer, q_rows);
  if (recycled_step) {
    RecycledAttention(layer, cache, *rec, q_rows, pos[0], attn_rows);
    rec->RecordRecycledStep(layer);
    return absl::OkStatus();
  }
  // Not cleared: the decode kernel writes the probability of every visible entry, and a decode
  // step's query is the newest position, so every entry is visible.
  if (rec != nullptr) s.full_probs.resize(static_cast<size_t>(c.n_heads) * max_keys);
  if (n == 1 && n_obs == 0) {
    // A plain decode step, or Recycled Attention's full step: the fused kernel, which also
    // hands the full step its attention probabilities.
    s.decode.Run(cache, layer, c.n_heads, pos[0], q_rows, scale, attn_rows, pool_,
                 rec != nullptr ? s.full_probs.data() : nullptr, max_keys);
    if (rec != nullptr) {
      std::vector<int64_t> n_keys(c.n_kv_heads);
      for (int g = 0; g < c.n_kv_heads; ++g) n_keys[g] = cache.head(layer, g).n();
      rec->RecordFullStep(layer, q_rows, s.full_probs.data(), max_keys, n_keys);
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
    const size_t n_vis =
        std::upper_bound(kv.pos.begin(), kv.pos.end(), pos[n - 1]) - kv.pos.begin();
    s.kf[g].resize(std::max(s.kf[g].size(), n_vis * hd));
    s.vf[g].resize(std::max(s.vf[g].size(), n_vis * hd));
  }
  pool_->ParallelFor(int64_t{c.n_kv_heads} * 2, [&](int64_t begin, int64_t end, int) {
    for (int64_t task = begin; task < end; ++task) {
      const int g = static_cast<int>(task / 2);
      const KvHead& kv = cache.head(layer, g);
      const int64_t n_vis =
          std::upper_bound(kv.pos.begin(), kv.pos.end(), pos[n - 1]) - kv.pos.begin();
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
            std::upper_bound(kv.pos.begin(), kv.pos.end(), pos[t1 - 1]) - kv.pos.begin();
        const float* q = q_rows + t0 * dq + h * hd;
        float* out = attn_rows + t0 * dq + h * hd;
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
              std::upper_bound(kv.pos.begin(), kv.pos.begin() + n_vis, pos[t0 + r]) -
              kv.pos.begin();
          Softmax(row, vis);
          std::fill(row + vis, row + n_vis, 0.f);
          if (const int oi = obs_index[t0 + r]; oi >= 0) {
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

void Runner::RecycledAttention(int layer, const KvCache& cache, const RecycledAttentionState& rec,
                               const float* q, int32_t query_pos, float* out) {
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
  s.decode.Run(view, 0, c.n_heads, query_pos, q, scale, out, pool_);
}

}  // namespace ctxcache
