// ctxcache-eval: the quality harness's runner. For each RULER-style sample (eval/ruler.py) it
// answers the question from the full context and from every compressed context, and writes
// one JSON line per (sample, method, ratio) with the string-match score, the teacher-forced
// log-likelihood of the reference answer and the KL divergence of the next-token
// distributions from the full context's, over the answer span.
//
// The work is shared the way a cache shares it: the document is prefilled once per sample;
// each single-pass method scores that prefill once and selects at every ratio
// (ScoreDocument / SelectScored); only finch, which selects while it prefills, runs once per
// ratio. Method "query_select" is "prefill once, select per query" (ContextRef.select): the
// full prefill scored by the request's own tokens (SelectForQuery) at every ratio. Output
// lines are appended per finished sample, so an interrupted run resumes where it stopped
// (samples this model already has in --out are skipped). --head-budget runs every method with
// each listed head budget (CompressionSpec::head_budget; methods that do not take one skip
// it), from the same scores; --kv-dtypes stores each selection every listed way (quantizing
// the selected fp16 entries, as Compress does); rows say which ("head_budget", "kv_dtype").
//
//   ctxcache-eval --samples eval/work/samples.jsonl --out eval/work/raw.jsonl
//                 [--methods streaming,snapkv,...,query_select] [--ratios 2,4,8,16,32]
//                 [--kv-dtypes fp16,int8,int4] [--head-budget uniform,adaptive,global]
//                 [--recycled [--recycled-stride S,...] [--recycled-topk K,...]] [--threads N]
//                 [--model PATH] [--limit N] [--digest-compressor FILE]
// Method "digest" (digest form) compresses each ratio with the compressor given, and the
// model reads the digests before the question (stored bytes: the digest's).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/chat_template.h"
#include "engine/cpu/blas_kernels.h"
#include "engine/compress/compress.h"
#include "engine/generate.h"
#include "engine/icformer.h"
#include "engine/model.h"
#include "nlohmann/json.hpp"

