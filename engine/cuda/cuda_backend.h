// The CUDA backend's entry points. Compile-only on machines without a GPU: every function
// first checks for a device and returns FailedPrecondition (with the driver's reason) when
// there is none, which the tests turn into a visible skip.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace ctxcache {
class KvCache;
struct KvSegment;
struct RopeParams;
}  // namespace ctxcache

namespace ctxcache::cuda {

// Number of usable CUDA devices, or FailedPrecondition naming why there are none.
absl::StatusOr<int> DeviceCount();

// y[n_rows, d] = x / rms(x) * w on the device (host buffers in and out; for tests).
absl::Status RmsNorm(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y);

// g[n] = silu(g) * u on the device (host buffers; for tests).
absl::Status SwiGlu(float* g, const float* u, int64_t n);

// The kernels of engine/cuda/kernels.cuh on host buffers (upload, run, download; for tests).
// Each returns FailedPrecondition without a device, like the ones above.

// y[n] = x rounded to nearest fp16 (bits), with ToHalf.
absl::Status ToHalfHost(const float* x, uint16_t* y, int64_t n);
// x[n_rows, d] += b[d], with AddBias.
absl::Status AddBiasHost(float* x, const float* b, int64_t n_rows, int d);
// x[n] += y[n], with AddInPlace.
absl::Status AddInPlaceHost(float* x, const float* y, int64_t n);
// As ApplyRope (engine/cpu/ops.h), with Rope (theta_scale computed as the CPU does).
absl::Status RopeHost(float* x, const int32_t* positions, int64_t n_rows, int n_heads,
                      const RopeParams& p);
// As KvCache::Append for each cache, with one AppendKv: the pass's rows k, v ([sum of rows,
// n_kv_heads * head_dim]) and positions are the caches' rows in order, caches[s] taking
// rows[s] of them. Heads must hold plain fp16 rows (no frozen segments).
absl::Status AppendKvHost(const std::vector<KvCache*>& caches, int layer, const float* k,
                          const float* v, const int32_t* positions,
                          const std::vector<int64_t>& rows);
// Rows [begin, end) of an int8 / int4 segment as fp16 bits into k and v ([end - begin,
// head_dim] each), with DequantizeSegment: as seg.LoadRows then Fp32ToFp16 per value.
// InvalidArgument for an fp16 segment, a range outside [0, seg.n] or buffers that do not
// match the segment's shape.
absl::Status DequantizeSegmentHost(const KvSegment& seg, int64_t begin, int64_t end,
                                   std::vector<uint16_t>* k, std::vector<uint16_t>* v);
// Attention of rows q ([n_rows, n_heads * head_dim]) at positions q_pos, row r over layer
// `layer` of caches[row_seq[r]] (plain fp16 heads), scale 1 / sqrt(head_dim): out [n_rows,
// n_heads * head_dim] and lse [n_rows, n_heads]. With probs, AttentionProbs of observe_rows
// into it ([n_heads, observe_rows.size(), max_keys], max_keys the most entries of any head).
absl::Status AttentionHost(const std::vector<const KvCache*>& caches, int layer, const float* q,
                           const int32_t* q_pos, const int32_t* row_seq, int64_t n_rows,
                           int n_heads, const std::vector<int32_t>& observe_rows, float* out,
                           float* lse, std::vector<float>* probs);

// y[m, n] = x[m, k] * w[n, k]^T with cuBLAS SGEMM (host buffers; for tests).
absl::Status Gemm(const float* x, const float* w, int64_t m, int64_t n, int64_t k, float* y);

}  // namespace ctxcache::cuda
