// Parity tests of MatVec / MatMul (engine/cpu/matmul.h) against their plain references, for
// every supported weight type, on awkward shapes, at each CPU level this machine has, with 1
// and 2 threads. Also: argument validation and the exactness of the SIMD panel dequantizers.
#include "engine/cpu/matmul.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/cpu_features.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/cpu/matmul_internal.h"
#include "engine/cpu/quant.h"
#include "gtest/gtest.h"

namespace ctxcache {
namespace {

// A random weight matrix: random block bytes (every bit pattern of the quants is valid) with
// the fp16 scale fields overwritten by moderate values, so products stay finite.
struct TestMatrix {
  std::vector<uint8_t> bytes;
  WeightMatrix w;
};

TestMatrix MakeMatrix(GgmlType type, int64_t n_in, int64_t n_out, uint32_t seed,
                      size_t row_padding = 0) {
  const GgmlTypeTraits t = GetGgmlTypeTraits(type);
  TestMatrix m;
  m.w.type = type;
  m.w.n_in = n_in;
  m.w.n_out = n_out;
  m.w.row_bytes = n_in / t.block_size * t.type_size + row_padding;
  m.bytes.resize(m.w.row_bytes * n_out);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(-0.02f, 0.02f);
  for (auto& b : m.bytes) b = static_cast<uint8_t>(rng());
  auto put16 = [&](size_t off, uint16_t v) { std::memcpy(&m.bytes[off], &v, 2); };
  for (int64_t r = 0; r < n_out; ++r) {
    const size_t row = r * m.w.row_bytes;
    for (int64_t i = 0; i < n_in / t.block_size; ++i) {
      const size_t blk = row + i * t.type_size;
      switch (type) {
        case GgmlType::kF32: {
          const float v = normal(rng);
          std::memcpy(&m.bytes[blk], &v, 4);
          break;
        }
        case GgmlType::kF16:
          put16(blk, Fp32ToFp16(normal(rng)));
          break;
        case GgmlType::kBF16:
          put16(blk, Fp32ToBf16(normal(rng)));
          break;
        case GgmlType::kQ4_1:
        case GgmlType::kQ5_1:
        case GgmlType::kQ4_K:
        case GgmlType::kQ5_K:
          put16(blk, Fp32ToFp16(scale(rng)));
          put16(blk + 2, Fp32ToFp16(scale(rng)));
          break;
        case GgmlType::kQ6_K:
          put16(blk + 208, Fp32ToFp16(scale(rng)));
          break;
        default:
          put16(blk, Fp32ToFp16(scale(rng)));
          break;  // Q4_0, Q5_0, Q8_0
      }
    }
  }
  m.w.data = m.bytes.data();
  return m;
}

std::vector<float> MakeActivations(int64_t n_tok, int64_t n_in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n_tok * n_in);
  for (auto& v : x) v = normal(rng);
  // Awkward blocks: all zeros (activation scale 0) and one dominated by an outlier.
  for (int64_t i = 0; i < std::min<int64_t>(n_in, 32); ++i) x[i] = 0.0f;
  if (n_in >= 64) x[32] = 40.0f;
  return x;
}

// Every quantized type has an integer dot kernel (with int8 activations) at AVX2 and above;
// F32/F16/BF16 take fp32 dots; the scalar level dequantizes and takes fp32 dots for all.
bool QuantizesActivations(GgmlType type) {
  return GetGgmlTypeTraits(type).block_size > 1 && GetCpuFeatures().level != CpuLevel::kScalar;
}

// Per output, the error the fast paths may make relative to the reference:
//  * fp32 accumulation in another order (SIMD lanes, sgemm blocking): at most
//    ~n_in * 2^-24 * sum|w*x| (the classic bound for recursive summation; kept loose because
//    it is rigorous, and a real bug such as a wrong nibble is O(sum|w*x|), far above it);
//  * for the quantized types, x rounded to int8 per block of 32 (scale d = amax/127): each x_i
//    moves by at most d/2 = amax_block/254, so the dot moves by at most
//    sum_i |w_i| * amax_block(i)/254. This is bounded with |w| and the block maximum, not
//    with sum|w*x|: a small x_i next to a large one in its block still gets the block's
//    rounding step, so a bound relative to sum|w*x| alone would not hold.
//  * with bf16 (the AMX and AVX512-BF16 GEMMs), w and x are each rounded to 8 significant bits (relative
//    error <= 2^-9 each), so each product moves by <= ~2^-8 |w*x|: 2^-8 * sum|w*x|.
//  * atol 1e-6 for rows whose products are all zero (zero scales, zero activations).
std::vector<float> Tolerances(const WeightMatrix& w, const float* x, int64_t n_tok,
                              bool bf16 = false) {
  std::vector<float> tol(n_tok * w.n_out);
  std::vector<float> row(w.n_in);
  const bool act_q = QuantizesActivations(w.type);
  for (int64_t r = 0; r < w.n_out; ++r) {
    EXPECT_TRUE(DequantizeRow(w.type, w.data + r * w.row_bytes, row.data(), w.n_in).ok());
    for (int64_t t = 0; t < n_tok; ++t) {
      const float* xt = x + t * w.n_in;
      double sum_abs = 0.0, act_err = 0.0;
      for (int64_t b = 0; b < w.n_in; b += 32) {
        const int64_t e = std::min<int64_t>(w.n_in, b + 32);
        double amax = 0.0, sum_w = 0.0;
        for (int64_t i = b; i < e; ++i) {
          amax = std::max(amax, std::fabs(static_cast<double>(xt[i])));
          sum_w += std::fabs(row[i]);
          sum_abs += std::fabs(static_cast<double>(row[i]) * xt[i]);
        }
        act_err += sum_w * amax / 254.0;
      }
      const double fp32_err = static_cast<double>(w.n_in) * std::ldexp(1.0, -24) * sum_abs;
      const double bf16_err = bf16 ? std::ldexp(1.0, -8) * sum_abs : 0.0;
      tol[t * w.n_out + r] =
          static_cast<float>(1e-6 + fp32_err + bf16_err + (act_q ? act_err : 0.0));
    }
  }
  return tol;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 const std::vector<float>& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    if (!(std::fabs(got[i] - want[i]) <= tol[i])) {
      ++bad;
      ADD_FAILURE() << what << " [" << i << "]: got " << got[i] << " want " << want[i] << " tol "
                    << tol[i];
    }
  }
}

