// The whole model on the GPU (engine/cuda/cuda_runner.h) against the CPU engine: prompt,
// greedy decode, a batch of sequences over pruned caches, observed attention. Skips, naming the
// driver's reason, where there is no usable GPU (tools/gpu_check.sh runs it on one).
//
// Tolerances: the GPU multiplies fp16 weights (dequantized from the GGUF's blocks, so exact up
// to fp16 rounding) by fp16 activations with fp32 accumulation; the CPU multiplies the
// quantized blocks by activations quantized to 8 bits (Q8_K / Q8_0, as llama.cpp does). The
// two round differently at every layer: logits agree to a few hundredths of their spread, and
// the greedy token agrees wherever the CPU's top two logits are not within that of each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/cuda/cuda_runner.h"
#include "engine/model.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

#define SKIP_WITHOUT_GPU()                                         \
  do {                                                             \
    auto devices = cuda::ListDevices();                            \
    if (!devices.ok()) GTEST_SKIP() << devices.status().message(); \
  } while (0)

// max |a - b| relative to the spread of a (max - min).
double RelativeMaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  const auto [lo, hi] = std::minmax_element(a.begin(), a.end());
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(a[i] - b[i])));
  }
  return worst / std::max(1e-6, static_cast<double>(*hi - *lo));
}

// The CPU's top two logits differ by more than `margin` of the spread: the argmax is stable.
bool ClearWinner(const std::vector<float>& l, double margin) {
  float first = -INFINITY, second = -INFINITY, lo = INFINITY;
  for (float x : l) {
    lo = std::min(lo, x);
    if (x > first) {
      second = first;
      first = x;
    } else if (x > second) {
      second = x;
    }
  }
  return first - second > margin * (first - lo);
}

constexpr double kLogitTol = 0.03;  // of the logits' spread (see the header comment)

// The real models (fetched by tools/setup.sh), and the three tiny synthetic ones checked in
// under tests/data/tiny (tiny_model_parity_test holds them to llama.cpp): QKV biases, NEOX and
// scaled RoPE, GQA 4:1 and none, F32 / F16 / Q8_0 / Q4_0 / Q4_1 weights. The tiny ones need no
// download, so a bare GPU machine checks the backend on them at least.
constexpr const char* kTiny[] = {"tiny/qwen2", "tiny/llama_scaled", "tiny/llama_mha"};

class CudaModelTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    const std::string name = GetParam();
    if (name.rfind("tiny/", 0) == 0) {
      absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(testing::TestDataPath(name + ".gguf"));
      ASSERT_TRUE(m.ok()) << m.status();
      owned_ = *std::move(m);
      model_ = owned_.get();
    } else {
      const auto& shared = testing::SharedTestModel(name);
      testing::RequireModel(shared, name);
      if (IsSkipped() || HasFatalFailure()) return;
      model_ = shared->get();
    }
    absl::StatusOr<std::unique_ptr<DeviceForward>> gpu = cuda::NewCudaForward(*model_, 0);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
  }
  // n token ids (any model's vocabulary), different for each `seed`; at most what fits the
  // model's window with `room` positions to spare.
  std::vector<int32_t> Prompt(int n, int seed = 0, int room = 64) const {
    n = std::min(n, model_->config().n_ctx_train - room);
    std::vector<int32_t> ids(n);
    for (int i = 0; i < n; ++i) {
      ids[i] =
          static_cast<int32_t>((int64_t{i} * 7919 + seed * 104729 + 11) % model_->config().n_vocab);
    }
    return ids;
  }
  std::unique_ptr<Model> owned_;
  const Model* model_ = nullptr;
  std::unique_ptr<DeviceForward> gpu_;
};

