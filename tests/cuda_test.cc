// CUDA kernels against the CPU reference ops. Skips, naming the driver's reason, when the
// machine has no usable GPU (CI and dev machines here compile CUDA but cannot run it).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "engine/cpu/ops.h"
#include "engine/cuda/cuda_backend.h"

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
