// The generation loop: prefill a prompt on top of a KV cache, then sample token by token,
// streaming UTF-8-safe text deltas and honouring stop strings, EOS and max_tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace ctxcache {

// Upper bounds (ValidateGenerateParams; GetModelInfo reports them). The stop strings are
// matched against every decoded piece, so their count and length multiply decode's cost
// (200k of them slowed decoding 2.4x).
inline constexpr int kMaxGenerateTokens = 1 << 20;
inline constexpr int kMaxStopStrings = 64;
inline constexpr int kMaxStopBytes = 256;  // per stop string

struct GenerateParams {
  SamplingParams sampling;
  int max_tokens = 256;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  bool ignore_eos = false;
  DecodePolicy decode;            // full attention, or Recycled Attention
};

enum class FinishReason { kLength, kStop, kEndOfGeneration, kCancelled, kContextFull };
std::string_view FinishReasonName(FinishReason r);

struct GenerateResult {
  std::string text;               // everything streamed (stop string excluded)
  std::vector<int32_t> tokens;    // generated ids (a matched stop string's tokens included)
  FinishReason finish = FinishReason::kLength;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;     // prompt prefill, up to the first sampled token
  double decode_seconds = 0;      // the rest
  int64_t full_attention_steps = 0;      // per layer, with a recycled decode policy
  int64_t recycled_attention_steps = 0;
};

// Called with each text delta; return false to cancel.
using TextCallback = std::function<bool(std::string_view delta)>;

absl::Status ValidateGenerateParams(const GenerateParams& p);

// Prefills `prompt` on top of `cache` (which may already hold context) and generates.
absl::StatusOr<GenerateResult> Generate(Runner& runner, KvCache& cache,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateParams& params, const TextCallback& on_text);

// How Generate runs a forward pass: `tokens` appended to `cache`, the last token's logits into
// *logits when it is set. A Runner's Forward, or a step of a worker's continuous batch
// (server/scheduler.h).
using ForwardFn =
    std::function<absl::Status(absl::Span<const int32_t> tokens, KvCache& cache,
                               RecycledAttentionState* recycled, std::vector<float>* logits)>;
// The same through `forward`, the prompt in passes of at most prompt_chunk tokens.
absl::StatusOr<GenerateResult> Generate(const Model& model, const ForwardFn& forward,
                                        int64_t prompt_chunk, KvCache& cache,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateParams& params, const TextCallback& on_text);

// Streams text while holding back any suffix that could still become a stop string.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stop) : stop_(std::move(stop)) {}
  // Adds text; returns what can be emitted now. Sets *stopped when a stop string completed
  // (the returned text then ends right before it).
  std::string Push(std::string_view text, bool* stopped);
  // Whatever was held back (call at the end when no stop string matched).
  std::string Flush();

 private:
  std::vector<std::string> stop_;
  std::string held_;
};

}  // namespace ctxcache
