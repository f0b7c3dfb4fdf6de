// The GPU benchmark (tools/gpu_check.sh): the model on one GPU through the Runner's device path
// (engine/cuda/cuda_runner.h), with the CPU engine on the same prompts for the ratio.
//
//   gpu_throughput MODEL.gguf OUT.json
//
// Cases: prefill of 512 and 2048 tokens (tok/s, and the FLOP rate of the weight products as a
// share of cuBLAS's fp16 peak on the card, measured in the same run); batched decode of 1 and
// 16 sequences over 512-token caches (generated tok/s). Exits 2 when there is no GPU.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "engine/cuda/cuda_runner.h"
#include "engine/model.h"

namespace ctxcache {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: gpu_throughput MODEL.gguf OUT.json\n");
    return 1;
  }
  absl::StatusOr<std::vector<cuda::DeviceInfo>> devices = cuda::ListDevices();
  if (!devices.ok()) {
    std::fprintf(stderr, "gpu_throughput: %s\n", std::string(devices.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(argv[1]);
  if (!model.ok()) {
    std::fprintf(stderr, "gpu_throughput: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  const Model& m = **model;
  const ModelConfig& c = m.config();
  absl::StatusOr<std::unique_ptr<DeviceForward>> gpu = cuda::NewCudaForward(m, 0);
  if (!gpu.ok()) {
    std::fprintf(stderr, "gpu_throughput: %s\n", std::string(gpu.status().message()).c_str());
    return 1;
  }
  // Parameters the weight products touch per token (the FLOP count is 2 per parameter).
  double params = static_cast<double>(m.output().n_in) * m.output().n_out;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = m.layer(l);
    for (const WeightMatrix* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down})
      params += static_cast<double>(w->n_in) * w->n_out;
  }
  absl::StatusOr<double> peak = cuda::GemmTflops(0, 4096, 4096, 4096, 10);
  if (!peak.ok()) {
    std::fprintf(stderr, "gpu_throughput: %s\n", std::string(peak.status().message()).c_str());
    return 1;
  }
  ThreadPool pool(ThreadPool::HardwareThreads());
  Runner runner(m, &pool);
  runner.set_device(gpu->get());
  std::vector<int32_t> tokens(4096);
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<int32_t>((i * 7919) % c.n_vocab);

  std::string json = "{\n  \"device\": \"" + (*gpu)->name() + "\",\n  \"model\": \"" + c.name +
                     "\",\n  \"cublas_fp16_tflops\": " + std::to_string(*peak) +
                     ",\n  \"cases\": [\n";
  bool first = true;
  auto add = [&](const std::string& name, double tok_s, double share) {
    char line[256];
    std::snprintf(line, sizeof line,
                  "%s    {\"name\": \"%s\", \"tok_s\": %.1f, \"peak_share\": %.3f}",
                  first ? "" : ",\n", name.c_str(), tok_s, share);
    json += line;
    first = false;
    std::printf("%-24s %10.1f tok/s  %5.1f%% of cuBLAS fp16 peak\n", name.c_str(), tok_s,
                100 * share);
  };
  for (int n : {512, 2048}) {
    std::vector<float> logits;
    double best = 1e30;
    for (int rep = 0; rep < 4; ++rep) {  // the first warms up (allocations, cuBLAS plans)
      KvCache cache = m.NewKvCache();
      const auto t0 = std::chrono::steady_clock::now();
      absl::Status st = runner.Forward(absl::MakeConstSpan(tokens.data(), n), cache, {}, &logits);
      const double s = Seconds(t0);
      if (!st.ok()) {
        std::fprintf(stderr, "gpu_throughput: prefill %d: %s\n", n,
                     std::string(st.message()).c_str());
        return 1;
      }
      if (rep > 0) best = std::min(best, s);
    }
    add("prefill_" + std::to_string(n), n / best, 2 * params * n / best / 1e12 / *peak);
  }
  for (int batch : {1, 16}) {
    std::vector<KvCache> caches(batch, m.NewKvCache());
    std::vector<std::vector<float>> logits(batch);
    for (int i = 0; i < batch; ++i) {
      absl::Status st =
          runner.Forward(absl::MakeConstSpan(tokens.data() + i, 512), caches[i], {}, &logits[i]);
      if (!st.ok()) return 1;
    }
    constexpr int kSteps = 64;
    std::vector<int32_t> next(batch);
    auto t0 = std::chrono::steady_clock::now();
    for (int step = 0; step < kSteps; ++step) {
      if (step == 4) t0 = std::chrono::steady_clock::now();  // after a warm-up
      std::vector<BatchSequence> seqs;
      for (int i = 0; i < batch; ++i) {
        next[i] = tokens[(step * 31 + i) % tokens.size()];
        seqs.push_back({absl::MakeConstSpan(&next[i], 1), &caches[i], nullptr, &logits[i]});
      }
      absl::Status st = runner.ForwardBatch(seqs);
      if (!st.ok()) {
        std::fprintf(stderr, "gpu_throughput: decode: %s\n", std::string(st.message()).c_str());
        return 1;
      }
    }
    const double s = Seconds(t0);
    add("decode_b" + std::to_string(batch), batch * (kSteps - 4) / s,
        2 * params * batch * (kSteps - 4) / s / 1e12 / *peak);
  }
  json += "\n  ]\n}\n";
  std::ofstream(argv[2]) << json;
  std::printf("wrote %s\n", argv[2]);
  return 0;
}

}  // namespace
}  // namespace ctxcache

int main(int argc, char** argv) { return ctxcache::Main(argc, argv); }
