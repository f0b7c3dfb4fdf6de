// CUDA kernels (engine/cuda/kernels.cuh) and the host-buffer wrappers the tests call
// (engine/cuda/cuda_backend.h), plus cuBLAS GEMM. Their scalar math is shared with the CPU
// backend (engine/shared_math.h).
//
// Conventions: every block size is a multiple of 32 (the warp reductions use full-mask
// shuffles), flat indices are int64, element-wise kernels are grid-stride loops over at most
// kMaxBlocks blocks, and every __syncthreads sits where all threads of the block reach it
// (loops around them have block-uniform trip counts; early returns are block-uniform).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/ops.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/kernels.cuh"
#include "engine/kv_cache.h"
#include "engine/shared_math.h"

namespace ctxcache::cuda {
namespace {

constexpr int kThreads = 256;                     // element-wise and row-wise kernels
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride kernels: x limit is 2^31 - 1
constexpr int kMaxGridY = 65535;

// Attention's partial kernel: one thread per key of a split (the in-split softmax takes one
// score per thread) and at least one key group of head_dim threads in the V pass.
constexpr int kAttnThreads = kAttentionSplit;
static_assert(kAttentionSplit % 32 == 0 && kAttentionSplit <= 1024);
static_assert(kMaxHeadDim <= kAttnThreads);
constexpr int kMergeThreads = 128;
constexpr int kProbsThreads = 256;
constexpr int kProbsChunk = 256;  // keys per probs block

unsigned BlocksFor(int64_t n, int per_block) {
  return static_cast<unsigned>(std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocks));
}

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Butterfly reductions: every lane ends with the same value (fp add / max are commutative).
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum (or max) of one value per thread; every thread of the block must call it
// (it synchronises) and every thread gets the same result (warp totals combined in warp
// order). red: blockDim.x / 32 floats of shared memory, reusable by the next call.
template <bool kMax>
__device__ float BlockReduce(float v, float* red) {
  v = kMax ? WarpMax(v) : WarpSum(v);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int n_warps = static_cast<int>(blockDim.x) >> 5;
  __syncthreads();  // readers of red from a previous call are done
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < n_warps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

// ---------------------------------------------------------------------------------------------
// Row-wise and element-wise kernels.

// One block per row (grid-stride over rows; the trip count is block-uniform): fp32 sum of
// squares reduced over the block, then the scaled row.
__global__ void __launch_bounds__(kThreads)
    RmsNormRowsKernel(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y) {
  __shared__ float red[kThreads / 32];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float ss = 0.f;
    for (int i = static_cast<int>(threadIdx.x); i < d; i += static_cast<int>(blockDim.x)) {
      ss += xr[i] * xr[i];
    }
    ss = BlockReduce<false>(ss, red);  // also orders every read of xr before the writes below
    const float scale = RmsScale(ss, d, eps);
    for (int i = static_cast<int>(threadIdx.x); i < d; i += static_cast<int>(blockDim.x)) {
      yr[i] = xr[i] * scale * w[i];
    }
  }
}

__global__ void ToHalfKernel(const float* x, __half* y, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) y[i] = __float2half_rn(x[i]);
}

__global__ void AddBiasKernel(float* x, const float* b, int64_t n, int d) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] += b[i % d];
}

__global__ void AddInPlaceKernel(float* x, const float* y, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] += y[i];
}

__global__ void SwiGluKernel(float* g, const float* u, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) g[i] = SwiGluScalar(g[i], u[i]);
}

// One thread per rotated pair (row, head, pair index p): theta by the CPU's float recurrence
// (RopeTheta: pos * freq_scale, times theta_scale p times), then the 2x2 rotation.
__global__ void RopeKernel(float* x, const int32_t* pos, int64_t n_pairs, int n_heads, RopeArgs a) {
  const int half = a.rope_dim / 2;
  for (int64_t i = GlobalThread(); i < n_pairs; i += GridThreads()) {
    const int p = static_cast<int>(i % half);
    const int64_t rh = i / half;  // row * n_heads + head
    const int64_t r = rh / n_heads;
    const float theta = RopeTheta(static_cast<float>(pos[r]) * a.freq_scale, a.theta_scale, p);
    const float c = cosf(theta), s = sinf(theta);
    float* xh = x + rh * a.head_dim;
    const int i0 = a.neox ? p : 2 * p, i1 = a.neox ? p + half : 2 * p + 1;
    const float x0 = xh[i0], x1 = xh[i1];
    xh[i0] = x0 * c - x1 * s;
    xh[i1] = x0 * s + x1 * c;
  }
}

