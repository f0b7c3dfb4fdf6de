// Microbenchmarks of MatVec (decode) and MatMul (prefill) on SmolLM2-135M's shapes, reporting
// weight bytes/s (the decode roofline: ~15 GB/s per core, ~30 GB/s for two) and FLOP/s.
//   build-quant/bench/matmul_bench --benchmark_counters_tabular=true
// Arguments: /type/n_in/n_out/threads (MatVec), /type/n_tok/n_in/n_out/threads (MatMul).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "common/cpu_features.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/matmul_internal.h"

namespace ctxcache {
namespace {

// Random blocks with moderate fp16 scales (values do not affect speed, NaNs could).
struct BenchMatrix {
  std::vector<uint8_t> bytes;
  WeightMatrix w;
  BenchMatrix(GgmlType type, int64_t n_in, int64_t n_out) {
    const GgmlTypeTraits t = GetGgmlTypeTraits(type);
    w.type = type;
    w.n_in = n_in;
    w.n_out = n_out;
    w.row_bytes = n_in / t.block_size * t.type_size;
    bytes.resize(w.row_bytes * n_out);
    std::mt19937 rng(1);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng() & 0x3b);  // small exponents
    if (type == GgmlType::kF32) {
      auto* f = reinterpret_cast<float*>(bytes.data());
      for (size_t i = 0; i < bytes.size() / 4; ++i) f[i] = 0.01f * static_cast<float>(i % 7);
    }
    w.data = bytes.data();
  }
};

// Pools live for the whole run; the pause lets workers start before the first job (works
// around a start-up race in common/thread_pool.cc, reported).
ThreadPool* Pool(int n) {
  static ThreadPool* pools[3] = {nullptr, new ThreadPool(1), [] {
                                   auto* p = new ThreadPool(2);
                                   std::this_thread::sleep_for(std::chrono::milliseconds(50));
                                   return p;
                                 }()};
  return pools[n];
}

// Rates per second of real time, in units of 1e9 (GB/s, GFLOP/s).
void SetCounters(benchmark::State& state, double bytes, double flops) {
  state.counters["GB/s"] =
      benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_MatVec(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const int64_t n_in = state.range(1), n_out = state.range(2);
  BenchMatrix m(type, n_in, n_out);
  std::vector<float> x(n_in, 0.5f), y(n_out);
  ThreadPool* pool = Pool(static_cast<int>(state.range(3)));
  for (auto _ : state) {
    MatVec(m.w, x.data(), y.data(), pool);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(std::string(GetGgmlTypeTraits(type).name) + " " + GetCpuFeatures().ToString());
  SetCounters(state, static_cast<double>(m.bytes.size()), 2.0 * n_in * n_out);
}

// Several matrices back to back, 85 MB in all, so weights come from DRAM as in real decode
// (a single 0.5 MB matrix sits in L2/L3 and measures the kernel, not the memory).
void BM_MatVecFromDram(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const int64_t n_in = state.range(1), n_out = state.range(2);
  const GgmlTypeTraits t = GetGgmlTypeTraits(type);
  const size_t one = n_in / t.block_size * t.type_size * n_out;
  const int copies = static_cast<int>(std::max<size_t>(1, (size_t{85} << 20) / one));
  std::vector<std::unique_ptr<BenchMatrix>> ms;
  for (int i = 0; i < copies; ++i) ms.push_back(std::make_unique<BenchMatrix>(type, n_in, n_out));
  std::vector<float> x(n_in, 0.5f), y(n_out);
  ThreadPool* pool = Pool(static_cast<int>(state.range(3)));
  for (auto _ : state) {
    for (auto& m : ms) MatVec(m->w, x.data(), y.data(), pool);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(std::string(t.name) + " x" + std::to_string(copies));
  SetCounters(state, static_cast<double>(one) * copies, 2.0 * n_in * n_out * copies);
}

template <int kStrategy>  // 0: MatMul (auto), 1: batched dot, 2: GEMM, 3: GEMM at AVX2 (sgemm)
void BM_MatMul(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const int64_t n_tok = state.range(1), n_in = state.range(2), n_out = state.range(3);
  BenchMatrix m(type, n_in, n_out);
  std::vector<float> x(n_tok * n_in, 0.25f), y(n_tok * n_out);
  ThreadPool* pool = Pool(static_cast<int>(state.range(4)));
  // Capping the level at AVX2 turns the bf16 GEMMs off: the OpenBLAS sgemm path, for comparison.
  const CpuLevel saved = kStrategy == 3 ? SetCpuLevelForTesting(CpuLevel::kAvx2) : CpuLevel{};
  for (auto _ : state) {
    if (kStrategy == 0) MatMul(m.w, x.data(), n_tok, y.data(), pool);
    if (kStrategy == 1) matmul_internal::MatMulBatchedDot(m.w, x.data(), n_tok, y.data(), pool);
    if (kStrategy >= 2) matmul_internal::MatMulGemm(m.w, x.data(), n_tok, y.data(), pool);
    benchmark::DoNotOptimize(y.data());
  }
  if (kStrategy == 3) SetCpuLevelForTesting(saved);
  state.SetLabel(std::string(GetGgmlTypeTraits(type).name));
  SetCounters(state, static_cast<double>(m.bytes.size()), 2.0 * n_tok * n_in * n_out);
}

constexpr int kQ4_1 = static_cast<int>(GgmlType::kQ4_1);
constexpr int kQ4_0 = static_cast<int>(GgmlType::kQ4_0);
constexpr int kQ8_0 = static_cast<int>(GgmlType::kQ8_0);
constexpr int kF16 = static_cast<int>(GgmlType::kF16);
constexpr int kF32 = static_cast<int>(GgmlType::kF32);
constexpr int kQ6_K = static_cast<int>(GgmlType::kQ6_K);
constexpr int kQ5_0 = static_cast<int>(GgmlType::kQ5_0);
constexpr int kQ5_1 = static_cast<int>(GgmlType::kQ5_1);
constexpr int kQ4_K = static_cast<int>(GgmlType::kQ4_K);
constexpr int kQ5_K = static_cast<int>(GgmlType::kQ5_K);
constexpr int kBF16 = static_cast<int>(GgmlType::kBF16);

void MatVecArgs(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2}) {
    // SmolLM2-135M: attention q/o (576x576), k/v (576->192), FFN up/gate (576->1536),
    // down (1536->576) in Q4_1, and the Q8_0 output head (576 -> 49152).
    for (auto [n_in, n_out] : {std::pair{576, 192}, {576, 576}, {576, 1536}, {1536, 576}}) {
      b->Args({kQ4_1, n_in, n_out, threads});
    }
    b->Args({kQ8_0, 576, 49152, threads});
    b->Args({kQ4_0, 576, 1536, threads});
    b->Args({kF16, 576, 1536, threads});
    b->Args({kF32, 576, 1536, threads});
    // Qwen2.5-0.5B Q4_K_M: Q5_0 where rows are 896 wide (not a 256-multiple), Q4_K/Q6_K
    // for the FFN down projection (4864 -> 896); other files bring Q5_1, Q5_K, BF16.
    b->Args({kQ5_0, 896, 4864, threads});
    b->Args({kQ4_K, 4864, 896, threads});
    b->Args({kQ6_K, 4864, 896, threads});
    b->Args({kQ5_K, 4864, 896, threads});
    b->Args({kQ5_1, 896, 4864, threads});
    b->Args({kBF16, 896, 4864, threads});
  }
}
BENCHMARK(BM_MatVec)->Apply(MatVecArgs)->UseRealTime();
BENCHMARK(BM_MatVecFromDram)
    ->Args({kQ4_1, 576, 1536, 1})
    ->Args({kQ4_1, 576, 1536, 2})
    ->Args({kQ8_0, 576, 49152, 1})
    ->Args({kQ8_0, 576, 49152, 2})
    ->ArgsProduct({{kQ5_0, kQ5_1}, {896}, {4864}, {1, 2}})
    ->ArgsProduct({{kQ4_K, kQ5_K, kQ6_K}, {4864}, {896}, {1, 2}})
    ->UseRealTime();

BENCHMARK(BM_MatMul<0>)
    ->ArgsProduct({{kQ4_1}, {1, 7, 64, 512, 2048}, {576}, {1536}, {1, 2}})
    ->Args({kQ4_1, 512, 1536, 576, 2})
    ->Args({kQ8_0, 512, 576, 49152, 2})
    ->Args({kF32, 512, 576, 1536, 2})
    ->UseRealTime();
// The crossover between the two strategies (kBatchedMaxTokens in matmul.cc).
BENCHMARK(BM_MatMul<1>)
    ->ArgsProduct({{kQ4_1}, {1, 4, 8, 12, 16, 20, 24, 32, 48, 64}, {576}, {1536}, {1, 2}})
    ->UseRealTime();
BENCHMARK(BM_MatMul<2>)
    ->ArgsProduct({{kQ4_1}, {1, 4, 8, 12, 16, 20, 24, 32, 48, 64}, {576}, {1536}, {1, 2}})
    ->UseRealTime();
// The batched dot's cost per extra token (a continuous-batching decode step) on the other
// models' shapes: SmolLM2's Q8_0 output head, Qwen2.5-0.5B's Q5_0 up and Q4_K/Q6_K down.
BENCHMARK(BM_MatMul<1>)
    ->ArgsProduct({{kQ8_0}, {1, 4, 8, 16, 32}, {576}, {49152}, {1}})
    ->ArgsProduct({{kQ5_0}, {1, 4, 8, 16, 32}, {896}, {4864}, {1}})
    ->ArgsProduct({{kQ4_K, kQ6_K}, {1, 4, 8, 16, 32}, {4864}, {896}, {1}})
    ->UseRealTime();

// The bf16 GEMM (AMX, or AVX512-BF16 without it) against OpenBLAS sgemm on fp32-dequantized
// panels (the choice in matmul.cc), on SmolLM2's and Qwen2.5-0.5B's FFN shapes.
BENCHMARK(BM_MatMul<2>)
    ->ArgsProduct({{kQ4_1}, {512}, {576}, {1536}, {1, 2}})
    ->ArgsProduct({{kQ5_0}, {512}, {896}, {4864}, {1, 2}})
    ->ArgsProduct({{kQ4_K, kQ6_K}, {512}, {4864}, {896}, {1, 2}})
    ->ArgsProduct({{kQ4_K}, {2048, 8192}, {4864}, {896}, {1, 2}})
    ->UseRealTime();
BENCHMARK(BM_MatMul<3>)
    ->ArgsProduct({{kQ4_1}, {512}, {576}, {1536}, {1, 2}})
    ->ArgsProduct({{kQ5_0}, {512}, {896}, {4864}, {1, 2}})
    ->ArgsProduct({{kQ4_K, kQ6_K}, {512}, {4864}, {896}, {1, 2}})
    ->UseRealTime();

}  // namespace
}  // namespace ctxcache

BENCHMARK_MAIN();
