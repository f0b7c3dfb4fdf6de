#include "common/cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace ctxcache {
namespace {

bool OsSavesZmm() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6) == 0xe6;  // XMM, YMM, opmask, ZMM_Hi256, Hi16_ZMM
}

bool RequestAmxPermission() {
  // Linux requires a per-process opt-in before AMX tile data may be used.
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

CpuFeatures Detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const unsigned ebx7 = b, ecx7 = c, edx7 = d;
  f.avx2 = avx && fma && f16c && (ebx7 & (1u << 5));
  const bool zmm = OsSavesZmm();
  f.avx512 = zmm && (ebx7 & (1u << 16)) && (ebx7 & (1u << 17)) && (ebx7 & (1u << 30)) &&
             (ebx7 & (1u << 31));
  f.avx512_vnni = f.avx512 && (ecx7 & (1u << 11));
  unsigned a71 = 0, b71, c71, d71;
  if (__get_cpuid_count(7, 1, &a71, &b71, &c71, &d71)) {
    f.avx512_bf16 = f.avx512 && (a71 & (1u << 5));
  }
  const bool amx_hw = (edx7 & (1u << 24)) && (edx7 & (1u << 22)) && (edx7 & (1u << 25));
  f.amx = f.avx512 && amx_hw && RequestAmxPermission();
  f.level = f.avx512 ? CpuLevel::kAvx512 : f.avx2 ? CpuLevel::kAvx2 : CpuLevel::kScalar;
  if (const char* cap = std::getenv("CTXCACHE_CPU")) {
    if (std::strcmp(cap, "avx2") == 0 && f.level > CpuLevel::kAvx2) f.level = CpuLevel::kAvx2;
    if (std::strcmp(cap, "scalar") == 0) f.level = CpuLevel::kScalar;
  }
  if (f.level < CpuLevel::kAvx512) f.amx = f.avx512_vnni = f.avx512_bf16 = false;
  return f;
}

CpuFeatures& Mutable() {
  static CpuFeatures features = Detect();
  return features;
}

}  // namespace

const CpuFeatures& GetCpuFeatures() { return Mutable(); }

CpuLevel SetCpuLevelForTesting(CpuLevel level) {
  static const CpuFeatures hw = Detect();
  CpuFeatures& f = Mutable();
  CpuLevel prev = f.level;
  f = hw;
  if (level < f.level) f.level = level;
  if (f.level < CpuLevel::kAvx512) f.amx = f.avx512_vnni = f.avx512_bf16 = false;
  return prev;
}

std::string CpuFeatures::ToString() const {
  std::string s = level == CpuLevel::kAvx512 ? "avx512" : level == CpuLevel::kAvx2 ? "avx2" : "scalar";
  if (avx512_vnni) s += "+vnni";
  if (avx512_bf16) s += "+bf16";
  if (amx) s += "+amx";
  return s;
}

}  // namespace ctxcache