// Block x = table entry, block y = a slice of its rows * head_dim values (grid-stride over y,
// so rows beyond max_rows would still be written).
__global__ void AppendKvKernel(const float* k, const float* v, const int32_t* row_pos,
                               int n_kv_heads, int head_dim, const KvAppendEntry* table) {
  const KvAppendEntry e = table[blockIdx.x];
  const int g = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_kv_heads));
  const int64_t row_width = static_cast<int64_t>(n_kv_heads) * head_dim;
  const int64_t total = e.rows * head_dim;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; j < total;
       j += stride) {
    const int64_t t = j / head_dim;
    const int c = static_cast<int>(j % head_dim);
    const int64_t src = (e.row0 + t) * row_width + static_cast<int64_t>(g) * head_dim + c;
    const int64_t dst = (e.head.n + t) * head_dim + c;
    e.head.k[dst] = __float2half_rn(k[src]);
    e.head.v[dst] = __float2half_rn(v[src]);
    if (c == 0) e.head.pos[e.head.n + t] = row_pos[e.row0 + t];
  }
}

// One thread per (row, channel) of the range (grid-stride; t = (j - begin) * head_dim + i):
// K's code times its channel's scale in row j's key group (groups counted from the segment's
// first row) plus that group's minimum, V's code times the scale of row j's channel group plus
// its minimum, as KvSegment::LoadRows computes them (each step rounded on its own: __fmul_rn,
// __fadd_rn, no FMA), then rounded to nearest fp16.
__global__ void DequantizeSegmentKernel(const QuantSegmentView s, int64_t begin, int64_t total,
                                        __half* k_out, __half* v_out) {
  const int hd = s.head_dim;
  const int half = hd / 2;
  const int v_groups = hd / kValueGroup;
  const bool int4 = s.dtype == static_cast<int>(KvDtype::kInt4);
  const int64_t row_bytes = int4 ? half : hd;
  for (int64_t t = GlobalThread(); t < total; t += GridThreads()) {
    const int64_t j = begin + t / hd;
    const int i = static_cast<int>(t % hd);
    // int4: channel i in the low nibble of byte i, channel i + hd / 2 in the high nibble.
    const int64_t byte = j * row_bytes + (int4 && i >= half ? i - half : i);
    const int shift = int4 && i >= half ? 4 : 0;
    const int mask = int4 ? 0xF : 0xFF;
    const float kc = static_cast<float>((s.kq[byte] >> shift) & mask);
    const float vc = static_cast<float>((s.vq[byte] >> shift) & mask);
    const int64_t ks = (j / kKeyGroup) * hd + i;
    const int64_t vs = j * v_groups + i / kValueGroup;
    k_out[t] = __float2half_rn(
        __fadd_rn(__fmul_rn(kc, __half2float(s.k_scale[ks])), __half2float(s.k_min[ks])));
    v_out[t] = __float2half_rn(
        __fadd_rn(__fmul_rn(vc, __half2float(s.v_scale[vs])), __half2float(s.v_min[vs])));
  }
}

// ---------------------------------------------------------------------------------------------
// Attention.

// The first index in [lo, hi) whose position exceeds q (hi if none).
__device__ int64_t UpperBound(const int32_t* pos, int64_t lo, int64_t hi, int32_t q) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pos[mid] <= q) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// scale * q . k for one key, by a whole warp (lanes over head_dim: each step reads 32
// consecutive fp16 values); every lane gets the score. The product is rounded on its own
// (__fmul_rn) so both kernels that use it get bit-identical scores.
__device__ __forceinline__ float WarpScore(const float* q_s, const __half* k, int hd, int lane,
                                           float scale) {
  float acc = 0.f;
  for (int d = lane; d < hd; d += 32) acc += q_s[d] * __half2float(k[d]);
  return __fmul_rn(scale, WarpSum(acc));
}

__device__ __forceinline__ KvHeadView HeadOf(const AttentionArgs& a, int64_t r, int h) {
  const int group = a.n_heads / a.n_kv_heads;
  return a.heads[static_cast<int64_t>(a.row_seq[r]) * a.n_kv_heads + h / group];
}

