// engine/cpu/blas_kernels: which OpenBLAS kernels a binary ends up with.
#include "engine/cpu/blas_kernels.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/cpu_features.h"
#include "gtest/gtest.h"

namespace ctxcache {
namespace {

bool IsGeneric(const std::string& core) {
  return core == "Prescott" || core == "Core2" || core == "Nehalem" || core == "Sandybridge";
}

TEST(BlasKernelsTest, NamesABetterCoreOnlyForTheGenericFallback) {
  const char* preset = std::getenv("OPENBLAS_CORETYPE");
  if (preset != nullptr) {
    // The user's choice wins.
    EXPECT_EQ(BetterBlasCoreType(), "") << "OPENBLAS_CORETYPE=" << preset;
    return;
  }
  const std::string core = BlasCoreName();
  ASSERT_FALSE(core.empty());
  const std::string better = BetterBlasCoreType();
  if (!IsGeneric(core)) {
    EXPECT_EQ(better, "") << core;
  } else if (GetCpuFeatures().level == CpuLevel::kAvx512) {
    EXPECT_EQ(better, "SkylakeX") << core;
  } else if (GetCpuFeatures().level == CpuLevel::kAvx2) {
    EXPECT_EQ(better, "Haswell") << core;
  } else {
    EXPECT_EQ(better, "");
  }
  setenv("OPENBLAS_CORETYPE", "Prescott", 1);
  EXPECT_EQ(BetterBlasCoreType(), "") << "a set OPENBLAS_CORETYPE is never overridden";
  unsetenv("OPENBLAS_CORETYPE");
}

// The ctxcache binary re-executes itself onto the better kernels: `info` reports them.
TEST(BlasKernelsTest, TheCliRunsOnTheBetterKernels) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) GTEST_SKIP() << "OPENBLAS_CORETYPE is set";
  const std::string better = BetterBlasCoreType();
  const std::string want = better.empty() ? BlasCoreName() : better;
  FILE* p = popen(CTXCACHE_CLI_BIN " info --model " CTXCACHE_TINY_MODEL " 2>&1", "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  pclose(p);
  EXPECT_NE(out.find("OpenBLAS kernels: " + want + ")"), std::string::npos) << out;
}

}  // namespace
}  // namespace ctxcache
