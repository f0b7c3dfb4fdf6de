// CUDA kernels against the CPU reference ops. Skips, naming the driver's reason, when the
// machine has no usable GPU (CI and dev machines here compile CUDA but cannot run it).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/half.h"
#include "engine/cpu/ops.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/kernels.cuh"
#include "engine/kv_cache.h"

namespace ctxcache {
namespace {

// GTEST_SKIP only returns from the function it is in, so this must be a macro.
#define SKIP_WITHOUT_GPU()                                            \
  do {                                                                \
    auto count = cuda::DeviceCount();                                 \
    if (!count.ok()) GTEST_SKIP() << count.status().message();        \
  } while (0)

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(CudaTest, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int rows = 7, d = 769;
  auto x = Random(rows * d, 1), w = Random(d, 2);
  std::vector<float> ref(rows * d), got(rows * d);
  RmsNorm(x.data(), w.data(), rows, d, 1e-5f, ref.data());
  ASSERT_TRUE(cuda::RmsNorm(x.data(), w.data(), rows, d, 1e-5f, got.data()).ok());
  // fp32 with a different summation order: a few ulp of the row's scale.
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-5f + 1e-5f * std::fabs(ref[i]));
}

TEST(CudaTest, SwiGluMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto g = Random(1000, 3), u = Random(1000, 4);
  auto ref = g;
  SwiGlu(ref.data(), u.data(), 1000);
  ASSERT_TRUE(cuda::SwiGlu(g.data(), u.data(), 1000).ok());
  for (size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], ref[i], 1e-6f + 1e-6f * std::fabs(ref[i]));
}

TEST(CudaTest, GemmMatchesNaive) {
  SKIP_WITHOUT_GPU();
  const int m = 7, n = 33, k = 65;
  auto x = Random(m * k, 5), w = Random(n * k, 6);
  std::vector<float> y(m * n);
  ASSERT_TRUE(cuda::Gemm(x.data(), w.data(), m, n, k, y.data()).ok());
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int t = 0; t < k; ++t) ref += double{x[i * k + t]} * w[j * k + t];
      // TF32 is off by default for SGEMM in cuBLAS; fp32 accumulation over k=65.
      EXPECT_NEAR(y[i * n + j], ref, 1e-4 + 1e-5 * std::fabs(ref));
    }
  }
}

TEST(CudaTest, ElementwiseOpsMatchCpu) {
  SKIP_WITHOUT_GPU();
  // ToHalf: bit-equal to the CPU's round-to-nearest-even (common/half.h) over normal values,
  // fp16 subnormals, overflow to inf and exact ties (1 + 2^-11 -> 1, 1 + 3 * 2^-11 -> 1 + 2^-9).
  std::vector<float> x = Random(3000, 7);
  for (size_t i = 0; i < 1000; ++i) x[i] *= 1e-6f;
  for (size_t i = 1000; i < 1100; ++i) x[i] *= 1e5f;
  x.insert(x.end(),
           {1.f + 1.f / 2048, 1.f + 3.f / 2048, -(1.f + 1.f / 2048), 65504.f, 65519.f, 65520.f, 0.f,
            -0.f, 6e-8f, 3e-8f, 2.98e-8f, std::ldexp(1.f, -25), 3 * std::ldexp(1.f, -25)});
  std::vector<uint16_t> bits(x.size());
  ASSERT_TRUE(cuda::ToHalfHost(x.data(), bits.data(), static_cast<int64_t>(x.size())).ok());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(bits[i], Fp32ToFp16(x[i])) << "x = " << x[i];

  // AddBias and AddInPlace: one fp32 add per element, so exactly the CPU's result.
  const int rows = 5, d = 333;
  auto a = Random(rows * d, 8), b = Random(d, 9), c = Random(rows * d, 10);
  auto biased = a, summed = a;
  ASSERT_TRUE(cuda::AddBiasHost(biased.data(), b.data(), rows, d).ok());
  ASSERT_TRUE(cuda::AddInPlaceHost(summed.data(), c.data(), rows * d).ok());
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < d; ++i) {
      ASSERT_EQ(biased[r * d + i], a[r * d + i] + b[i]);
      ASSERT_EQ(summed[r * d + i], a[r * d + i] + c[r * d + i]);
    }
  }
}

