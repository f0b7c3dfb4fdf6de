// Runtime CPU feature detection, so one binary picks AVX-512/AMX kernels where the CPU has
// them and still runs on a baseline x86-64 (AVX2) machine. CTXCACHE_CPU=avx2|scalar caps
// the level for testing the fallback paths on a bigger CPU (read once, at first use).
#pragma once

#include <string>

namespace ctxcache {

enum class CpuLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool avx2 = false;         // AVX2 + FMA + F16C
  bool avx512 = false;       // AVX-512 F/BW/DQ/VL
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool amx = false;          // AMX-TILE + AMX-BF16 + AMX-INT8, and the OS allows it
  CpuLevel level = CpuLevel::kScalar;  // the best level usable, after any cap
  std::string ToString() const;
};

// Detected once; thread-safe.
const CpuFeatures& GetCpuFeatures();

// Overrides the level (tests and benchmarks); returns the previous one. Capped by hardware.
CpuLevel SetCpuLevelForTesting(CpuLevel level);

}  // namespace ctxcache
