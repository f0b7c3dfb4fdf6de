// Softmax kernels behind Softmax() (ops.cc), one per instruction-set level, each in its own
// file with __attribute__((target)) so the portable build still contains them; ops.cc picks
// one at run time from GetCpuFeatures().level. Attention at long contexts spends much of its
// time here (an exp per score: 9 billion for one 8192-token prefill of SmolLM2-135M), so the
// scalar libm exp is replaced by a polynomial one: e^x = 2^n * p(r), x = n ln2 + r,
// |r| <= ln2/2, p the degree-7 Taylor polynomial (truncation error < 1e-8 relative), within
// a few ulp of the correctly rounded value. Not a public interface.
#pragma once

#include <cstdint>

namespace ctxcache::softmax_internal {

// Same contract as Softmax (ops.h): in place over x[n], numerically stable (max subtracted),
// n == 0 a no-op.
void SoftmaxReference(float* x, int64_t n);
void SoftmaxAvx512(float* x, int64_t n);  // needs AVX-512 F/DQ + FMA
void SoftmaxAvx2(float* x, int64_t n);    // needs AVX2 + FMA + F16C (our AVX2 level)

// Exponent and polynomial constants shared by both vector kernels.
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693359375f;         // ln 2 split so that n * kLn2Hi is exact
inline constexpr float kLn2Lo = -2.12194440e-4f;
inline constexpr float kExpMin = -87.33654f;           // e^x underflows to subnormal below this
inline constexpr float kExpMax = 88.0f;                // 2^n stays a normal float (n <= 127)
inline constexpr float kTaylor[8] = {1.0f,         1.0f,          0.5f,           1.0f / 6,
                                     1.0f / 24,    1.0f / 120,    1.0f / 720,     1.0f / 5040};

}  // namespace ctxcache::softmax_internal
