// MatVec / MatMul entry points: validation, the plain references, dispatch to the kernel
// table of the CPU level (matmul_avx512.cc, matmul_avx2.cc, matmul_amx.cc), and threading.
//
// MatVec (decode) is memory-bound: it quantizes x once to int8 blocks and streams each weight
// row through an integer dot kernel, rows split over the pool. MatMul (prefill) reuses those
// kernels for a few tokens (each weight row read once for all of them); above that it runs a
// GEMM: on AMX, bf16 tiles (W dequantized and packed 32 rows at a time); elsewhere W is
// dequantized in row panels to fp32 and multiplied with OpenBLAS sgemm, one single-threaded
// sgemm per pool thread so OpenBLAS threads never compete with ours. Every supported type has
// a dot kernel at AVX2 and AVX-512; at the scalar level (or a table without one) a row is
// dequantized with the reference and takes an fp32 dot.
#include "engine/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/cpu_features.h"
#include "engine/cpu/matmul_internal.h"
#include "engine/cpu/quant.h"

namespace ctxcache {

using matmul_internal::DequantKernel;
using matmul_internal::FloatKernel;
using matmul_internal::kActBlock;
using matmul_internal::KernelTable;
using matmul_internal::QuantKernel;
using matmul_internal::QuantizedActs;

namespace matmul_internal {

QuantDotFn QuantKernel(const KernelTable* k, GgmlType type) {
  if (k == nullptr) return nullptr;
  switch (type) {
    case GgmlType::kQ4_0: return k->q4_0;
    case GgmlType::kQ4_1: return k->q4_1;
    case GgmlType::kQ5_0: return k->q5_0;
    case GgmlType::kQ5_1: return k->q5_1;
    case GgmlType::kQ8_0: return k->q8_0;
    case GgmlType::kQ4_K: return k->q4_k;
    case GgmlType::kQ5_K: return k->q5_k;
    case GgmlType::kQ6_K: return k->q6_k;
    default: return nullptr;
  }
}

FloatDotFn FloatKernel(const KernelTable* k, GgmlType type) {
  if (k == nullptr) return nullptr;
  switch (type) {
    case GgmlType::kF32: return k->f32;
    case GgmlType::kF16: return k->f16;
    case GgmlType::kBF16: return k->bf16;
    default: return nullptr;
  }
}

DequantFn DequantKernel(const KernelTable* k, GgmlType type) {
  if (k == nullptr) return nullptr;
  switch (type) {
    case GgmlType::kQ4_0: return k->dequant_q4_0;
    case GgmlType::kQ4_1: return k->dequant_q4_1;
    case GgmlType::kQ5_0: return k->dequant_q5_0;
    case GgmlType::kQ5_1: return k->dequant_q5_1;
    case GgmlType::kQ8_0: return k->dequant_q8_0;
    case GgmlType::kQ4_K: return k->dequant_q4_k;
    case GgmlType::kQ5_K: return k->dequant_q5_k;
    case GgmlType::kQ6_K: return k->dequant_q6_k;
    case GgmlType::kF16: return k->dequant_f16;
    case GgmlType::kBF16: return k->dequant_bf16;
    default: return nullptr;
  }
}

}  // namespace matmul_internal

namespace {

// Rows per thread boundary: 16 fp32 outputs = one 64-byte cache line of y, so two threads
// never write the same line (for a 64-byte aligned y).
constexpr int64_t kRowAlign = 16;
// Below this much weight data a MatVec runs on the calling thread: one core streams 64 KiB in
// ~4-5 us (measured: Q4_1 576x192, 69 KB, 5.6 us), about what a pool dispatch and join cost,
// so splitting gains nothing.
constexpr size_t kMinParallelBytes = 64 << 10;
// MatMul uses the batched dot kernels up to this many tokens, the GEMM above. Measured with
//   matmul_bench --benchmark_filter='BM_MatMul<[12]>/3/.*/576/1536/' (Q4_1 576x1536, AMX GEMM)
// the dot kernels, which unpack a row's weights once for tiles of 4 tokens, take ~38 us for
// one token + ~15 us per extra one on 1 thread; the GEMM ~0.31 ms (dequantize + pack W) up to
// 32 tokens. Equal at ~19 tokens on 1 thread (145 vs 315 us at 8, 281 vs 315 at 16, 337 vs
// 317 at 20, 404 vs 323 at 24, 544 vs 326 at 32), ~24 on 2 (141 vs 213 at 16, 175 vs 210 at
// 20, 211 vs 224 at 24, 298 vs 200 at 32); 20 sits between the two.
constexpr int64_t kBatchedMaxTokens = 20;
// GEMM panel: about this many bytes of dequantized fp32 weights per sgemm call. OpenBLAS
// repacks x on every call, so bigger is better: one-thread sgemm 512x576 by 1536 rows ran at
// 100 GFLOP/s in one call, 93 in 768-row and 77 in 256-row panels (here, under load).
constexpr size_t kPanelBytes = 4 << 20;

void FillNaN(float* y, int64_t n) {
  if (y == nullptr) return;
  std::fill(y, y + std::max<int64_t>(n, 0), std::numeric_limits<float>::quiet_NaN());
}

bool Valid(const WeightMatrix& w) { return ValidateWeightMatrix(w).ok(); }

float ScalarDot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Runs fn(r0, r1, thread) over the n_out rows, on the pool unless the work is small.
template <typename Fn>
void ForRows(ThreadPool* pool, int64_t n_out, bool small, Fn&& fn) {
  if (pool == nullptr || pool->n_threads() == 1 || small || n_out <= kRowAlign) {
    fn(int64_t{0}, n_out, 0);
    return;
  }
  pool->ParallelFor(n_out, kRowAlign, fn);
}

// Any type: dequantize each row of [r0, r1) once, then dot it with every token.
void DequantDotRows(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, int64_t r0,
                    int64_t r1, matmul_internal::DotF32Fn dot) {
  thread_local std::vector<float> row;  // [n_in], grows, never shrinks: no per-call allocation
  if (static_cast<int64_t>(row.size()) < w.n_in) row.resize(w.n_in);
  for (int64_t r = r0; r < r1; ++r) {
    // Cannot fail: the matrix was validated by the caller.
    DequantizeRow(w.type, w.data + r * w.row_bytes, row.data(), w.n_in).IgnoreError();
    for (int64_t t = 0; t < n_tok; ++t) {
      const float* xt = x + t * w.n_in;
      y[t * w.n_out + r] = dot ? dot(row.data(), xt, w.n_in) : ScalarDot(row.data(), xt, w.n_in);
    }
  }
}

// Per calling thread: x quantized to int8 blocks, one QuantizedActs per token.
struct ActScratch {
  std::vector<int8_t> qs;           // [n_tok * n_in]
  std::vector<float> ds;            // [n_tok * n_in / 32 * 2]
  std::vector<QuantizedActs> acts;  // [n_tok]
};

}  // namespace

namespace matmul_internal {

const KernelTable* ActiveKernels() {
  const CpuFeatures& f = GetCpuFeatures();
  if (f.level == CpuLevel::kAvx512 && f.avx512_vnni && f.avx2) return &Avx512Kernels();
  if (f.level >= CpuLevel::kAvx2 && f.avx2) return &Avx2Kernels();
  return nullptr;
}

void MatMulBatchedDot(const WeightMatrix& w, const float* x, int64_t n_tok, float* y,
                      ThreadPool* pool) {
  const KernelTable* k = ActiveKernels();
  const bool small = w.row_bytes * w.n_out * n_tok < kMinParallelBytes;
  if (QuantDotFn qdot = QuantKernel(k, w.type)) {
    thread_local ActScratch s;
    const int64_t nb = w.n_in / kActBlock;
    if (static_cast<int64_t>(s.qs.size()) < n_tok * w.n_in) s.qs.resize(n_tok * w.n_in);
    if (static_cast<int64_t>(s.ds.size()) < n_tok * nb * 2) s.ds.resize(n_tok * nb * 2);
    if (static_cast<int64_t>(s.acts.size()) < n_tok) s.acts.resize(n_tok);
    // Quantized once on the calling thread: n_in is small (<= a few thousand) and every row
    // of every thread needs all of it.
    for (int64_t t = 0; t < n_tok; ++t) {
      int8_t* qs = s.qs.data() + t * w.n_in;
      float* ds = s.ds.data() + t * nb * 2;
      k->quantize_acts(x + t * w.n_in, w.n_in, qs, ds);
      s.acts[t] = QuantizedActs{qs, ds};
    }
    const QuantizedActs* acts = s.acts.data();
    ForRows(pool, w.n_out, small, [&](int64_t r0, int64_t r1, int) {
      qdot(w.data, w.row_bytes, w.n_in, r0, r1, acts, n_tok, y, w.n_out);
    });
  } else if (FloatDotFn fdot = FloatKernel(k, w.type)) {
    ForRows(pool, w.n_out, small, [&](int64_t r0, int64_t r1, int) {
      fdot(w.data, w.row_bytes, w.n_in, r0, r1, x, n_tok, y, w.n_out);
    });
  } else {
    const DotF32Fn dot = k ? k->dot_f32 : nullptr;
    ForRows(pool, w.n_out, small,
            [&](int64_t r0, int64_t r1, int) { DequantDotRows(w, x, n_tok, y, r0, r1, dot); });
  }
}

namespace {

enum class GemmKind { kAmx, kAvx512Bf16, kSgemm };

GemmKind ChooseGemm(int64_t n_in) {
  const CpuFeatures& f = GetCpuFeatures();
  if (n_in % 32 != 0 || !f.avx512_bf16 || f.level != CpuLevel::kAvx512) return GemmKind::kSgemm;
  return f.amx ? GemmKind::kAmx : GemmKind::kAvx512Bf16;
}

// Runs rows(r0, r1, thread) over the n_out rows in blocks of 32 (the bf16 GEMMs' panel).
template <typename Fn>
void ForRowPanels(ThreadPool* pool, int64_t n_out, Fn&& rows) {
  if (pool == nullptr || pool->n_threads() == 1 || n_out <= 32) {
    rows(int64_t{0}, n_out, 0);
  } else {
    pool->ParallelFor(n_out, 32, rows);
  }
}

}  // namespace

bool GemmUsesBf16(int64_t n_in) { return ChooseGemm(n_in) != GemmKind::kSgemm; }

void MatMulGemm(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, ThreadPool* pool) {
  const DequantFn dequant = DequantKernel(ActiveKernels(), w.type);
  const GemmKind kind = ChooseGemm(w.n_in);
  if (kind == GemmKind::kAvx512Bf16) {
    // Activations converted once on the calling thread; every thread reads all of them.
    thread_local std::vector<uint16_t> xb;  // [m_pad][n_in] bf16
    const int64_t m_pad = Bf16PaddedRows(n_tok);
    if (static_cast<int64_t>(xb.size()) < m_pad * w.n_in) xb.resize(m_pad * w.n_in);
    ConvertActsToBf16Rows(x, n_tok, w.n_in, xb.data(), m_pad);
    const uint16_t* xbp = xb.data();
    ForRowPanels(pool, w.n_out, [&](int64_t r0, int64_t r1, int) {
      Bf16GemmRows(w, xbp, n_tok, y, r0, r1, dequant);
    });
    return;
  }
  if (kind == GemmKind::kAmx) {
    // Activations converted once on the calling thread; every thread reads all of them.
    thread_local std::vector<uint16_t> xb;  // m_pad * n_in bf16, tiled
    const int64_t m_pad = (n_tok + 31) / 32 * 32;
    if (static_cast<int64_t>(xb.size()) < m_pad * w.n_in) xb.resize(m_pad * w.n_in);
    ConvertActsToBf16(x, n_tok, w.n_in, xb.data(), m_pad);
    const uint16_t* xbp = xb.data();
    auto rows = [&](int64_t r0, int64_t r1, int) {
      AmxGemmRows(w, xbp, n_tok, m_pad, y, r0, r1, dequant);
    };
    ForRowPanels(pool, w.n_out, rows);  // AmxGemmRows works in blocks of 32 rows
    return;
  }
  // OpenBLAS's own threads would oversubscribe the cores our pool already uses.
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });

  const bool f32_in_place = w.type == GgmlType::kF32 && w.row_bytes % sizeof(float) == 0 &&
                            reinterpret_cast<uintptr_t>(w.data) % alignof(float) == 0;
  const int64_t panel_rows =
      std::max<int64_t>(kRowAlign, static_cast<int64_t>(kPanelBytes / (w.n_in * sizeof(float))) /
                                       kRowAlign * kRowAlign);
  const bool small = 2 * n_tok * w.n_in * w.n_out < (int64_t{1} << 20);  // < 1 MFLOP
  ForRows(pool, w.n_out, small, [&](int64_t r0, int64_t r1, int) {
    thread_local std::vector<float> panel;  // [panel_rows, n_in] fp32 weights
    for (int64_t p0 = r0; p0 < r1; p0 += panel_rows) {
      const int64_t rows = std::min(panel_rows, r1 - p0);
      const float* b;
      int64_t ldb;
      if (f32_in_place) {
        b = reinterpret_cast<const float*>(w.data + p0 * w.row_bytes);
        ldb = static_cast<int64_t>(w.row_bytes / sizeof(float));
      } else {
        if (static_cast<int64_t>(panel.size()) < rows * w.n_in) panel.resize(rows * w.n_in);
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* src = w.data + (p0 + r) * w.row_bytes;
          float* dst = panel.data() + r * w.n_in;
          if (dequant) {
            dequant(src, dst, w.n_in);
          } else {
            DequantizeRow(w.type, src, dst, w.n_in).IgnoreError();  // validated by caller
          }
        }
        b = panel.data();
        ldb = w.n_in;
      }
      // y[:, p0:p0+rows] = x[n_tok, n_in] · panel[rows, n_in]ᵀ
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n_tok),
                  static_cast<int>(rows), static_cast<int>(w.n_in), 1.0f, x,
                  static_cast<int>(w.n_in), b, static_cast<int>(ldb), 0.0f, y + p0,
                  static_cast<int>(w.n_out));
    }
  });
}

}  // namespace matmul_internal

