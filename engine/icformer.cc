// The digest compressor: loading (every check a refusal names) and the forward pass, on the
// engine's kernels (F16 MatMul, RmsNorm, NEOX ApplyRope, Softmax, SwiGlu).
#include "engine/icformer.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "common/status.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"
#include "engine/model.h"

namespace ctxcache {
namespace {

constexpr char kArch[] = "icformer";

std::string Key(const char* suffix) { return absl::StrCat(kArch, ".", suffix); }

absl::StatusOr<IcFormerConfig> ReadConfig(const GgufFile& g) {
  IcFormerConfig c;
  ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  if (arch != kArch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture '", arch, "' is not a digest compressor (expected '", kArch,
        "', as train/export_gguf.py writes)"));
  }
  ASSIGN_OR_RETURN(c.d_model, GgufPositiveInt(g, Key("embedding_length")));
  ASSIGN_OR_RETURN(c.head_dim, GgufPositiveInt(g, Key("head_dim")));
  ASSIGN_OR_RETURN(c.n_layers, GgufPositiveInt(g, Key("block_count")));
  ASSIGN_OR_RETURN(c.d_ff, GgufPositiveInt(g, Key("feed_forward_length")));
  ASSIGN_OR_RETURN(c.digest_count, GgufPositiveInt(g, Key("digest_count")));
  ASSIGN_OR_RETURN(c.chunk_length, GgufPositiveInt(g, Key("chunk_length")));
  if (c.d_model % c.head_dim != 0 || c.head_dim % 2 != 0 || c.head_dim > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", c.head_dim,
                                                   " does not divide embedding_length ",
                                                   c.d_model, " into even-sized heads"));
  }
  if (c.n_layers > 64 || c.chunk_length > 65536 || c.digest_count > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block_count ", c.n_layers, ", chunk_length ", c.chunk_length, ", digest_count ",
        c.digest_count, ": larger than any digest compressor (64 layers, 65536 tokens)"));
  }
  c.n_heads = c.d_model / c.head_dim;
  ASSIGN_OR_RETURN(double base, g.GetFloat(Key("rope.freq_base")));
  ASSIGN_OR_RETURN(double eps, g.GetFloat(Key("attention.layer_norm_rms_epsilon")));
  if (!(base > 1.0) || !(eps > 0.0 && eps < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("rope.freq_base ", base,
                                                   " or rms epsilon ", eps, " is out of range"));
  }
  c.rope_freq_base = static_cast<float>(base);
  c.rms_eps = static_cast<float>(eps);
  ASSIGN_OR_RETURN(c.base_fingerprint, g.GetString(Key("base_fingerprint")));
  c.train_steps = g.GetInt(Key("train_steps")).value_or(0);
  c.source = g.GetString(Key("source")).value_or("");
  return c;
}

// y[n, n_out] = x[n, n_in] · Wᵀ: the fast kernels, or the plain reference.
void Product(const WeightMatrix& w, const float* x, int64_t n, float* y, ThreadPool* pool,
             bool reference) {
  if (reference) {
    MatMulReference(w, x, n, y);
  } else if (n == 1) {
    MatVec(w, x, y, pool);
  } else {
    MatMul(w, x, n, y, pool);
  }
}

}  // namespace

std::vector<std::pair<int64_t, int64_t>> DigestChunks(int64_t n_tokens, int chunk_length) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (n_tokens <= 0 || chunk_length <= 0) return out;
  const int64_t k = (n_tokens + chunk_length - 1) / chunk_length;
  const int64_t size = (n_tokens + k - 1) / k;
  for (int64_t s = 0; s < n_tokens; s += size) out.emplace_back(s, std::min(s + size, n_tokens));
  return out;
}

int DigestsFor(int64_t n_chunk_tokens, double ratio, int digest_count) {
  if (n_chunk_tokens <= 0 || !(ratio > 0)) return 1;
  const double n = std::ceil(static_cast<double>(n_chunk_tokens) / ratio);
  return static_cast<int>(std::clamp<double>(n, 1.0, digest_count));
}

