// A decoder-only transformer loaded from GGUF (architectures `llama` and `qwen2`) and the
// Runner that executes it on the CPU. The Model is immutable after Load and shared by every
// Runner (one per worker thread); a Runner owns its scratch buffers.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/stop.h"
#include "common/thread_pool.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/ops.h"
#include "engine/device_forward.h"
#include "engine/gguf.h"
#include "engine/kv_cache.h"
#include "engine/recycled_attention.h"
#include "engine/tokenizer.h"

namespace ctxcache {

class IcFormer;

enum class RopeStyle {
  kNormal,  // rotate adjacent pairs (x[2i], x[2i+1]): GGUF llama (Q/K permuted at conversion)
  kNeox,    // rotate halves (x[i], x[i + d/2]): qwen2
};

struct ModelConfig {
  std::string arch;          // "llama" | "qwen2"
  std::string name;          // general.name
  int n_layers = 0;
  int d_model = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int d_ff = 0;
  int n_vocab = 0;
  int n_ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_freq_base = 10000.f;
  float rope_freq_scale = 1.f;  // positions are multiplied by this (linear scaling = 1/factor)
  int rope_dim = 0;             // rotated dimensions per head (== head_dim usually)
  RopeStyle rope_style = RopeStyle::kNormal;
  bool qkv_bias = false;
  bool tied_output = false;     // output head shares token_embd
};

// A model's identity for the caches (Model::fingerprint): tensors, tokenizer metadata, the
// derived config and every "<arch>." metadata key. ConfigFingerprintText is the config's part:
// every ModelConfig field, exactly (a field added to ModelConfig belongs there too).
std::string Fingerprint(const GgufFile& g, const ModelConfig& config);
std::string ConfigFingerprintText(const ModelConfig& config);

// Tensor and metadata lookups shared by Model::Load and the digest compressor (icformer.h):
// a weight matrix of [n_out rows of n_in] (shape and type checked, the data not copied), a
// vector dequantized to fp32, an integer key in 1..2^24. InvalidArgument naming the tensor
// or key when it is missing or does not fit.
absl::StatusOr<WeightMatrix> GgufMatrix(const GgufFile& g, const std::string& name, int64_t n_in,
                                        int64_t n_out);
absl::StatusOr<std::vector<float>> GgufVector(const GgufFile& g, const std::string& name,
                                              int64_t n);
absl::StatusOr<int> GgufPositiveInt(const GgufFile& g, const std::string& key);

// The RoPE parameters of a model (used by the forward pass and by key re-rotation).
RopeParams RopeParamsFor(const ModelConfig& config);

struct LayerWeights {
  const float* attn_norm = nullptr;  // [d_model]
  WeightMatrix wq;                   // [n_heads*head_dim, d_model]
  WeightMatrix wk;                   // [n_kv_heads*head_dim, d_model]
  WeightMatrix wv;                   // [n_kv_heads*head_dim, d_model]
  WeightMatrix wo;                   // [d_model, n_heads*head_dim]
  std::vector<float> bq, bk, bv;     // qwen2 biases (empty for llama)
  const float* ffn_norm = nullptr;   // [d_model]
  WeightMatrix w_gate;               // [d_ff, d_model]
  WeightMatrix w_up;                 // [d_ff, d_model]
  WeightMatrix w_down;               // [d_model, d_ff]
};

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& path);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const GgufFile& gguf() const { return *gguf_; }
  // Hex SHA-256 over the tensor data, the tokenizer metadata and every hyper-parameter the
  // forward pass reads (Fingerprint below): every cached context carries it, and a mismatch
  // is a miss.
  const std::string& fingerprint() const { return fingerprint_; }

  const WeightMatrix& token_embd() const { return token_embd_; }  // [n_vocab, d_model]
  const WeightMatrix& output() const { return output_; }          // [n_vocab, d_model]
  const float* output_norm() const { return output_norm_.data(); }
  const LayerWeights& layer(int i) const { return layers_[i]; }

  // The digest compressor trained for this model (icformer.h), when one is attached: method
  // "digest" needs it. Attach before any Runner uses the model (the model is shared,
  // read-only, from then on); IcFormer::Load has checked it belongs to this model.
  const IcFormer* digest_compressor() const { return digest_compressor_.get(); }
  void AttachDigestCompressor(std::unique_ptr<IcFormer> compressor);

  KvCache NewKvCache() const {
    return KvCache(config_.n_layers, config_.n_kv_heads, config_.head_dim);
  }
  // Bytes of K+V per token over all layers and KV heads at `bytes_per_value`.
  int64_t KvBytesPerToken(int bytes_per_value = 2) const {
    return int64_t{2} * config_.n_layers * config_.n_kv_heads * config_.head_dim *
           bytes_per_value;
  }

 private:
  Model() = default;
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  std::string fingerprint_;
  WeightMatrix token_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<std::vector<float>> norms_;  // fp32 copies of every layer's norm weights
  std::vector<LayerWeights> layers_;
  std::shared_ptr<const IcFormer> digest_compressor_;
};

