// The CUDA backend's forward pass (a DeviceForward, engine/device_forward.h): a model's
// weights uploaded once to one GPU, every layer and the output head run there.
//
// Weights: every matrix is dequantized on the host (the CPU's DequantizeRow) and uploaded as
// fp16; products are cuBLAS GEMMs on fp16 inputs with fp32 accumulation and output (prefill
// and decode alike; a decode step is a GEMM of one row per sequence, so a batch reads the
// weights once). Norms, RoPE, SwiGLU, residuals stay fp32 (engine/cuda/kernels.cuh).
// Attention: a flash-decoding kernel over the same per-(layer, KV head) ragged fp16 layout as
// the CPU's KvCache, each sequence of a pass over its own cache.
//
// Contexts: a cache's entries are mirrored on the device, uploaded in the form the host keeps
// them (fp16 rows as they are; int8 / int4 stored segments as codes, scales and minima, expanded
// to fp16 by a kernel, so the device holds 2 bytes a value whatever the codec); least recently
// used mirrors are dropped when the device's budget is reached.
//
// Not thread-safe: one Runner (one engine worker) per CudaForward.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/device_forward.h"

namespace ctxcache {
class Model;
}

namespace ctxcache::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;  // "NVIDIA H100 80GB HBM3"
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
  int cc_major = 0, cc_minor = 0;
};

// The visible CUDA devices; FailedPrecondition naming the driver's reason when there are none
// (no driver, no device).
absl::StatusOr<std::vector<DeviceInfo>> ListDevices();

struct CudaForwardOptions {
  // Share of the device memory free after the weights that context mirrors may take.
  double mirror_memory_fraction = 0.6;
};

// Uploads `model`'s weights to device `index`. FailedPrecondition when the device does not
// exist (naming the devices there are) or has no driver; ResourceExhausted when the weights do
// not fit (naming the bytes needed and free). `model` outlives the result.
absl::StatusOr<std::unique_ptr<DeviceForward>> NewCudaForward(
    const Model& model, int index, const CudaForwardOptions& options = {});

// The throughput cuBLAS reaches on device `index` for the products the forward pass runs
// (fp16 inputs, fp32 accumulation and output) at y[m, n] = x[m, k] w[n, k]^T: TFLOP/s, the best
// of `reps` after a warm-up (the GPU benchmark's peak, bench/gpu_throughput.cc).
absl::StatusOr<double> GemmTflops(int index, int64_t m, int64_t n, int64_t k, int reps);

}  // namespace ctxcache::cuda