// Block (x = row * n_heads + head, y = split): the split's visible keys [s0, s0 + cnt) get
// their scores (one warp per key), an exact softmax within the split (m = max, l = sum of
// exp(s - m), one key per thread), and acc[d] = sum of exp(s - m) v[d] (key groups of head_dim
// threads, lanes over d, summed over the groups in order). Writes (m, l, acc[head_dim]) to the
// split's workspace slot; a split with no visible key writes (-inf, 0) and no acc.
__global__ void __launch_bounds__(kAttnThreads)
    AttentionPartialKernel(const AttentionArgs a, int64_t n_splits) {
  __shared__ float q_s[kMaxHeadDim];
  __shared__ float p_s[kAttentionSplit];
  __shared__ float acc_s[kAttnThreads];
  __shared__ float red[kAttnThreads / 32];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int n_warps = kAttnThreads / 32;
  const int hd = a.head_dim;
  const int64_t rh = blockIdx.x;
  const int64_t r = rh / a.n_heads;
  const int h = static_cast<int>(rh % a.n_heads);
  const int64_t split = blockIdx.y;
  float* ws = a.workspace + (rh * n_splits + split) * (hd + 2);

  const KvHeadView kv = HeadOf(a, r, h);
  const int64_t s0 = split * kAttentionSplit;
  const int64_t s1 = s0 + kAttentionSplit < kv.n ? s0 + kAttentionSplit : kv.n;
  // Every thread computes the same count (same reads), so this branch is block-uniform.
  const int cnt = s0 < s1 ? static_cast<int>(UpperBound(kv.pos, s0, s1, a.q_pos[r]) - s0) : 0;
  if (cnt == 0) {
    if (tid == 0) {
      ws[0] = -INFINITY;
      ws[1] = 0.f;
    }
    return;
  }

  const float* q = a.q + rh * hd;  // [n_rows, n_heads * hd]: row r, head h
  for (int d = tid; d < hd; d += kAttnThreads) q_s[d] = q[d];
  __syncthreads();

  const __half* k = kv.k + s0 * hd;
  for (int j = warp; j < cnt; j += n_warps) {  // warp-uniform: the shuffles see all lanes
    const float s = WarpScore(q_s, k + static_cast<int64_t>(j) * hd, hd, lane, a.scale);
    if (lane == 0) p_s[j] = s;
  }
  __syncthreads();

  const float s = tid < cnt ? p_s[tid] : -INFINITY;
  const float m = BlockReduce<true>(s, red);
  const float p = tid < cnt ? expf(s - m) : 0.f;
  p_s[tid] = p;                                // only this thread read p_s[tid] above
  const float l = BlockReduce<false>(p, red);  // its barriers publish p_s

  const int n_groups = kAttnThreads / hd;
  float acc = 0.f;
  if (tid < n_groups * hd) {
    const int d = tid % hd, grp = tid / hd;
    const __half* vd = kv.v + s0 * hd + d;
    for (int j = grp; j < cnt; j += n_groups) {
      acc += p_s[j] * __half2float(vd[static_cast<int64_t>(j) * hd]);
    }
  }
  acc_s[tid] = acc;
  __syncthreads();
  if (tid < hd) {
    float o = 0.f;
    for (int g = 0; g < n_groups; ++g) o += acc_s[g * hd + tid];
    ws[2 + tid] = o;
  }
  if (tid == 0) {
    ws[0] = m;
    ws[1] = l;
  }
}

// Block x = row * n_heads + head: merges the splits' (m, l, acc) with weights exp(m_s - M)
// (splits with m = -inf skipped, so an empty split adds nothing and never makes a NaN), out =
// sum w_s acc_s / L, lse = M + log(L); no visible key at all: out = 0, lse = -inf. Every thread
// computes M and L itself (same reads, same order), then its dims of out.
__global__ void __launch_bounds__(kMergeThreads)
    AttentionMergeKernel(const AttentionArgs a, int64_t n_splits) {
  const int hd = a.head_dim;
  const int64_t rh = blockIdx.x;
  const int64_t slot = hd + 2;
  const float* ws = a.workspace + rh * n_splits * slot;
  float mx = -INFINITY;
  for (int64_t s = 0; s < n_splits; ++s) mx = fmaxf(mx, ws[s * slot]);
  float* out = a.out + rh * hd;
  if (mx == -INFINITY) {
    for (int d = static_cast<int>(threadIdx.x); d < hd; d += kMergeThreads) out[d] = 0.f;
    if (threadIdx.x == 0) a.lse[rh] = -INFINITY;
    return;
  }
  float l = 0.f;
  for (int64_t s = 0; s < n_splits; ++s) {
    const float ms = ws[s * slot];
    if (ms != -INFINITY) l += ws[s * slot + 1] * expf(ms - mx);
  }
  const float inv = 1.f / l;
  for (int d = static_cast<int>(threadIdx.x); d < hd; d += kMergeThreads) {
    float o = 0.f;
    for (int64_t s = 0; s < n_splits; ++s) {
      const float ms = ws[s * slot];
      if (ms != -INFINITY) o += ws[s * slot + 2 + d] * expf(ms - mx);
    }
    out[d] = o * inv;
  }
  if (threadIdx.x == 0) a.lse[rh] = mx + logf(l);
}