TEST(CudaTest, RopeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int rows = 6, n_heads = 3, hd = 64;
  const std::vector<int32_t> pos = {0, 1, 17, 1000, 4095, 32767};
  struct Case {
    int rope_dim;
    bool neox;
    float freq_base, freq_scale;
  };
  for (const Case& k : {Case{64, true, 10000.f, 1.f}, Case{32, false, 10000.f, 1.f},
                        Case{32, true, 1e6f, 0.25f}, Case{64, false, 500000.f, 1.f}}) {
    SCOPED_TRACE(testing::Message() << "rope_dim " << k.rope_dim << " neox " << k.neox);
    RopeParams p;
    p.head_dim = hd;
    p.rope_dim = k.rope_dim;
    p.freq_base = k.freq_base;
    p.freq_scale = k.freq_scale;
    p.neox = k.neox;
    const auto x = Random(rows * n_heads * hd, 11);
    auto ref = x, got = x;
    ApplyRope(ref.data(), pos.data(), rows, n_heads, p);
    ASSERT_TRUE(cuda::RopeHost(got.data(), pos.data(), rows, n_heads, p).ok());
    for (size_t i = 0; i < x.size(); ++i) {
      if (static_cast<int>(i % hd) >= k.rope_dim) {
        ASSERT_EQ(got[i], x[i]) << i;  // dims past rope_dim are untouched
        continue;
      }
      // Same angles (the same float recurrence); cosf / sinf within 2 ulp of libm's, and
      // possibly fused multiply-adds in the rotation: a few ulp of |x| ~ 1.
      ASSERT_NEAR(got[i], ref[i], 4e-6f * (1.f + std::fabs(ref[i]))) << i;
    }
  }
}

// One sequence's cache with `layers` layers; head g of layer `layer` holds the entries at
// `pos[g]` (ascending) with random fp16 K and V.
KvCache MakeCache(int layers, int layer, int head_dim, const std::vector<std::vector<int32_t>>& pos,
                  uint32_t seed) {
  KvCache cache(layers, static_cast<int>(pos.size()), head_dim);
  for (size_t g = 0; g < pos.size(); ++g) {
    KvHead& kv = cache.head(layer, static_cast<int>(g));
    const size_t n = pos[g].size() * head_dim;
    const auto k = Random(n, seed + 2 * static_cast<uint32_t>(g));
    const auto v = Random(n, seed + 2 * static_cast<uint32_t>(g) + 1);
    kv.pos = pos[g];
    kv.k.resize(n);
    kv.v.resize(n);
    for (size_t i = 0; i < n; ++i) {
      kv.k[i] = Fp32ToFp16(k[i]);
      kv.v[i] = Fp32ToFp16(v[i]);
    }
  }
  return cache;
}

// Ascending positions in [first, end), each kept with probability `keep` (gaps).
std::vector<int32_t> Positions(int32_t first, int32_t end, double keep, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u;
  std::vector<int32_t> pos;
  for (int32_t p = first; p < end; ++p) {
    if (u(rng) < keep) pos.push_back(p);
  }
  return pos;
}