// Called once per layer during a forward pass that asked for attention observations:
// probs is [n_heads, n_rows, n_keys] — the softmax attention of each observed query row
// (rows of this batch, in the order requested) over every key the head attends to, in the
// order of that KV head's cache entries (query head h reads KV head h / (n_heads/n_kv_heads)).
// Keys a row may not see (causal mask) have probability 0.
using AttentionObserver =
    std::function<void(int layer, const float* probs, int n_rows, int64_t n_keys)>;

struct ForwardOptions {
  bool all_logits = false;             // logits for every token, else only the last
  std::vector<int> observe_rows;       // batch rows whose attention to report
  AttentionObserver observer;          // required when observe_rows is non-empty
  // Decode steps (one token) attend per this policy's state when set (Recycled Attention).
  RecycledAttentionState* recycled = nullptr;
};

// One sequence of a batched forward pass (Runner::ForwardBatch).
struct BatchSequence {
  absl::Span<const int32_t> tokens;  // at least one: a decode step's token, or a prompt chunk
  KvCache* cache = nullptr;          // the sequence's own cache; tokens append at next_position
  RecycledAttentionState* recycled = nullptr;  // decode steps (one token) only
  std::vector<float>* logits = nullptr;        // when set: the last token's logits [n_vocab]
};

class Runner {
 public:
  // pool may be shared with nothing else running concurrently; n_threads from it.
  Runner(const Model& model, ThreadPool* pool);
  ~Runner();

  // Appends tokens to the cache at cache.next_position onwards and fills logits:
  // [n_vocab] for the last token, or [n_tokens, n_vocab] with all_logits.
  absl::Status Forward(absl::Span<const int32_t> tokens, KvCache& cache,
                       const ForwardOptions& options, std::vector<float>* logits);
  // Same with input embeddings [n_tokens, d_model] instead of token ids (digest tokens).
  absl::Status ForwardEmbeddings(const float* embeddings, int64_t n_tokens, KvCache& cache,
                                 const ForwardOptions& options, std::vector<float>* logits);
  // One pass over several sequences, each on its own cache (continuous batching): every
  // weight product runs once for the decode tokens of all of them (weights read once per
  // step) and once for their prompt chunks; attention runs per sequence over its own cache.
  // A decode token's results are bitwise those of a Forward of it alone, whatever else is in
  // the batch (the dot kernels compute each row as a lone row, matmul.h); prompt rows may
  // round differently from a lone Forward (the product's kernel depends on the row count).
  // Every sequence is checked first (InvalidArgument / OutOfRange naming its index, nothing
  // written). On a stop, caches are partly written as with Forward.
  absl::Status ForwardBatch(absl::Span<const BatchSequence> seqs);
  // One token (decode step): logits [n_vocab].
  absl::Status Decode(int32_t token, KvCache& cache, std::vector<float>* logits,
                      RecycledAttentionState* recycled = nullptr) {
    ForwardOptions options;
    options.recycled = recycled;
    return Forward(absl::MakeConstSpan(&token, 1), cache, options, logits);
  }

  const Model& model() const { return model_; }
  ThreadPool* pool() const { return pool_; }

  // Runs the forward passes on a device from now on (engine/device_forward.h): every pass it
  // Supports; others (a Recycled Attention decode step) on the CPU. Null: all on the CPU.
  // The device outlives the Runner's use of it.
  void set_device(DeviceForward* device) { device_ = device; }
  DeviceForward* device() const { return device_; }

  // Interleaving: long work that has the Runner to itself (a compression's prefill and
  // scoring passes) lets other sequences' steps through while it runs, as a long prompt is
  // prefilled in chunks between decode steps. While set, every CPU pass calls
  // `interleave(rows)` after each of its layers (rows: the pass's row count, so that the
  // callee can meter the work done); the callee may run other passes on this Runner
  // (ForwardBatch of other caches). Those run on working buffers of their own and cannot
  // interleave again, so the pass in progress resumes unchanged: its results, observations
  // and cache are bitwise those of the pass without interleaving. The callee must not touch
  // the interrupted pass's cache. Passes a device runs whole are not interrupted.
  using Interleave = std::function<void(int64_t rows)>;
  void set_interleave(Interleave interleave) { interleave_ = std::move(interleave); }

