// Element-wise and row-wise transformer operations on fp32 (RMSNorm, RoPE, SwiGLU, softmax)
// and causal attention over a KvCache head. Plain, readable loops that the compiler
// vectorises; the heavy products go through matmul.h and OpenBLAS.
#pragma once

#include <cstdint>

#include "engine/kv_cache.h"

namespace ctxcache {

// y[n_rows, d] = x / rms(x) * w, per row.
void RmsNorm(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y);

struct RopeParams {
  int head_dim = 0;
  int rope_dim = 0;         // leading dims of each head that rotate
  float freq_base = 10000.f;
  float freq_scale = 1.f;   // position multiplier (linear scaling)
  bool neox = false;        // rotate (i, i + rope_dim/2) instead of (2i, 2i+1)
};

// Rotates x[n_rows, n_heads * head_dim] in place; row r is at position positions[r].
// Angles are computed as llama.cpp does (float recurrence theta *= base^(-2/rope_dim)), so
// our keys match its keys bit-for-bit in the common case.
void ApplyRope(float* x, const int32_t* positions, int64_t n_rows, int n_heads,
               const RopeParams& p);

// Rotates rows by a position delta (exact re-rotation of post-RoPE keys, e.g. to shift a
// context): equivalent to RoPE at pos + delta when applied to keys rotated at pos.
void ShiftRope(float* x, int64_t n_rows, int n_heads, int32_t delta, const RopeParams& p);

// g[n] = silu(g) * u, in place in g.
void SwiGlu(float* g, const float* u, int64_t n);

// In-place numerically stable softmax over x[n]; returns nothing; n == 0 is a no-op.
// Vectorized for the CPU's level (softmax_internal.h: a polynomial exp within a few ulp of
// libm's; softmax_test checks every level against the scalar reference).
void Softmax(float* x, int64_t n);

}  // namespace ctxcache