TEST(CudaTest, AppendKvMatchesKvCacheAppend) {
  SKIP_WITHOUT_GPU();
  const int layers = 2, layer = 1, n_kv = 2, hd = 64;
  // Sequence 0 already holds 5 entries per head; sequence 1 is empty (appends at n = 0).
  KvCache c0(layers, n_kv, hd), c1(layers, n_kv, hd);
  {
    const auto k = Random(5 * n_kv * hd, 20), v = Random(5 * n_kv * hd, 21);
    const std::vector<int32_t> p = {0, 1, 2, 3, 4};
    c0.Append(layer, k.data(), v.data(), p.data(), 5);
  }
  const std::vector<int64_t> rows = {3, 7};
  const int64_t n_rows = 10, width = int64_t{n_kv} * hd;
  auto k = Random(n_rows * width, 22), v = Random(n_rows * width, 23);
  // Values across fp16's range: subnormals, overflow to inf, exact ties.
  for (int64_t i = 0; i < width; ++i) k[i] *= 1e-6f, v[2 * width + i] *= 1e5f;
  k[width] = 1.f + 1.f / 2048;
  v[width] = 1.f + 3.f / 2048;
  const std::vector<int32_t> positions = {5, 6, 9, 0, 1, 2, 10, 11, 12, 40};
  KvCache r0 = c0, r1 = c1;
  r0.Append(layer, k.data(), v.data(), positions.data(), rows[0]);
  r1.Append(layer, k.data() + rows[0] * width, v.data() + rows[0] * width,
            positions.data() + rows[0], rows[1]);
  ASSERT_TRUE(
      cuda::AppendKvHost({&c0, &c1}, layer, k.data(), v.data(), positions.data(), rows).ok());
  for (auto [got, ref] : {std::pair{&c0, &r0}, std::pair{&c1, &r1}}) {
    for (int g = 0; g < n_kv; ++g) {
      SCOPED_TRACE(testing::Message() << "sequence " << (got == &c0 ? 0 : 1) << " head " << g);
      const KvHead& a = got->head(layer, g);
      const KvHead& b = ref->head(layer, g);
      EXPECT_EQ(a.pos, b.pos);
      ASSERT_EQ(a.k.size(), b.k.size());
      ASSERT_EQ(a.v.size(), b.v.size());
      for (size_t i = 0; i < a.k.size(); ++i) {  // fp16 bits equal: the same rounding
        ASSERT_EQ(a.k[i], b.k[i]) << "k[" << i << "]";
        ASSERT_EQ(a.v[i], b.v[i]) << "v[" << i << "]";
      }
      EXPECT_EQ(got->head(0, g).n(), 0);  // other layers untouched
    }
  }
}

// Causal grouped-query attention in double (Runner::Attention's semantics): per row and query
// head, the visible prefix of its KV head (position <= the row's), exact softmax of
// scale * q.k, out = sum p v; no visible key: out = 0, lse = -inf. probs: [n_heads, n_obs,
// max_keys] as AttentionProbs.
struct Reference {
  std::vector<double> out, lse, probs;
  int64_t max_keys = 0;
};
Reference ReferenceAttention(const std::vector<const KvCache*>& caches, int layer,
                             const std::vector<float>& q, const std::vector<int32_t>& q_pos,
                             const std::vector<int32_t>& row_seq, int n_heads,
                             const std::vector<int32_t>& observe) {
  const int n_kv = caches[0]->n_kv_heads(), hd = caches[0]->head_dim();
  const int group = n_heads / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t n_rows = static_cast<int64_t>(q_pos.size());
  const int n_obs = static_cast<int>(observe.size());
  Reference ref;
  for (const KvCache* c : caches) {
    for (int g = 0; g < n_kv; ++g) ref.max_keys = std::max(ref.max_keys, c->head(layer, g).n());
  }
  ref.out.assign(n_rows * n_heads * hd, 0.0);
  ref.lse.assign(n_rows * n_heads, -std::numeric_limits<double>::infinity());
  ref.probs.assign(int64_t{n_heads} * n_obs * ref.max_keys, 0.0);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int h = 0; h < n_heads; ++h) {
      const KvHead& kv = caches[row_seq[r]]->head(layer, h / group);
      const int64_t n_vis =
          std::upper_bound(kv.pos.begin(), kv.pos.end(), q_pos[r]) - kv.pos.begin();
      if (n_vis == 0) continue;
      const float* qh = q.data() + (r * n_heads + h) * hd;
      std::vector<double> s(n_vis);
      for (int64_t j = 0; j < n_vis; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += double{qh[d]} * Fp16ToFp32(kv.k[j * hd + d]);
        s[j] = scale * dot;
      }
      const double m = *std::max_element(s.begin(), s.end());
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      double* out = ref.out.data() + (r * n_heads + h) * hd;
      for (int64_t j = 0; j < n_vis; ++j) {
        for (int d = 0; d < hd; ++d) out[d] += s[j] / l * Fp16ToFp32(kv.v[j * hd + d]);
      }
      ref.lse[r * n_heads + h] = m + std::log(l);
      for (int i = 0; i < n_obs; ++i) {
        if (observe[i] != r) continue;
        double* p = ref.probs.data() + (int64_t{h} * n_obs + i) * ref.max_keys;
        for (int64_t j = 0; j < n_vis; ++j) p[j] = s[j] / l;
      }
    }
  }
  return ref;
}

