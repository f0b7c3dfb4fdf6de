// Kernels over the fp16 KV cache (engine/cpu/attention.h) at every dispatch level this CPU
// has: fp16 <-> fp32 rows bit-exact against common/half.h, and the fused decode attention
// against a plain double-precision reference, on ragged per-head lengths, positions with gaps,
// heads with nothing visible, and key counts that no chunk or tile size divides.
// (Registered a second time as attention_test_avx2 with CTXCACHE_CPU=avx2, which caps the
// level so that the AVX2 kernels run on an AVX-512 machine.)
#include "engine/cpu/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/kv_cache.h"
#include "engine/recycled_attention.h"

namespace ctxcache {
namespace {

const char* LevelName(CpuLevel level) {
  return level == CpuLevel::kAvx512 ? "avx512" : level == CpuLevel::kAvx2 ? "avx2" : "scalar";
}

class AttentionTest : public ::testing::TestWithParam<CpuLevel> {
 protected:
  void SetUp() override {
    saved_ = SetCpuLevelForTesting(GetParam());
    if (GetCpuFeatures().level != GetParam()) {
      GTEST_SKIP() << "this CPU (or CTXCACHE_CPU) gives no " << LevelName(GetParam())
                   << " (best: " << GetCpuFeatures().ToString() << ")";
    }
  }
  void TearDown() override { SetCpuLevelForTesting(saved_); }

 private:
  CpuLevel saved_ = CpuLevel::kScalar;
};

TEST_P(AttentionTest, Fp16ToFp32IsExactForEveryValue) {
  std::vector<uint16_t> all(1 << 16);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> got(all.size());
  // Odd lengths and offsets reach the vector loops' tails.
  for (int64_t n : {int64_t{1 << 16}, int64_t{1 << 16} - 3, int64_t{7}}) {
    std::fill(got.begin(), got.end(), -1.f);
    Fp16ToFp32Row(all.data() + 1, got.data(), n - 1);
    for (int64_t i = 0; i + 1 < n; ++i) {
      const float want = Fp16ToFp32(all[i + 1]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got[i])) << "fp16 " << i + 1;
      } else {
        ASSERT_EQ(std::memcmp(&got[i], &want, 4), 0) << "fp16 " << i + 1;
      }
    }
  }
}

TEST_P(AttentionTest, Fp32ToFp16RoundsToNearestEvenLikeHalfH) {
  std::mt19937 rng(3);
  std::vector<float> x;
  // Every fp16 value and the midpoints between neighbours (ties to even), fp16 subnormals,
  // overflow, and random fp32 of every magnitude.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = Fp16ToFp32(static_cast<uint16_t>(h));
    const float b = Fp16ToFp32(static_cast<uint16_t>(h + 1));
    x.push_back(a);
    x.push_back(-a);
    x.push_back(a + (b - a) / 2);
  }
  x.insert(x.end(), {65504.f, 65519.f, 65520.f, 1e6f, -1e6f, 1e-10f, 3e-8f, 0.f, -0.f,
                     std::numeric_limits<float>::infinity()});
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 100000; ++i) {
    const uint32_t b = bits(rng) & 0xbfffffffu;  // no NaN: payloads may differ
    float f;
    std::memcpy(&f, &b, 4);
    x.push_back(f);
  }
  std::vector<uint16_t> got(x.size());
  Fp32ToFp16Row(x.data(), got.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(got[i], Fp32ToFp16(x[i])) << "x = " << x[i] << " at " << i;
  }
}

// The reference: per query head, softmax over the visible keys of (q . k) * scale in double,
// then the weighted sum of V.
std::vector<float> Reference(const KvCache& cache, int layer, int n_heads, int32_t query_pos,
                             const std::vector<float>& q, float scale) {
  const int hd = cache.head_dim(), group = n_heads / cache.n_kv_heads();
  std::vector<float> out(static_cast<size_t>(n_heads) * hd, 0.f);
  for (int h = 0; h < n_heads; ++h) {
    const KvHead& kv = cache.head(layer, h / group);
    // K/V as fp32 through the plain reference reader (fp16 rows, or dequantized segments).
    std::vector<float> k(kv.n() * hd), v(kv.n() * hd);
    kv.LoadRows(0, kv.n(), hd, k.data(), v.data());
    std::vector<double> s;
    for (int64_t j = 0; j < kv.n() && kv.pos[j] <= query_pos; ++j) {
      double dot = 0;
      for (int i = 0; i < hd; ++i) dot += double{q[h * hd + i]} * k[j * hd + i];
      s.push_back(dot * scale);
    }
    if (s.empty()) continue;
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (double& x : s) sum += (x = std::exp(x - mx));
    for (int i = 0; i < hd; ++i) {
      double o = 0;
      for (size_t j = 0; j < s.size(); ++j) o += s[j] / sum * v[j * hd + i];
      out[h * hd + i] = static_cast<float>(o);
    }
  }
  return out;
}

