// CompressionSpec validation and its canonical parameter string (part of every cache key, so
// it must change whenever a knob that changes the output changes, and never otherwise).
#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/compress/compress.h"

namespace ctxcache {
namespace {

// Every method with its output version: the one table (the engine stamps it on each
// CompressedContext, the server hashes it into each context id). Bump a method's version when
// its output changes for the same input and params, so that cached contexts of the old
// version miss. compress_test's MethodVersionTest fails when a method's output changes without
// a bump (golden digests per method and version in tests/data/method_digests.txt).
//  expected_attention 2: RecoverQueries centres the keys (a better query fit on models with
//  large K biases, e.g. Qwen2.5).
//  finch 2: the full budget after every chunk, each chunk judged in the next chunk's pass,
//  scores pooled over positions (finch.cc: it kept about half the answer snapkv keeps).
//  kvzip 2: head_budget "global" by default (KVzip's one threshold over every layer and head;
//  docs/quality.md).
struct MethodInfo {
  const char* name;
  uint32_t version;
};
constexpr MethodInfo kMethodTable[] = {
    {"none", 1},  {"streaming", 1},          {"snapkv", 1}, {"finch", 2},
    {"expected_attention", 2}, {"kvzip", 2}, {"anchor", 1}, {"digest", 1},
};
constexpr size_t kMethodCount = sizeof(kMethodTable) / sizeof(kMethodTable[0]);
constexpr std::array<const char*, kMethodCount> kMethods = [] {
  std::array<const char*, kMethodCount> names{};
  for (size_t i = 0; i < kMethodCount; ++i) names[i] = kMethodTable[i].name;
  return names;
}();

bool UsesWindow(const std::string& m) { return m == "anchor"; }

// Methods whose scores differ between heads in comparable units (compress.h head_budget).
bool ScoresHeadsApart(const std::string& m) {
  return m == "snapkv" || m == "finch" || m == "expected_attention" || m == "kvzip";
}

// Escapes the separator list so that the params string stays one printable line.
std::string Escaped(const std::string& s) {
  std::string out;
  out.reserve(2 * s.size());
  for (char c : s) {
    const bool special = c == '\n' || c == '\t' || c == ';' || c == '=' || c == '\\';
    if (special) out.push_back('\\');
    out.push_back(c == '\n' ? 'n' : (c == '\t' ? 't' : c));
  }
  return out;
}

// The shortest decimal that reads back as exactly `v` (std::to_chars): two different doubles
// never print alike. absl::StrCat prints 6 significant digits, so ratio 3.999999 and 4 shared
// one cache key while keeping different budgets (issue 14). Short values print as before
// ("4", "3.5", "0.2"), so their keys did not change.
std::string ExactDecimal(double v) {
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

}  // namespace

absl::Span<const char* const> CompressionMethods() { return kMethods; }

uint32_t MethodVersion(std::string_view method) {
  for (const MethodInfo& m : kMethodTable) {
    if (method == m.name) return m.version;
  }
  return 0;
}

std::string_view DefaultHeadBudget(std::string_view method) {
  return method == "kvzip" ? "global" : "uniform";
}

std::string CompressionSpec::HeadBudget() const {
  if (!head_budget.empty()) return head_budget;
  // per_layer keeps one set per layer: no head budget but uniform applies to it.
  return per_layer ? "uniform" : std::string(DefaultHeadBudget(method));
}

absl::Status CompressionSpec::Validate() const {
  if (std::find_if(std::begin(kMethods), std::end(kMethods),
                   [&](const char* m) { return method == m; }) == std::end(kMethods)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown compression method \"", method,
                                                   "\"; expected one of ",
                                                   absl::StrJoin(kMethods, ", ")));
  }
  if (!std::isfinite(ratio) || ratio < 0 || ratio > kMaxRatio) {
    return absl::InvalidArgumentError(absl::StrCat("ratio must be a finite number > 1 and <= ",
                                                   kMaxRatio, " (e.g. 4 keeps 1/4), got ", ratio));
  }
  if (budget < 0 || budget > kMaxCompressBudget) {
    return absl::InvalidArgumentError(absl::StrCat("budget must be > 0 and <= ", kMaxCompressBudget,
                                                   " entries per head when given, got ", budget));
  }
  if (method == "none") {
    if (ratio != 0 || budget != 0) {
      return absl::InvalidArgumentError("method \"none\" keeps everything: give no ratio/budget");
    }
  } else {
    if (ratio != 0 && budget != 0) {
      return absl::InvalidArgumentError("give either ratio or budget, not both");
    }
    if (ratio == 0 && budget == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "method \"", method, "\" needs a ratio > 1 (keep 1/ratio) or a token budget > 0"));
    }
    if (ratio != 0 && ratio <= 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("ratio must be > 1 (it is the compression factor), got ", ratio));
    }
  }
  // An integer knob outside [lo, hi]: InvalidArgument naming it and its range.
  auto out_of = [](const char* name, int64_t v, int64_t lo, int64_t hi, const char* what) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " = ", v, " is out of range: allowed ", lo, " to ", hi, " ", what));
  };
  if (n_sink < 0 || n_sink > kMaxNSink) return out_of("n_sink", n_sink, 0, kMaxNSink, "tokens");
  if (window < 0 || window > kMaxWindow) return out_of("window", window, 0, kMaxWindow, "tokens");
  if (budget > 0 && n_sink > budget && method != "digest") {
    return absl::InvalidArgumentError(
        absl::StrCat("n_sink (", n_sink, ") exceeds the budget (", budget, ")"));
  }
  if (chunk < 16 || chunk > kMaxChunk) return out_of("chunk", chunk, 16, kMaxChunk, "tokens");
  if (kernel < 1 || kernel % 2 == 0 || kernel > kMaxKernel) {
    return absl::InvalidArgumentError(absl::StrCat("kernel = ", kernel,
                                                   " is invalid: allowed odd numbers 1 to ",
                                                   kMaxKernel, " (1 disables pooling)"));
  }
  if (pooling != "avg" && pooling != "max") {
    return absl::InvalidArgumentError("pooling must be \"avg\" or \"max\"");
  }
  if (max_positions < 0 || max_positions > kMaxPositions) {
    return out_of("max_positions", max_positions, 0, kMaxPositions, "positions (0 = the window)");
  }
  if (n_future < 1 || n_future > kMaxNFuture) {
    return out_of("n_future", n_future, 1, kMaxNFuture, "positions");
  }
  if (static_cast<int64_t>(separators.size()) > kMaxSeparatorsBytes) {
    return absl::InvalidArgumentError(absl::StrCat("separators is ", separators.size(),
                                                   " bytes; allowed at most ", kMaxSeparatorsBytes,
                                                   " (each byte counts once)"));
  }
  if (absl::StatusOr<KvDtype> d = ParseKvDtype(kv_dtype); !d.ok()) return d.status();
  const std::string hb = HeadBudget();
  if (hb != "uniform" && hb != "adaptive" && hb != "global") {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_budget must be \"uniform\" (every KV head keeps the budget), \"adaptive\" "
        "(Ada-KV: the heads of a layer share its budget by score) or \"global\" (KVzip: every "
        "head of every layer shares the model's budget by score), got \"",
        hb, "\""));
  }
  if (hb != "uniform") {
    if (!ScoresHeadsApart(method)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "head_budget \"", hb,
          "\" needs a method that scores each KV head's entries "
          "(snapkv, finch, expected_attention, kvzip); \"",
          method,
          method == "none" ? "\" keeps everything"
                           : "\" scores by position, the same in every head, so it would "
                             "change nothing"));
    }
    if (per_layer) {
      return absl::InvalidArgumentError(absl::StrCat(
          "head_budget \"", hb,
          "\" gives each KV head its own share of the budget, per_layer keeps one set shared "
          "by the heads of a layer: use one or the other"));
    }
    if (hb == "global" && method == "finch") {
      return absl::InvalidArgumentError(
          "head_budget \"global\" is not available for finch, which selects chunk by chunk "
          "(each chunk's survivors bound what a head may hold): use \"adaptive\"");
    }
    if (!(head_budget_alpha >= 0 && head_budget_alpha <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("head_budget_alpha must be in [0, 1] (the share of its unforced budget "
                       "every head keeps), got ",
                       head_budget_alpha));
    }
  } else if (head_budget_alpha != CompressionSpec().head_budget_alpha) {
    return absl::InvalidArgumentError(
        "head_budget_alpha applies only with head_budget \"adaptive\" or \"global\"");
  }
  if (method == "digest") {
    if (per_layer) {
      return absl::InvalidArgumentError(
          "per_layer selects KV entries; method \"digest\" keeps none (it writes digest vectors)");
    }
    if (kv_dtype != "fp16") {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv_dtype \"", kv_dtype, "\" quantizes kept KV entries; method \"digest\" stores "
          "digest vectors (at fp16): leave kv_dtype at fp16"));
    }
    if (budget > kMaxDigestsPerChunk) {
      return absl::InvalidArgumentError(absl::StrCat(
          "budget = ", budget, " digest tokens per chunk is out of range: allowed 1 to ",
          kMaxDigestsPerChunk, " (and at most the compressor's digest_count)"));
    }
    if (!compressor.empty() && compressor.size() != 64) {
      return absl::InvalidArgumentError("compressor must be a digest compressor's hex SHA-256");
    }
  } else if (!compressor.empty()) {
    return absl::InvalidArgumentError("compressor applies only to method \"digest\"");
  }
  if (method == "anchor" && separators.empty()) {
    return absl::InvalidArgumentError("anchor needs at least one separator character");
  }
  return absl::OkStatus();
}