  // Working buffers keep the size of the largest pass so far (an 8K-token prefill's attention
  // scores alone are hundreds of MiB): the bytes they hold now, and a way to give them back
  // (the scheduler does after a job that grew them past its limit; the next pass allocates
  // again, with the same results).
  int64_t ScratchBytes() const;
  void ReleaseScratch();

  // Cooperative stop (common/stop.h): while set, every forward pass asks it before each layer
  // and between a layer's heavy stages (attention, output projection, each feed-forward
  // product), and returns its status when it is not OK. The cache is then partly written
  // (some layers hold the batch, next_position is not advanced): the caller must discard it.
  // Long loops outside Forward (scoring, statistics, composition) ask CheckStop()
  // themselves. So a stop takes effect within one stage of one layer (the largest: one
  // feed-forward product, or attention over the whole cache); the check is a few calls per
  // layer, nothing next to the layer's matrix products.
  void set_stop(StopFn stop) { stop_ = std::move(stop); }
  const StopFn& stop() const { return stop_; }
  absl::Status CheckStop() const { return ctxcache::CheckStop(stop_); }

  // Sets a stop for a scope and restores the previous one after (a worker's Runner serves
  // one job after another).
  class ScopedStop {
   public:
    ScopedStop(Runner& runner, StopFn stop) : runner_(runner), previous_(runner.stop_) {
      runner_.stop_ = std::move(stop);
    }
    ~ScopedStop() { runner_.stop_ = std::move(previous_); }
    ScopedStop(const ScopedStop&) = delete;
    ScopedStop& operator=(const ScopedStop&) = delete;

   private:
    Runner& runner_;
    StopFn previous_;
  };

 private:
  struct Scratch;
  // Rows [row0, row0 + n) of a pass: one sequence's tokens, on its cache.
  struct Segment {
    KvCache* cache;
    int64_t row0, n;
    const ForwardOptions* options;
  };
  std::unique_ptr<Scratch> NewScratch() const;
  // Calls interleave_ on the second set of working buffers (see set_interleave).
  void RunInterleaved(int64_t rows);
  absl::Status CheckTokens(absl::Span<const int32_t> tokens) const;
  // A pass of n tokens on `cache` fits: shape, at least one token, positions in the window.
  absl::Status CheckCache(const KvCache& cache, int64_t n) const;
  void EmbedTokens(absl::Span<const int32_t> tokens, float* out) const;  // [n, d_model]
  // Every layer over the n rows of scratch x (segments in row order, the first n_decode_rows
  // rows single-token segments), appending to each segment's cache.
  absl::Status Layers(int64_t n, absl::Span<const Segment> segs, int64_t n_decode_rows);
  // Causal attention of rows [row0, row0 + n) (scratch q) over layer's cache entries, into
  // scratch attn; reports observed rows' probabilities. The stop's status when it fires.
  absl::Status Attention(int layer, int64_t row0, int64_t n_tokens, const KvCache& cache,
                         const ForwardOptions& options);
  // A decode step's attention (query q at query_pos, into out) over a recycled subset of the
  // keys.
  void RecycledAttention(int layer, const KvCache& cache, const RecycledAttentionState& rec,
                         const float* q, int32_t query_pos, float* out);

  const Model& model_;
  ThreadPool* pool_;
  std::unique_ptr<Scratch> scratch_;
  // The interleaved passes' buffers while the interrupted pass's wait (made on first use).
  std::unique_ptr<Scratch> interleaved_scratch_;
  Interleave interleave_;
  bool interleaving_ = false;
  StopFn stop_;
  DeviceForward* device_ = nullptr;
};

// The default served model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (tools/fetch_model.sh). It
// answers questions about a document; SmolLM2-135M, the fast model most tests run on, cannot.
inline constexpr char kDefaultModelFile[] = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

// Finds the default model: $CTXCACHE_MODEL, else models/<kDefaultModelFile> under the source
// tree, the current directory or above the executable. NotFound says how to fetch it.
absl::StatusOr<std::string> FindDefaultModel();

}  // namespace ctxcache