TEST_P(CudaModelTest, PromptAndGreedyDecodeMatchTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool), gpu(*model_, &pool);
  gpu.set_device(gpu_.get());
  KvCache a = model_->NewKvCache(), b = model_->NewKvCache();
  std::vector<float> la, lb;
  // Longer than one attention split (256 keys), so the splits merge.
  const std::vector<int32_t> prompt = Prompt(700);
  ASSERT_GT(prompt.size(), 256u);
  ASSERT_TRUE(cpu.Forward(prompt, a, {}, &la).ok());
  ASSERT_TRUE(gpu.Forward(prompt, b, {}, &lb).ok());
  EXPECT_LT(RelativeMaxDiff(la, lb), kLogitTol);
  for (int step = 0; step < 16; ++step) {
    const int32_t t = testing::Argmax(la);
    if (ClearWinner(la, 2 * kLogitTol)) {
      EXPECT_EQ(testing::Argmax(lb), t) << "step " << step;
    }
    ASSERT_TRUE(cpu.Decode(t, a, &la).ok());
    ASSERT_TRUE(gpu.Decode(t, b, &lb).ok());  // the same token: the caches stay comparable
    EXPECT_LT(RelativeMaxDiff(la, lb), kLogitTol) << "step " << step;
  }
  // The GPU's K/V reached the host cache: entries and positions as the CPU's, values within
  // the arithmetic's difference.
  ASSERT_EQ(b.TotalEntries(), a.TotalEntries());
  EXPECT_EQ(b.next_position, a.next_position);
  const int hd = model_->config().head_dim;
  std::vector<float> ka(2 * hd), kb(2 * hd);
  for (int l = 0; l < model_->config().n_layers; l += 5) {
    const KvHead& ha = std::as_const(a).head(l, 0);
    const KvHead& hb = std::as_const(b).head(l, 0);
    ASSERT_EQ(ha.pos, hb.pos);
    ha.LoadRows(ha.n() - 1, ha.n(), hd, ka.data(), ka.data() + hd);
    hb.LoadRows(hb.n() - 1, hb.n(), hd, kb.data(), kb.data() + hd);
    EXPECT_LT(RelativeMaxDiff(ka, kb), 0.05) << "layer " << l;
  }
}

TEST_P(CudaModelTest, BatchedPrunedAndQuantizedCachesMatchTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool), gpu(*model_, &pool);
  gpu.set_device(gpu_.get());
  const ModelConfig& c = model_->config();
  std::vector<KvCache> a(3, model_->NewKvCache());
  std::vector<std::vector<float>> la(3), lb(3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(cpu.Forward(Prompt(150 + 90 * i, i, 64 + 90 * (2 - i)), a[i], {}, &la[i]).ok());
  }
  // Prune: every (layer, head) of sequence i keeps a different subset (a compressed context).
  for (int i = 1; i < 3; ++i) {
    for (int l = 0; l < c.n_layers; ++l) {
      for (int g = 0; g < c.n_kv_heads; ++g) {
        KvHead& h = a[i].head(l, g);
        const int64_t first = 4 + (l * 7 + g * 3) % 50, drop = 20 + (l + g * 11) % 60;
        h.pos.erase(h.pos.begin() + first, h.pos.begin() + first + drop);
        h.k.erase(h.k.begin() + first * c.head_dim, h.k.begin() + (first + drop) * c.head_dim);
        h.v.erase(h.v.begin() + first * c.head_dim, h.v.begin() + (first + drop) * c.head_dim);
      }
    }
  }
  // Stored contexts in their codecs (where the head size allows: a multiple of 32): the GPU
  // gets codes and scales and expands them itself.
  if (c.head_dim % 32 == 0) {
    ASSERT_TRUE(a[1].Freeze(KvDtype::kInt8).ok());
    ASSERT_TRUE(a[2].Freeze(KvDtype::kInt4).ok());
  }
  std::vector<KvCache> b = a;
  const std::vector<int32_t> question = Prompt(24, 3, 0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(cpu.Forward(question, a[i], {}, &la[i]).ok());
    ASSERT_TRUE(gpu.Forward(question, b[i], {}, &lb[i]).ok());
    EXPECT_LT(RelativeMaxDiff(la[i], lb[i]), kLogitTol) << "seq " << i;
  }
  for (int step = 0; step < 8; ++step) {
    std::vector<int32_t> next(3);
    std::vector<BatchSequence> sa, sb;
    for (int i = 0; i < 3; ++i) {
      next[i] = testing::Argmax(la[i]);
      sa.push_back({absl::MakeConstSpan(&next[i], 1), &a[i], nullptr, &la[i]});
      sb.push_back({absl::MakeConstSpan(&next[i], 1), &b[i], nullptr, &lb[i]});
    }
    ASSERT_TRUE(cpu.ForwardBatch(sa).ok());
    ASSERT_TRUE(gpu.ForwardBatch(sb).ok());
    for (int i = 0; i < 3; ++i) {
      EXPECT_LT(RelativeMaxDiff(la[i], lb[i]), kLogitTol) << "step " << step << " seq " << i;
    }
  }
}

