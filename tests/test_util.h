// Helpers shared by the model-level tests: the default model and the other real test models
// (by fetch name) loaded once per test binary (skipped with a visible reason when they have
// not been fetched), fixture file access, a bounds-checked little-endian reader for binary
// fixtures, and the per-model tolerances of the llama.cpp parity tests
// (logit_parity_test.cc, greedy_parity_test.cc), which must agree.
#pragma once

#include <sys/stat.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "engine/model.h"
#include "gtest/gtest.h"

namespace ctxcache::testing {

// ---- Parity tolerances (ctxcache vs references on SmolLM2-135M Q4_1) ----------------------
//
// tools/make_logit_fixture.py stores two references per value: llama.cpp, and a plain fp32
// numpy forward pass over the dequantized weights. None of the three implementations is
// exact, and on this model their rounding is not small:
//  * llama.cpp rounds every 32-element block of the activations to 8 bits (Q8_1/Q8_0, step
//    amax/127) for its Q4_1/Q8_0 dot products and keeps Q, K, V and the attention
//    probabilities in fp16;
//  * ours rounds both GEMM operands to bf16 in prefill (AMX, 2^-9 relative), activations to
//    8 bits in decode, and K/V to fp16;
//  * the fp32 reference rounds only in fp32 (it differs from the same pass in fp64 by at most
//    6.5e-4).
// SmolLM2-135M carries large outlier activations through 30 layers, which turns ~0.3% input
// rounding into logit noise of mean |d| ~0.2. Measured on the fixture's 1548 positions (32
// stored ids + log-sum-exp each, mean per prompt): fp32 reference vs llama.cpp mean 0.15-0.22,
// max 3.3 (6.0 at one id outside the stored ones); a numpy emulation of the 8-bit rounding
// moves fp32 logits by the same amount, so this is the known error source, not a bug in
// either; ours (one batch) vs llama.cpp mean 0.15-0.24, max 3.9 (numbers pos 5, the most
// sensitive position, where the fp32 reference is 6.0 away); ours vs fp32 mean 0.04-0.07, max
// 0.87 at the same position.
// So the check is statistical. The mean over a prompt is the sharp test: a wrong RoPE, norm,
// mask, position or KV layout moves it by whole units, the rounding above by <= 0.24, and
// kMeanAbsTol = 0.35 sits between. kMaxAbsTol = 8 (2x the worst single value measured) only
// catches a gross error at a few positions that the mean would dilute. The same bounds apply
// to both references: either one alone would pass a bug in the other.
inline constexpr float kMaxAbsTol = 8.0f;
inline constexpr float kMeanAbsTol = 0.35f;
// An argmax may legitimately differ from llama.cpp's where llama.cpp's own top-1/top-2 gap is
// smaller than the noise that can close it. Measured (fp32 vs llama.cpp): the shift of the
// top-1 minus top-2 margin is at most 1.5 (p99.9 0.83), and the argmax actually differed only
// at gaps <= 0.27 (31 of 1548 positions). 1.0 excuses those with room and no more.
inline constexpr float kNearTieGap = 1.0f;

// ---- Parity tolerances (ctxcache vs references on Qwen2.5-Coder-0.5B-Instruct Q4_K_M) --------
//
// The same two references (tools/make_logit_fixture.py --model qwen2.5-0.5b; the fp32 numpy
// pass handles qwen2's Q/K/V biases and NEOX RoPE at freq_base 1e6), on a model whose weights
// are mostly Q5_0 with Q4_K/Q6_K/Q8_0 (the file has its own Q8_0 output head). Qwen2.5 has no
// SmolLM2-style outlier activations, so the same rounding costs far less here. Measured on
// the fixture's 680 positions (32 stored ids + log-sum-exp each, mean per prompt): fp32
// reference vs llama.cpp mean 0.051-0.063, max 0.59 (0.67 over the whole vocabulary); ours
// (one batch; bf16 GEMM operands on AVX-512 BF16, as on AMX) vs llama.cpp mean 0.053-0.065, max
// 0.61 (long pos 5, where the fp32 reference is 0.59 away too); ours vs fp32 mean 0.012-0.017,
// max 0.11; decoding (8-bit activations) the second half of the long prompt: vs fp32 mean
// 0.023, max 0.17; vs llama.cpp mean 0.057. At CTXCACHE_CPU=avx2 (fp32 sgemm prefill) ours vs
// fp32 is mean 0.002, max 0.025 batched; vs llama.cpp unchanged.
// What bugs cost, measured with the fp32 reference on the code and long prompts (mean |d| over
// the whole vocabulary): q/k bias dropped 3.0-3.7, v bias dropped 3.6-3.8, adjacent-pair
// instead of NEOX RoPE 1.3-2.0, freq_base 1e4 instead of 1e6 0.44-0.51 (max 9-16); every one
// has a max |d| of 9-40.
// So kQwenMeanAbsTol = 0.15 is 2.3x the worst mean measured (anything that rounds activations
// to 8 bits as llama.cpp does lands near 0.06) and a third of the subtlest bug's; kQwenMaxAbsTol
// = 1.5 is 2.5x the worst single value and far below every bug's max. (The SmolLM2 bounds,
// 0.35 and 8, would catch the freq_base bug on this model by a margin of 1.3x only.)
// Near-ties: the top-1 minus top-2 margin moves by at most 0.41 between the references (p99.9
// 0.40), and the argmax differed from llama.cpp's (ours and fp32 alike) only at llama.cpp gaps
// <= 0.272 (logits) and <= 0.101 (greedy steps); 0.5 excuses those with room.
inline constexpr float kQwenMaxAbsTol = 1.5f;
inline constexpr float kQwenMeanAbsTol = 0.15f;
inline constexpr float kQwenNearTieGap = 0.5f;

// One model's bounds, for the tests parameterized over models.
struct ParityTolerance {
  float max_abs;   // every compared value
  float mean_abs;  // mean over one prompt (or one decode run)
  float near_tie;  // llama.cpp top-1/top-2 gap below which an argmax may differ
};
inline constexpr ParityTolerance kSmolLM2Tolerance{kMaxAbsTol, kMeanAbsTol, kNearTieGap};
inline constexpr ParityTolerance kQwenTolerance{kQwenMaxAbsTol, kQwenMeanAbsTol, kQwenNearTieGap};

// ---- Files ---------------------------------------------------------------------------------

inline std::string TestDataPath(const std::string& relative) {
  return std::string(CTXCACHE_TEST_DATA) + "/" + relative;
}

inline absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream data;
  data << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("read error on ", path));
  return data.str();
}