// One two-thread pool for the whole binary. common/thread_pool.cc has a start-up race: a
// worker that first reads the generation counter after the first ParallelFor (or the
// destructor) has bumped it misses that job and the caller waits forever. Until it is fixed,
// the pool is created once, given time to start its workers, and never destroyed.
ThreadPool* SharedPool2() {
  static ThreadPool* pool = [] {
    auto* p = new ThreadPool(2);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return p;
  }();
  return pool;
}

const char* LevelName(CpuLevel l) {
  return l == CpuLevel::kAvx512 ? "avx512" : l == CpuLevel::kAvx2 ? "avx2" : "scalar";
}

// Restores the detected CPU level after each test.
class CpuLevelGuard {
 public:
  CpuLevelGuard() : saved_(SetCpuLevelForTesting(CpuLevel::kAvx512)) {
    SetCpuLevelForTesting(saved_);
  }
  ~CpuLevelGuard() { SetCpuLevelForTesting(saved_); }

 private:
  CpuLevel saved_;
};

struct Case {
  GgmlType type;
  CpuLevel level;
};

class MatMulParityTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const CpuLevel want = GetParam().level;
    SetCpuLevelForTesting(want);
    if (GetCpuFeatures().level != want) {
      GTEST_SKIP() << "this CPU has no " << LevelName(want)
                   << " (best: " << GetCpuFeatures().ToString() << ")";
    }
  }
  CpuLevelGuard guard_;
  ThreadPool* pool2_ = SharedPool2();
};

std::vector<int64_t> InputSizes(GgmlType type) {
  const int64_t bs = GetGgmlTypeTraits(type).block_size;
  if (bs == 256) return {256, 512, 1536};
  if (bs == 32) return {32, 288, 576, 1536};
  return {7, 32, 288, 576, 769};  // F32/F16/BF16: any n_in, incl. SIMD tails
}

TEST_P(MatMulParityTest, MatVecMatchesReference) {
  const GgmlType type = GetParam().type;
  uint32_t seed = 1;
  for (int64_t n_in : InputSizes(type)) {
    for (int64_t n_out : {1, 3, 17, 192, 1000}) {
      const size_t padding = n_out == 17 ? 6 : 0;  // row stride larger than a row
      TestMatrix m = MakeMatrix(type, n_in, n_out, ++seed, padding);
      const std::vector<float> x = MakeActivations(1, n_in, ++seed);
      std::vector<float> want(n_out);
      MatVecReference(m.w, x.data(), want.data());
      const std::vector<float> tol = Tolerances(m.w, x.data(), 1);
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), pool2_}) {
        std::vector<float> got(n_out, -1.0f);
        MatVec(m.w, x.data(), got.data(), pool);
        ExpectClose(got, want, tol,
                    "MatVec n_in=" + std::to_string(n_in) + " n_out=" + std::to_string(n_out) +
                        " threads=" + std::to_string(pool ? pool->n_threads() : 1));
      }
    }
  }
}

