// The CUDA backend's entry points. Compile-only on machines without a GPU: every function
// first checks for a device and returns FailedPrecondition (with the driver's reason) when
// there is none, which the tests turn into a visible skip.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace ctxcache::cuda {

// Number of usable CUDA devices, or FailedPrecondition naming why there are none.
absl::StatusOr<int> DeviceCount();

// y[n_rows, d] = x / rms(x) * w on the device (host buffers in and out; for tests).
absl::Status RmsNorm(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y);

// g[n] = silu(g) * u on the device (host buffers; for tests).
absl::Status SwiGlu(float* g, const float* u, int64_t n);

// y[m, n] = x[m, k] * w[n, k]^T with cuBLAS SGEMM (host buffers; for tests).
absl::Status Gemm(const float* x, const float* w, int64_t m, int64_t n, int64_t k, float* y);

}  // namespace ctxcache::cuda