namespace ctxcache {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Options {
  std::string samples, out, model;
  std::string digest_compressor;  // method "digest" needs it
  std::vector<std::string> methods = {"streaming", "snapkv",   "finch",
                                      "expected_attention", "kvzip", "anchor"};
  std::vector<double> ratios = {2, 4, 8, 16, 32};
  std::vector<std::string> kv_dtypes = {"fp16"};
  std::vector<std::string> head_budgets = {"uniform"};
  bool recycled = false;
  // Recycled Attention settings, every (stride, top-K) pair evaluated on each sample's one
  // prefill: stride 10 and top-K 1/8 of the keys (0) unless told.
  std::vector<int> recycled_strides = {10};
  std::vector<int64_t> recycled_topks = {0};
  int threads = 0;
  int limit = 0;
};

constexpr char kUsage[] =
    "usage: ctxcache-eval --samples FILE --out FILE [--methods a,b,...] [--ratios 2,4,...]\n"
    "                     [--kv-dtypes fp16,int8,int4] [--head-budget uniform,adaptive,global]\n"
    "                     [--recycled [--recycled-stride S,...] [--recycled-topk K,...]]\n"
    "                     [--threads N]\n"
    "                     [--model PATH] [--limit N] [--digest-compressor FILE]\n";

// Whether `method` takes `head_budget` (streaming and anchor take only "uniform").
absl::Status CheckHeadBudget(const std::string& method, const std::string& head_budget) {
  CompressionSpec spec;
  spec.method = method;
  spec.ratio = 2;
  spec.head_budget = head_budget;
  return spec.Validate();
}

absl::StatusOr<Options> ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> absl::StatusOr<std::string> {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(a, " needs a value"));
      return std::string(argv[++i]);
    };
    if (a == "--samples") {
      ASSIGN_OR_RETURN(o.samples, value());
    } else if (a == "--out") {
      ASSIGN_OR_RETURN(o.out, value());
    } else if (a == "--model") {
      ASSIGN_OR_RETURN(o.model, value());
    } else if (a == "--digest-compressor") {
      ASSIGN_OR_RETURN(o.digest_compressor, value());
    } else if (a == "--kv-dtypes") {
      ASSIGN_OR_RETURN(std::string v, value());
      o.kv_dtypes = absl::StrSplit(v, ',', absl::SkipEmpty());
      for (const std::string& d : o.kv_dtypes) RETURN_IF_ERROR(ParseKvDtype(d).status());
    } else if (a == "--methods") {
      ASSIGN_OR_RETURN(std::string v, value());
      o.methods = absl::StrSplit(v, ',', absl::SkipEmpty());
    } else if (a == "--ratios") {
      ASSIGN_OR_RETURN(std::string v, value());
      o.ratios.clear();
      for (absl::string_view r : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        double x = 0;
        if (!absl::SimpleAtod(r, &x) || !(x > 1)) {
          return absl::InvalidArgumentError(absl::StrCat("--ratios: '", r, "' is not a ratio > 1"));
        }
        o.ratios.push_back(x);
      }
    } else if (a == "--head-budget") {
      ASSIGN_OR_RETURN(std::string v, value());
      o.head_budgets = absl::StrSplit(v, ',', absl::SkipEmpty());
      for (const std::string& b : o.head_budgets) {
        if (absl::Status st = CheckHeadBudget("snapkv", b); !st.ok()) {
          return absl::InvalidArgumentError(absl::StrCat("--head-budget: ", st.message()));
        }
      }
      if (o.head_budgets.empty()) {
        return absl::InvalidArgumentError("--head-budget needs uniform and/or adaptive");
      }
    } else if (a == "--recycled") {
      o.recycled = true;
    } else if (a == "--recycled-stride" || a == "--recycled-topk") {
      ASSIGN_OR_RETURN(std::string v, value());
      const bool stride = a == "--recycled-stride";
      if (stride) o.recycled_strides.clear();
      else o.recycled_topks.clear();
      for (absl::string_view item : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        DecodePolicy p;
        p.kind = DecodePolicy::Kind::kRecycled;
        int64_t x = 0;
        if (!absl::SimpleAtoi(item, &x) || x < 0 || x > kMaxRecycledTopK) {
          return absl::InvalidArgumentError(absl::StrCat(a, ": '", item, "' is not a count"));
        }
        if (stride) p.stride = static_cast<int>(x);
        else p.top_k = x;
        if (absl::Status st = p.Validate(); !st.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(a, ": ", st.message()));
        }
        if (stride) {
          o.recycled_strides.push_back(static_cast<int>(x));
        } else {
          o.recycled_topks.push_back(x);
        }
      }
      if (o.recycled_strides.empty() || o.recycled_topks.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(a, " needs a comma-separated list"));
      }
    } else if (a == "--threads" || a == "--limit") {
      ASSIGN_OR_RETURN(std::string v, value());
      int x = 0;
      if (!absl::SimpleAtoi(v, &x) || x < 0) {
        return absl::InvalidArgumentError(absl::StrCat(a, ": '", v, "' is not a count"));
      }
      (a == "--threads" ? o.threads : o.limit) = x;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown argument '", a, "'\n", kUsage));
    }
  }
  if (o.samples.empty() || o.out.empty()) return absl::InvalidArgumentError(kUsage);
  if (std::find(o.methods.begin(), o.methods.end(), "digest") != o.methods.end() &&
      o.digest_compressor.empty()) {
    return absl::InvalidArgumentError("--methods digest needs --digest-compressor FILE");
  }
  for (const std::string& m : o.methods) {
    const auto known = CompressionMethods();
    const bool compress = std::find(known.begin(), known.end(), m) != known.end() && m != "none";
    if (!compress && m != "query_select") {
      return absl::InvalidArgumentError(absl::StrCat("--methods: unknown method '", m, "'"));
    }
  }
  return o;
}

// RULER string_match_all: the fraction of reference strings the prediction contains,
// case-insensitively (eval/ruler.py string_match_all is the same function).
double StringMatchAll(const std::string& prediction, const std::vector<std::string>& outputs) {
  if (outputs.empty()) return 0;
  const std::string p = absl::AsciiStrToLower(prediction);
  double hits = 0;
  for (const std::string& o : outputs) {
    if (p.find(absl::AsciiStrToLower(o)) != std::string::npos) hits += 1;
  }
  return hits / static_cast<double>(outputs.size());
}

struct Sample {
  json raw;
  std::string id, task;
  int64_t length = 0;
  std::vector<int32_t> doc, suffix, reference;
  std::string question;  // the observation window of the prompt-guided methods
  std::vector<std::string> outputs;
  int max_new = 0;
};

