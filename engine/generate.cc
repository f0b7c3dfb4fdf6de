#include "engine/generate.h"

#include <chrono>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ctxcache {

std::string_view FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kEndOfGeneration: return "eos";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kContextFull: return "context_full";
  }
  return "unknown";
}

absl::Status ValidateGenerateParams(const GenerateParams& p) {
  RETURN_IF_ERROR(ValidateSamplingParams(p.sampling));
  RETURN_IF_ERROR(p.decode.Validate());
  if (p.max_tokens < 0 || p.max_tokens > kMaxGenerateTokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens = ", p.max_tokens, " is invalid; allowed: 0 to ", kMaxGenerateTokens));
  }
  if (p.stop.size() > static_cast<size_t>(kMaxStopStrings)) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop has ", p.stop.size(), " strings; allowed at most ", kMaxStopStrings));
  }
  for (size_t i = 0; i < p.stop.size(); ++i) {
    if (p.stop[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop[", i, "] is empty; stop strings must not be empty"));
    }
    if (p.stop[i].size() > static_cast<size_t>(kMaxStopBytes)) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is ", p.stop[i].size(),
                                                     " bytes; allowed at most ", kMaxStopBytes));
    }
  }
  return absl::OkStatus();
}

std::string StopMatcher::Push(std::string_view text, bool* stopped) {
  *stopped = false;
  held_.append(text);
  size_t cut = std::string::npos;
  for (const std::string& s : stop_) {
    const size_t at = held_.find(s);
    if (at != std::string::npos && at < cut) cut = at;
  }
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest suffix of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stop_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return out;
}

absl::StatusOr<GenerateResult> Generate(Runner& runner, KvCache& cache,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateParams& params, const TextCallback& on_text) {
  // The prompt in chunks (as compression prefills documents, compress.h kPrefillChunk): one
  // pass over a long prompt makes stages so large (at 8K tokens, a single feed-forward product
  // of tens of GFLOP) that the runner's stop could not react quickly. Prompts up to a chunk
  // run in one pass.
  constexpr int64_t kPromptChunk = 2048;
  auto forward = [&runner](absl::Span<const int32_t> tokens, KvCache& c,
                           RecycledAttentionState* recycled, std::vector<float>* logits) {
    ForwardOptions options;
    options.recycled = recycled;
    return runner.Forward(tokens, c, options, logits);
  };
  return Generate(runner.model(), forward, kPromptChunk, cache, prompt, params, on_text);
}

absl::StatusOr<GenerateResult> Generate(const Model& model, const ForwardFn& forward,
                                        int64_t prompt_chunk, KvCache& cache,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateParams& params, const TextCallback& on_text) {
  RETURN_IF_ERROR(ValidateGenerateParams(params));
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (prompt_chunk < 1) return absl::InvalidArgumentError("prompt_chunk must be positive");
  const Tokenizer& tok = model.tokenizer();
  const int64_t n_ctx = model.config().n_ctx_train;
  if (cache.next_position + static_cast<int64_t>(prompt.size()) > n_ctx) {
    return absl::OutOfRangeError(absl::StrCat(
        "prompt of ", prompt.size(), " tokens after ", cache.next_position,
        " context positions exceeds the model's context window of ", n_ctx, " tokens"));
  }
  using Clock = std::chrono::steady_clock;
  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  std::vector<float> logits;
  Sampler sampler(params.sampling);
  IncrementalDecoder decoder(tok);
  StopMatcher stop(params.stop);
  std::unique_ptr<RecycledAttentionState> recycled;
  if (params.decode.kind == DecodePolicy::Kind::kRecycled) {
    const ModelConfig& c = model.config();
    recycled = std::make_unique<RecycledAttentionState>(params.decode, c.n_layers, c.n_kv_heads,
                                                        c.n_heads, c.head_dim);
  }

  const auto t0 = Clock::now();
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  for (int64_t b = 0; b < n_prompt; b += prompt_chunk) {
    const int64_t e = std::min(n_prompt, b + prompt_chunk);
    RETURN_IF_ERROR(
        forward(prompt.subspan(b, e - b), cache, nullptr, e == n_prompt ? &logits : nullptr));
  }
  auto t_first = Clock::now();
  bool cancelled = false;
  auto emit = [&](const std::string& text) {
    if (text.empty() || cancelled) return;
    result.text += text;
    if (on_text && !on_text(text)) cancelled = true;
  };
  result.finish = FinishReason::kLength;
  for (int i = 0; i < params.max_tokens; ++i) {
    const int32_t id = sampler.Sample(logits, history);
    if (i == 0) t_first = Clock::now();
    if (!params.ignore_eos && tok.IsEndOfGeneration(id)) {
      result.finish = FinishReason::kEndOfGeneration;
      break;
    }
    result.tokens.push_back(id);
    history.push_back(id);
    bool stopped = false;
    emit(stop.Push(decoder.Push(id), &stopped));
    if (stopped) {
      result.finish = FinishReason::kStop;
      break;
    }
    if (cancelled) {
      result.finish = FinishReason::kCancelled;
      break;
    }
    if (i + 1 == params.max_tokens) break;
    if (cache.next_position >= n_ctx) {
      result.finish = FinishReason::kContextFull;
      break;
    }
    RETURN_IF_ERROR(forward(absl::MakeConstSpan(&id, 1), cache, recycled.get(), &logits));
  }
  if (result.finish != FinishReason::kStop && result.finish != FinishReason::kCancelled) {
    bool stopped = false;
    std::string tail = stop.Push(decoder.Flush(), &stopped);
    if (stopped) result.finish = FinishReason::kStop;
    emit(tail + (stopped ? "" : stop.Flush()));
  }
  const auto t_end = Clock::now();
  if (recycled) {
    result.full_attention_steps = recycled->full_steps();
    result.recycled_attention_steps = recycled->recycled_steps();
  }
  result.prefill_seconds = std::chrono::duration<double>(t_first - t0).count();
  result.decode_seconds = std::chrono::duration<double>(t_end - t_first).count();
  return result;
}

}  // namespace ctxcache