struct Shape {
  int n_heads, n_kv_heads, head_dim;
  std::vector<int64_t> lengths;  // entries per KV head
};

// A one-layer cache whose heads hold `lengths` entries at increasing positions with random
// gaps (as after per-head selection), K/V drawn at a scale that gives peaked and flat rows.
KvCache MakeCache(const Shape& shape, std::mt19937& rng) {
  KvCache cache(1, shape.n_kv_heads, shape.head_dim);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::uniform_int_distribution<int> gap(1, 3);
  for (int g = 0; g < shape.n_kv_heads; ++g) {
    KvHead& kv = cache.head(0, g);
    int32_t p = gap(rng) - 1;
    for (int64_t j = 0; j < shape.lengths[g]; ++j) {
      kv.pos.push_back(p);
      p += gap(rng);
      for (int i = 0; i < shape.head_dim; ++i) {
        kv.k.push_back(Fp32ToFp16(2.f * dist(rng)));
        kv.v.push_back(Fp32ToFp16(dist(rng)));
      }
    }
    cache.next_position = std::max(cache.next_position, p);
  }
  return cache;
}

// Runs `attention` for a random query at each of `query_positions` and checks every output
// against Reference.
void ExpectDecodeMatchesReference(DecodeAttention& attention, const KvCache& cache, int n_heads,
                                  std::initializer_list<int32_t> query_positions,
                                  std::mt19937& rng, ThreadPool& pool) {
  const int hd = cache.head_dim();
  const int64_t dq = int64_t{n_heads} * hd;
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> q(dq);
  for (float& x : q) x = dist(rng);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (int32_t query_pos : query_positions) {
    SCOPED_TRACE(testing::Message() << "query_pos " << query_pos);
    std::vector<float> got(dq, std::nanf(""));
    attention.Run(cache, 0, n_heads, query_pos, q.data(), scale, got.data(), &pool);
    const std::vector<float> want = Reference(cache, 0, n_heads, query_pos, q, scale);
    for (int64_t i = 0; i < dq; ++i) {
      // fp32 accumulation over up to 5000 keys of |v| ~ 1 values, against double: the
      // outputs are convex combinations of V (|out| <= ~4), so an absolute bound.
      ASSERT_NEAR(got[i], want[i], 2e-5f) << "head " << i / hd << " dim " << i % hd;
    }
  }
}

TEST_P(AttentionTest, DecodeMatchesReference) {
  std::mt19937 rng(11);
  const std::vector<Shape> shapes = {
      {9, 3, 64, {128, 128, 128}},          // SmolLM2's shape, a short context
      {9, 3, 64, {2049, 700, 1}},           // ragged; lengths no chunk divides
      {9, 3, 64, {5000, 0, 333}},           // a head with no entries
      {8, 2, 40, {77, 1500}},               // head_dim not a multiple of 16
      {4, 4, 16, {17, 15, 16, 1025}},       // no GQA; around the tile size
      {16, 2, 128, {3001, 999}},            // wide heads, big groups
  };
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    DecodeAttention attention;  // reused across shapes: its scratch must adapt
    for (size_t si = 0; si < shapes.size(); ++si) {
      const Shape& shape = shapes[si];
      const KvCache cache = MakeCache(shape, rng);
      SCOPED_TRACE(testing::Message() << LevelName(GetParam()) << " threads " << threads
                                      << " shape " << si);
      // Every position visible; then a cut that hides a tail of each head (and all of some).
      ExpectDecodeMatchesReference(attention, cache, shape.n_heads,
                                   {cache.next_position, cache.next_position / 3, 0}, rng, pool);
    }
  }
}

