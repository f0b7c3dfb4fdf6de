// The Runner's device path (engine/device_forward.h) with a device made of the CPU engine: a
// MirrorDevice keeps its own copy of every cache it serves, synced by the protocol the CUDA
// backend uses (KvCache::uid / generation: the entries appended since, or all of them after a
// rewrite), runs the pass on the copy with a plain Runner and appends the new rows to the
// caller's cache. Its arithmetic is the CPU's, so every result must be bitwise the CPU's:
// any entry the protocol failed to carry over (or carried twice) changes the logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>

#include "common/status.h"
#include "engine/cpu/attention.h"
#include "engine/model.h"
#include "engine/recycled_attention.h"
#include "tests/test_util.h"

namespace ctxcache {
namespace {

class MirrorDevice final : public DeviceForward {
 public:
  MirrorDevice(const Model& model, ThreadPool* pool) : model_(model), runner_(model, pool) {}

  std::string name() const override { return "mirror (CPU)"; }
  bool Supports(const ForwardOptions& options) const override {
    return options.recycled == nullptr;
  }
  int64_t DeviceBytes() const override { return 0; }

  absl::Status Run(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                   const StopFn& stop) override {
    ++passes;
    const ModelConfig& c = model_.config();
    EXPECT_EQ(seqs.back().row0 + seqs.back().n, n);
    for (const Sequence& q : seqs) {
      Mirror& m = mirrors_[q.cache->uid()];
      Sync(*q.cache, m);
      const int64_t before = m.cache.head(0, 0).n();
      Runner::ScopedStop scoped(runner_, stop);
      ForwardOptions options = q.options != nullptr ? *q.options : ForwardOptions{};
      RETURN_IF_ERROR(
          runner_.ForwardEmbeddings(x + q.row0 * c.d_model, q.n, m.cache, options, q.logits));
      // The new rows back to the caller's cache, as the CUDA backend downloads them.
      const int64_t dkv = int64_t{c.n_kv_heads} * c.head_dim;
      std::vector<float> k(q.n * dkv), v(q.n * dkv), kh(q.n * c.head_dim), vh(q.n * c.head_dim);
      for (int l = 0; l < c.n_layers; ++l) {
        for (int g = 0; g < c.n_kv_heads; ++g) {
          const KvHead& h = std::as_const(m.cache).head(l, g);
          h.LoadRows(h.n() - q.n, h.n(), c.head_dim, kh.data(), vh.data());
          for (int64_t r = 0; r < q.n; ++r) {
            std::copy_n(kh.data() + r * c.head_dim, c.head_dim,
                        k.data() + r * dkv + g * c.head_dim);
            std::copy_n(vh.data() + r * c.head_dim, c.head_dim,
                        v.data() + r * dkv + g * c.head_dim);
          }
        }
        const KvHead& h0 = std::as_const(m.cache).head(l, 0);
        q.cache->Append(l, k.data(), v.data(), h0.pos.data() + before, q.n);
      }
      q.cache->next_position = m.cache.next_position;
      m.generation = q.cache->generation();
      for (int64_t& e : m.n) e += q.n;
    }
    return absl::OkStatus();
  }

  int passes = 0;
  int64_t uploaded_entries = 0;  // entries copied from a caller's cache to a mirror
  int full_uploads = 0;          // mirrors rebuilt from scratch

 private:
  struct Mirror {
    KvCache cache;
    uint64_t generation = 0;
    std::vector<int64_t> n;  // per (layer, head): entries the mirror has
  };