// Block (x = observed row i * n_heads + head, y = chunk of kProbsChunk keys): one warp per key,
// the same score as AttentionPartialKernel, exp(score - lse) for visible keys, 0 beyond.
__global__ void __launch_bounds__(kProbsThreads)
    AttentionProbsKernel(const AttentionArgs a, const int32_t* rows, int n_obs, float* probs) {
  __shared__ float q_s[kMaxHeadDim];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int n_warps = kProbsThreads / 32;
  const int hd = a.head_dim;
  const int64_t ih = blockIdx.x;
  const int64_t i = ih / a.n_heads;
  const int h = static_cast<int>(ih % a.n_heads);
  const int64_t r = rows[i];
  const KvHeadView kv = HeadOf(a, r, h);
  const int64_t n_vis = UpperBound(kv.pos, 0, kv.n, a.q_pos[r]);
  const float* q = a.q + (r * a.n_heads + h) * hd;
  for (int d = tid; d < hd; d += kProbsThreads) q_s[d] = q[d];
  __syncthreads();
  const float lse = a.lse[r * a.n_heads + h];
  float* dst = probs + (static_cast<int64_t>(h) * n_obs + i) * a.max_keys;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kProbsChunk;
  const int64_t c1 = c0 + kProbsChunk < a.max_keys ? c0 + kProbsChunk : a.max_keys;
  for (int64_t j = c0 + warp; j < c1; j += n_warps) {
    float p = 0.f;
    if (j < n_vis)
      p = expf(WarpScore(q_s, kv.k + j * hd, hd, lane, a.scale) - lse);  // warp-uniform
    if (lane == 0) dst[j] = p;
  }
}

int64_t NumSplits(int64_t max_keys) {
  return std::max<int64_t>(1, (max_keys + kAttentionSplit - 1) / kAttentionSplit);
}

// Shape checks shared by Attention and AttentionProbs.
bool AttentionShapeOk(const AttentionArgs& a) {
  return a.head_dim >= 1 && a.head_dim <= kMaxHeadDim && a.n_kv_heads >= 1 &&
         a.n_heads >= a.n_kv_heads && a.n_heads % a.n_kv_heads == 0 && a.max_keys >= 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernels.cuh

cudaError_t RmsNormRows(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y,
                        cudaStream_t stream) {
  if (n_rows <= 0 || d <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min(n_rows, kMaxBlocks));
  RmsNormRowsKernel<<<blocks, kThreads, 0, stream>>>(x, w, n_rows, d, eps, y);
  return cudaGetLastError();
}

cudaError_t ToHalf(const float* x, __half* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ToHalfKernel<<<BlocksFor(n, kThreads), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t AddBias(float* x, const float* b, int64_t n_rows, int d, cudaStream_t stream) {
  if (n_rows <= 0 || d <= 0) return cudaSuccess;
  const int64_t n = n_rows * d;
  AddBiasKernel<<<BlocksFor(n, kThreads), kThreads, 0, stream>>>(x, b, n, d);
  return cudaGetLastError();
}

cudaError_t AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AddInPlaceKernel<<<BlocksFor(n, kThreads), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t SwiGluInPlace(float* g, const float* u, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  SwiGluKernel<<<BlocksFor(n, kThreads), kThreads, 0, stream>>>(g, u, n);
  return cudaGetLastError();
}

cudaError_t Rope(float* x, const int32_t* pos, int64_t n_rows, int n_heads, const RopeArgs& args,
                 cudaStream_t stream) {
  if (args.head_dim <= 0 || args.rope_dim < 0 || args.rope_dim > args.head_dim) {
    return cudaErrorInvalidValue;
  }
  const int half = args.rope_dim / 2;
  if (n_rows <= 0 || n_heads <= 0 || half == 0) return cudaSuccess;
  const int64_t n_pairs = n_rows * n_heads * half;
  RopeKernel<<<BlocksFor(n_pairs, kThreads), kThreads, 0, stream>>>(x, pos, n_pairs, n_heads, args);
  return cudaGetLastError();
}

cudaError_t AppendKv(const float* k, const float* v, const int32_t* row_pos, int n_kv_heads,
                     int head_dim, const KvAppendEntry* table, int n_entries, int64_t max_rows,
                     cudaStream_t stream) {
  if (n_entries <= 0 || max_rows <= 0) return cudaSuccess;
  if (n_kv_heads <= 0 || head_dim <= 0) return cudaErrorInvalidValue;
  const int64_t y = std::min<int64_t>((max_rows * head_dim + kThreads - 1) / kThreads, kMaxGridY);
  AppendKvKernel<<<dim3(static_cast<unsigned>(n_entries), static_cast<unsigned>(y)), kThreads, 0,
                   stream>>>(k, v, row_pos, n_kv_heads, head_dim, table);
  return cudaGetLastError();
}

cudaError_t DequantizeSegment(const QuantSegmentView& seg, int64_t begin, int64_t end,
                              __half* k_out, __half* v_out, cudaStream_t stream) {
  if (seg.dtype != static_cast<int>(KvDtype::kInt8) &&
      seg.dtype != static_cast<int>(KvDtype::kInt4)) {
    return cudaErrorInvalidValue;
  }
  if (seg.head_dim <= 0 || seg.head_dim % kValueGroup != 0 || begin < 0 || begin > end ||
      end > seg.n) {
    return cudaErrorInvalidValue;
  }
  if (begin == end) return cudaSuccess;  // also every range of an empty segment
  const int64_t total = (end - begin) * seg.head_dim;
  DequantizeSegmentKernel<<<BlocksFor(total, kThreads), kThreads, 0, stream>>>(seg, begin, total,
                                                                               k_out, v_out);
  return cudaGetLastError();
}

int64_t AttentionWorkspaceFloats(int64_t n_rows, int n_heads, int head_dim, int64_t max_keys) {
  return n_rows * n_heads * NumSplits(max_keys) * (head_dim + 2);
}

cudaError_t Attention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.n_rows <= 0 || args.n_heads <= 0) return cudaSuccess;
  if (!AttentionShapeOk(args)) return cudaErrorInvalidValue;
  const int64_t n_splits = NumSplits(args.max_keys);
  const int64_t row_heads = args.n_rows * args.n_heads;
  if (n_splits > kMaxGridY || row_heads > INT_MAX) return cudaErrorInvalidValue;
  AttentionPartialKernel<<<dim3(static_cast<unsigned>(row_heads), static_cast<unsigned>(n_splits)),
                           kAttnThreads, 0, stream>>>(args, n_splits);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  AttentionMergeKernel<<<static_cast<unsigned>(row_heads), kMergeThreads, 0, stream>>>(args,
                                                                                       n_splits);
  return cudaGetLastError();
}