// Tolerances for the attention checks, with their reasons.
struct AttentionTolerance {
  double out_abs, out_rel, lse_abs, probs_rel;
};
// Scores of O(10) at most (|q| ~ 2, |k| ~ 1, head_dim 64): the inputs are exact (fp32 q, fp16
// K and V), so the only differences are the fp32 dot (a tree of ~7 levels of sums of terms
// ~ 16: ~1e-6 on the dot, 1e-7 on the score), expf / logf (2 ulp) and the fp32 merge: ~1e-6
// relative on a probability and on out, about 1e-6 on lse ~ 10. Limits 10-20x above that.
// (out_abs also covers cancellation: out ~ 0.1 from terms of |v| ~ 1.)
constexpr AttentionTolerance kModerate{3e-5, 2e-5, 5e-5, 2e-5};

void ExpectAttentionMatches(const std::vector<const KvCache*>& caches, int layer,
                            const std::vector<float>& q, const std::vector<int32_t>& q_pos,
                            const std::vector<int32_t>& row_seq, int n_heads,
                            const std::vector<int32_t>& observe, const AttentionTolerance& tol) {
  const int hd = caches[0]->head_dim();
  const int64_t n_rows = static_cast<int64_t>(q_pos.size());
  const Reference ref = ReferenceAttention(caches, layer, q, q_pos, row_seq, n_heads, observe);
  std::vector<float> out(n_rows * n_heads * hd, std::nanf("")), lse(n_rows * n_heads);
  std::vector<float> probs;
  const absl::Status st =
      cuda::AttentionHost(caches, layer, q.data(), q_pos.data(), row_seq.data(), n_rows, n_heads,
                          observe, out.data(), lse.data(), &probs);
  ASSERT_TRUE(st.ok()) << st;
  // At most one failure per (row, head) and per (observed row, head), ten in all.
  int bad = 0;
  for (int64_t r = 0; r < n_rows && bad < 10; ++r) {
    for (int h = 0; h < n_heads && bad < 10; ++h) {
      SCOPED_TRACE(testing::Message() << "row " << r << " (pos " << q_pos[r] << ") head " << h);
      const double ref_lse = ref.lse[r * n_heads + h];
      const float got_lse = lse[r * n_heads + h];
      const float* got = out.data() + (r * n_heads + h) * hd;
      const double* want = ref.out.data() + (r * n_heads + h) * hd;
      if (std::isinf(ref_lse)) {
        // Nothing visible: exactly lse = -inf and out = 0.
        if (!(std::isinf(got_lse) && got_lse < 0)) {
          ADD_FAILURE() << "lse " << got_lse << ", want -inf";
          ++bad;
        }
        for (int d = 0; d < hd; ++d) {
          if (got[d] != 0.f) {
            ADD_FAILURE() << "out[" << d << "] " << got[d] << ", want 0";
            ++bad;
            break;
          }
        }
        continue;
      }
      if (!(std::fabs(got_lse - ref_lse) <= tol.lse_abs)) {
        ADD_FAILURE() << "lse " << got_lse << " vs " << ref_lse;
        ++bad;
      }
      for (int d = 0; d < hd; ++d) {
        if (!(std::fabs(got[d] - want[d]) <= tol.out_abs + tol.out_rel * std::fabs(want[d]))) {
          ADD_FAILURE() << "out[" << d << "] " << got[d] << " vs " << want[d];
          ++bad;
          break;
        }
      }
    }
  }
  const int n_obs = static_cast<int>(observe.size());
  ASSERT_EQ(probs.size(), ref.probs.size());
  for (int h = 0; h < n_heads && bad < 10; ++h) {
    for (int i = 0; i < n_obs && bad < 10; ++i) {
      SCOPED_TRACE(testing::Message() << "observed row " << observe[i] << " head " << h);
      const int64_t base = (int64_t{h} * n_obs + i) * ref.max_keys;
      for (int64_t j = 0; j < ref.max_keys; ++j) {
        const double want = ref.probs[base + j];
        const float got = probs[base + j];
        // Zeros (not visible, or past the head's entries) must be exact zeros; probabilities
        // that underflow fp32 are within the 1e-9 absolute slack.
        const bool ok =
            want == 0 ? got == 0.f : std::fabs(got - want) <= 1e-9 + tol.probs_rel * want;
        if (!ok) {
          ADD_FAILURE() << "probs[" << j << "] " << got << " vs " << want;
          ++bad;
          break;
        }
      }
    }
  }
}

