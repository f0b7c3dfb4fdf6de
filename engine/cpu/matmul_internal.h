// Kernel tables behind MatVec/MatMul (engine/cpu/matmul.cc). One table per instruction-set
// level, each defined in its own file (matmul_avx512.cc, matmul_avx2.cc) whose functions carry
// __attribute__((target)), so the portable baseline build still contains them and matmul.cc
// picks one at run time from GetCpuFeatures().level. Not a public interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/thread_pool.h"
#include "engine/cpu/matmul.h"

namespace ctxcache::matmul_internal {

constexpr int kActBlock = 32;  // activation quantization block (= weight block of Q4/Q8)

// Activations quantized to int8 in blocks of 32, one set per token (like ggml's Q8_1, but
// with fp32 scales and structure-of-arrays so kernels load two blocks' scales at once).
// x[i] ≈ ds[2 * (i / 32)] * qs[i].
struct QuantizedActs {
  const int8_t* qs = nullptr;  // [n_in] int8 in [-127, 127]
  const float* ds = nullptr;   // [n_in / 32][2]: {d, d * sum(qs of the block)}
};

// Quantizes x[n] (n % 32 == 0) into qs[n] and ds[n / 32 * 2].
using QuantizeActsFn = void (*)(const float* x, int64_t n, int8_t* qs, float* ds);

// For weight rows r in [r0, r1) and tokens t in [0, n_tok):
//   y[t * ldy + r] = dot(row r of w, activations of token t).
// w: row r at w + r * row_bytes; n_in a multiple of the weight block size.
using QuantDotFn = void (*)(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0,
                            int64_t r1, const QuantizedActs* acts, int64_t n_tok, float* y,
                            int64_t ldy);
// Same with fp32 activations x[n_tok][n_in] (F32 / F16 weights, no activation rounding).
using FloatDotFn = void (*)(const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t r0,
                            int64_t r1, const float* x, int64_t n_tok, float* y, int64_t ldy);
// dot(a[n], b[n]) in fp32.
using DotF32Fn = float (*)(const float* a, const float* b, int64_t n);
// Dequantizes a row of n elements; must give exactly DequantizeRow's values.
using DequantFn = void (*)(const uint8_t* src, float* dst, int64_t n);

struct KernelTable {
  const char* name;
  QuantizeActsFn quantize_acts;
  // Integer dot kernels, one per quantized weight type; nullptr → dequantize-then-dot.
  QuantDotFn q4_0;
  QuantDotFn q4_1;
  QuantDotFn q5_0;
  QuantDotFn q5_1;
  QuantDotFn q8_0;
  QuantDotFn q4_k;
  QuantDotFn q5_k;
  QuantDotFn q6_k;
  FloatDotFn f32;
  FloatDotFn f16;
  FloatDotFn bf16;
  DotF32Fn dot_f32;
  // Vectorized dequantizers for GEMM panels; nullptr → the reference DequantizeRow.
  DequantFn dequant_q4_0;
  DequantFn dequant_q4_1;
  DequantFn dequant_q5_0;
  DequantFn dequant_q5_1;
  DequantFn dequant_q8_0;
  DequantFn dequant_q4_k;
  DequantFn dequant_q5_k;
  DequantFn dequant_q6_k;
  DequantFn dequant_f16;
  DequantFn dequant_bf16;
};

// The table's entries for one weight type (nullptr where the table has none).
QuantDotFn QuantKernel(const KernelTable* k, GgmlType type);
FloatDotFn FloatKernel(const KernelTable* k, GgmlType type);
DequantFn DequantKernel(const KernelTable* k, GgmlType type);

// The table for the current GetCpuFeatures() level; nullptr at kScalar.
const KernelTable* ActiveKernels();
const KernelTable& Avx512Kernels();  // needs AVX-512 F/BW/DQ/VL + VNNI + F16C + FMA
const KernelTable& Avx2Kernels();    // needs AVX2 + FMA + F16C

// AMX-BF16 GEMM (matmul_amx.cc; needs CpuFeatures::amx and n_in % 32 == 0).
// xb: bf16 activations as A tiles, [m_pad/16][n_in/32][16 tokens][32], m_pad = n_tok
// rounded up to 32, padding tokens zero.
void ConvertActsToBf16(const float* x, int64_t n_tok, int64_t n_in, uint16_t* xb, int64_t m_pad);
// y[t][r] for r in [r0, r1) (r0 a multiple of 32), all n_tok tokens. dequant may be null.
void AmxGemmRows(const WeightMatrix& w, const uint16_t* xb, int64_t n_tok, int64_t m_pad, float* y,
                 int64_t r0, int64_t r1, DequantFn dequant);

// bf16 helpers shared by the AMX and AVX512-BF16 GEMMs (matmul_bf16.cc; need AVX512-BF16).
// n fp32 -> bf16 (round to nearest even), n % 32 == 0.
void ToBf16(const float* src, uint16_t* dst, int64_t n);
// Weight rows [n0, n0 + nr) (nr <= 32; rows past nr are zero) dequantized into wf ([32][n_in]
// fp32) and packed into bp as n_in/32 blocks of two B tiles: [half][16 K-pairs][16 rows], each
// entry the bf16 pair (2p, 2p + 1) of one row as a u32 (the layout TDPBF16PS and VDPBF16PS
// take). dequant may be null (reference). Both vectors grow as needed.
void PackBPanel(const WeightMatrix& w, int64_t n0, int64_t nr, DequantFn dequant,
                std::vector<float>* wf, std::vector<uint32_t>* bp);

// AVX512-BF16 GEMM without AMX (matmul_bf16.cc; needs n_in % 32 == 0). Activations are bf16
// rows; the micro-kernel reads rows in groups, so a buffer of n rows must hold
// Bf16PaddedRows(n) readable rows (the padding's products are computed and dropped).
int64_t Bf16PaddedRows(int64_t n_rows);
// xb[m_pad][n_in] = bf16 of x[n_tok][n_in], rows past n_tok zero (m_pad = Bf16PaddedRows).
void ConvertActsToBf16Rows(const float* x, int64_t n_tok, int64_t n_in, uint16_t* xb,
                           int64_t m_pad);
// c[m][0..nr) = a[m] . (the 32 rows packed in b, as PackBPanel lays them out: kc_n blocks of
// 32 K-elements) for m < n_rows. a: bf16 rows of stride lda (padded as above).
void Bf16PanelProduct(const uint16_t* a, int64_t lda, int64_t n_rows, const uint32_t* b,
                      int64_t kc_n, float* c, int64_t ldc, int64_t nr);
// y[t][r] for r in [r0, r1), all n_tok tokens (xb from ConvertActsToBf16Rows). dequant may be
// null.
void Bf16GemmRows(const WeightMatrix& w, const uint16_t* xb, int64_t n_tok, float* y, int64_t r0,
                  int64_t r1, DequantFn dequant);
// Which GEMM MatMulGemm runs at the current CPU level for an n_in-wide matrix: true for the
// two bf16 ones (AMX, AVX512-BF16), false for OpenBLAS sgemm.
bool GemmUsesBf16(int64_t n_in);

// MatMul's two strategies, exposed so benchmarks can measure the crossover (kBatchedMaxTokens
// in matmul.cc). Same contract as MatMul; w must be valid.
//  - BatchedDot: the MatVec kernels over several tokens; each weight row is read once.
//  - Gemm: with AMX, bf16 tiles (AmxGemmRows); with AVX512-BF16, VDPBF16PS (Bf16GemmRows);
//    otherwise W dequantized in row panels to fp32, then OpenBLAS sgemm per pool thread.
void MatMulBatchedDot(const WeightMatrix& w, const float* x, int64_t n_tok, float* y,
                      ThreadPool* pool);
void MatMulGemm(const WeightMatrix& w, const float* x, int64_t n_tok, float* y, ThreadPool* pool);

}  // namespace ctxcache::matmul_internal
