// The vectorized softmax kernels (engine/cpu/softmax_*.cc) against the scalar reference
// (libm exp, double sum), at every CPU level this machine has; and the dispatched Softmax.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "common/cpu_features.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/softmax_internal.h"
#include "gtest/gtest.h"

namespace ctxcache {
namespace {

using softmax_internal::SoftmaxReference;
using Kernel = void (*)(float*, int64_t);

struct Level {
  const char* name;
  Kernel kernel;
  bool available;
};

std::vector<Level> Levels() {
  const CpuFeatures& f = GetCpuFeatures();
  return {{"avx512", softmax_internal::SoftmaxAvx512, f.avx512},
          {"avx2", softmax_internal::SoftmaxAvx2, f.avx2}};
}

// Attention-like scores: mostly within a few units, some far below the max (e^-80 and less,
// which must come out as ~0, not NaN), lengths around every vector width.
std::vector<float> Scores(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_int_distribution<int> pick(0, 19);
  std::vector<float> x(n);
  for (float& v : x) v = pick(rng) == 0 ? -100.f + normal(rng) : normal(rng);
  return x;
}

TEST(SoftmaxTest, EveryLevelMatchesTheReference) {
  std::mt19937 rng(7);
  for (const Level& level : Levels()) {
    if (!level.available) {
      // Not silent: the forced-AVX2 and scalar runs are what cover a smaller CPU.
      std::printf("[  SKIPPED ] %s: this CPU lacks it\n", level.name);
      continue;
    }
    for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 1000, 8192}) {
      const std::vector<float> x = Scores(n, rng);
      std::vector<float> want = x, got = x;
      SoftmaxReference(want.data(), n);
      level.kernel(got.data(), n);
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        // A few ulp of exp plus a float (not double) sum over at most 8192 terms: 2e-6
        // relative covers it with room; absolute 1e-12 for the probabilities that underflow.
        ASSERT_NEAR(got[i], want[i], 2e-6 * want[i] + 1e-12)
            << level.name << " n=" << n << " i=" << i << " x=" << x[i];
        sum += got[i];
      }
      EXPECT_NEAR(sum, 1.0, 1e-5) << level.name << " n=" << n;
    }
  }
}

TEST(SoftmaxTest, ExtremesAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  for (const Level& level : Levels()) {
    if (!level.available) continue;
    // A -inf score (a masked key) gets probability 0, not NaN.
    std::vector<float> x = {0.f, -inf, 1.f, -1e30f, 2.f, -200.f, 3.f, 4.f, 5.f};
    std::vector<float> want = x;
    SoftmaxReference(want.data(), static_cast<int64_t>(want.size()));
    level.kernel(x.data(), static_cast<int64_t>(x.size()));
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_NEAR(x[i], want[i], 2e-6 * want[i] + 1e-12) << level.name << " i=" << i;
    }
    // Large equal scores: no overflow (the max is subtracted first).
    std::vector<float> big(20, 1e30f);
    level.kernel(big.data(), 20);
    for (float v : big) EXPECT_NEAR(v, 0.05f, 1e-7f) << level.name;
    // A NaN score poisons the row, as with the reference; it is never hidden.
    std::vector<float> nan = {1.f, std::nanf(""), 2.f};
    level.kernel(nan.data(), 3);
    EXPECT_TRUE(std::isnan(nan[0]) || std::isnan(nan[1])) << level.name;
    // n == 0 touches nothing.
    float untouched = 3.f;
    level.kernel(&untouched, 0);
    EXPECT_EQ(untouched, 3.f);
  }
}

TEST(SoftmaxTest, DispatchedSoftmaxIsTheActiveLevelsKernel) {
  std::mt19937 rng(11);
  const std::vector<float> x = Scores(300, rng);
  std::vector<float> a = x, b = x;
  Softmax(a.data(), 300);
  switch (GetCpuFeatures().level) {
    case CpuLevel::kAvx512:
      softmax_internal::SoftmaxAvx512(b.data(), 300);
      break;
    case CpuLevel::kAvx2:
      softmax_internal::SoftmaxAvx2(b.data(), 300);
      break;
    case CpuLevel::kScalar:
      SoftmaxReference(b.data(), 300);
      break;
  }
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace ctxcache
