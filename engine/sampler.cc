#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "absl/strings/str_cat.h"

namespace ctxcache {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  auto bad = [](const char* field, double v, const char* range) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling parameter ", field, " = ", v, " is invalid; allowed: ", range));
  };
  if (!(p.temperature >= 0.f && p.temperature <= 100.f)) {
    return bad("temperature", p.temperature, "0 (greedy) to 100");
  }
  if (p.top_k < 0 || p.top_k > kMaxSamplingTopK) {
    return bad("top_k", p.top_k, "0 (disables) to 1048576");
  }
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) return bad("top_p", p.top_p, "(0, 1]");
  if (!(p.min_p >= 0.f && p.min_p <= 1.f)) return bad("min_p", p.min_p, "[0, 1]");
  if (!(p.repetition_penalty > 0.f && p.repetition_penalty <= 10.f)) {
    return bad("repetition_penalty", p.repetition_penalty, "(0, 10]");
  }
  if (p.repeat_last_n < 0 || p.repeat_last_n > kMaxRepeatLastN) {
    return bad("repeat_last_n", p.repeat_last_n, "0 to 65536");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(std::vector<float>& logits, absl::Span<const int32_t> history) {
  const int32_t n_vocab = static_cast<int32_t>(logits.size());
  if (params_.repetition_penalty != 1.f && params_.repeat_last_n > 0) {
    // As in llama.cpp (and CTRL): divide positive logits, multiply negative ones, once per
    // distinct recent token.
    const size_t from = history.size() > static_cast<size_t>(params_.repeat_last_n)
                            ? history.size() - params_.repeat_last_n
                            : 0;
    std::unordered_set<int32_t> seen(history.begin() + from, history.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= n_vocab) continue;
      float& l = logits[id];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  if (params_.temperature <= 0.f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }

  candidates_.resize(n_vocab);
  for (int32_t i = 0; i < n_vocab; ++i) candidates_[i] = {logits[i], i};
  auto by_logit = [](const Candidate& a, const Candidate& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };
  size_t n = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
    n = params_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + n, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  // Probabilities at temperature 1 for the nucleus and min-p cuts (llama.cpp applies them
  // before temperature in its default chain).
  std::vector<double> p(n);
  const float top = candidates_[0].logit;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += p[i] = std::exp(static_cast<double>(candidates_[i].logit - top));
  if (params_.top_p < 1.f) {
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i] / sum;
      if (cum >= params_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  if (params_.min_p > 0.f) {
    // p[0] is the largest (exp(0) = 1): keep candidates with p >= min_p * p_max.
    size_t keep = 1;
    while (keep < n && p[keep] >= params_.min_p) ++keep;
    n = keep;
  }
  std::vector<double> w(n);
  double total = 0;
  for (size_t i = 0; i < n; ++i) {
    total += w[i] = std::exp(static_cast<double>(candidates_[i].logit - top) / params_.temperature);
  }
  std::uniform_real_distribution<double> uni(0.0, total);
  double u = uni(rng_);
  for (size_t i = 0; i < n; ++i) {
    if (u < w[i]) return candidates_[i].id;
    u -= w[i];
  }
  return candidates_[n - 1].id;
}

}  // namespace ctxcache
