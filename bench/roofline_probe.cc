// The hardware side of the roofline in docs/benchmarks.md (bench/roofline.py runs this):
//   roofline_probe --model PATH [--threads 2] [--seconds 1.5]
// prints one JSON object:
//   - read_gbs: memory read bandwidth, GB/s: every thread sums its slice of a 1 GiB buffer
//     (far beyond the caches), best of several passes. Decode reads weights and KV rows
//     exactly this way, streaming, so this is the ceiling decode can reach.
//   - fma_peak_gflops / bf16_peak_gflops: the cores' instruction peaks, fp32 FMA (zmm at
//     AVX-512, ymm at AVX2) and VDPBF16PS (0 where the CPU lacks it), register-only loops.
//   - matmul_gflops: the prefill GEMM the engine uses (engine/cpu MatMul, the model's own
//     FFN up-projection weights, 512 tokens), GFLOP/s: the peak of the kernel prefill runs on.
//   - attn_gflops: OpenBLAS sgemm at prefill attention's shape (64 query rows x 2048 keys x
//     head_dim 64, scores then values), GFLOP/s.
//   - the model's per-token costs: weight_bytes (every matrix a decode step reads, the tied
//     output head included), kv_bytes_per_token (K and V of one context token, every layer,
//     as the cache stores them: kv_value_bytes per value), params (multiply-adds per token in
//     the weight products), and the attention shape (layers, heads, head_dim).
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// GCC 12's AVX-512 reductions trip -Wuninitialized inside target("avx512f") functions (see
// engine/cpu/matmul_avx512.cc); the values in question are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "common/cpu_features.h"
#include "common/thread_pool.h"
#include "engine/cpu/matmul.h"
#include "engine/kv_cache.h"
#include "engine/cpu/blas_kernels.h"
#include "engine/model.h"

namespace ctxcache {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Runs fn() until `budget` seconds have passed (at least `min_reps` times) and returns the
// fastest single run, in seconds.
template <typename Fn>
double Best(double budget, int min_reps, Fn&& fn) {
  double best = 1e30;
  const auto start = Clock::now();
  for (int rep = 0; rep < min_reps || Seconds(start, Clock::now()) < budget; ++rep) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

// Sums of n floats, bound by the loads: 16 independent lanes in the plain version (it
// vectorizes to the baseline's SSE), four ymm accumulators with AVX2 (256-bit loads, as the
// decode kernels issue at least; the baseline build's 128-bit loads measured ~15% less).
double SumPlain(const float* p, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  }
  for (; i < n; ++i) acc[0] += p[i];
  double total = 0;
  for (float a : acc) total += a;
  return total;
}

__attribute__((target("avx2,fma"))) double SumAvx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  double total = 0;
  for (float v : out) total += v;
  for (; i < n; ++i) total += p[i];
  return total;
}

double ReadBandwidth(ThreadPool& pool, double budget) {
  const int64_t n = (int64_t{1} << 30) / sizeof(float);
  std::vector<float> buf(n);
  // First touch in parallel, so pages spread as the readers will use them.
  pool.ParallelFor(n, 4096, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) buf[i] = static_cast<float>(i & 7);
  });
  std::vector<double> sums(pool.n_threads());
  const double s = Best(budget, 3, [&] {
    pool.ParallelFor(n, 4096, [&](int64_t b, int64_t e, int t) {
      const float* p = buf.data() + b;
      sums[t] += GetCpuFeatures().avx2 ? SumAvx2(p, e - b) : SumPlain(p, e - b);
    });
  });
  volatile double sink = 0;  // keeps the sums, so the reads cannot be optimized away
  for (double v : sums) sink = sink + v;
  return static_cast<double>(n) * sizeof(float) / s / 1e9;
}

// Instruction peaks: every thread runs a register-only loop of independent multiply-adds
// (24 chains: 12 left VDPBF16PS latency-bound on Zen 5), so the figure is what the
// core's FMA units give, the ceiling any GEMM kernel on them approaches. FLOPs per instruction:
// fp32 FMA 2 x 16 lanes (zmm) or 2 x 8 (ymm); VDPBF16PS 2 x 32 bf16 pairs' products.
constexpr int kChains = 24;
constexpr int64_t kPeakIters = 1 << 20;

__attribute__((target("avx512f"))) double Fma512Flops() {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * c);
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.0001f);
  for (int64_t i = 0; i < kPeakIters; ++i) {
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  float sink = 0;
  for (int c = 0; c < kChains; ++c) sink += _mm512_reduce_add_ps(acc[c]);
  volatile float keep = sink;
  (void)keep;
  return 2.0 * 16 * kChains * kPeakIters;
}

__attribute__((target("avx2,fma"))) double Fma256Flops() {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(0.001f * c);
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.0001f);
  for (int64_t i = 0; i < kPeakIters; ++i) {
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  }
  alignas(32) float out[8];
  float sink = 0;
  for (int c = 0; c < kChains; ++c) {
    _mm256_store_ps(out, acc[c]);
    sink += out[0];
  }
  volatile float keep = sink;
  (void)keep;
  return 2.0 * 8 * kChains * kPeakIters;
}

__attribute__((target("avx512f,avx512bf16"))) double Bf16DotFlops() {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * c);
  const __m512i ones = _mm512_set1_epi16(0x3f80);  // bf16 1.0
  const __m512bh a = reinterpret_cast<const __m512bh&>(ones);
  for (int64_t i = 0; i < kPeakIters; ++i) {
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, a);
  }
  float sink = 0;
  for (int c = 0; c < kChains; ++c) sink += _mm512_reduce_add_ps(acc[c]);
  volatile float keep = sink;
  (void)keep;
  return 2.0 * 32 * kChains * kPeakIters;
}