std::vector<int> DigestPlan(int64_t n_tokens, const IcFormerConfig& c, double ratio,
                            int64_t budget) {
  std::vector<int> out;
  for (const auto& [b, e] : DigestChunks(n_tokens, c.chunk_length)) {
    out.push_back(budget > 0 ? static_cast<int>(std::min<int64_t>(budget, e - b))
                             : DigestsFor(e - b, ratio, c.digest_count));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<IcFormer>> IcFormer::Load(const std::string& path,
                                                         const Model& model) {
  return Load(path, model.config().d_model, model.fingerprint());
}

absl::StatusOr<std::unique_ptr<IcFormer>> IcFormer::Load(const std::string& path, int d_model,
                                                         const std::string& base_fingerprint) {
  auto file = GgufFile::Open(path);
  if (!file.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("digest compressor ", path, ": ", file.status().message()));
  }
  return FromGguf(*std::move(file), path, d_model, base_fingerprint);
}

absl::StatusOr<std::unique_ptr<IcFormer>> IcFormer::FromGguf(std::unique_ptr<GgufFile> file,
                                                             const std::string& path, int d_model,
                                                             const std::string& base_fingerprint) {
  auto refuse = [&](const absl::Status& s) {
    return absl::FailedPreconditionError(
        absl::StrCat("digest compressor ", path, ": ", s.message()));
  };
  std::unique_ptr<IcFormer> f(new IcFormer());
  f->path_ = path;
  f->gguf_ = std::move(file);
  const GgufFile& g = *f->gguf_;
  auto config = ReadConfig(g);
  if (!config.ok()) return refuse(config.status());
  f->config_ = *std::move(config);
  const IcFormerConfig& c = f->config_;
  if (c.d_model != d_model) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "its width is ", c.d_model, " but the served model's embeddings are ", d_model,
        " wide: it was trained for another model")));
  }
  if (c.base_fingerprint != base_fingerprint) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "it was trained against the model with fingerprint ", c.base_fingerprint,
        ", not the served one (", base_fingerprint,
        "): digests only mean something to the model they were trained for; train one "
        "for this model (train/README.md) or serve the model it names")));
  }
  auto load = [&]() -> absl::Status {
    const int64_t d = c.d_model;
    f->layers_.resize(c.n_layers);
    for (int i = 0; i < c.n_layers; ++i) {
      Layer& L = f->layers_[i];
      const std::string p = absl::StrCat("blk.", i, ".");
      ASSIGN_OR_RETURN(L.q_norm, GgufVector(g, p + "q_norm.weight", d));
      ASSIGN_OR_RETURN(L.ctx_norm, GgufVector(g, p + "ctx_norm.weight", d));
      ASSIGN_OR_RETURN(L.mlp_norm, GgufVector(g, p + "mlp_norm.weight", d));
      ASSIGN_OR_RETURN(L.wq, GgufMatrix(g, p + "wq.weight", d, d));
      ASSIGN_OR_RETURN(L.wk, GgufMatrix(g, p + "wk.weight", d, d));
      ASSIGN_OR_RETURN(L.wv, GgufMatrix(g, p + "wv.weight", d, d));
      ASSIGN_OR_RETURN(L.wo, GgufMatrix(g, p + "wo.weight", d, d));
      ASSIGN_OR_RETURN(L.gate, GgufMatrix(g, p + "gate.weight", d, c.d_ff));
      ASSIGN_OR_RETURN(L.up, GgufMatrix(g, p + "up.weight", d, c.d_ff));
      ASSIGN_OR_RETURN(L.down, GgufMatrix(g, p + "down.weight", c.d_ff, d));
    }
    ASSIGN_OR_RETURN(f->out_norm_, GgufVector(g, "out_norm.weight", d));
    ASSIGN_OR_RETURN(WeightMatrix digest, GgufMatrix(g, "digest.weight", d, c.digest_count));
    f->digest_.resize(static_cast<size_t>(c.digest_count) * d);
    for (int i = 0; i < c.digest_count; ++i) {
      RETURN_IF_ERROR(DequantizeRow(digest.type, digest.data + i * digest.row_bytes,
                                    f->digest_.data() + i * d, d));
    }
    for (float v : f->digest_) {
      if (!std::isfinite(v)) return absl::InvalidArgumentError("digest.weight is not finite");
    }
    return absl::OkStatus();
  };
  if (absl::Status s = load(); !s.ok()) return refuse(s);
  f->file_sha256_ = Sha256().Update(g.file_data(), g.file_size()).FinalHex();
  return f;
}

absl::Status IcFormer::CompressChunk(const float* chunk_embeddings, int64_t lc, int n_digest,
                                     float* out, ThreadPool* pool, const StopFn& stop) const {
  return Run(chunk_embeddings, lc, n_digest, out, pool, stop, /*reference=*/false);
}

absl::Status IcFormer::CompressChunkReference(const float* chunk_embeddings, int64_t lc,
                                              int n_digest, float* out) const {
  return Run(chunk_embeddings, lc, n_digest, out, nullptr, nullptr, /*reference=*/true);
}

