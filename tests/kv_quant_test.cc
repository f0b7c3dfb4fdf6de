// KV quantization (engine/kv_cache.h): KIVI-style int8 / int4 segments -- the error bound of
// every group, the int4 nibble layout, sizes, refusals -- and the frozen-segment bookkeeping of
// KvCache (Freeze, Thaw, Append after a freeze, Truncate never dropping frozen entries,
// LoadRows across a segment's end).
#include "engine/kv_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"

namespace ctxcache {
namespace {

using ::testing::HasSubstr;

std::vector<float> Random(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// The bound of asymmetric rounding: half a step, plus the fp16 rounding of scale and minimum
// (a relative 2^-11 each, applied to at most the group's range and its largest magnitude).
float Bound(float lo, float hi, int qmax) {
  const float range = hi - lo;
  const float mag = std::max(std::fabs(lo), std::fabs(hi));
  return 0.5f * range / qmax + range * 1e-3f + mag * 1e-3f + 1e-6f;
}

class QuantizeTest : public ::testing::TestWithParam<KvDtype> {};

TEST_P(QuantizeTest, EveryGroupIsWithinHalfAStep) {
  const KvDtype dtype = GetParam();
  const int qmax = dtype == KvDtype::kInt4 ? 15 : 255;
  std::mt19937 rng(3);
  for (const int hd : {32, 64, 128}) {
    for (const int64_t n : {int64_t{1}, int64_t{31}, int64_t{32}, int64_t{77}}) {
      SCOPED_TRACE(testing::Message() << KvDtypeName(dtype) << " hd " << hd << " n " << n);
      std::vector<float> k = Random(n * hd, 3.f, rng), v = Random(n * hd, 1.f, rng);
      // A key outlier channel, as KIVI observes: per-channel groups keep it from hurting the
      // other channels.
      for (int64_t j = 0; j < n; ++j) k[j * hd + 5] += 40.f;
      absl::StatusOr<KvSegment> seg = QuantizeRows(k.data(), v.data(), n, hd, dtype);
      ASSERT_TRUE(seg.ok()) << seg.status();
      std::vector<float> kd(n * hd), vd(n * hd);
      seg->LoadRows(0, n, kd.data(), vd.data());
      for (int64_t g0 = 0; g0 < n; g0 += kKeyGroup) {
        const int64_t g1 = std::min(n, g0 + kKeyGroup);
        for (int i = 0; i < hd; ++i) {
          float lo = k[g0 * hd + i], hi = lo;
          for (int64_t j = g0; j < g1; ++j) lo = std::min(lo, k[j * hd + i]), hi = std::max(hi, k[j * hd + i]);
          for (int64_t j = g0; j < g1; ++j) {
            ASSERT_NEAR(kd[j * hd + i], k[j * hd + i], Bound(lo, hi, qmax)) << "K " << j << "," << i;
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        for (int g = 0; g < hd / kValueGroup; ++g) {
          const float* x = v.data() + j * hd + g * kValueGroup;
          const auto [lo, hi] = std::minmax_element(x, x + kValueGroup);
          for (int i = 0; i < kValueGroup; ++i) {
            ASSERT_NEAR(vd[j * hd + g * kValueGroup + i], x[i], Bound(*lo, *hi, qmax))
                << "V " << j << "," << g * kValueGroup + i;
          }
        }
      }
      // Codes, then fp16 scale and minimum per key group x channel and per token x value group.
      const int64_t codes = dtype == KvDtype::kInt4 ? n * hd / 2 : n * hd;
      EXPECT_EQ(seg->Bytes(), 2 * codes + 4 * ((n + 31) / 32) * hd + 4 * n * (hd / 32));
    }
  }
}

TEST_P(QuantizeTest, ConstantGroupsAreExactAtFp16) {
  std::vector<float> k(40 * 64, 1.5f), v(40 * 64, -0.25f);
  absl::StatusOr<KvSegment> seg = QuantizeRows(k.data(), v.data(), 40, 64, GetParam());
  ASSERT_TRUE(seg.ok());
  std::vector<float> kd(40 * 64), vd(40 * 64);
  seg->LoadRows(0, 40, kd.data(), vd.data());
  EXPECT_THAT(kd, ::testing::Each(1.5f));
  EXPECT_THAT(vd, ::testing::Each(-0.25f));
}

TEST_P(QuantizeTest, HeadDimMustSuitTheValueGroups) {
  std::vector<float> x(3 * 40, 1.f);
  absl::StatusOr<KvSegment> seg = QuantizeRows(x.data(), x.data(), 3, 40, GetParam());
  ASSERT_FALSE(seg.ok());
  EXPECT_EQ(seg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(seg.status().message()), HasSubstr("multiple of 32"));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, QuantizeTest, ::testing::Values(KvDtype::kInt8, KvDtype::kInt4),
                         [](const auto& info) { return std::string(KvDtypeName(info.param)); });

TEST(KvQuantTest, Int4PacksChannelsIAndIPlusHalfInOneByte) {
  // Two rows, one key group: row 0 holds every channel's minimum (code 0), row 1 its maximum
  // (code 15), so each byte of row 1 is 0xFF only if both of its nibbles are channels.
  const int hd = 32;
  std::vector<float> k(2 * hd), v(2 * hd, 0.f);
  for (int c = 0; c < hd; ++c) {
    k[c] = 0.f;
    k[hd + c] = static_cast<float>(c + 1);
  }
  absl::StatusOr<KvSegment> seg = QuantizeRows(k.data(), v.data(), 2, hd, KvDtype::kInt4);
  ASSERT_TRUE(seg.ok());
  ASSERT_EQ(seg->kq.size(), 2u * hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    EXPECT_EQ(seg->kq[i], 0x00) << i;         // row 0: channels i and i + 16 at code 0
    EXPECT_EQ(seg->kq[hd / 2 + i], 0xFF) << i;  // row 1: both nibbles at code 15
  }
}

TEST(KvQuantTest, ParseKvDtypeNamesTheChoices) {
  EXPECT_EQ(*ParseKvDtype("int4"), KvDtype::kInt4);
  EXPECT_EQ(*ParseKvDtype("fp16"), KvDtype::kF16);
  const absl::Status s = ParseKvDtype("int3").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("fp16, int8 or int4"));
}

KvCache RandomCache(int n_layers, int n_kv, int hd, int64_t n, std::mt19937& rng) {
  KvCache cache(n_layers, n_kv, hd);
  std::vector<int32_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(2 * i);
  for (int l = 0; l < n_layers; ++l) {
    const std::vector<float> k = Random(n * n_kv * hd, 2.f, rng), v = Random(n * n_kv * hd, 1.f, rng);
    cache.Append(l, k.data(), v.data(), pos.data(), n);
  }
  cache.next_position = static_cast<int32_t>(2 * n);
  return cache;
}

TEST(KvQuantTest, FreezeKeepsEntriesAndShrinksBytes) {
  std::mt19937 rng(9);
  const KvCache plain = RandomCache(2, 3, 64, 100, rng);
  for (KvDtype dtype : {KvDtype::kInt8, KvDtype::kInt4}) {
    KvCache frozen = plain;
    ASSERT_TRUE(frozen.Freeze(dtype).ok());
    EXPECT_EQ(frozen.StoredDtype(), dtype);
    EXPECT_EQ(frozen.TotalEntries(), plain.TotalEntries());
    EXPECT_EQ(frozen.Bytes(2), plain.Bytes(2));  // fp16 equivalents: unchanged
    const double ratio = static_cast<double>(plain.StoredBytes()) / frozen.StoredBytes();
    // int8: 256 / (128 + 16) bytes per entry at head_dim 64, with key groups of 32 tokens
    // (4 groups for 100 tokens); int4: 256 / (64 + 16).
    EXPECT_NEAR(ratio, dtype == KvDtype::kInt8 ? 1.75 : 3.1, 0.1) << KvDtypeName(dtype);
    const KvHead& a = plain.head(1, 2);
    const KvHead& b = frozen.head(1, 2);
    EXPECT_EQ(b.n_frozen(), 100);
    EXPECT_TRUE(b.k.empty());
    // The fp16 rows are released, not only cleared (a cleared vector keeps its capacity: a
    // frozen context held its fp16 copy beside its codes, uncounted).
    EXPECT_EQ(b.k.capacity() + b.v.capacity(), 0u);
    EXPECT_EQ(frozen.ResidentBytes(),
              frozen.StoredBytes() + frozen.TotalEntries() * int64_t{sizeof(int32_t)});
    EXPECT_EQ(a.pos, b.pos);
  }
}

TEST(KvQuantTest, ShrinkToFitLeavesOnlyWhatIsStored) {
  std::mt19937 rng(5);
  KvCache cache(2, 2, 64);
  // Appended a few rows at a time, as a prefill does: the vectors grow past their size.
  for (int32_t t = 0; t < 37; t += 3) {
    const std::vector<float> k = Random(3 * 2 * 64, 1.f, rng), v = Random(3 * 2 * 64, 1.f, rng);
    const int32_t pos[3] = {t, t + 1, t + 2};
    for (int l = 0; l < 2; ++l) cache.Append(l, k.data(), v.data(), pos, 3);
  }
  const int64_t exact = cache.StoredBytes() + cache.TotalEntries() * int64_t{sizeof(int32_t)};
  EXPECT_GT(cache.ResidentBytes(), exact);
  cache.ShrinkToFit();
  EXPECT_EQ(cache.ResidentBytes(), exact);
  EXPECT_EQ(cache.TotalEntries(), 2 * 2 * 39);
}

TEST(KvQuantTest, AppendTruncateAndLoadAcrossTheFrozenEnd) {
  std::mt19937 rng(4);
  KvCache cache = RandomCache(1, 2, 64, 50, rng);
  ASSERT_TRUE(cache.Freeze(KvDtype::kInt8).ok());
  std::vector<float> frozen_k(50 * 64), frozen_v(50 * 64);
  cache.head(0, 1).LoadRows(0, 50, 64, frozen_k.data(), frozen_v.data());
  // A request's own tokens go after the frozen entries as fp16 rows.
  const std::vector<float> k = Random(3 * 2 * 64, 1.f, rng), v = Random(3 * 2 * 64, 1.f, rng);
  const int32_t pos[3] = {100, 101, 102};
  cache.Append(0, k.data(), v.data(), pos, 3);
  const KvHead& h = cache.head(0, 1);
  ASSERT_EQ(h.n(), 53);
  ASSERT_EQ(h.n_frozen(), 50);
  std::vector<float> got_k(4 * 64), got_v(4 * 64);
  h.LoadRows(49, 53, 64, got_k.data(), got_v.data());
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(got_k[i], frozen_k[49 * 64 + i]);                      // the last frozen row
    EXPECT_EQ(got_k[64 + i], Fp16ToFp32(Fp32ToFp16(k[64 + i])));     // token 0, head 1
    EXPECT_EQ(got_v[3 * 64 + i], Fp16ToFp32(Fp32ToFp16(v[2 * 128 + 64 + i])));  // token 2
  }
  // Undoing the request never reaches into the stored context.
  cache.Truncate(10);
  EXPECT_EQ(cache.head(0, 1).n(), 50);
  EXPECT_TRUE(cache.head(0, 1).k.empty());
  // Thaw: fp16 rows equal to the dequantized values rounded to fp16.
  cache.Thaw();
  EXPECT_EQ(cache.StoredDtype(), KvDtype::kF16);
  ASSERT_EQ(cache.head(0, 1).k.size(), 50u * 64);
  for (int i = 0; i < 50 * 64; ++i) {
    ASSERT_EQ(cache.head(0, 1).k[i], Fp32ToFp16(frozen_k[i])) << i;
  }
}

TEST(KvQuantTest, FreezeFailsWholeOnAnUnsuitableHeadDim) {
  std::mt19937 rng(1);
  KvCache cache = RandomCache(1, 1, 48, 10, rng);
  const KvCache before = cache;
  const absl::Status s = cache.Freeze(KvDtype::kInt4);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.StoredDtype(), KvDtype::kF16);
  EXPECT_EQ(cache.head(0, 0).k, before.head(0, 0).k);
}

}  // namespace
}  // namespace ctxcache