cudaError_t AttentionProbs(const AttentionArgs& args, const int32_t* rows, int n_obs, float* probs,
                           cudaStream_t stream) {
  if (n_obs <= 0 || args.n_heads <= 0 || args.max_keys <= 0) return cudaSuccess;
  if (!AttentionShapeOk(args)) return cudaErrorInvalidValue;
  const int64_t chunks = (args.max_keys + kProbsChunk - 1) / kProbsChunk;
  const int64_t obs_heads = int64_t{n_obs} * args.n_heads;
  if (chunks > kMaxGridY || obs_heads > INT_MAX) return cudaErrorInvalidValue;
  AttentionProbsKernel<<<dim3(static_cast<unsigned>(obs_heads), static_cast<unsigned>(chunks)),
                         kProbsThreads, 0, stream>>>(args, rows, n_obs, probs);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Host-buffer wrappers (cuda_backend.h): upload, run on the default stream, download.

namespace {

absl::Status Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// The launch's error, then the execution's.
absl::Status Finish(cudaError_t launch, const char* what) {
  if (launch != cudaSuccess) return Check(launch, what);
  return Check(cudaDeviceSynchronize(), what);
}

// Device array that frees itself.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  absl::Status Alloc(int64_t n) {
    return Check(cudaMalloc(&p_, std::max<int64_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  // Allocates n and copies them from host memory.
  absl::Status AllocFrom(const void* src, int64_t n) {
    if (absl::Status s = Alloc(n); !s.ok()) return s;
    return Upload(src, n);
  }
  absl::Status Upload(const void* src, int64_t n, int64_t offset = 0) {
    if (n <= 0) return absl::OkStatus();
    return Check(cudaMemcpy(p_ + offset, src, n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  absl::Status Download(void* dst, int64_t n) const {
    if (n <= 0) return absl::OkStatus();
    return Check(cudaMemcpy(dst, p_, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
};

#define CTX_RETURN_IF_ERROR(expr) \
  do {                            \
    absl::Status _s = (expr);     \
    if (!_s.ok()) return _s;      \
  } while (0)

absl::Status RequireDevice() {
  absl::StatusOr<int> count = DeviceCount();
  return count.ok() ? absl::OkStatus() : count.status();
}

// A head's fp16 rows must all be plain rows (no frozen segments) to be copied as they are.
absl::Status CheckPlainHead(const KvHead& kv, int head_dim) {
  if (kv.n_frozen() != 0 || static_cast<int64_t>(kv.k.size()) != kv.n() * head_dim ||
      kv.v.size() != kv.k.size()) {
    return absl::InvalidArgumentError("device wrappers take heads of plain fp16 rows only");
  }
  return absl::OkStatus();
}

// One head copied to the device with room for `extra` more entries.
struct DeviceHead {
  DeviceArray<__half> k, v;
  DeviceArray<int32_t> pos;
  absl::Status Upload(const KvHead& kv, int head_dim, int64_t extra) {
    const int64_t cap = kv.n() + extra;
    CTX_RETURN_IF_ERROR(k.Alloc(cap * head_dim));
    CTX_RETURN_IF_ERROR(v.Alloc(cap * head_dim));
    CTX_RETURN_IF_ERROR(pos.Alloc(cap));
    CTX_RETURN_IF_ERROR(k.Upload(kv.k.data(), kv.n() * head_dim));
    CTX_RETURN_IF_ERROR(v.Upload(kv.v.data(), kv.n() * head_dim));
    return pos.Upload(kv.pos.data(), kv.n());
  }
  KvHeadView View(int64_t n) const { return KvHeadView{k.get(), v.get(), pos.get(), n}; }
};

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
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dx, dw, dy;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, n_rows * d));
  CTX_RETURN_IF_ERROR(dw.AllocFrom(w, d));
  CTX_RETURN_IF_ERROR(dy.Alloc(n_rows * d));
  CTX_RETURN_IF_ERROR(
      Finish(RmsNormRows(dx.get(), dw.get(), n_rows, d, eps, dy.get(), nullptr), "RmsNormRows"));
  return dy.Download(y, n_rows * d);
}

absl::Status SwiGlu(float* g, const float* u, int64_t n) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dg, du;
  CTX_RETURN_IF_ERROR(dg.AllocFrom(g, n));
  CTX_RETURN_IF_ERROR(du.AllocFrom(u, n));
  CTX_RETURN_IF_ERROR(Finish(SwiGluInPlace(dg.get(), du.get(), n, nullptr), "SwiGluInPlace"));
  return dg.Download(g, n);
}

absl::Status ToHalfHost(const float* x, uint16_t* y, int64_t n) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dx;
  DeviceArray<__half> dy;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, n));
  CTX_RETURN_IF_ERROR(dy.Alloc(n));
  CTX_RETURN_IF_ERROR(Finish(ToHalf(dx.get(), dy.get(), n, nullptr), "ToHalf"));
  return dy.Download(y, n);
}

absl::Status AddBiasHost(float* x, const float* b, int64_t n_rows, int d) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dx, db;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, n_rows * d));
  CTX_RETURN_IF_ERROR(db.AllocFrom(b, d));
  CTX_RETURN_IF_ERROR(Finish(AddBias(dx.get(), db.get(), n_rows, d, nullptr), "AddBias"));
  return dx.Download(x, n_rows * d);
}

