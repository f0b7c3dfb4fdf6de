// Contexts for the Redis tier's tests (redis_tier_test, redis_cluster_test): small KV contexts
// whose values survive fp16, as the engine's do, so that Redis round trips are exact.
#pragma once

#include <gtest/gtest.h>

#include "common/half.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache::testing {

inline constexpr char kFingerprint[] =
    "81ee8e0f5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";
inline constexpr char kOtherFingerprint[] =
    "1a2b3c4d5c3d2a1b00112233445566778899aabbccddeeff0123456789abcdef";

// A KV context whose values survive fp16 (as the engine's do), so round trips are exact.
// About 3.3 KB encoded with the defaults: several parts at max_part_bytes = 1000.
inline CompressedContext MakeContext(float seed = 1.0f, const char* fingerprint = kFingerprint,
                                     int n = 20) {
  CompressedContext c;
  c.model_fingerprint = fingerprint;
  c.method = "snapkv";
  c.params = "ratio=8;window=16";
  c.method_version = 2;
  c.source_tokens = 8 * n;
  c.kv = KvCache(2, 2, 8);
  c.kv.next_position = 8 * n;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      KvHead& kh = c.kv.head(l, h);
      for (int i = 0; i < n; ++i) kh.pos.push_back(8 * i + h);
      for (int i = 0; i < n * 8; ++i) {
        kh.k.push_back(Fp32ToFp16(seed + 0.125f * (i + l)));
        kh.v.push_back(Fp32ToFp16(seed - 0.0625f * (i + h)));
      }
    }
  }
  return c;
}

inline void ExpectSameContext(const CompressedContext& a, const CompressedContext& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.model_fingerprint, b.model_fingerprint);
  EXPECT_EQ(a.method, b.method);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.method_version, b.method_version);
  EXPECT_EQ(a.source_tokens, b.source_tokens);
  EXPECT_EQ(a.kv.next_position, b.kv.next_position);
  ASSERT_EQ(a.kv.n_layers(), b.kv.n_layers());
  ASSERT_EQ(a.kv.n_kv_heads(), b.kv.n_kv_heads());
  ASSERT_EQ(a.kv.head_dim(), b.kv.head_dim());
  for (int l = 0; l < a.kv.n_layers(); ++l) {
    for (int h = 0; h < a.kv.n_kv_heads(); ++h) {
      EXPECT_EQ(a.kv.head(l, h).pos, b.kv.head(l, h).pos);
      EXPECT_EQ(a.kv.head(l, h).k, b.kv.head(l, h).k);
      EXPECT_EQ(a.kv.head(l, h).v, b.kv.head(l, h).v);
    }
  }
  EXPECT_EQ(a.digest_tokens, b.digest_tokens);
  EXPECT_EQ(a.digest, b.digest);
}

}  // namespace ctxcache::testing