// Two sequences over caches whose heads keep different entries (gaps; one head starts at
// position 40, so early rows see nothing there), several causal rows per sequence, the
// longest head beyond 2 * kAttentionSplit so splits merge (including partly visible ones).
void MultiSequenceCase(int n_heads, int n_kv, int hd) {
  const int layers = 2, layer = 1;
  std::vector<std::vector<int32_t>> p0, p1;
  for (int g = 0; g < n_kv; ++g) {
    p0.push_back(Positions(0, 800, g % 2 == 0 ? 0.95 : 0.5, 30 + g));
    p1.push_back(g % 2 == 0 ? Positions(0, 300, 0.34, 40 + g) : Positions(40, 300, 0.7, 40 + g));
  }
  const KvCache c0 = MakeCache(layers, layer, hd, p0, 100);
  const KvCache c1 = MakeCache(layers, layer, hd, p1, 200);
  ASSERT_GT(c0.head(layer, 0).n(), 2 * cuda::kAttentionSplit);
  const std::vector<int32_t> q_pos = {0, 1,  255, 256, 300, 511, 600, 799, 1000,  // sequence 0
                                      3, 39, 40,  41,  150, 299};                 // sequence 1
  const std::vector<int32_t> row_seq = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1};
  auto q = Random(q_pos.size() * n_heads * hd, 300);
  for (float& x : q) x *= 2.f;  // scores ~ N(0, 4): a peakier softmax than unit queries give
  // Observed: a row seeing nothing in one KV head, middle rows, a row seeing everything.
  const std::vector<int32_t> observe = {0, 4, 8, 9, 12};
  ExpectAttentionMatches({&c0, &c1}, layer, q, q_pos, row_seq, n_heads, observe, kModerate);
}

TEST(CudaTest, AttentionMatchesReferenceQwenShape) {
  SKIP_WITHOUT_GPU();
  MultiSequenceCase(/*n_heads=*/14, /*n_kv=*/2, /*hd=*/64);  // Qwen2.5-0.5B
}

TEST(CudaTest, AttentionMatchesReferenceOtherShape) {
  SKIP_WITHOUT_GPU();
  // No grouping, head_dim not a multiple of 64 (two key groups of 96 threads in the V pass).
  MultiSequenceCase(/*n_heads=*/3, /*n_kv=*/3, /*hd=*/96);
}

TEST(CudaTest, AttentionDecodeMatchesReference) {
  SKIP_WITHOUT_GPU();
  // One row over 5000 keys (20 splits, the last partly filled); head 1 keeps 4000 of them, so
  // its probabilities end in a zero tail.
  const int n_heads = 14, hd = 64, layer = 0;
  std::vector<int32_t> all(5000), most;
  for (int32_t p = 0; p < 5000; ++p) {
    all[p] = p;
    if (p % 5 != 2) most.push_back(p);
  }
  const KvCache c = MakeCache(1, layer, hd, {all, most}, 400);
  auto q = Random(n_heads * hd, 401);
  for (float& x : q) x *= 2.f;
  ExpectAttentionMatches({&c}, layer, q, {5000}, {0}, n_heads, {0}, kModerate);
}