// Sequential little-endian reader over an in-memory fixture. Every read is bounds-checked;
// after the first short read ok() is false and all further reads yield zeros, so a parser can
// read a whole record and check once.
class ByteReader {
 public:
  explicit ByteReader(std::string_view data) : data_(data) {}

  bool ok() const { return ok_; }
  size_t remaining() const { return data_.size() - pos_; }

  int32_t I32() { return Scalar<int32_t>(); }
  float F32() { return Scalar<float>(); }
  // A fixed-width NUL-padded text field.
  std::string FixedString(size_t width) {
    if (!Has(width)) return {};
    std::string_view field = data_.substr(pos_, width);
    pos_ += width;
    return std::string(field.substr(0, field.find('\0')));
  }
  template <typename T>
  std::vector<T> Array(int64_t n) {
    if (n < 0 || !Has(static_cast<size_t>(n) * sizeof(T))) return std::vector<T>(0);
    std::vector<T> out(static_cast<size_t>(n));
    std::memcpy(out.data(), data_.data() + pos_, out.size() * sizeof(T));
    pos_ += out.size() * sizeof(T);
    return out;
  }

 private:
  bool Has(size_t n) {
    if (ok_ && n <= remaining()) return true;
    ok_ = false;
    return false;
  }
  template <typename T>
  T Scalar() {
    T v{};
    if (Has(sizeof(T))) {
      std::memcpy(&v, data_.data() + pos_, sizeof(T));  // x86-64 and aarch64: little-endian
      pos_ += sizeof(T);
    }
    return v;
  }

