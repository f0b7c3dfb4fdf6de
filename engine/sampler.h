// Token sampling: repetition penalty, top-k, top-p, min-p, temperature, seeded draws.
// The order follows llama.cpp's default chain (penalties, top-k, top-p, min-p, temperature,
// draw). Temperature 0 is greedy (argmax after penalties).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace ctxcache {

// Upper bounds (ValidateSamplingParams): beyond any vocabulary, and a penalty window whose
// per-step set stays cheap.
inline constexpr int kMaxSamplingTopK = 1 << 20;
inline constexpr int kMaxRepeatLastN = 65536;

struct SamplingParams {
  float temperature = 0.8f;
  int top_k = 40;                   // 0 = off
  float top_p = 0.95f;              // 1 = off
  float min_p = 0.05f;              // 0 = off
  float repetition_penalty = 1.0f;  // 1 = off; > 1 discourages repeats
  int repeat_last_n = 64;           // window of recent tokens the penalty looks at
  uint64_t seed = 0;

  static SamplingParams Greedy() {
    SamplingParams p;
    p.temperature = 0.f;
    return p;
  }
};

// InvalidArgument naming the bad field and its allowed range.
absl::Status ValidateSamplingParams(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token. logits [n_vocab] is used as scratch; history is the sequence so
  // far (prompt and generated), for the repetition penalty.
  int32_t Sample(std::vector<float>& logits, absl::Span<const int32_t> history);

 private:
  struct Candidate {
    float logit;
    int32_t id;
  };
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<Candidate> candidates_;
};

}  // namespace ctxcache