absl::Status IcFormer::Run(const float* chunk_embeddings, int64_t lc, int n_digest, float* out,
                           ThreadPool* pool, const StopFn& stop, bool reference) const {
  const IcFormerConfig& c = config_;
  if (lc < 1 || lc > c.chunk_length || n_digest < 1 || n_digest > c.digest_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a chunk of ", lc, " tokens into ", n_digest, " digests: this compressor takes 1..",
        c.chunk_length, " tokens and 1..", c.digest_count, " digests per chunk"));
  }
  const int64_t d = c.d_model, n = n_digest, nk = lc + n, hd = c.head_dim;
  // C = [chunk ; D[0..n)], the keys' and values' source in every layer; h = D[0..n).
  std::vector<float> ctx(nk * d), cn(nk * d), k(nk * d), v(nk * d);
  std::copy(chunk_embeddings, chunk_embeddings + lc * d, ctx.begin());
  std::copy(digest_.begin(), digest_.begin() + n * d, ctx.begin() + lc * d);
  std::vector<float> h(digest_.begin(), digest_.begin() + n * d);
  std::vector<float> hn(n * d), q(n * d), attn(n * d), tmp(n * d);
  std::vector<float> gate(n * c.d_ff), up(n * c.d_ff);
  std::vector<int32_t> key_pos(nk);
  for (int64_t i = 0; i < nk; ++i) key_pos[i] = static_cast<int32_t>(i);
  RopeParams rope;
  rope.head_dim = c.head_dim;
  rope.rope_dim = c.head_dim;
  rope.freq_base = c.rope_freq_base;
  rope.neox = true;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Head `hh`'s attention for every digest: digest i sees keys 0..lc+i.
  auto attend = [&](int64_t h_begin, int64_t h_end, std::vector<float>& scores) {
    scores.resize(nk);
    for (int64_t hh = h_begin; hh < h_end; ++hh) {
      for (int64_t i = 0; i < n; ++i) {
        const float* qi = q.data() + i * d + hh * hd;
        const int64_t n_keys = lc + i + 1;
        for (int64_t j = 0; j < n_keys; ++j) {
          const float* kj = k.data() + j * d + hh * hd;
          float s = 0.f;
          for (int64_t e = 0; e < hd; ++e) s += qi[e] * kj[e];
          scores[j] = s * scale;
        }
        Softmax(scores.data(), n_keys);
        float* o = attn.data() + i * d + hh * hd;
        std::fill(o, o + hd, 0.f);
        for (int64_t j = 0; j < n_keys; ++j) {
          const float* vj = v.data() + j * d + hh * hd;
          const float p = scores[j];
          for (int64_t e = 0; e < hd; ++e) o[e] += p * vj[e];
        }
      }
    }
  };

  for (const Layer& L : layers_) {
    RETURN_IF_ERROR(CheckStop(stop));
    RmsNorm(h.data(), L.q_norm.data(), n, c.d_model, c.rms_eps, hn.data());
    Product(L.wq, hn.data(), n, q.data(), pool, reference);
    RmsNorm(ctx.data(), L.ctx_norm.data(), nk, c.d_model, c.rms_eps, cn.data());
    Product(L.wk, cn.data(), nk, k.data(), pool, reference);
    RETURN_IF_ERROR(CheckStop(stop));
    Product(L.wv, cn.data(), nk, v.data(), pool, reference);
    ApplyRope(q.data(), key_pos.data() + lc, n, c.n_heads, rope);
    ApplyRope(k.data(), key_pos.data(), nk, c.n_heads, rope);
    RETURN_IF_ERROR(CheckStop(stop));
    if (pool != nullptr && !reference) {
      std::vector<std::vector<float>> scores(pool->n_threads());
      pool->ParallelFor(c.n_heads, [&](int64_t b, int64_t e, int t) { attend(b, e, scores[t]); });
    } else {
      std::vector<float> scores;
      attend(0, c.n_heads, scores);
    }
    Product(L.wo, attn.data(), n, tmp.data(), pool, reference);
    for (int64_t i = 0; i < n * d; ++i) h[i] += tmp[i];
    RETURN_IF_ERROR(CheckStop(stop));
    RmsNorm(h.data(), L.mlp_norm.data(), n, c.d_model, c.rms_eps, hn.data());
    Product(L.gate, hn.data(), n, gate.data(), pool, reference);
    Product(L.up, hn.data(), n, up.data(), pool, reference);
    SwiGlu(gate.data(), up.data(), n * c.d_ff);
    Product(L.down, gate.data(), n, tmp.data(), pool, reference);
    for (int64_t i = 0; i < n * d; ++i) h[i] += tmp[i];
  }
  RmsNorm(h.data(), out_norm_.data(), n, c.d_model, c.rms_eps, out);
  return absl::OkStatus();
}

}  // namespace ctxcache