// Renders the sample as one user turn of the chat template followed by the answer prefix,
// and splits it into the document part (compressed) and the suffix (the question and the
// assistant header, prefilled uncompressed per request).
absl::StatusOr<Sample> PrepareSample(const json& j, const Model& model, const ChatTemplate& tmpl) {
  Sample s;
  s.raw = j;
  s.id = j.at("id").get<std::string>();
  s.task = j.at("task").get<std::string>();
  s.length = j.at("length").get<int64_t>();
  s.max_new = j.at("max_new_tokens").get<int>();
  s.outputs = j.at("outputs").get<std::vector<std::string>>();
  s.question = j.at("question").get<std::string>();
  const std::string tail = "\n\n" + s.question;
  const std::string user =
      j.at("instruction").get<std::string>() + "\n\n" + j.at("context").get<std::string>() + tail;
  ASSIGN_OR_RETURN(std::string text, ApplyChatTemplate(tmpl, {{"user", user}}, true));
  std::string prefix = j.at("answer_prefix").get<std::string>();
  text += std::string(absl::StripLeadingAsciiWhitespace(prefix));
  const size_t cut = text.rfind(tail);
  if (cut == std::string::npos) return absl::InternalError("question not found in the prompt");
  const Tokenizer& tok = model.tokenizer();
  s.doc = tok.Encode(text.substr(0, cut), tok.add_bos_default(), /*parse_special=*/true);
  s.suffix = tok.Encode(text.substr(cut), false, /*parse_special=*/true);
  s.reference = tok.Encode(j.at("reference").get<std::string>(), false, false);
  const int64_t total = static_cast<int64_t>(s.doc.size() + s.suffix.size()) + s.max_new;
  if (total > model.config().n_ctx_train) {
    return absl::OutOfRangeError(absl::StrCat(s.id, ": ", total, " tokens (document ", s.doc.size(),
                                              " + question ", s.suffix.size(), " + answer ",
                                              s.max_new, ") exceed the window"));
  }
  return s;
}

// Log-probabilities [m, n_vocab] of the reference answer's tokens, teacher-forced after the
// suffix on top of `context`.
absl::StatusOr<std::vector<float>> AnswerLogProbs(Runner& runner, const KvCache& context,
                                                  const Sample& s) {
  KvCache work = context;
  std::vector<int32_t> tokens = s.suffix;
  tokens.insert(tokens.end(), s.reference.begin(), s.reference.end() - 1);
  ForwardOptions options;
  options.all_logits = true;
  std::vector<float> logits;
  RETURN_IF_ERROR(runner.Forward(tokens, work, options, &logits));
  const int64_t v = runner.model().config().n_vocab;
  const int64_t m = static_cast<int64_t>(s.reference.size());
  const int64_t first = static_cast<int64_t>(s.suffix.size()) - 1;
  std::vector<float> out(static_cast<size_t>(m * v));
  for (int64_t i = 0; i < m; ++i) {
    const float* row = logits.data() + (first + i) * v;
    const float mx = *std::max_element(row, row + v);
    double z = 0;
    for (int64_t t = 0; t < v; ++t) z += std::exp(static_cast<double>(row[t] - mx));
    const float lz = mx + static_cast<float>(std::log(z));
    for (int64_t t = 0; t < v; ++t) out[i * v + t] = row[t] - lz;
  }
  return out;
}

struct Outcome {
  std::string prediction;
  double score = 0, ll = 0, kl = 0;
  std::vector<float> logp;
};