  std::string_view data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// ---- Logits ----------------------------------------------------------------------------------

// Index of the largest value; the lowest index wins ties (numpy.argmax, as in the fixtures).
inline int32_t Argmax(absl::Span<const float> v) {
  int32_t best = 0;
  for (size_t i = 1; i < v.size(); ++i) {
    if (v[i] > v[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

// ---- The real models ---------------------------------------------------------------------------

using SharedModel = absl::StatusOr<std::unique_ptr<Model>>;

// The fast test model, loaded once per test binary: $CTXCACHE_MODEL when set (ctest sets it
// to SmolLM2-135M, tests/CMakeLists.txt), else SmolLM2-135M from models/. Not the served
// default (Qwen2.5-Coder-0.5B, FindDefaultModel): most suites need a real model, not a good
// one, and SmolLM2 runs them 4x faster. NotFound when it has not been fetched.
inline absl::StatusOr<std::string> FindTestModel(std::string_view name);
inline const SharedModel& SharedFastModel() {
  static const auto* const model = [] {
    const char* env = std::getenv("CTXCACHE_MODEL");
    absl::StatusOr<std::string> path =
        env != nullptr && *env != '\0' ? absl::StatusOr<std::string>(env) : FindTestModel("smollm2");
    if (!path.ok()) return new SharedModel(path.status());
    return new SharedModel(Model::Load(*path));
  }();
  return *model;
}

// The real models the tests know by their tools/fetch_model.sh names, and their files.
inline constexpr char kSmolLM2[] = "smollm2";      // the fast test model (SharedFastModel)
inline constexpr char kQwen25[] = "qwen2.5-0.5b";  // Qwen2.5-Coder-0.5B-Instruct Q4_K_M
inline const char* TestModelFile(std::string_view name) {
  if (name == kSmolLM2) return "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (name == kQwen25) return "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
  return nullptr;
}

// Both real models, for INSTANTIATE_TEST_SUITE_P over model names; TestModelLabel names the
// instances ("smollm2", "qwen2_5_0_5b": gtest allows only letters, digits and '_').
inline auto TestModelNames() { return ::testing::Values(kSmolLM2, kQwen25); }
inline std::string TestModelLabel(const ::testing::TestParamInfo<const char*>& info) {
  std::string label = info.param;
  for (char& ch : label) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return label;
}

// The llama.cpp parity bounds of a real model (above), for tests that reuse them.
inline const ParityTolerance& ToleranceFor(std::string_view name) {
  return name == kQwen25 ? kQwenTolerance : kSmolLM2Tolerance;
}

// Finds a named model's GGUF: models/FILE under the source tree or the current directory.
// NotFound says how to fetch it. Unlike the default model, CTXCACHE_MODEL does not redirect
// it: a test that asks for Qwen means Qwen.
inline absl::StatusOr<std::string> FindTestModel(std::string_view name) {
  const char* file = TestModelFile(name);
  const std::string n(name);  // this absl's StrCat takes no std::string_view
  if (file == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown model ", n));
  const std::vector<std::string> candidates = {absl::StrCat(CTXCACHE_SOURCE_DIR, "/models/", file),
                                               absl::StrCat("models/", file)};
  for (const std::string& c : candidates) {
    struct stat st;
    if (stat(c.c_str(), &st) == 0 && S_ISREG(st.st_mode)) return c;
  }
  return absl::NotFoundError(absl::StrCat("model ", n, " (", file, ") not found (looked in ",
                                          absl::StrJoin(candidates, ", "),
                                          "); run tools/fetch_model.sh ", n));
}

// A model by name, loaded once per test binary; "smollm2" is SharedFastModel() (so
// CTXCACHE_MODEL still redirects it). NotFound when it has not been fetched.
inline const SharedModel& SharedTestModel(std::string_view name) {
  if (name == kSmolLM2) return SharedFastModel();
  static auto* const models = new std::map<std::string, SharedModel, std::less<>>();
  auto it = models->find(name);
  if (it == models->end()) {
    absl::StatusOr<std::string> path = FindTestModel(name);
    SharedModel model = path.ok() ? Model::Load(*path) : SharedModel(path.status());
    it = models->emplace(std::string(name), std::move(model)).first;
  }
  return it->second;
}

// Skips the current test with the reason when `model` was not fetched, unless
// CTXCACHE_REQUIRE_MODEL=1, which CI sets after fetching the models so that a lost model
// cannot turn the model suites into silent skips; a model that exists but fails to load is a
// failure. Call from SetUp and return when IsSkipped() or HasFatalFailure().
inline void RequireModel(const SharedModel& model, std::string_view what) {
  if (model.ok()) return;
  const char* require = std::getenv("CTXCACHE_REQUIRE_MODEL");
  const bool required = require != nullptr && std::string_view(require) == "1";
  if (absl::IsNotFound(model.status()) && !required) {
    GTEST_SKIP() << what << " not available: " << model.status().message();
  }
  FAIL() << "loading " << what << ": " << model.status();
}

// Base fixture for tests that need a real model, the fast one (see RequireModel).
class FastModelTest : public ::testing::Test {
 protected:
  void SetUp() override { RequireModel(SharedFastModel(), "test model SmolLM2-135M"); }
  static const Model& model() { return **SharedFastModel(); }
};

}  // namespace ctxcache::testing