absl::Status ValidateWeightMatrix(const WeightMatrix& w) {
  const GgmlTypeTraits traits = GetGgmlTypeTraits(w.type);
  if (traits.block_size == 0 || !traits.supported) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight matrix: unsupported GGML type ", static_cast<uint32_t>(w.type),
                     traits.name.empty() ? "" : absl::StrCat(" (", std::string(traits.name), ")")));
  }
  // sgemm takes int dimensions; 2^31 also bounds every offset we compute.
  constexpr int64_t kMaxDim = std::numeric_limits<int>::max();
  if (w.n_in < 0 || w.n_out < 0 || w.n_in > kMaxDim || w.n_out > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight matrix: bad shape n_in=", w.n_in, " n_out=", w.n_out));
  }
  if (w.n_in % traits.block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight matrix: n_in=", w.n_in, " is not a multiple of the ",
                     std::string(traits.name), " block size ", traits.block_size));
  }
  const size_t min_row = static_cast<size_t>(w.n_in / traits.block_size) * traits.type_size;
  if (w.row_bytes < min_row) {
    return absl::InvalidArgumentError(absl::StrCat("weight matrix: row_bytes=", w.row_bytes, " < ",
                                                   min_row, " bytes per ", std::string(traits.name),
                                                   " row of ", w.n_in));
  }
  if (w.data == nullptr && w.n_in > 0 && w.n_out > 0) {
    return absl::InvalidArgumentError("weight matrix: null data");
  }
  return absl::OkStatus();
}

