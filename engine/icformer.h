// The digest compressor (IC-Former, Wang et al. 2024): a small cross-attention network that
// reads a document chunk's input embeddings — the served model's own token embeddings, no
// layer of the served model runs on the document — and writes n digest vectors that the
// served model reads as input embeddings in place of the chunk (Runner::ForwardEmbeddings).
//
// Per chunk of lc tokens, with D the learned initial digest embeddings [n, d]:
//   C = [E(chunk) ; D[0..n)]                 the same C feeds every layer
//   h = D[0..n)
//   per layer: q = Wq RMSNorm_q(h), k = Wk RMSNorm_c(C), v = Wv RMSNorm_c(C)
//              RoPE (NEOX halves): keys at 0..lc+n-1, queries at lc..lc+n-1
//              digest i attends to every chunk token and to C's digests 0..i
//              h += Wo attn;  h += Wdown(silu(Wgate m) * Wup m), m = RMSNorm_m(h)
//   digests = RMSNorm_out(h)
// Digest i reads the chunk and D[0..i] only, so the first m of n digests do not depend on n:
// one compressor serves every digest count up to its digest_count (train/icformer.py is the
// PyTorch reference, tests/icformer_test.cc the parity test against it).
//
// The file is a GGUF written by train/export_gguf.py (architecture "icformer"); it names the
// fingerprint of the model it was trained against, and Load refuses any other.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/stop.h"
#include "common/thread_pool.h"
#include "engine/cpu/matmul.h"
#include "engine/gguf.h"

namespace ctxcache {

class Model;

struct IcFormerConfig {
  int d_model = 0;      // = the served model's embedding width
  int head_dim = 0;
  int n_heads = 0;      // d_model / head_dim, each with its own K/V
  int n_layers = 0;
  int d_ff = 0;
  int digest_count = 0;  // learned digest queries: the most digests one chunk can get
  int chunk_length = 0;  // the most tokens one chunk can hold
  float rope_freq_base = 10000.f;
  float rms_eps = 1e-6f;
  std::string base_fingerprint;  // Model::fingerprint() of the model it was trained for
  int64_t train_steps = 0;
  std::string source;            // what produced it (script and commit)
};

class IcFormer {
 public:
  // Loads a compressor file and checks it against the served model: the same embedding width
  // and the same fingerprint. Every refusal (unreadable or truncated file, another
  // architecture, a missing or misshapen tensor, another base model) is FailedPrecondition
  // naming the file and the problem: the server cannot serve `digest` with it.
  static absl::StatusOr<std::unique_ptr<IcFormer>> Load(const std::string& path,
                                                        const Model& model);
  // The same checks against an explicit width and fingerprint (tests, tools).
  static absl::StatusOr<std::unique_ptr<IcFormer>> Load(const std::string& path, int d_model,
                                                        const std::string& base_fingerprint);
  // From a parsed file (GgufFile::FromBytes: the fuzz target); `name` labels the messages.
  static absl::StatusOr<std::unique_ptr<IcFormer>> FromGguf(std::unique_ptr<GgufFile> file,
                                                            const std::string& name,
                                                            int d_model,
                                                            const std::string& base_fingerprint);

  const IcFormerConfig& config() const { return config_; }
  // Hex SHA-256 of the file: part of every digest context's cache key, so a retrained
  // compressor never serves another's digests.
  const std::string& file_sha256() const { return file_sha256_; }
  const std::string& path() const { return path_; }

  // Digests of one chunk: chunk embeddings [lc, d_model] (1 <= lc <= chunk_length) ->
  // out [n_digest, d_model] (1 <= n_digest <= digest_count). The stop is asked between
  // layers and stages; its status is returned when it fires.
  absl::Status CompressChunk(const float* chunk_embeddings, int64_t lc, int n_digest,
                             float* out, ThreadPool* pool, const StopFn& stop = nullptr) const;
  // The plain reference (scalar loops, MatMulReference): the parity test compares the two.
  absl::Status CompressChunkReference(const float* chunk_embeddings, int64_t lc, int n_digest,
                                      float* out) const;

 private:
  struct Layer {
    std::vector<float> q_norm, ctx_norm, mlp_norm;  // [d]
    WeightMatrix wq, wk, wv, wo;                    // [d, d]
    WeightMatrix gate, up;                          // [d_ff, d]
    WeightMatrix down;                              // [d, d_ff]
  };
  IcFormer() = default;
  absl::Status Run(const float* chunk_embeddings, int64_t lc, int n_digest, float* out,
                   ThreadPool* pool, const StopFn& stop, bool reference) const;

  std::unique_ptr<GgufFile> gguf_;
  IcFormerConfig config_;
  std::string path_, file_sha256_;
  std::vector<Layer> layers_;
  std::vector<float> out_norm_;
  std::vector<float> digest_;  // [digest_count, d_model] initial digest embeddings, fp32
};

// How a document of n_tokens is cut for compression (the IC-Former code's divide and
// conquer): ceil(n / chunk_length) chunks of near-equal length, [begin, end) each.
std::vector<std::pair<int64_t, int64_t>> DigestChunks(int64_t n_tokens, int chunk_length);
// Digests a chunk of n tokens gets at compression `ratio`: ceil(n / ratio), within
// 1..digest_count.
int DigestsFor(int64_t n_chunk_tokens, double ratio, int digest_count);
// Digests of each of DigestChunks(n_tokens, c.chunk_length): `budget` per chunk (at most the
// chunk's length) when budget > 0, else DigestsFor at `ratio`.
std::vector<int> DigestPlan(int64_t n_tokens, const IcFormerConfig& c, double ratio,
                            int64_t budget);

}  // namespace ctxcache