std::string CompressionSpec::CanonicalParams() const {
  std::map<std::string, std::string> kv;  // sorted keys
  if (method != "none") {
    if (ratio != 0) kv["ratio"] = ExactDecimal(ratio);
    if (budget != 0) kv["budget"] = absl::StrCat(budget);
    kv["per_layer"] = absl::StrCat(per_layer ? 1 : 0);
    kv["n_sink"] = absl::StrCat(n_sink);
  }
  // Only when not the default, so that the keys of uniform contexts stay what they were.
  if (const std::string hb = HeadBudget(); hb != "uniform") {
    kv["head_budget"] = hb;
    kv["head_budget_alpha"] = ExactDecimal(head_budget_alpha);
  }
  if (UsesWindow(method)) kv["window"] = absl::StrCat(window);
  if (method == "finch" || method == "kvzip") kv["chunk"] = absl::StrCat(chunk);
  if (method == "finch" && max_positions > 0) kv["max_positions"] = absl::StrCat(max_positions);
  if (method == "snapkv") {
    kv["kernel"] = absl::StrCat(kernel);
    kv["pooling"] = pooling;
  }
  if (method == "expected_attention") kv["n_future"] = absl::StrCat(n_future);
  if (method == "digest") {
    kv.erase("per_layer");
    kv.erase("n_sink");
    kv["compressor"] = compressor;
  }
  if (method == "anchor") kv["separators"] = Escaped(separators);
  // Only when not the default, so that every fp16 context keeps the key it always had.
  if (kv_dtype != "fp16") kv["kv_dtype"] = kv_dtype;
  return absl::StrJoin(kv, ";", absl::PairFormatter("="));
}

}  // namespace ctxcache