void MatVec(const WeightMatrix& w, const float* x, float* y, ThreadPool* pool) {
  if (!Valid(w) || (x == nullptr && w.n_in > 0)) return FillNaN(y, w.n_out);
  if (w.n_out == 0) return;
  matmul_internal::MatMulBatchedDot(w, x, 1, y, pool);
}

void MatMul(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, ThreadPool* pool) {
  if (n_tok <= 0) return;
  if (!Valid(w) || (x == nullptr && w.n_in > 0)) return FillNaN(y, n_tok * w.n_out);
  if (w.n_out == 0) return;
  if (n_tok <= kBatchedMaxTokens || w.n_in == 0) {
    matmul_internal::MatMulBatchedDot(w, x, n_tok, y, pool);
  } else {
    matmul_internal::MatMulGemm(w, x, n_tok, y, pool);
  }
}

int64_t MatMulDotMaxTokens() { return kBatchedMaxTokens; }

void MatVecReference(const WeightMatrix& w, const float* x, float* y) {
  MatMulReference(w, x, 1, y);
}

void MatMulReference(const WeightMatrix& w, const float* x, int64_t n_tok, float* y) {
  if (n_tok <= 0) return;
  if (!Valid(w) || (x == nullptr && w.n_in > 0)) return FillNaN(y, n_tok * w.n_out);
  // Plain on purpose: dequantize with the reference, accumulate in double so the reference
  // itself contributes no visible rounding error to the parity tests.
  std::vector<float> row(w.n_in);
  for (int64_t r = 0; r < w.n_out; ++r) {
    DequantizeRow(w.type, w.data + r * w.row_bytes, row.data(), w.n_in).IgnoreError();
    for (int64_t t = 0; t < n_tok; ++t) {
      double s = 0.0;
      for (int64_t i = 0; i < w.n_in; ++i) s += static_cast<double>(row[i]) * x[t * w.n_in + i];
      y[t * w.n_out + r] = static_cast<float>(s);
    }
  }
}

}  // namespace ctxcache
