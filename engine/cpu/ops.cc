#include "engine/cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "common/cpu_features.h"
#include "engine/cpu/softmax_internal.h"

namespace ctxcache {

void RmsNorm(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    // Accumulate in double like ggml_compute_forward_rms_norm (ggml_float sum).
    double ss = 0;
    for (int i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float scale = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int i = 0; i < d; ++i) yr[i] = xr[i] * scale * w[i];
  }
}

namespace {

// cos/sin for each rotated pair at one position, with ggml's float recurrence.
void RopeAngles(float pos, const RopeParams& p, float* cos_out, float* sin_out) {
  const float theta_scale = std::pow(p.freq_base, -2.0f / static_cast<float>(p.rope_dim));
  float theta = pos * p.freq_scale;
  for (int i = 0; i < p.rope_dim / 2; ++i) {
    cos_out[i] = std::cos(theta);
    sin_out[i] = std::sin(theta);
    theta *= theta_scale;
  }
}

void RotateHeads(float* row, int n_heads, const RopeParams& p, const float* c, const float* s) {
  const int half = p.rope_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* x = row + h * p.head_dim;
    if (p.neox) {
      for (int i = 0; i < half; ++i) {
        const float x0 = x[i], x1 = x[i + half];
        x[i] = x0 * c[i] - x1 * s[i];
        x[i + half] = x0 * s[i] + x1 * c[i];
      }
    } else {
      for (int i = 0; i < half; ++i) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c[i] - x1 * s[i];
        x[2 * i + 1] = x0 * s[i] + x1 * c[i];
      }
    }
  }
}

}  // namespace

void ApplyRope(float* x, const int32_t* positions, int64_t n_rows, int n_heads,
               const RopeParams& p) {
  float c[512], s[512];  // rope_dim/2 <= 512 is checked at model load
  for (int64_t r = 0; r < n_rows; ++r) {
    RopeAngles(static_cast<float>(positions[r]), p, c, s);
    RotateHeads(x + r * static_cast<int64_t>(n_heads) * p.head_dim, n_heads, p, c, s);
  }
}

void ShiftRope(float* x, int64_t n_rows, int n_heads, int32_t delta, const RopeParams& p) {
  float c[512], s[512];
  RopeAngles(static_cast<float>(delta), p, c, s);
  for (int64_t r = 0; r < n_rows; ++r) {
    RotateHeads(x + r * static_cast<int64_t>(n_heads) * p.head_dim, n_heads, p, c, s);
  }
}

void SwiGlu(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = g[i];
    g[i] = v / (1.0f + std::exp(-v)) * u[i];
  }
}

void Softmax(float* x, int64_t n) {
  switch (GetCpuFeatures().level) {
    case CpuLevel::kAvx512:
      return softmax_internal::SoftmaxAvx512(x, n);
    case CpuLevel::kAvx2:
      return softmax_internal::SoftmaxAvx2(x, n);
    case CpuLevel::kScalar:
      break;
  }
  softmax_internal::SoftmaxReference(x, n);
}

void softmax_internal::SoftmaxReference(float* x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace ctxcache
