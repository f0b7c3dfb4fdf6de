// The CUDA backend's device kernels (engine/cuda/kernels.cu). Every pointer is a device
// pointer; every function launches asynchronously on `stream` and returns the launch's error
// (cudaGetLastError), so callers check once per stage. Each kernel has a CPU reference that
// tests/cuda_test.cc compares it with (engine/cpu/ops.h; attention: Runner's CPU path).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ctxcache::cuda {

// y[r, :] = x[r, :] / rms(x[r, :]) * w, for n_rows rows of d (RmsNorm in engine/cpu/ops.h).
cudaError_t RmsNormRows(const float* x, const float* w, int64_t n_rows, int d, float eps, float* y,
                        cudaStream_t stream);
// y[i] = x[i] rounded to nearest fp16 (GEMM inputs).
cudaError_t ToHalf(const float* x, __half* y, int64_t n, cudaStream_t stream);
// x[r, i] += b[i] for r < n_rows, i < d.
cudaError_t AddBias(float* x, const float* b, int64_t n_rows, int d, cudaStream_t stream);
// x[i] += y[i].
cudaError_t AddInPlace(float* x, const float* y, int64_t n, cudaStream_t stream);
// g[i] = silu(g[i]) * u[i] (SwiGluScalar, engine/shared_math.h).
cudaError_t SwiGluInPlace(float* g, const float* u, int64_t n, cudaStream_t stream);

// RoPE as ApplyRope (engine/cpu/ops.h): x[n_rows, n_heads * head_dim] rotated in place, row r
// at position pos[r]. theta_scale = powf(freq_base, -2 / rope_dim), computed on the host as
// the CPU does, so both take the same float recurrence (RopeTheta, shared_math.h).
struct RopeArgs {
  int head_dim = 0;
  int rope_dim = 0;
  float theta_scale = 1.f;
  float freq_scale = 1.f;
  bool neox = false;
};
cudaError_t Rope(float* x, const int32_t* pos, int64_t n_rows, int n_heads, const RopeArgs& args,
                 cudaStream_t stream);

// One (sequence, KV head) of a layer in device memory: entries [0, n) as fp16 K and V rows
// ([n, head_dim] each) and their positions, ascending (the CPU KvHead's layout).
struct KvHeadView {
  __half* k = nullptr;
  __half* v = nullptr;
  int32_t* pos = nullptr;
  int64_t n = 0;
};

// Appends one layer's new rows: for every table entry e (a sequence's KV head g = e %
// n_kv_heads), rows [row0, row0 + rows) of k and v ([n_rows, n_kv_heads * head_dim] fp32,
// head-major within a row) go to entries [n, n + rows) of table[e] rounded to nearest fp16
// (as KvCache::Append), with positions row_pos[row0 ..]. Capacity is the caller's concern.
struct KvAppendEntry {
  KvHeadView head;   // n = entries before this append
  int64_t row0 = 0;  // the sequence's first row in the pass
  int64_t rows = 0;
};
cudaError_t AppendKv(const float* k, const float* v, const int32_t* row_pos, int n_kv_heads,
                     int head_dim, const KvAppendEntry* table, int n_entries, int64_t max_rows,
                     cudaStream_t stream);

// Causal grouped-query attention of a pass's rows over their sequences' caches, flash-decoding
// style: the keys of each (row, head) are split in chunks of kAttentionSplit processed by
// separate blocks (online softmax), then merged. Row r belongs to sequence row_seq[r] and sees
// the entries of its KV head with position <= q_pos[r] (a prefix: positions ascend). Query
// head h reads KV head h / (n_heads / n_kv_heads): heads[row_seq[r] * n_kv_heads + h / group].
inline constexpr int kAttentionSplit = 256;
inline constexpr int kMaxHeadDim = 256;
struct AttentionArgs {
  const float* q = nullptr;           // [n_rows, n_heads * head_dim], after RoPE
  const int32_t* q_pos = nullptr;     // [n_rows]
  const int32_t* row_seq = nullptr;   // [n_rows]
  const KvHeadView* heads = nullptr;  // [n_seqs * n_kv_heads], n = entries after the append
  int64_t n_rows = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;  // head_dim <= kMaxHeadDim
  int64_t max_keys = 0;                           // the largest n in heads (sizes the splits)
  float scale = 1.f;                              // 1 / sqrt(head_dim)
  float* out = nullptr;                           // [n_rows, n_heads * head_dim]
  float* lse = nullptr;  // [n_rows, n_heads]: log of the sum of exp(scale * q.k) over visible keys
  float* workspace = nullptr;  // AttentionWorkspaceFloats(...) floats
};
int64_t AttentionWorkspaceFloats(int64_t n_rows, int n_heads, int head_dim, int64_t max_keys);
cudaError_t Attention(const AttentionArgs& args, cudaStream_t stream);

// The attention probabilities of observed rows (after Attention filled lse):
// probs[h, i, j] = exp(scale * q[rows[i], h] . k_j - lse[rows[i], h]) for entries j the row
// sees, 0 for j it does not see and for j >= its KV head's n, with j < max_keys
// ([n_heads, n_obs, max_keys], AttentionObserver's layout in engine/model.h).
cudaError_t AttentionProbs(const AttentionArgs& args, const int32_t* rows, int n_obs, float* probs,
                           cudaStream_t stream);

// A stored context's int8 / int4 segment on the device in its codec form (KvSegment,
// engine/kv_cache.h: KIVI codes, keys scaled per channel over groups of kKeyGroup = 32 tokens
// counted from the segment's first row, values per token over groups of kValueGroup = 32
// channels; x = code * scale + min with fp16 scale and min; int4 packs channel i in the low
// nibble and channel i + head_dim / 2 in the high nibble of byte i).
struct QuantSegmentView {
  int dtype = 0;  // KvDtype: 1 = int8, 2 = int4
  int64_t n = 0;  // rows of the segment
  int head_dim = 0;
  const uint8_t* kq = nullptr;  // [n, row_code_bytes]: head_dim (int8) or head_dim / 2 (int4)
  const uint8_t* vq = nullptr;
  const __half* k_scale = nullptr;  // [ceil(n / 32), head_dim]
  const __half* k_min = nullptr;
  const __half* v_scale = nullptr;  // [n, head_dim / 32]
  const __half* v_min = nullptr;
};
// Rows [begin, end) of the segment dequantized and rounded to fp16 into k_out, v_out
// ([end - begin, head_dim] each): bitwise what the CPU gets from KvSegment::LoadRows then
// Fp32ToFp16 (fp32 product and sum, no fused multiply-add, round to nearest).
cudaError_t DequantizeSegment(const QuantSegmentView& seg, int64_t begin, int64_t end,
                              __half* k_out, __half* v_out, cudaStream_t stream);

}  // namespace ctxcache::cuda