TEST_P(CudaModelTest, ObservedAttentionMatchesTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool), gpu(*model_, &pool);
  gpu.set_device(gpu_.get());
  const ModelConfig& c = model_->config();
  const std::vector<int32_t> prompt = Prompt(400);
  std::vector<std::vector<float>> pa(c.n_layers), pb(c.n_layers);
  std::vector<int64_t> ka(c.n_layers), kb(c.n_layers);
  auto run = [&](Runner& r, std::vector<std::vector<float>>& probs, std::vector<int64_t>& keys) {
    KvCache cache = model_->NewKvCache();
    ForwardOptions o;
    o.observe_rows = {0, 150, 399};
    o.observer = [&](int layer, const float* p, int n_rows, int64_t n_keys) {
      probs[layer].assign(p, p + int64_t{c.n_heads} * n_rows * n_keys);
      keys[layer] = n_keys;
    };
    std::vector<float> logits;
    ASSERT_TRUE(r.Forward(prompt, cache, o, &logits).ok());
  };
  run(cpu, pa, ka);
  run(gpu, pb, kb);
  for (int l = 0; l < c.n_layers; ++l) {
    ASSERT_EQ(ka[l], kb[l]) << "layer " << l;
    ASSERT_EQ(pa[l].size(), pb[l].size());
    ASSERT_EQ(kb[l], static_cast<int64_t>(prompt.size()));
    const std::vector<int> rows = {0, 150, 399};
    double worst = 0;
    for (int h = 0; h < c.n_heads; ++h) {
      for (int r = 0; r < 3; ++r) {
        for (int64_t k = 0; k < kb[l]; ++k) {
          const size_t i = (static_cast<size_t>(h) * 3 + r) * kb[l] + k;
          if (k > rows[r]) {  // the entries are positions 0..n-1: k > row is the future
            ASSERT_EQ(pb[l][i], 0.f) << "row " << rows[r] << " sees key " << k;
          }
          worst = std::max(worst, static_cast<double>(std::fabs(pa[l][i] - pb[l][i])));
        }
      }
    }
    // Probabilities in [0, 1] through the layers' arithmetic difference (see the top).
    EXPECT_LT(worst, 0.05) << "layer " << l;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaModelTest, testing::TestModelNames(), testing::TestModelLabel);
INSTANTIATE_TEST_SUITE_P(Tiny, CudaModelTest, ::testing::ValuesIn(kTiny), testing::TestModelLabel);

TEST(CudaDeviceTest, AMissingDeviceIsNamed) {
  SKIP_WITHOUT_GPU();
  const auto& shared = testing::SharedTestModel(testing::kSmolLM2);
  testing::RequireModel(shared, "SmolLM2");
  if (IsSkipped() || HasFatalFailure()) return;
  absl::StatusOr<std::unique_ptr<DeviceForward>> gpu = cuda::NewCudaForward(*shared->get(), 77);
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(gpu.status().message().find("cuda:77 does not exist"), std::string::npos)
      << gpu.status();
}

}  // namespace
}  // namespace ctxcache
