// A random digest compressor (engine/icformer.h) for any model width and fingerprint, built
// as a GGUF in memory: the digest method's engine and server tests need one that belongs to
// the test model, and a trained one exists only for the served model.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/gguf_builder.h"

namespace ctxcache::testing {

struct RandomCompressorShape {
  int head_dim = 64;
  int layers = 1;
  int d_ff = 128;
  int digest_count = 16;
  int chunk_length = 32;
};

// F32 weights, N(0, 0.05) matrices and digest embeddings, norms around 1.
inline std::string RandomCompressorGguf(int d_model, const std::string& base_fingerprint,
                                        uint32_t seed, const RandomCompressorShape& s = {}) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto values = [&](int64_t n, float mean, float stddev) {
    std::string bytes(static_cast<size_t>(n) * 4, '\0');
    for (int64_t i = 0; i < n; ++i) {
      const float v = mean + stddev * normal(rng);
      std::memcpy(&bytes[static_cast<size_t>(i) * 4], &v, 4);
    }
    return bytes;
  };
  constexpr uint32_t kF32 = 0;
  const uint64_t d = d_model, ff = s.d_ff;
  GgufBuilder b;
  b.KvStr("general.architecture", "icformer")
      .KvU32("icformer.embedding_length", d_model)
      .KvU32("icformer.head_dim", s.head_dim)
      .KvU32("icformer.block_count", s.layers)
      .KvU32("icformer.feed_forward_length", s.d_ff)
      .KvU32("icformer.digest_count", s.digest_count)
      .KvU32("icformer.chunk_length", s.chunk_length)
      .KvF32("icformer.rope.freq_base", 10000.f)
      .KvF32("icformer.attention.layer_norm_rms_epsilon", 1e-6f)
      .KvStr("icformer.base_fingerprint", base_fingerprint)
      .KvU32("icformer.train_steps", 0)
      .KvStr("icformer.source", "tests/digest_util.h (random weights)");
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    for (const char* norm : {"q_norm", "ctx_norm", "mlp_norm"}) {
      b.Tensor(p + norm + ".weight", {d}, kF32, values(d, 1.f, 0.1f));
    }
    for (const char* m : {"wq", "wk", "wv", "wo"}) {
      b.Tensor(p + m + ".weight", {d, d}, kF32, values(d * d, 0.f, 0.05f));
    }
    b.Tensor(p + "gate.weight", {d, ff}, kF32, values(d * ff, 0.f, 0.05f));
    b.Tensor(p + "up.weight", {d, ff}, kF32, values(d * ff, 0.f, 0.05f));
    b.Tensor(p + "down.weight", {ff, d}, kF32, values(ff * d, 0.f, 0.05f));
  }
  b.Tensor("out_norm.weight", {d}, kF32, values(d, 1.f, 0.1f));
  b.Tensor("digest.weight", {d, static_cast<uint64_t>(s.digest_count)}, kF32,
           values(d * s.digest_count, 0.f, 0.05f));
  return b.Build();
}

}  // namespace ctxcache::testing
