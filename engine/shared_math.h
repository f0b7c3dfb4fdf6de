// Scalar math shared by the CPU backend and CUDA kernels (compiled for host and device), so
// the device code reuses formulas that the CPU tests already check.
#pragma once

#if defined(__CUDACC__)
#define CTX_HD __host__ __device__ __forceinline__
#else
#define CTX_HD inline
#endif

#include <cmath>

namespace ctxcache {

// SiLU gate of SwiGLU: silu(g) * u.
CTX_HD float SwiGluScalar(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// RoPE angle of rotated pair i at a position, as ggml computes it: the float recurrence
// theta_i = pos * scale * base^(-2i/d) evaluated as repeated multiplication.
CTX_HD float RopeTheta(float pos_scaled, float theta_scale, int i) {
  float theta = pos_scaled;
  for (int k = 0; k < i; ++k) theta *= theta_scale;
  return theta;
}

// 1 / rms for a row given its sum of squares.
CTX_HD float RmsScale(float sum_squares, int d, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(d) + eps);
}

}  // namespace ctxcache