TEST(CudaTest, AttentionLargeScoresStayFinite) {
  SKIP_WITHOUT_GPU();
  // Queries 30x larger: scores reach ~100, whose exp overflows fp32, so this fails unless the
  // split softmax subtracts its max and the merge rescales each split by exp(m_s - M).
  // The score errors scale with them (fp32 dot: ~1e-6 relative, so ~1e-4 on a score of 100):
  // probabilities ~1e-4 relative, out ~1e-4 * |v| (|v| < 5), lse ~1e-4.
  const int n_heads = 4, hd = 64, layer = 0;
  const KvCache c =
      MakeCache(1, layer, hd, {Positions(0, 700, 1.0, 50), Positions(0, 700, 0.8, 51)}, 500);
  const std::vector<int32_t> q_pos = {100, 400, 699};
  auto q = Random(q_pos.size() * n_heads * hd, 501);
  for (float& x : q) x *= 30.f;
  ExpectAttentionMatches({&c}, layer, q, q_pos, {0, 0, 0}, n_heads, {0, 2},
                         AttentionTolerance{1e-3, 1e-4, 1e-3, 1e-3});
}

// The device's dequantization of an int8 / int4 segment against the CPU's: seg.LoadRows then
// Fp32ToFp16, fp16 bits equal. Equality is the right bound: both sides compute the same fp32
// code * scale (code < 256 and an fp16 scale's 11-bit significand make an exact product of at
// most 19 bits, so it does not round at all) and the same fp32 sum, rounded once (the device
// by __fadd_rn; the CPU's LoadRows has no FMA to fuse it into: x86-64's baseline has none and
// the project sets no -march, and with the product exact a fused add would round the same
// anyway), then the same round-to-nearest-even to fp16. Any other grouping, index or nibble
// changes bits. n = 100 leaves the last key group partial (rows 96..99); [37, 90) starts mid
// key group, so the key groups must count from the segment's first row, not the range's, and
// output row j - begin must take row j; [97, 100) lies inside the partial group.
TEST(CudaTest, DequantizeSegmentMatchesLoadRows) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 100;
  uint32_t seed = 600;
  for (KvDtype dtype : {KvDtype::kInt8, KvDtype::kInt4}) {
    for (int hd : {64, 128}) {
      auto k = Random(n * hd, seed++), v = Random(n * hd, seed++);
      // Keys with per-channel offsets and outlier channels (what per-channel scales are for),
      // values with a per-token spread: every channel's and row's scale and minimum differ.
      for (int64_t j = 0; j < n; ++j) {
        for (int i = 0; i < hd; ++i) {
          k[j * hd + i] = k[j * hd + i] * (i % 7 == 3 ? 20.f : 1.f) + 0.1f * static_cast<float>(i);
          v[j * hd + i] *= 0.5f + static_cast<float>(j % 5);
        }
      }
      absl::StatusOr<KvSegment> seg = QuantizeRows(k.data(), v.data(), n, hd, dtype);
      ASSERT_TRUE(seg.ok()) << seg.status();
      for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, n}, {37, 90}, {97, n}, {50, 50}}) {
        SCOPED_TRACE(testing::Message() << KvDtypeName(dtype) << " head_dim " << hd << " rows ["
                                        << begin << ", " << end << ")");
        const int64_t count = (end - begin) * hd;
        std::vector<float> kf(count), vf(count);
        seg->LoadRows(begin, end, kf.data(), vf.data());
        std::vector<uint16_t> got_k, got_v;
        ASSERT_TRUE(cuda::DequantizeSegmentHost(*seg, begin, end, &got_k, &got_v).ok());
        ASSERT_EQ(static_cast<int64_t>(got_k.size()), count);
        ASSERT_EQ(static_cast<int64_t>(got_v.size()), count);
        for (int64_t x = 0; x < count; ++x) {
          ASSERT_EQ(got_k[x], Fp32ToFp16(kf[x]))
              << "k row " << begin + x / hd << " channel " << x % hd;
          ASSERT_EQ(got_v[x], Fp32ToFp16(vf[x]))
              << "v row " << begin + x / hd << " channel " << x % hd;
        }
      }
    }
  }
}