absl::Status AddInPlaceHost(float* x, const float* y, int64_t n) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dx, dy;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, n));
  CTX_RETURN_IF_ERROR(dy.AllocFrom(y, n));
  CTX_RETURN_IF_ERROR(Finish(AddInPlace(dx.get(), dy.get(), n, nullptr), "AddInPlace"));
  return dx.Download(x, n);
}

absl::Status RopeHost(float* x, const int32_t* positions, int64_t n_rows, int n_heads,
                      const RopeParams& p) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  RopeArgs args;
  args.head_dim = p.head_dim;
  args.rope_dim = p.rope_dim;
  // As RopeAngles (engine/cpu/ops.cc) computes it, so both run the same recurrence.
  args.theta_scale = std::pow(p.freq_base, -2.0f / static_cast<float>(p.rope_dim));
  args.freq_scale = p.freq_scale;
  args.neox = p.neox;
  const int64_t n = n_rows * n_heads * p.head_dim;
  DeviceArray<float> dx;
  DeviceArray<int32_t> dpos;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, n));
  CTX_RETURN_IF_ERROR(dpos.AllocFrom(positions, n_rows));
  CTX_RETURN_IF_ERROR(Finish(Rope(dx.get(), dpos.get(), n_rows, n_heads, args, nullptr), "Rope"));
  return dx.Download(x, n);
}

absl::Status AppendKvHost(const std::vector<KvCache*>& caches, int layer, const float* k,
                          const float* v, const int32_t* positions,
                          const std::vector<int64_t>& rows) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  if (caches.empty() || caches.size() != rows.size()) {
    return absl::InvalidArgumentError("AppendKvHost: one row count per cache");
  }
  const int n_kv = caches[0]->n_kv_heads(), hd = caches[0]->head_dim();
  int64_t n_rows = 0, max_rows = 0;
  for (int64_t r : rows) {
    n_rows += r;
    max_rows = std::max(max_rows, r);
  }
  const int64_t width = int64_t{n_kv} * hd;
  DeviceArray<float> dk, dv;
  DeviceArray<int32_t> dpos;
  CTX_RETURN_IF_ERROR(dk.AllocFrom(k, n_rows * width));
  CTX_RETURN_IF_ERROR(dv.AllocFrom(v, n_rows * width));
  CTX_RETURN_IF_ERROR(dpos.AllocFrom(positions, n_rows));
  std::vector<DeviceHead> heads(caches.size() * n_kv);
  std::vector<KvAppendEntry> table(heads.size());
  int64_t row0 = 0;
  for (size_t s = 0; s < caches.size(); ++s) {
    if (caches[s]->n_kv_heads() != n_kv || caches[s]->head_dim() != hd) {
      return absl::InvalidArgumentError("AppendKvHost: caches of different shapes");
    }
    for (int g = 0; g < n_kv; ++g) {
      const KvHead& kv = caches[s]->head(layer, g);
      CTX_RETURN_IF_ERROR(CheckPlainHead(kv, hd));
      const size_t e = s * n_kv + g;
      CTX_RETURN_IF_ERROR(heads[e].Upload(kv, hd, rows[s]));
      table[e].head = heads[e].View(kv.n());
      table[e].row0 = row0;
      table[e].rows = rows[s];
    }
    row0 += rows[s];
  }
  DeviceArray<KvAppendEntry> dtable;
  CTX_RETURN_IF_ERROR(dtable.AllocFrom(table.data(), static_cast<int64_t>(table.size())));
  CTX_RETURN_IF_ERROR(Finish(AppendKv(dk.get(), dv.get(), dpos.get(), n_kv, hd, dtable.get(),
                                      static_cast<int>(table.size()), max_rows, nullptr),
                             "AppendKv"));
  for (size_t s = 0; s < caches.size(); ++s) {
    for (int g = 0; g < n_kv; ++g) {
      KvHead& kv = caches[s]->head(layer, g);
      const DeviceHead& dh = heads[s * n_kv + g];
      const int64_t n = kv.n() + rows[s];
      kv.k.resize(n * hd);
      kv.v.resize(n * hd);
      kv.pos.resize(n);
      CTX_RETURN_IF_ERROR(dh.k.Download(kv.k.data(), n * hd));
      CTX_RETURN_IF_ERROR(dh.v.Download(kv.v.data(), n * hd));
      CTX_RETURN_IF_ERROR(dh.pos.Download(kv.pos.data(), n));
    }
  }
  return absl::OkStatus();
}