// GFLOP/s of fn() run on every pool thread at once, best of a few rounds.
double PeakGflops(ThreadPool& pool, double (*fn)(), double budget) {
  const int n = pool.n_threads();
  double flops = 0;
  const double s = Best(budget / 3, 3, [&] {
    std::vector<double> f(n);
    pool.ParallelFor(n, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) f[t] = fn();
    });
    flops = 0;
    for (double v : f) flops += v;
  });
  return flops / s / 1e9;
}

int Run(int argc, char** argv) {
  std::string model_path;
  int threads = 2;
  double budget = 1.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--model") {
      model_path = argv[i + 1];
    } else if (flag == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (flag == "--seconds") {
      budget = std::atof(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (model_path.empty() || threads < 1 || budget <= 0) {
    std::fprintf(stderr, "usage: roofline_probe --model PATH [--threads N] [--seconds S]\n");
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Model>> loaded = Model::Load(model_path);
  if (!loaded.ok()) {
    std::fprintf(stderr, "roofline_probe: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  const Model& model = **loaded;
  const ModelConfig& c = model.config();
  ThreadPool pool(threads, /*pin=*/true);
  openblas_set_num_threads(1);

  // Per-token costs of the model.
  auto bytes = [](const WeightMatrix& w) { return static_cast<double>(w.row_bytes) * w.n_out; };
  auto macs = [](const WeightMatrix& w) { return static_cast<double>(w.n_in) * w.n_out; };
  double weight_bytes = bytes(model.output()), params = macs(model.output());
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = model.layer(l);
    for (const WeightMatrix* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
      weight_bytes += bytes(*w);
      params += macs(*w);
    }
  }
  // What one cached token costs, measured on the cache type itself (its value width).
  KvCache one = model.NewKvCache();
  std::vector<float> row(static_cast<size_t>(c.n_kv_heads) * c.head_dim, 0.f);
  const int32_t pos = 0;
  for (int l = 0; l < c.n_layers; ++l) one.Append(l, row.data(), row.data(), &pos, 1);
  const double kv_value_bytes = static_cast<double>(sizeof(one.head(0, 0).k[0]));
  const double kv_bytes_per_token =
      2.0 * c.n_layers * c.n_kv_heads * c.head_dim * kv_value_bytes;

  const double read_gbs = ReadBandwidth(pool, budget);
  const CpuFeatures& f = GetCpuFeatures();
  const double fma_peak = f.level == CpuLevel::kAvx512 ? PeakGflops(pool, &Fma512Flops, budget)
                          : f.avx2                     ? PeakGflops(pool, &Fma256Flops, budget)
                                                       : 0.0;
  const double bf16_peak =
      f.level == CpuLevel::kAvx512 && f.avx512_bf16 ? PeakGflops(pool, &Bf16DotFlops, budget) : 0.0;

  // The prefill GEMM on the model's FFN up-projection.
  const WeightMatrix& up = model.layer(0).w_up;
  const int64_t n_tok = 512;
  std::vector<float> x(n_tok * up.n_in), y(n_tok * up.n_out);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.001f * static_cast<float>(i % 97);
  const double mm_s = Best(budget, 3, [&] { MatMul(up, x.data(), n_tok, y.data(), &pool); });
  const double matmul_gflops = 2.0 * n_tok * up.n_in * up.n_out / mm_s / 1e9;

  // Attention GEMMs at prefill's shape: per thread, one (head, 64-row block) task.
  const int64_t rows = 64, keys = 2048, hd = c.head_dim;
  std::vector<std::vector<float>> q(threads), k(threads), v(threads), sc(threads), o(threads);
  for (int t = 0; t < threads; ++t) {
    q[t].assign(rows * hd, 0.01f);
    k[t].assign(keys * hd, 0.02f);
    v[t].assign(keys * hd, 0.03f);
    sc[t].assign(rows * keys, 0.f);
    o[t].assign(rows * hd, 0.f);
  }
  const int tasks = 8 * threads;
  const double at_s = Best(budget, 3, [&] {
    pool.ParallelFor(tasks, [&](int64_t b, int64_t e, int t) {
      for (int64_t task = b; task < e; ++task) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hd, 1.f, q[t].data(),
                    hd, k[t].data(), hd, 0.f, sc[t].data(), keys);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, keys, 1.f,
                    sc[t].data(), keys, v[t].data(), hd, 0.f, o[t].data(), hd);
      }
    });
  });
  const double attn_gflops = tasks * 2.0 * (2.0 * rows * keys * hd) / at_s / 1e9;

  std::printf(
      "{\"threads\":%d,\"cpu\":\"%s\",\"read_gbs\":%.3f,\"fma_peak_gflops\":%.3f,"
      "\"bf16_peak_gflops\":%.3f,\"matmul_gflops\":%.3f,"
      "\"attn_gflops\":%.3f,\"weight_bytes\":%.0f,\"params\":%.0f,"
      "\"kv_bytes_per_token\":%.0f,\"kv_value_bytes\":%.0f,\"n_layers\":%d,\"n_heads\":%d,"
      "\"n_kv_heads\":%d,\"head_dim\":%d,\"matmul_type\":\"%s\"}\n",
      threads, GetCpuFeatures().ToString().c_str(), read_gbs, fma_peak, bf16_peak, matmul_gflops,
      attn_gflops, weight_bytes, params, kv_bytes_per_token, kv_value_bytes, c.n_layers,
      c.n_heads, c.n_kv_heads, c.head_dim, std::string(GetGgmlTypeTraits(up.type).name).c_str());
  return 0;
}

}  // namespace
}  // namespace ctxcache

int main(int argc, char** argv) {
  ctxcache::UseBestBlasKernels(argv);  // the kernels ctxcache itself runs with
  return ctxcache::Run(argc, argv);
}