// A stored context read in place: each head's first entries in frozen segments (int8, int4,
// then fp16 rows in a segment, as ComposeContexts leaves them) and the request's own tokens
// as fp16 rows after them. The kernels dequantize a tile at a time; the reference dequantizes
// with KvSegment::LoadRows, so this checks the SIMD dequantization and the split of chunks at
// segment ends.
KvCache Segmented(const KvCache& plain) {
  const int hd = plain.head_dim();
  KvCache out(1, plain.n_kv_heads(), hd);
  out.next_position = plain.next_position;
  for (int g = 0; g < plain.n_kv_heads(); ++g) {
    const KvHead& src = plain.head(0, g);
    KvHead& dst = out.head(0, g);
    dst.pos = src.pos;
    const int64_t n = src.n();
    // Cuts that no tile, chunk or key group divides.
    const int64_t cuts[4] = {0, n * 3 / 7, n * 5 / 7, n * 6 / 7};
    const KvDtype dtypes[3] = {KvDtype::kInt8, KvDtype::kInt4, KvDtype::kF16};
    std::vector<float> k(n * hd), v(n * hd);
    src.LoadRows(0, n, hd, k.data(), v.data());
    for (int i = 0; i < 3; ++i) {
      const int64_t b = cuts[i], e = cuts[i + 1];
      if (e == b) continue;
      absl::StatusOr<KvSegment> seg =
          QuantizeRows(k.data() + b * hd, v.data() + b * hd, e - b, hd, dtypes[i]);
      EXPECT_TRUE(seg.ok()) << seg.status();
      dst.segments.push_back(std::make_shared<const KvSegment>(*std::move(seg)));
    }
    dst.k.assign(src.k.begin() + cuts[3] * hd, src.k.end());
    dst.v.assign(src.v.begin() + cuts[3] * hd, src.v.end());
  }
  return out;
}

TEST_P(AttentionTest, DecodeReadsQuantizedSegmentsInPlace) {
  std::mt19937 rng(23);
  const std::vector<Shape> shapes = {
      {9, 3, 64, {2049, 700, 1}},    // SmolLM2's heads; ragged
      {14, 2, 64, {3001, 95}},       // Qwen2.5-0.5B's heads
      {16, 2, 128, {1000, 33}},      // wide heads
      {4, 4, 32, {17, 15, 64, 1025}},  // the narrowest head quantization allows
  };
  ThreadPool pool(2);
  DecodeAttention attention;
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape& shape = shapes[si];
    const KvCache cache = Segmented(MakeCache(shape, rng));
    ASSERT_EQ(cache.StoredDtype(), KvDtype::kInt8);
    SCOPED_TRACE(testing::Message() << LevelName(GetParam()) << " shape " << si);
    ExpectDecodeMatchesReference(attention, cache, shape.n_heads,
                                 {cache.next_position, cache.next_position / 2, 3}, rng, pool);
  }
}