absl::Status DequantizeSegmentHost(const KvSegment& seg, int64_t begin, int64_t end,
                                   std::vector<uint16_t>* k, std::vector<uint16_t>* v) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  if (seg.dtype != KvDtype::kInt8 && seg.dtype != KvDtype::kInt4) {
    return absl::InvalidArgumentError("DequantizeSegmentHost: not an int8 / int4 segment");
  }
  if (begin < 0 || begin > end || end > seg.n) {
    return absl::InvalidArgumentError("DequantizeSegmentHost: rows out of range");
  }
  const int hd = seg.head_dim;
  const int64_t codes = seg.n * seg.RowCodeBytes();
  const int64_t k_params = (seg.n + kKeyGroup - 1) / kKeyGroup * hd;
  const int64_t v_params = seg.n * (hd / kValueGroup);
  const auto size = [](const auto& vec) { return static_cast<int64_t>(vec.size()); };
  if (size(seg.kq) != codes || size(seg.vq) != codes || size(seg.k_scale) != k_params ||
      size(seg.k_min) != k_params || size(seg.v_scale) != v_params || size(seg.v_min) != v_params) {
    return absl::InvalidArgumentError("DequantizeSegmentHost: buffers do not match the shape");
  }
  DeviceArray<uint8_t> dkq, dvq;
  DeviceArray<__half> dks, dkm, dvs, dvm, dk, dv;
  CTX_RETURN_IF_ERROR(dkq.AllocFrom(seg.kq.data(), codes));
  CTX_RETURN_IF_ERROR(dvq.AllocFrom(seg.vq.data(), codes));
  CTX_RETURN_IF_ERROR(dks.AllocFrom(seg.k_scale.data(), k_params));
  CTX_RETURN_IF_ERROR(dkm.AllocFrom(seg.k_min.data(), k_params));
  CTX_RETURN_IF_ERROR(dvs.AllocFrom(seg.v_scale.data(), v_params));
  CTX_RETURN_IF_ERROR(dvm.AllocFrom(seg.v_min.data(), v_params));
  const int64_t out = (end - begin) * hd;
  CTX_RETURN_IF_ERROR(dk.Alloc(out));
  CTX_RETURN_IF_ERROR(dv.Alloc(out));
  // All-ones bits (an fp16 NaN no rounding produces) where the kernel would leave a value unset.
  CTX_RETURN_IF_ERROR(Check(cudaMemset(dk.get(), 0xff, out * sizeof(__half)), "cudaMemset"));
  CTX_RETURN_IF_ERROR(Check(cudaMemset(dv.get(), 0xff, out * sizeof(__half)), "cudaMemset"));
  QuantSegmentView view;
  view.dtype = static_cast<int>(seg.dtype);
  view.n = seg.n;
  view.head_dim = hd;
  view.kq = dkq.get();
  view.vq = dvq.get();
  view.k_scale = dks.get();
  view.k_min = dkm.get();
  view.v_scale = dvs.get();
  view.v_min = dvm.get();
  CTX_RETURN_IF_ERROR(Finish(DequantizeSegment(view, begin, end, dk.get(), dv.get(), nullptr),
                             "DequantizeSegment"));
  k->resize(out);
  v->resize(out);
  CTX_RETURN_IF_ERROR(dk.Download(k->data(), out));
  return dv.Download(v->data(), out);
}