TEST(CudaTest, EmptyAndInvalidLaunchesNeedNoDevice) {
  // Runs everywhere: these return before touching the driver.
  EXPECT_EQ(cuda::RmsNormRows(nullptr, nullptr, 0, 64, 1e-5f, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::ToHalf(nullptr, nullptr, 0, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::AddBias(nullptr, nullptr, 0, 64, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::AddInPlace(nullptr, nullptr, 0, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::SwiGluInPlace(nullptr, nullptr, 0, nullptr), cudaSuccess);
  cuda::RopeArgs rope;
  rope.head_dim = 64;
  rope.rope_dim = 64;
  EXPECT_EQ(cuda::Rope(nullptr, nullptr, 0, 14, rope, nullptr), cudaSuccess);
  rope.rope_dim = 65;
  EXPECT_EQ(cuda::Rope(nullptr, nullptr, 1, 14, rope, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::AppendKv(nullptr, nullptr, nullptr, 2, 64, nullptr, 0, 5, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::AppendKv(nullptr, nullptr, nullptr, 2, 64, nullptr, 4, 0, nullptr), cudaSuccess);
  cuda::AttentionArgs args;
  args.n_heads = 14;
  args.n_kv_heads = 2;
  args.head_dim = 64;
  args.max_keys = 1000;
  EXPECT_EQ(cuda::Attention(args, nullptr), cudaSuccess);  // n_rows == 0
  EXPECT_EQ(cuda::AttentionProbs(args, nullptr, 0, nullptr, nullptr), cudaSuccess);
  args.n_rows = 1;
  args.head_dim = cuda::kMaxHeadDim + 1;
  EXPECT_EQ(cuda::Attention(args, nullptr), cudaErrorInvalidValue);
  args.head_dim = 64;
  args.n_kv_heads = 3;  // 14 query heads do not group over 3
  EXPECT_EQ(cuda::Attention(args, nullptr), cudaErrorInvalidValue);
  // Workspace: one (m, l, acc[head_dim]) slot per (row, head, split of 256 keys), >= 1 split.
  EXPECT_EQ(cuda::AttentionWorkspaceFloats(3, 14, 64, 0), 3 * 14 * 1 * 66);
  EXPECT_EQ(cuda::AttentionWorkspaceFloats(3, 14, 64, 256), 3 * 14 * 1 * 66);
  EXPECT_EQ(cuda::AttentionWorkspaceFloats(3, 14, 64, 257), 3 * 14 * 2 * 66);
  EXPECT_EQ(cuda::AttentionWorkspaceFloats(1, 14, 64, 32768), 14 * 128 * 66);
  // DequantizeSegment: an empty range launches nothing; impossible shapes and ranges are
  // refused before launching (a launch here would return the driver's error, or succeed on a
  // GPU, never cudaErrorInvalidValue).
  cuda::QuantSegmentView seg;
  seg.dtype = 1;
  seg.n = 100;
  seg.head_dim = 64;
  EXPECT_EQ(cuda::DequantizeSegment(seg, 0, 0, nullptr, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::DequantizeSegment(seg, 37, 37, nullptr, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::DequantizeSegment(seg, 100, 100, nullptr, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(cuda::DequantizeSegment(seg, 50, 40, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::DequantizeSegment(seg, 0, 101, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::DequantizeSegment(seg, -1, 10, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  for (int dtype : {0, 3}) {
    seg.dtype = dtype;
    EXPECT_EQ(cuda::DequantizeSegment(seg, 0, 100, nullptr, nullptr, nullptr),
              cudaErrorInvalidValue)
        << "dtype " << dtype;
  }
  seg.dtype = 2;
  for (int hd : {48, 0, -32}) {
    seg.head_dim = hd;
    EXPECT_EQ(cuda::DequantizeSegment(seg, 0, 100, nullptr, nullptr, nullptr),
              cudaErrorInvalidValue)
        << "head_dim " << hd;
  }
  seg.head_dim = 64;
  seg.n = 0;
  EXPECT_EQ(cuda::DequantizeSegment(seg, 0, 0, nullptr, nullptr, nullptr), cudaSuccess);
}

TEST(CudaTest, ReportsMissingDeviceAsFailedPrecondition) {
  auto n = cuda::DeviceCount();
  if (n.ok()) GTEST_SKIP() << "a GPU is present; this checks the no-GPU path";
  EXPECT_EQ(n.status().code(), absl::StatusCode::kFailedPrecondition);
  std::vector<float> x(4, 1.f), w(4, 1.f), y(4);
  EXPECT_EQ(cuda::RmsNorm(x.data(), w.data(), 1, 4, 1e-5f, y.data()).code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace ctxcache