TEST_P(MatMulParityTest, MatMulMatchesReference) {
  const GgmlType type = GetParam().type;
  const int64_t bs = GetGgmlTypeTraits(type).block_size;
  const std::vector<int64_t> n_ins =
      bs == 256 ? std::vector<int64_t>{256, 512} : std::vector<int64_t>{32, 288};
  uint32_t seed = 100;
  ThreadPool pool1(1);
  for (int64_t n_in : n_ins) {
    for (int64_t n_tok : {1, 7, 33, 300}) {
      for (int64_t n_out : {1, 17, 192}) {
        if (n_tok == 300 && n_out == 1) continue;  // covered by smaller shapes, keeps it quick
        TestMatrix m = MakeMatrix(type, n_in, n_out, ++seed);
        const std::vector<float> x = MakeActivations(n_tok, n_in, ++seed);
        std::vector<float> want(n_tok * n_out);
        MatMulReference(m.w, x.data(), n_tok, want.data());
        const std::vector<float> tol = Tolerances(m.w, x.data(), n_tok);
        // The GEMM strategy runs in bf16 (AMX or AVX512-BF16) where the CPU level allows it.
        const std::vector<float> gemm_tol =
            Tolerances(m.w, x.data(), n_tok, matmul_internal::GemmUsesBf16(n_in));
        const std::string shape = " n_tok=" + std::to_string(n_tok) +
                                  " n_in=" + std::to_string(n_in) +
                                  " n_out=" + std::to_string(n_out);
        for (ThreadPool* pool : {&pool1, pool2_}) {
          const std::string th = " threads=" + std::to_string(pool->n_threads());
          std::vector<float> got(n_tok * n_out, -1.0f);
          MatMul(m.w, x.data(), n_tok, got.data(), pool);
          ExpectClose(got, want, gemm_tol, "MatMul" + shape + th);
          // Both strategies, whatever the crossover (kBatchedMaxTokens) picks for this shape.
          std::fill(got.begin(), got.end(), -1.0f);
          matmul_internal::MatMulGemm(m.w, x.data(), n_tok, got.data(), pool);
          ExpectClose(got, want, gemm_tol, "Gemm" + shape + th);
          if (n_tok <= 33) {
            std::fill(got.begin(), got.end(), -1.0f);
            matmul_internal::MatMulBatchedDot(m.w, x.data(), n_tok, got.data(), pool);
            ExpectClose(got, want, tol, "BatchedDot" + shape + th);
          }
        }
      }
    }
  }
}