absl::Status AttentionHost(const std::vector<const KvCache*>& caches, int layer, const float* q,
                           const int32_t* q_pos, const int32_t* row_seq, int64_t n_rows,
                           int n_heads, const std::vector<int32_t>& observe_rows, float* out,
                           float* lse, std::vector<float>* probs) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  if (caches.empty()) return absl::InvalidArgumentError("AttentionHost: no caches");
  const int n_kv = caches[0]->n_kv_heads(), hd = caches[0]->head_dim();
  int64_t max_keys = 0;
  std::vector<DeviceHead> heads(caches.size() * n_kv);
  std::vector<KvHeadView> views(heads.size());
  for (size_t s = 0; s < caches.size(); ++s) {
    if (caches[s]->n_kv_heads() != n_kv || caches[s]->head_dim() != hd) {
      return absl::InvalidArgumentError("AttentionHost: caches of different shapes");
    }
    for (int g = 0; g < n_kv; ++g) {
      const KvHead& kv = caches[s]->head(layer, g);
      CTX_RETURN_IF_ERROR(CheckPlainHead(kv, hd));
      const size_t e = s * n_kv + g;
      CTX_RETURN_IF_ERROR(heads[e].Upload(kv, hd, 0));
      views[e] = heads[e].View(kv.n());
      max_keys = std::max(max_keys, kv.n());
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    if (row_seq[r] < 0 || static_cast<size_t>(row_seq[r]) >= caches.size()) {
      return absl::InvalidArgumentError("AttentionHost: row_seq out of range");
    }
  }
  const int64_t dq = int64_t{n_heads} * hd;
  DeviceArray<KvHeadView> dviews;
  DeviceArray<float> dq_rows, dout, dlse, dws;
  DeviceArray<int32_t> dq_pos, drow_seq;
  CTX_RETURN_IF_ERROR(dviews.AllocFrom(views.data(), static_cast<int64_t>(views.size())));
  CTX_RETURN_IF_ERROR(dq_rows.AllocFrom(q, n_rows * dq));
  CTX_RETURN_IF_ERROR(dq_pos.AllocFrom(q_pos, n_rows));
  CTX_RETURN_IF_ERROR(drow_seq.AllocFrom(row_seq, n_rows));
  CTX_RETURN_IF_ERROR(dout.Alloc(n_rows * dq));
  CTX_RETURN_IF_ERROR(dlse.Alloc(n_rows * n_heads));
  CTX_RETURN_IF_ERROR(dws.Alloc(AttentionWorkspaceFloats(n_rows, n_heads, hd, max_keys)));
  AttentionArgs args;
  args.q = dq_rows.get();
  args.q_pos = dq_pos.get();
  args.row_seq = drow_seq.get();
  args.heads = dviews.get();
  args.n_rows = n_rows;
  args.n_heads = n_heads;
  args.n_kv_heads = n_kv;
  args.head_dim = hd;
  args.max_keys = max_keys;
  args.scale = 1.0f / std::sqrt(static_cast<float>(hd));  // as Runner::Attention
  args.out = dout.get();
  args.lse = dlse.get();
  args.workspace = dws.get();
  CTX_RETURN_IF_ERROR(Finish(Attention(args, nullptr), "Attention"));
  CTX_RETURN_IF_ERROR(dout.Download(out, n_rows * dq));
  CTX_RETURN_IF_ERROR(dlse.Download(lse, n_rows * n_heads));
  if (probs != nullptr) {
    const int n_obs = static_cast<int>(observe_rows.size());
    const int64_t n_probs = int64_t{n_heads} * n_obs * max_keys;
    DeviceArray<int32_t> drows;
    DeviceArray<float> dprobs;
    CTX_RETURN_IF_ERROR(drows.AllocFrom(observe_rows.data(), n_obs));
    CTX_RETURN_IF_ERROR(dprobs.Alloc(n_probs));
    CTX_RETURN_IF_ERROR(
        Finish(AttentionProbs(args, drows.get(), n_obs, dprobs.get(), nullptr), "AttentionProbs"));
    probs->resize(n_probs);
    CTX_RETURN_IF_ERROR(dprobs.Download(probs->data(), n_probs));
  }
  return absl::OkStatus();
}

absl::Status Gemm(const float* x, const float* w, int64_t m, int64_t n, int64_t k, float* y) {
  CTX_RETURN_IF_ERROR(RequireDevice());
  DeviceArray<float> dx, dw, dy;
  CTX_RETURN_IF_ERROR(dx.AllocFrom(x, m * k));
  CTX_RETURN_IF_ERROR(dw.AllocFrom(w, n * k));
  CTX_RETURN_IF_ERROR(dy.Alloc(m * n));
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    return absl::FailedPreconditionError("cublasCreate failed (no usable GPU?)");
  }
  // Row-major y[m,n] = x[m,k] w[n,k]^T is column-major y^T[n,m] = w[n,k] x^T[k,m].
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st =
      cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                  static_cast<int>(k), &alpha, dw.get(), static_cast<int>(k), dx.get(),
                  static_cast<int>(k), &beta, dy.get(), static_cast<int>(n));
  cublasDestroy(handle);
  if (st != CUBLAS_STATUS_SUCCESS) return absl::InternalError("cublasSgemm failed");
  return dy.Download(y, m * n);
}

}  // namespace ctxcache::cuda