absl::StatusOr<Outcome> Evaluate(Runner& runner, const KvCache& context, const Sample& s,
                                 const DecodePolicy& decode, const std::vector<float>* full_logp) {
  Outcome o;
  KvCache work = context;
  GenerateParams params;
  params.sampling = SamplingParams::Greedy();
  params.max_tokens = s.max_new;
  params.stop = {"<|im_end|>"};
  params.decode = decode;
  // The answer ends at the first blank line after it has begun (a letter or digit): models
  // that open with ":\n\n1. ..." (Qwen on the multi-value tasks) are not cut before they
  // answer, and small models that ramble on after one are.
  std::string seen;
  size_t end = std::string::npos;
  auto on_text = [&](std::string_view delta) {
    seen += delta;
    const size_t begun = seen.find_first_of(
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz");
    if (begun != std::string::npos) end = seen.find("\n\n", begun);
    return end == std::string::npos;
  };
  ASSIGN_OR_RETURN(GenerateResult r, Generate(runner, work, s.suffix, params, on_text));
  o.prediction = r.text.substr(0, end);
  o.score = StringMatchAll(r.text, s.outputs);
  if (decode.kind != DecodePolicy::Kind::kFull) return o;  // fidelity: full-attention decoding
  ASSIGN_OR_RETURN(o.logp, AnswerLogProbs(runner, context, s));
  const int64_t v = runner.model().config().n_vocab;
  const int64_t m = static_cast<int64_t>(s.reference.size());
  for (int64_t i = 0; i < m; ++i) o.ll += o.logp[i * v + s.reference[i]];
  if (full_logp != nullptr) {
    for (int64_t i = 0; i < m; ++i) {
      double kl = 0;
      for (int64_t t = 0; t < v; ++t) {
        const double lp = (*full_logp)[i * v + t];
        kl += std::exp(lp) * (lp - o.logp[i * v + t]);
      }
      o.kl += std::max(0.0, kl) / static_cast<double>(m);
    }
  }
  return o;
}

std::string Fmt(double x) { return absl::StrCat(std::round(x * 1000) / 1000); }

absl::Status Run(const Options& opt) {
  std::string path = opt.model;
  if (path.empty()) {
    ASSIGN_OR_RETURN(path, FindDefaultModel());
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(path));
  if (!opt.digest_compressor.empty()) {
    ASSIGN_OR_RETURN(std::unique_ptr<IcFormer> compressor,
                     IcFormer::Load(opt.digest_compressor, *model));
    model->AttachDigestCompressor(std::move(compressor));
  }
  const std::string tmpl_text = model->gguf().GetString("tokenizer.chat_template").value_or("");
  ASSIGN_OR_RETURN(ChatTemplate tmpl, DetectChatTemplate(tmpl_text, false));

  // Rows name the model by its file's stem; resuming skips the samples this model has done
  // (rows of older runs carry no model: they were SmolLM2's).
  std::string model_name = path.substr(path.find_last_of('/') + 1);
  if (absl::EndsWith(model_name, ".gguf")) model_name.resize(model_name.size() - 5);
  std::set<std::string> done;
  {
    std::ifstream prev(opt.out);
    for (std::string line; std::getline(prev, line);) {
      // A line cut short by an interrupted run is ignored (its sample runs again).
      const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("id")) continue;
      const std::string m = j.value("model", std::string("SmolLM2-135M-Instruct.Q4_1"));
      if (m == model_name) done.insert(j["id"].get<std::string>());
    }
  }
  std::vector<json> todo;
  {
    std::ifstream in(opt.samples);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read --samples ", opt.samples));
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("id")) {
        return absl::InvalidArgumentError(absl::StrCat(opt.samples, ": not a sample line: ",
                                                       line.substr(0, 80)));
      }
      if (!done.count(j.at("id").get<std::string>())) todo.push_back(std::move(j));
    }
  }
  if (opt.limit > 0 && static_cast<int>(todo.size()) > opt.limit) todo.resize(opt.limit);
  std::fprintf(stderr, "ctxcache-eval: %zu samples to run (%zu already in %s)\n", todo.size(),
               done.size(), opt.out.c_str());
  for (const std::string& method : opt.methods) {
    if (method == "query_select") continue;  // selects per request; no head budget
    for (const std::string& b : opt.head_budgets) {
      if (!CheckHeadBudget(method, b).ok()) {
        std::fprintf(stderr, "ctxcache-eval: %s takes no head budget %s; skipped\n", method.c_str(),
                     b.c_str());
      }
    }
  }
  ThreadPool pool(opt.threads > 0 ? opt.threads : ThreadPool::HardwareThreads());
  Runner runner(*model, &pool);
  std::ofstream out(opt.out, std::ios::app);
  const auto t_start = Clock::now();
  for (size_t i = 0; i < todo.size(); ++i) {
    ASSIGN_OR_RETURN(Sample s, PrepareSample(todo[i], *model, tmpl));
    const auto t_sample = Clock::now();
    std::vector<json> rows;
    auto base = [&](const std::string& method, double ratio) {
      json r;
      r["model"] = model_name;
      r["id"] = s.id;
      r["task"] = s.task;
      r["length"] = s.length;
      r["index"] = s.raw.at("index");
      r["doc_tokens"] = s.doc.size();
      r["method"] = method;
      r["ratio"] = ratio;
      return r;
    };
    ASSIGN_OR_RETURN(KvCache prefill, PrefillDocument(runner, s.doc));
    ASSIGN_OR_RETURN(Outcome full, Evaluate(runner, prefill, s, DecodePolicy{}, nullptr));
    const int64_t heads = int64_t{prefill.n_layers()} * prefill.n_kv_heads();
    const int64_t full_bytes = prefill.Bytes(2);
    // stored_bytes: what the context stores when that is not its KV (a digest's vectors).
    auto add = [&](const CompressionSpec& spec, const std::string& kv_dtype, const KvCache& kv,
                   const Outcome& o, double seconds, int64_t stored_bytes = -1) {
      if (stored_bytes < 0) stored_bytes = kv.StoredBytes();
      json r = base(spec.method, spec.ratio);
      r["head_budget"] = spec.head_budget;
      r["kv_dtype"] = kv_dtype;
      r["score"] = o.score;
      r["full_score"] = full.score;
      r["ll"] = o.ll;
      r["full_ll"] = full.ll;
      r["kl"] = o.kl;
      r["kept_tokens"] = static_cast<double>(kv.TotalEntries()) / static_cast<double>(heads);
      r["kv_bytes"] = stored_bytes;
      r["full_kv_bytes"] = full_bytes;
      const double bytes_ratio =
          static_cast<double>(full_bytes) / static_cast<double>(stored_bytes);
      r["bytes_ratio"] = bytes_ratio;
      r["compress_seconds"] = seconds;
      r["prediction"] = o.prediction;
      r["full_prediction"] = full.prediction;
      rows.push_back(std::move(r));
      const std::string label =
          spec.head_budget == "uniform" ? spec.method : spec.method + " " + spec.head_budget;
      std::fprintf(stderr,
                   "  %-18s x%-4g %s (%4.1fx bytes) score %.2f (full %.2f)  kl %.3f  ll %.2f "
                   "(full %.2f)\n",
                   label.c_str(), spec.ratio, kv_dtype.c_str(), bytes_ratio, o.score, full.score,
                   o.kl, o.ll, full.ll);
    };
    // One selection, evaluated at every --kv-dtypes: quantizing the selected fp16 entries is
    // what Compress does for that kv_dtype.
    auto add_dtypes = [&](const CompressionSpec& spec, const KvCache& kv,
                          double seconds) -> absl::Status {
      for (const std::string& d : opt.kv_dtypes) {
        ASSIGN_OR_RETURN(const KvDtype dtype, ParseKvDtype(d));
        KvCache stored = kv;
        if (dtype != KvDtype::kF16) RETURN_IF_ERROR(stored.Freeze(dtype));
        ASSIGN_OR_RETURN(Outcome o, Evaluate(runner, stored, s, DecodePolicy{}, &full.logp));
        add(spec, d, stored, o, seconds);
      }
      return absl::OkStatus();
    };
    std::fprintf(stderr, "[%zu/%zu] %s: %zu document tokens, full answer %s\n", i + 1, todo.size(),
                 s.id.c_str(), s.doc.size(), json(full.prediction).dump().c_str());
    // The whole document at each quantized kv_dtype: what quantization alone costs.
    if (std::any_of(opt.kv_dtypes.begin(), opt.kv_dtypes.end(),
                    [](const std::string& d) { return d != "fp16"; })) {
      CompressionSpec none;
      none.method = "none";
      none.ratio = 1;
      std::vector<std::string> quantized;
      for (const std::string& d : opt.kv_dtypes) {
        if (d != "fp16") quantized.push_back(d);
      }
      for (const std::string& d : quantized) {
        ASSIGN_OR_RETURN(const KvDtype dtype, ParseKvDtype(d));
        KvCache stored = prefill;
        RETURN_IF_ERROR(stored.Freeze(dtype));
        ASSIGN_OR_RETURN(Outcome o, Evaluate(runner, stored, s, DecodePolicy{}, &full.logp));
        add(none, d, stored, o, 0);
      }
    }
    for (const int stride : opt.recycled ? opt.recycled_strides : std::vector<int>{}) {
      for (const int64_t top_k : opt.recycled_topks) {
        DecodePolicy policy;
        policy.kind = DecodePolicy::Kind::kRecycled;
        policy.stride = stride;
        policy.top_k = top_k;
        ASSIGN_OR_RETURN(Outcome o, Evaluate(runner, prefill, s, policy, nullptr));
        json r = base("none", 1);
        r["decode"] = "recycled";
        r["recycled_stride"] = stride;
        r["recycled_topk"] = top_k;  // 0: 1/8 of the keys
        r["score"] = o.score;
        r["full_score"] = full.score;
        r["prediction"] = o.prediction;
        r["full_prediction"] = full.prediction;
        r["same_as_full"] = o.prediction == full.prediction;
        rows.push_back(std::move(r));
        std::fprintf(stderr, "  recycled decode (stride %d, top-K %lld) score %.2f, %s full\n",
                     stride, static_cast<long long>(top_k), o.score,
                     o.prediction == full.prediction ? "same text as" : "differs from");
      }
    }
    for (const std::string& method : opt.methods) {
      if (method == "query_select") {
        // Prefill once, select per query (ContextRef.select): this request's own tokens
        // (question and answer prefix) score the stored full context at every ratio.
        CompressionSpec spec;
        spec.method = method;
        for (double ratio : opt.ratios) {
          spec.ratio = ratio;
          const auto t0 = Clock::now();
          const int64_t budget = static_cast<int64_t>(
              std::ceil(static_cast<double>(s.doc.size()) / ratio));
          ASSIGN_OR_RETURN(KvCache kv, SelectForQuery(runner, prefill, s.suffix, budget));
          RETURN_IF_ERROR(add_dtypes(spec, kv, Since(t0)));
        }
        continue;
      }
      if (method == "digest") {
        // Digest form: the document's chunks through the compressor; the model reads the
        // digests (ComposeContexts) before the question. Stored bytes are the digest's; at
        // generation it occupies its tokens' K/V ("attended_kv_bytes").
        CompressionSpec spec;
        spec.method = method;
        for (double ratio : opt.ratios) {
          spec.ratio = ratio;
          const auto t0 = Clock::now();
          ASSIGN_OR_RETURN(CompressedContext ctx, Compress(runner, s.doc, spec));
          const double seconds = Since(t0);
          const CompressedContext* ptr = &ctx;
          ASSIGN_OR_RETURN(KvCache kv, ComposeContexts(absl::MakeConstSpan(&ptr, 1), runner));
          ASSIGN_OR_RETURN(Outcome o, Evaluate(runner, kv, s, DecodePolicy{}, &full.logp));
          add(spec, "fp16", kv, o, seconds, ctx.KvBytes());
          json& r = rows.back();
          r["attended_kv_bytes"] = ctx.AttendedKvBytes();
          r["digest_tokens"] = ctx.digest_tokens;
        }
        continue;
      }
      std::vector<CompressionSpec> specs;  // one per head budget the method takes
      for (const std::string& b : opt.head_budgets) {
        if (!CheckHeadBudget(method, b).ok()) continue;
        CompressionSpec& spec = specs.emplace_back();
        spec.method = method;
        spec.question = s.question;
        spec.ratio = opt.ratios.front();
        spec.head_budget = b;
      }
      if (specs.empty()) continue;
      if (method == "finch") {
        for (CompressionSpec& spec : specs) {
          for (double ratio : opt.ratios) {
            spec.ratio = ratio;
            const auto t0 = Clock::now();
            ASSIGN_OR_RETURN(CompressedContext ctx, Compress(runner, s.doc, spec));
            RETURN_IF_ERROR(add_dtypes(spec, ctx.kv, Since(t0)));
          }
        }
        continue;
      }
      // The scores do not depend on the head budget: score once, select with each.
      const auto t0 = Clock::now();
      ASSIGN_OR_RETURN(DocumentScores scores, ScoreDocument(runner, s.doc, prefill, specs[0]));
      const double score_seconds = Since(t0);
      for (CompressionSpec& spec : specs) {
        for (double ratio : opt.ratios) {
          spec.ratio = ratio;
          ASSIGN_OR_RETURN(CompressedContext ctx, SelectScored(*model, prefill, scores, spec));
          RETURN_IF_ERROR(add_dtypes(spec, ctx.kv, score_seconds));
        }
      }
    }
    for (const json& r : rows) out << r.dump() << "\n";
    out.flush();
    const double elapsed = Since(t_start);
    std::fprintf(stderr, "[%zu/%zu] %s done in %s s; %s s elapsed, ~%s s to go\n", i + 1,
                 todo.size(), s.id.c_str(), Fmt(Since(t_sample)).c_str(), Fmt(elapsed).c_str(),
                 Fmt(elapsed / static_cast<double>(i + 1) * static_cast<double>(todo.size() - i - 1))
                     .c_str());
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace ctxcache

int main(int argc, char** argv) {
  ctxcache::UseBestBlasKernels(argv);  // may re-execute (engine/cpu/blas_kernels.h)
  absl::StatusOr<ctxcache::Options> opt = ctxcache::ParseArgs(argc, argv);
  if (!opt.ok()) {
    std::fprintf(stderr, "ctxcache-eval: %s\n", std::string(opt.status().message()).c_str());
    return 2;
  }
  const absl::Status s = ctxcache::Run(*opt);
  if (!s.ok()) {
    std::fprintf(stderr, "ctxcache-eval: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