// Batching must change no result: a decode step that batches B sequences into one MatMul has
// to produce, for each sequence, the bits it would get alone. So the multi-token kernels
// (tiles of tokens sharing one unpacking of the weights) must give exactly MatVec's values,
// whatever the token count (full tiles and every remainder), odd block counts (the scalar
// tail block) and rows not a multiple of any tile.
TEST_P(MatMulParityTest, BatchedDotMatchesMatVecExactly) {
  const GgmlType type = GetParam().type;
  const int64_t bs = GetGgmlTypeTraits(type).block_size;
  const std::vector<int64_t> n_ins = bs == 256  ? std::vector<int64_t>{256, 768, 1536}
                                     : bs == 32 ? std::vector<int64_t>{32, 96, 288, 576}
                                                : std::vector<int64_t>{7, 288, 769};
  uint32_t seed = 500;
  for (int64_t n_in : n_ins) {
    for (int64_t n_out : {1, 5, 67}) {
      TestMatrix m = MakeMatrix(type, n_in, n_out, ++seed);
      for (int64_t n_tok : {2, 3, 4, 5, 8, 13, 16, 32}) {
        const std::vector<float> x = MakeActivations(n_tok, n_in, ++seed);
        std::vector<float> want(n_tok * n_out);
        for (int64_t t = 0; t < n_tok; ++t) {
          MatVec(m.w, x.data() + t * n_in, want.data() + t * n_out, nullptr);
        }
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), pool2_}) {
          std::vector<float> got(n_tok * n_out, -1.0f);
          matmul_internal::MatMulBatchedDot(m.w, x.data(), n_tok, got.data(), pool);
          for (int64_t i = 0; i < n_tok * n_out; ++i) {
            if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
              ADD_FAILURE() << "BatchedDot n_tok=" << n_tok << " n_in=" << n_in
                            << " n_out=" << n_out << " threads=" << (pool ? 2 : 1)
                            << ": token " << i / n_out << " row " << i % n_out << " got "
                            << got[i] << " MatVec " << want[i] << " (first difference)";
              break;
            }
          }
        }
      }
    }
  }
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (CpuLevel level : {CpuLevel::kScalar, CpuLevel::kAvx2, CpuLevel::kAvx512}) {
    // Every type has a fast path at AVX2 and AVX-512; scalar is dequantize-then-dot.
    for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kF16,
                          GgmlType::kF32, GgmlType::kBF16, GgmlType::kQ5_0, GgmlType::kQ5_1,
                          GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K}) {
      cases.push_back({type, level});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(TypesAndLevels, MatMulParityTest, ::testing::ValuesIn(AllCases()),
                         [](const auto& info) {
                           return std::string(GetGgmlTypeTraits(info.param.type).name) + "_" +
                                  LevelName(info.param.level);
                         });

TEST(MatMulValidationTest, RejectsBadMatrices) {
  std::vector<uint8_t> bytes(4096);
  WeightMatrix w{GgmlType::kQ4_0, bytes.data(), 64, 4, 36};
  EXPECT_TRUE(ValidateWeightMatrix(w).ok());
  WeightMatrix bad = w;
  bad.n_in = 48;  // partial block
  EXPECT_EQ(ValidateWeightMatrix(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = w;
  bad.row_bytes = 35;  // shorter than a row
  EXPECT_EQ(ValidateWeightMatrix(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = w;
  bad.type = GgmlType::kQ2_K;  // not supported
  EXPECT_EQ(ValidateWeightMatrix(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = w;
  bad.data = nullptr;
  EXPECT_EQ(ValidateWeightMatrix(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = w;
  bad.n_out = -1;
  EXPECT_EQ(ValidateWeightMatrix(bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST(MatMulValidationTest, InvalidMatrixYieldsNaNNotACrash) {
  std::vector<uint8_t> bytes(4096);
  WeightMatrix w{GgmlType::kQ4_0, bytes.data(), 48, 4, 36};  // n_in not a block multiple
  std::vector<float> x(48, 1.0f), y(4 * 3, 0.0f);
  ThreadPool* pool = SharedPool2();
  MatVec(w, x.data(), y.data(), pool);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(std::isnan(y[i]));
  MatMul(w, x.data(), 3, y.data(), pool);
  for (float v : y) EXPECT_TRUE(std::isnan(v));
}

// The panel dequantizers (AVX-512 and AVX2) must give DequantizeRow's values bit for bit, so
// the GEMM path's only rounding is the GEMM's own (sgemm's, or bf16's).
void ExpectPanelDequantExact(const matmul_internal::KernelTable& k) {
  for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1,
                        GgmlType::kQ8_0, GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K,
                        GgmlType::kF16, GgmlType::kBF16}) {
    const matmul_internal::DequantFn fn = matmul_internal::DequantKernel(&k, type);
    ASSERT_NE(fn, nullptr) << GetGgmlTypeTraits(type).name;
    const bool k_format = GetGgmlTypeTraits(type).block_size == 256;
    const std::vector<int64_t> sizes =
        k_format ? std::vector<int64_t>{256, 768} : std::vector<int64_t>{32, 288, 576, 33};
    for (int64_t n : sizes) {
      if (n % GetGgmlTypeTraits(type).block_size != 0) continue;  // 33: F16/BF16 tails only
      TestMatrix m = MakeMatrix(type, n, 1, 7);
      std::vector<float> want(n), got(n);
      ASSERT_TRUE(DequantizeRow(type, m.w.data, want.data(), n).ok());
      fn(m.w.data, got.data(), n);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * n))
          << GetGgmlTypeTraits(type).name << " n=" << n;
    }
  }
}

TEST(PanelDequantTest, Avx512MatchesReferenceExactly) {
  if (!GetCpuFeatures().avx512_vnni) GTEST_SKIP() << "no AVX-512 VNNI on this CPU";
  ExpectPanelDequantExact(matmul_internal::Avx512Kernels());
}

TEST(PanelDequantTest, Avx2MatchesReferenceExactly) {
  if (!GetCpuFeatures().avx2) GTEST_SKIP() << "no AVX2 on this CPU";
  ExpectPanelDequantExact(matmul_internal::Avx2Kernels());
}

}  // namespace
}  // namespace ctxcache