  void Sync(const KvCache& host, Mirror& m) {
    const ModelConfig& c = model_.config();
    const int lh_count = c.n_layers * c.n_kv_heads;
    bool stale = m.n.empty() || m.generation != host.generation();
    for (int lh = 0; lh < lh_count && !stale; ++lh) {
      stale = host.head(lh / c.n_kv_heads, lh % c.n_kv_heads).n() < m.n[lh];
    }
    if (stale) {
      m.cache = model_.NewKvCache();
      m.n.assign(lh_count, 0);
      m.generation = host.generation();
      ++full_uploads;
    }
    std::vector<float> k, v;
    for (int lh = 0; lh < lh_count; ++lh) {
      const KvHead& h = host.head(lh / c.n_kv_heads, lh % c.n_kv_heads);
      const int64_t b = m.n[lh], e = h.n();
      if (e <= b) continue;
      k.resize((e - b) * c.head_dim);
      v.resize((e - b) * c.head_dim);
      h.LoadRows(b, e, c.head_dim, k.data(), v.data());
      KvHead& mh = m.cache.head(lh / c.n_kv_heads, lh % c.n_kv_heads);
      const size_t at = mh.k.size();
      mh.k.resize(at + k.size());
      mh.v.resize(at + v.size());
      Fp32ToFp16Row(k.data(), mh.k.data() + at, static_cast<int64_t>(k.size()));
      Fp32ToFp16Row(v.data(), mh.v.data() + at, static_cast<int64_t>(v.size()));
      mh.pos.insert(mh.pos.end(), h.pos.begin() + b, h.pos.end());
      m.n[lh] = e;
      uploaded_entries += e - b;
    }
    m.cache.next_position = host.next_position;
  }

  const Model& model_;
  Runner runner_;
  std::map<uint64_t, Mirror> mirrors_;
};

class DeviceForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto& shared = testing::SharedTestModel(testing::kSmolLM2);
    testing::RequireModel(shared, "the test model");
    if (IsSkipped() || HasFatalFailure()) return;
    model_ = shared->get();
  }
  std::vector<int32_t> Prompt(int n, int rotate = 0) const {
    std::vector<int32_t> ids = model_->tokenizer().Encode(
        "A context cache keeps compressed documents so that every question reuses them. ", false,
        false);
    while (static_cast<int>(ids.size()) < n) ids.insert(ids.end(), ids.begin(), ids.end());
    ids.resize(n);
    std::rotate(ids.begin(), ids.begin() + rotate, ids.end());
    return ids;
  }
  const Model* model_ = nullptr;
};

TEST(KvCacheIdentityTest, CopiesAreNewCachesAndRewritesChangeTheGeneration) {
  KvCache a(2, 1, 4);
  const float k[4] = {1, 2, 3, 4}, v[4] = {5, 6, 7, 8};
  const int32_t pos = 0;
  const uint64_t gen = a.generation();
  a.Append(0, k, v, &pos, 1);
  EXPECT_EQ(a.generation(), gen) << "an append is not a rewrite";
  KvCache b = a;
  EXPECT_NE(b.uid(), a.uid());
  const uint64_t uid = a.uid();
  KvCache c = std::move(a);
  EXPECT_EQ(c.uid(), uid) << "a move hands the entries and their name over";
  EXPECT_NE(a.uid(), uid);  // NOLINT(bugprone-use-after-move): the moved-from gets a new name
  for (auto rewrite : std::vector<std::function<void(KvCache&)>>{
           [](KvCache& x) { x.head(0, 0); }, [](KvCache& x) { x.Truncate(0); },
           [](KvCache& x) { x.Clear(); },
           [](KvCache& x) { ASSERT_TRUE(x.Freeze(KvDtype::kF16).ok()); },
           [](KvCache& x) { x.Thaw(); }}) {
    const uint64_t before = c.generation();
    rewrite(c);
    EXPECT_NE(c.generation(), before);
  }
}

