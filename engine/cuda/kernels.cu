// CUDA kernels for the element-wise and row-wise ops, plus cuBLAS GEMM. Their scalar math is
// shared with the CPU backend (engine/shared_math.h).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/shared_math.h"

namespace ctxcache::cuda {
namespace {

__global__ void RmsNormKernel(const float* x, const float* w, int d, float eps, float* y) {
  // One block per row; block-wide sum of squares through shared memory.
  extern __shared__ float partial[];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * d;
  float* yr = y + static_cast<int64_t>(blockIdx.x) * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  partial[threadIdx.x] = ss;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float scale = RmsScale(partial[0], d, eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

__global__ void SwiGluKernel(float* g, const float* u, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) g[i] = SwiGluScalar(g[i], u[i]);
}

absl::Status Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// Device buffer that frees itself.
struct DeviceBuffer {
  float* p = nullptr;
  ~DeviceBuffer() { if (p) cudaFree(p); }
  absl::Status Alloc(int64_t n) { return Check(cudaMalloc(&p, n * sizeof(float)), "cudaMalloc"); }
  absl::Status Upload(const float* src, int64_t n) {
    return Check(cudaMemcpy(p, src, n * sizeof(float), cudaMemcpyHostToDevice), "upload");
  }
  absl::Status Download(float* dst, int64_t n) const {
    return Check(cudaMemcpy(dst, p, n * sizeof(float), cudaMemcpyDeviceToHost), "download");
  }
};

#define CTX_RETURN_IF_ERROR(expr)          \
  do {                                     \
    absl::Status _s = (expr);              \
    if (!_s.ok()) return _s;               \
  } while (0)

}  // namespace

absl::StatusOr<int> DeviceCount() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device: ", cudaGetErrorString(e)));
  }
  if (n == 0) return absl::FailedPreconditionError("no CUDA device present");
  return n;
}

absl::Status RmsNorm(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y) {
  auto count = DeviceCount();
  if (!count.ok()) return count.status();
  DeviceBuffer dx, dw, dy;
  CTX_RETURN_IF_ERROR(dx.Alloc(n_rows * d));
  CTX_RETURN_IF_ERROR(dw.Alloc(d));
  CTX_RETURN_IF_ERROR(dy.Alloc(n_rows * d));
  CTX_RETURN_IF_ERROR(dx.Upload(x, n_rows * d));
  CTX_RETURN_IF_ERROR(dw.Upload(w, d));
  constexpr int kThreads = 256;
  RmsNormKernel<<<static_cast<unsigned>(n_rows), kThreads, kThreads * sizeof(float)>>>(
      dx.p, dw.p, d, eps, dy.p);
  CTX_RETURN_IF_ERROR(Check(cudaGetLastError(), "RmsNormKernel launch"));
  return dy.Download(y, n_rows * d);
}

absl::Status SwiGlu(float* g, const float* u, int64_t n) {
  auto count = DeviceCount();
  if (!count.ok()) return count.status();
  DeviceBuffer dg, du;
  CTX_RETURN_IF_ERROR(dg.Alloc(n));
  CTX_RETURN_IF_ERROR(du.Alloc(n));
  CTX_RETURN_IF_ERROR(dg.Upload(g, n));
  CTX_RETURN_IF_ERROR(du.Upload(u, n));
  SwiGluKernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(dg.p, du.p, n);
  CTX_RETURN_IF_ERROR(Check(cudaGetLastError(), "SwiGluKernel launch"));
  return dg.Download(g, n);
}

absl::Status Gemm(const float* x, const float* w, int64_t m, int64_t n, int64_t k, float* y) {
  auto count = DeviceCount();
  if (!count.ok()) return count.status();
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    return absl::FailedPreconditionError("cublasCreate failed (no usable GPU?)");
  }
  DeviceBuffer dx, dw, dy;
  absl::Status s = dx.Alloc(m * k);
  if (s.ok()) s = dw.Alloc(n * k);
  if (s.ok()) s = dy.Alloc(m * n);
  if (s.ok()) s = dx.Upload(x, m * k);
  if (s.ok()) s = dw.Upload(w, n * k);
  if (s.ok()) {
    // Row-major y[m,n] = x[m,k] w[n,k]^T is column-major y^T[n,m] = w[n,k] x^T[k,m].
    const float alpha = 1.f, beta = 0.f;
    if (cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                    static_cast<int>(k), &alpha, dw.p, static_cast<int>(k), dx.p,
                    static_cast<int>(k), &beta, dy.p, static_cast<int>(n)) !=
        CUBLAS_STATUS_SUCCESS) {
      s = absl::InternalError("cublasSgemm failed");
    }
  }
  if (s.ok()) s = dy.Download(y, m * n);
  cublasDestroy(handle);
  return s;
}

}  // namespace ctxcache::cuda
