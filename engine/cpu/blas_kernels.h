// OpenBLAS kernel selection. Debian 12's OpenBLAS (0.3.21, DYNAMIC_ARCH) does not recognise
// newer CPUs such as Sapphire Rapids and falls back to its generic "Prescott" SSE3 kernels,
// which run attention's sgemm at well under half the speed of its AVX-512 ("SkylakeX")
// kernels on the same CPU (prefill of 2048 tokens: 265 vs 624 tok/s here). The core type is
// chosen when the library loads, before main(), and only OPENBLAS_CORETYPE changes it, so a
// binary that finds the fallback re-executes itself once with the right OPENBLAS_CORETYPE.
#pragma once

#include <string>

namespace ctxcache {

// OpenBLAS' core type, e.g. "SkylakeX" or "Prescott".
std::string BlasCoreName();

// The OPENBLAS_CORETYPE this CPU should use when OpenBLAS fell back to a generic kernel
// below what GetCpuFeatures() reports ("SkylakeX" with AVX-512, "Haswell" with AVX2); empty
// when the loaded kernels are fine or OPENBLAS_CORETYPE is already set (the user's choice
// wins, and a re-executed process never re-executes again).
std::string BetterBlasCoreType();

// Call first thing in main(): when BetterBlasCoreType() names a core type, sets
// OPENBLAS_CORETYPE and re-executes /proc/self/exe with the same arguments. Returns (and the
// process goes on with the loaded kernels) when there is nothing to do or exec fails.
void UseBestBlasKernels(char** argv);

}  // namespace ctxcache