// A prompt, decode steps, a speculative undo (Truncate), and Recycled Attention steps (which
// the device declines: the CPU runs them and the device picks up their rows): every logit
// equals the CPU engine's alone.
TEST_F(DeviceForwardTest, GenerationOnTheDeviceEqualsTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool);
  Runner dev(*model_, &pool);
  MirrorDevice device(*model_, &pool);
  dev.set_device(&device);
  KvCache a = model_->NewKvCache(), b = model_->NewKvCache();
  std::vector<float> la, lb;
  const std::vector<int32_t> prompt = Prompt(37);
  ASSERT_TRUE(cpu.Forward(prompt, a, {}, &la).ok());
  ASSERT_TRUE(dev.Forward(prompt, b, {}, &lb).ok());
  ASSERT_EQ(la, lb);
  EXPECT_EQ(device.passes, 1);
  EXPECT_EQ(device.uploaded_entries, 0) << "a new cache has nothing to upload";
  for (int step = 0; step < 4; ++step) {
    const int32_t t = testing::Argmax(la);
    ASSERT_TRUE(cpu.Decode(t, a, &la).ok());
    ASSERT_TRUE(dev.Decode(t, b, &lb).ok());
    ASSERT_EQ(la, lb) << "step " << step;
  }
  EXPECT_EQ(device.passes, 5);
  EXPECT_EQ(device.uploaded_entries, 0) << "the device's own rows need no upload";
  EXPECT_EQ(b.next_position, a.next_position);

  // Undo two tokens and decode again: the rewrite is seen, the mirror rebuilt.
  a.Truncate(a.head(0, 0).n() - 2);
  b.Truncate(b.head(0, 0).n() - 2);
  a.next_position -= 2;
  b.next_position -= 2;
  const int full = device.full_uploads;
  ASSERT_TRUE(cpu.Decode(7, a, &la).ok());
  ASSERT_TRUE(dev.Decode(7, b, &lb).ok());
  ASSERT_EQ(la, lb);
  EXPECT_EQ(device.full_uploads, full + 1);

  // Recycled Attention decode steps run on the CPU; the next device pass uploads their rows.
  DecodePolicy policy;
  policy.kind = DecodePolicy::Kind::kRecycled;
  policy.stride = 2;
  policy.top_k = 8;
  const ModelConfig& mc = model_->config();
  RecycledAttentionState ra(policy, mc.n_layers, mc.n_kv_heads, mc.n_heads, mc.head_dim);
  RecycledAttentionState rb(policy, mc.n_layers, mc.n_kv_heads, mc.n_heads, mc.head_dim);
  const int passes = device.passes;
  for (int step = 0; step < 3; ++step) {
    const int32_t t = testing::Argmax(la);
    ASSERT_TRUE(cpu.Decode(t, a, &la, &ra).ok());
    ASSERT_TRUE(dev.Decode(t, b, &lb, &rb).ok());
    ASSERT_EQ(la, lb) << "recycled step " << step;
  }
  EXPECT_EQ(device.passes, passes) << "Recycled Attention steps are not the device's";
  const int64_t uploaded = device.uploaded_entries;
  ASSERT_TRUE(cpu.Decode(testing::Argmax(la), a, &la).ok());
  ASSERT_TRUE(dev.Decode(testing::Argmax(lb), b, &lb).ok());
  ASSERT_EQ(la, lb);
  const ModelConfig& c = model_->config();
  EXPECT_EQ(device.uploaded_entries - uploaded, int64_t{3} * c.n_layers * c.n_kv_heads)
      << "three CPU-appended rows per (layer, head), nothing more";
}

