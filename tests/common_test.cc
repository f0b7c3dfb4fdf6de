#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "common/cpu_features.h"
#include "common/half.h"
#include "common/thread_pool.h"

namespace ctxcache {
namespace {

TEST(ThreadPoolTest, CoversRangeExactlyOnceWithAlignedSplits) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 5, 16, 17, 1000}) {
      for (int64_t align : {1, 4, 16}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelFor(n, align, [&](int64_t b, int64_t e, int t) {
          ASSERT_GE(t, 0);
          ASSERT_LT(t, threads);
          if (e < n) {
            EXPECT_EQ(e % align, 0) << "split not aligned";
          }
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
      }
    }
  }
}

TEST(ThreadPoolTest, FirstJobRightAfterConstructionIsNotLost) {
  // Regression: a worker that started after the first job was published used to miss it and
  // leave the caller waiting forever.
  for (int rep = 0; rep < 300; ++rep) {
    ThreadPool pool(3);
    std::atomic<int> done{0};
    pool.ParallelFor(3, [&](int64_t b, int64_t e, int) { done += static_cast<int>(e - b); });
    ASSERT_EQ(done.load(), 3);
  }
}

TEST(ThreadPoolTest, ManyQuickDispatches) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 20000; ++rep) {
    pool.ParallelFor(8, [&](int64_t b, int64_t e, int) { sum += e - b; });
  }
  EXPECT_EQ(sum.load(), 8 * 20000);
}

TEST(HalfTest, Fp16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Fp16ToFp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(Fp32ToFp16(f), h) << "h=" << h;
  }
  EXPECT_EQ(Fp16ToFp32(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFp32(0xc000), -2.0f);
  EXPECT_EQ(Fp32ToFp16(65520.f), 0x7c00) << "overflow rounds to inf";
  EXPECT_EQ(Fp32ToFp16(1.0f + 1.0f / 2048), 0x3c00) << "ties to even";
}

TEST(HalfTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFp32(Fp32ToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Fp32ToBf16(1.0f + 1.0f / 256), 0x3f80) << "tie to even";
  EXPECT_EQ(Fp32ToBf16(1.0f + 3.0f / 256), 0x3f82);
}

TEST(CpuFeaturesTest, LevelCanBeCapped) {
  const CpuLevel hw = GetCpuFeatures().level;
  CpuLevel prev = SetCpuLevelForTesting(CpuLevel::kScalar);
  EXPECT_EQ(GetCpuFeatures().level, CpuLevel::kScalar);
  EXPECT_FALSE(GetCpuFeatures().amx);
  SetCpuLevelForTesting(prev);
  EXPECT_EQ(GetCpuFeatures().level, hw);
  EXPECT_FALSE(GetCpuFeatures().ToString().empty());
}

}  // namespace
}  // namespace ctxcache
