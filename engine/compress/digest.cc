// Method "digest": the document's chunks through the model's digest compressor (icformer.h).
// No layer of the model runs on the document: each chunk's token embeddings go through the
// compressor's few cross-attention layers, and the digests are stored in place of any KV.
#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "engine/compress/scorer.h"
#include "engine/cpu/quant.h"
#include "engine/icformer.h"

namespace ctxcache {

absl::StatusOr<CompressedContext> CompressDigest(Runner& runner,
                                                 absl::Span<const int32_t> doc_tokens,
                                                 const CompressionSpec& spec,
                                                 const CompressProgress& progress) {
  const Model& model = runner.model();
  const IcFormer* f = model.digest_compressor();
  if (f == nullptr) {
    return absl::FailedPreconditionError(
        "method \"digest\" needs a digest compressor for the served model, and none is loaded "
        "(ctxcache-server --digest-compressor FILE; train/README.md makes one)");
  }
  if (!spec.compressor.empty() && spec.compressor != f->file_sha256()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "digest compressor ", spec.compressor, " was asked for; the loaded one is ",
        f->file_sha256()));
  }
  const IcFormerConfig& fc = f->config();
  const ModelConfig& mc = model.config();
  const int64_t n = static_cast<int64_t>(doc_tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    if (doc_tokens[i] < 0 || doc_tokens[i] >= mc.n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", doc_tokens[i], " at index ", i,
                                                     " is outside the vocabulary"));
    }
  }
  if (spec.budget > fc.digest_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "budget = ", spec.budget, " digest tokens per chunk: the loaded compressor makes at most ",
        fc.digest_count, " per chunk of up to ", fc.chunk_length, " tokens"));
  }
  const auto chunks = DigestChunks(n, fc.chunk_length);
  const std::vector<int> per_chunk = DigestPlan(n, fc, spec.ratio, spec.budget);
  int64_t total = 0;
  for (int k : per_chunk) total += k;
  if (total > mc.n_ctx_train) {
    return absl::OutOfRangeError(absl::StrCat("document of ", n, " tokens makes ", total,
                                              " digest tokens, more than the model's ",
                                              mc.n_ctx_train, "-token window"));
  }

  CompressedContext out;
  out.kind = ContextKind::kDigest;
  out.model_fingerprint = model.fingerprint();
  out.method = spec.method;
  CompressionSpec keyed = spec;
  keyed.compressor = f->file_sha256();
  out.params = keyed.CanonicalParams();
  out.method_version = MethodVersion(spec.method);
  out.source_tokens = n;
  out.kv = model.NewKvCache();  // no entries; the model's shape (for the entry counts)
  out.kv.next_position = static_cast<int32_t>(total);
  out.digest_tokens = total;
  out.digest.resize(static_cast<size_t>(total) * mc.d_model);

  const WeightMatrix& te = model.token_embd();
  std::vector<float> emb;
  int64_t written = 0;
  if (progress) progress("digest", 0, n);
  for (size_t c = 0; c < chunks.size(); ++c) {
    RETURN_IF_ERROR(runner.CheckStop());
    const auto [b, e] = chunks[c];
    emb.resize(static_cast<size_t>(e - b) * mc.d_model);
    for (int64_t t = b; t < e; ++t) {
      RETURN_IF_ERROR(DequantizeRow(te.type, te.data + doc_tokens[t] * te.row_bytes,
                                    emb.data() + (t - b) * mc.d_model, mc.d_model));
    }
    float* dst = out.digest.data() + written * mc.d_model;
    RETURN_IF_ERROR(f->CompressChunk(emb.data(), e - b, per_chunk[c], dst, runner.pool(),
                                      runner.stop()));
    written += per_chunk[c];
    if (progress) progress("digest", e, n);
  }
  // Stored at fp16 (the codec's row type): rounded here, so that a digest read back from any
  // tier is the one that was made.
  for (float& v : out.digest) {
    if (!std::isfinite(v)) return absl::InternalError("the digest compressor produced a non-finite value");
    v = Fp16ToFp32(Fp32ToFp16(v));
  }
  return out;
}

}  // namespace ctxcache
