#include "engine/cpu/blas_kernels.h"

#include <cblas.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/cpu_features.h"

namespace ctxcache {

std::string BlasCoreName() {
  const char* name = openblas_get_corename();
  return name != nullptr ? name : "";
}

std::string BetterBlasCoreType() {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return "";
  // The generic x86-64 kernels OpenBLAS falls back to for a CPU it does not know.
  const std::string core = BlasCoreName();
  if (core != "Prescott" && core != "Core2" && core != "Nehalem" && core != "Sandybridge") {
    return "";
  }
  switch (GetCpuFeatures().level) {
    case CpuLevel::kAvx512:
      return "SkylakeX";
    case CpuLevel::kAvx2:
      return "Haswell";
    case CpuLevel::kScalar:
      break;
  }
  return "";
}

void UseBestBlasKernels(char** argv) {
  const std::string core = BetterBlasCoreType();
  if (core.empty()) return;
  setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
  execv("/proc/self/exe", argv);
  // exec failed (no /proc?): go on with the loaded kernels, slower but correct.
  std::fprintf(stderr, "note: could not re-execute with OPENBLAS_CORETYPE=%s (%s); attention "
               "runs on OpenBLAS' generic kernels\n", core.c_str(), std::strerror(errno));
  unsetenv("OPENBLAS_CORETYPE");
}

}  // namespace ctxcache