// A batch of sequences (decode steps and a prompt chunk), one a copy of a pruned context:
// logits equal the CPU's batched pass.
TEST_F(DeviceForwardTest, BatchesOnTheDeviceEqualTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool);
  Runner dev(*model_, &pool);
  MirrorDevice device(*model_, &pool);
  dev.set_device(&device);
  const ModelConfig& c = model_->config();
  std::vector<KvCache> a(3, model_->NewKvCache());
  std::vector<std::vector<float>> la(3), lb(3);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(cpu.Forward(Prompt(20 + 9 * i, i), a[i], {}, &la[i]).ok());
  }
  // Sequence 1 becomes a pruned context: each head keeps a different subset of its entries.
  for (int l = 0; l < c.n_layers; ++l) {
    for (int g = 0; g < c.n_kv_heads; ++g) {
      KvHead& h = a[1].head(l, g);
      const int64_t drop = 1 + (l + g) % 5;
      h.pos.erase(h.pos.begin() + 3, h.pos.begin() + 3 + drop);
      h.k.erase(h.k.begin() + 3 * c.head_dim, h.k.begin() + (3 + drop) * c.head_dim);
      h.v.erase(h.v.begin() + 3 * c.head_dim, h.v.begin() + (3 + drop) * c.head_dim);
    }
  }
  std::vector<KvCache> b = a;  // copies: caches the device has never seen
  lb = la;
  const std::vector<int32_t> prompt = Prompt(13, 5);
  for (int step = 0; step < 3; ++step) {
    std::vector<int32_t> next(2);
    std::vector<BatchSequence> sa, sb;
    for (int i = 0; i < 2; ++i) {
      next[i] = testing::Argmax(la[i]);
      sa.push_back({absl::MakeConstSpan(&next[i], 1), &a[i], nullptr, &la[i]});
      sb.push_back({absl::MakeConstSpan(&next[i], 1), &b[i], nullptr, &lb[i]});
    }
    if (step == 1) {  // a prompt joins
      sa.push_back({prompt, &a[2], nullptr, &la[2]});
      sb.push_back({prompt, &b[2], nullptr, &lb[2]});
    }
    ASSERT_TRUE(cpu.ForwardBatch(sa).ok());
    ASSERT_TRUE(dev.ForwardBatch(sb).ok());
    for (int i = 0; i < 3; ++i) ASSERT_EQ(la[i], lb[i]) << "step " << step << " seq " << i;
  }
  EXPECT_EQ(device.passes, 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(b[i].TotalEntries(), a[i].TotalEntries());
}

// A batch where one sequence decodes under Recycled Attention: it runs on the CPU, the others
// on the device, in the same ForwardBatch; every logit is the CPU's batched pass's.
TEST_F(DeviceForwardTest, ARecycledSequenceInABatchRunsOnTheCpu) {
  ThreadPool pool(2);
  Runner cpu(*model_, &pool);
  Runner dev(*model_, &pool);
  MirrorDevice device(*model_, &pool);
  dev.set_device(&device);
  const ModelConfig& c = model_->config();
  std::vector<KvCache> a(3, model_->NewKvCache());
  std::vector<std::vector<float>> la(3), lb(3);
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(cpu.Forward(Prompt(30 + 7 * i, i), a[i], {}, &la[i]).ok());
  std::vector<KvCache> b = a;
  lb = la;
  DecodePolicy policy;
  policy.kind = DecodePolicy::Kind::kRecycled;
  policy.stride = 2;
  policy.top_k = 8;
  RecycledAttentionState ra(policy, c.n_layers, c.n_kv_heads, c.n_heads, c.head_dim);
  RecycledAttentionState rb(policy, c.n_layers, c.n_kv_heads, c.n_heads, c.head_dim);
  for (int step = 0; step < 4; ++step) {
    std::vector<int32_t> next(3);
    std::vector<BatchSequence> sa, sb;
    for (int i = 0; i < 3; ++i) {
      next[i] = testing::Argmax(la[i]);
      sa.push_back({absl::MakeConstSpan(&next[i], 1), &a[i], i == 1 ? &ra : nullptr, &la[i]});
      sb.push_back({absl::MakeConstSpan(&next[i], 1), &b[i], i == 1 ? &rb : nullptr, &lb[i]});
    }
    ASSERT_TRUE(cpu.ForwardBatch(sa).ok());
    ASSERT_TRUE(dev.ForwardBatch(sb).ok());
    for (int i = 0; i < 3; ++i) ASSERT_EQ(la[i], lb[i]) << "step " << step << " seq " << i;
  }
  EXPECT_EQ(device.passes, 4) << "one device pass a step, for the two plain sequences";
  EXPECT_EQ(dev.device(), &device);
}

}  // namespace
}  // namespace ctxcache