// Recycled Attention's full step asks the fused kernel for every head's probabilities as
// well: they must be the softmax full attention computes (double reference), over fp16 rows
// and quantized segments, with positions past the query left as the caller set them.
TEST_P(AttentionTest, DecodeAlsoReturnsTheAttentionProbabilities) {
  std::mt19937 rng(31);
  const Shape shape = {14, 2, 64, {3001, 95}};
  ThreadPool pool(2);
  DecodeAttention attention;
  for (const bool segmented : {false, true}) {
    const KvCache plain = MakeCache(shape, rng);
    const KvCache cache = segmented ? Segmented(plain) : plain;
    const int hd = 64, n_heads = 14, group = 7;
    std::vector<float> q(n_heads * hd);
    std::normal_distribution<float> dist(0.f, 1.f);
    for (float& x : q) x = dist(rng);
    const float scale = 0.125f;
    const int64_t stride = 3001;
    for (int32_t query_pos : {cache.next_position, cache.next_position / 2}) {
      SCOPED_TRACE(testing::Message() << LevelName(GetParam()) << " segmented " << segmented
                                      << " query_pos " << query_pos);
      std::vector<float> probs(n_heads * stride, -1.f), out(n_heads * hd), plain_out(n_heads * hd);
      attention.Run(cache, 0, n_heads, query_pos, q.data(), scale, out.data(), &pool,
                    probs.data(), stride);
      attention.Run(cache, 0, n_heads, query_pos, q.data(), scale, plain_out.data(), &pool);
      EXPECT_EQ(out, plain_out) << "asking for probabilities changed the output";
      for (int h = 0; h < n_heads; ++h) {
        const KvHead& kv = cache.head(0, h / group);
        std::vector<float> k(kv.n() * hd), v(kv.n() * hd);
        kv.LoadRows(0, kv.n(), hd, k.data(), v.data());
        std::vector<double> sc;
        for (int64_t j = 0; j < kv.n() && kv.pos[j] <= query_pos; ++j) {
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += double{q[h * hd + i]} * k[j * hd + i];
          sc.push_back(dot * scale);
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double sum = 0;
        for (double x : sc) sum += std::exp(x - mx);
        for (size_t j = 0; j < sc.size(); ++j) {
          ASSERT_NEAR(probs[h * stride + j], std::exp(sc[j] - mx) / sum, 1e-6) << h << "," << j;
        }
        for (int64_t j = static_cast<int64_t>(sc.size()); j < kv.n(); ++j) {
          ASSERT_EQ(probs[h * stride + j], -1.f) << "past the query: " << h << "," << j;
        }
      }
    }
  }
}

TEST_P(AttentionTest, OneVisibleKeyReturnsItsValueExactly) {
  // softmax over one key is exactly 1, whatever the score: out = v bit for bit.
  std::mt19937 rng(5);
  const Shape shape = {6, 2, 64, {1, 300}};
  KvCache cache = MakeCache(shape, rng);
  // Head 1's first entry at head 0's only position, the rest after it.
  for (int32_t j = 0; j < 300; ++j) cache.head(0, 1).pos[j] = cache.head(0, 0).pos[0] + j;
  ThreadPool pool(2);
  DecodeAttention attention;
  std::vector<float> q(6 * 64, 3.f), out(6 * 64);
  attention.Run(cache, 0, 6, cache.head(0, 0).pos[0], q.data(), 0.125f, out.data(), &pool);
  for (int h = 0; h < 6; ++h) {
    const KvHead& kv = cache.head(0, h / 3);
    for (int i = 0; i < 64; ++i) ASSERT_EQ(out[h * 64 + i], Fp16ToFp32(kv.v[i])) << h;
  }
}

INSTANTIATE_TEST_SUITE_P(Levels, AttentionTest,
                         ::testing::Values(CpuLevel::kScalar, CpuLevel::kAvx2, CpuLevel::kAvx512),
                         [](const ::testing::TestParamInfo<CpuLevel>& info) {
                           return std::string(LevelName(info.param));
                         });

// Recycled Attention's selection of the keys a full step attended to most (max over the
// group's query heads, max-pooled, the top-K with ties to the lower index) against the plain
// reference it replaced: pooling by max_element over each window, nth_element with the
// (value desc, index asc) order, then a sort. Scores with many ties (quantized to a few
// levels) and without.
TEST(RecycledSelectionTest, MatchesThePlainReference) {
  constexpr int kHeads = 6, kKvHeads = 2, kHeadDim = 4, kGroup = kHeads / kKvHeads;
  std::mt19937 rng(7);
  for (const int levels : {0, 3, 50}) {
    for (const int64_t n_all : {int64_t{1}, int64_t{2}, int64_t{9}, int64_t{300}, int64_t{2049}}) {
      for (const int64_t top_k : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{64}, int64_t{5000}}) {
        for (const int kernel : {1, 7}) {
          DecodePolicy policy;
          policy.kind = DecodePolicy::Kind::kRecycled;
          policy.top_k = top_k;
          policy.pool_kernel = kernel;
          RecycledAttentionState state(policy, 1, kKvHeads, kHeads, kHeadDim);
          std::uniform_real_distribution<float> u(0.f, 1.f);
          std::vector<float> probs(kHeads * n_all), q(kHeads * kHeadDim, 0.5f);
          for (float& p : probs) p = levels == 0 ? u(rng) : std::floor(u(rng) * levels) / levels;
          state.RecordFullStep(0, q.data(), probs.data(), n_all, {n_all, n_all});
          for (int g = 0; g < kKvHeads; ++g) {
            const int64_t n = n_all > 1 ? n_all - 1 : n_all;
            std::vector<float> agg(n, 0.f), pooled(n);
            for (int j = 0; j < kGroup; ++j) {
              for (int64_t k = 0; k < n; ++k) {
                agg[k] = std::max(agg[k], probs[(g * kGroup + j) * n_all + k]);
              }
            }
            const int64_t half = kernel / 2;
            for (int64_t k = 0; k < n; ++k) {
              const int64_t lo = std::max<int64_t>(0, k - half), hi = std::min(n - 1, k + half);
              pooled[k] = *std::max_element(agg.begin() + lo, agg.begin() + hi + 1);
            }
            const int64_t keep = std::min(n, top_k > 0 ? top_k : std::max<int64_t>(1, n / 8));
            std::vector<int64_t> want(n);
            for (int64_t k = 0; k < n; ++k) want[k] = k;
            std::nth_element(want.begin(), want.begin() + keep, want.end(),
                             [&](int64_t a, int64_t b) {
                               return pooled[a] > pooled[b] || (pooled[a] == pooled[b] && a < b);
                             });
            want.resize(keep);
            std::sort(want.begin(), want.end());
            ASSERT_EQ(state.recycled(0, g), want)
                << "levels " << levels << ", n " << n_all << ", top_k " << top_k << ", kernel "
                << kernel << ", kv head " << g;
            EXPECT_EQ(state.first_new(0, g), n);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ctxcache
