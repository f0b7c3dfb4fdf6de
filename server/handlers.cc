// The RPCs' work in native types (see handlers.h).
#include "server/handlers.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/redis_client.h"
#include "common/status.h"
#include "engine/icformer.h"
#include "engine/unicode.h"
#include "server/context_key.h"
#include "server/server_metrics.h"

namespace ctxcache::server {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

absl::Status NotFoundContext(const std::string& id) {
  return absl::NotFoundError(absl::StrCat(
      "no context ", id, " for this tenant: it was never compressed, was evicted or expired, "
      "or was made by another tenant or model; send the document again (Compress, or an inline "
      "context in Generate)"));
}

// ContextRef.select: ratio and budget follow CompressionParams' rules.
absl::Status ValidateSelect(const QuerySelect& select, const std::string& field) {
  if (select.ratio != 0 && select.budget != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": give either ratio or budget, not both"));
  }
  if (select.ratio == 0 && select.budget == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field,
                     " needs a ratio > 1 (4 keeps 1/4 of each head's entries) or a budget > 0 "
                     "(entries per head)"));
  }
  if (select.ratio != 0 && !(select.ratio > 1 && std::isfinite(select.ratio))) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".ratio must be a finite number > 1 (4 keeps 1/4 of each head's entries), got ",
        select.ratio));
  }
  if (select.ratio > kMaxRatio) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".ratio = ", select.ratio,
                                                   " is out of range: allowed up to ", kMaxRatio));
  }
  if (select.budget < 0 || select.budget > kMaxCompressBudget) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".budget must be > 0 and <= ", kMaxCompressBudget,
                     " entries per head, got ", select.budget));
  }
  return absl::OkStatus();
}

// A chat prompt's messages as rendered: `system` first unless the messages have their own.
std::vector<ChatMessage> Conversation(const GenerateInput& in) {
  std::vector<ChatMessage> messages;
  const bool has_system = std::any_of(in.messages.begin(), in.messages.end(),
                                      [](const ChatMessage& m) { return m.role == "system"; });
  if (!in.system.empty() && !has_system) messages.push_back({"system", in.system});
  messages.insert(messages.end(), in.messages.begin(), in.messages.end());
  return messages;
}

// `full`'s header with `kv` as its entries: one request's selection, composed like a context.
std::shared_ptr<const CompressedContext> WithEntries(const CompressedContext& full, KvCache kv) {
  auto out = std::make_shared<CompressedContext>();
  out->kind = full.kind;
  out->model_fingerprint = full.model_fingerprint;
  out->method = full.method;
  out->params = full.params;
  out->method_version = full.method_version;
  out->source_tokens = full.source_tokens;
  out->kv = std::move(kv);
  return out;
}

}  // namespace

absl::Status CheckUtf8(std::string_view text, const std::string& field) {
  const std::optional<size_t> bad = unicode::FirstInvalidUtf8(text);
  if (!bad) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " is not valid UTF-8 (first bad byte at offset ", *bad,
                   "); send text as UTF-8, or the document as token ids"));
}

Handlers::Handlers(const Model& model, ContextStore& store, const RequestLimits& limits,
                   ServerMetrics* metrics)
    : model_(model), store_(store), limits_(limits), metrics_(metrics) {
  const std::string tmpl = model_.gguf().GetString("tokenizer.chat_template").value_or("");
  absl::StatusOr<ChatTemplate> t = DetectChatTemplate(tmpl, /*allow_raw=*/false);
  if (t.ok()) {
    chat_template_ = *t;
  } else {
    chat_template_status_ = absl::FailedPreconditionError(absl::StrCat(
        "this model's chat template is not supported (", t.status().message(),
        "); send the prompt as text instead of chat messages"));
  }
}

absl::Status Handlers::ValidateDocument(const DocumentInput& doc, const std::string& field) const {
  if (doc.is_text) {
    if (doc.text.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " is empty: set document.text (UTF-8) or document.tokens"));
    }
    if (static_cast<int64_t>(doc.text.size()) > limits_.max_document_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".text is ", doc.text.size(), " bytes; this server accepts at most ",
          limits_.max_document_bytes, " (max_document_bytes): split the document"));
    }
    return CheckUtf8(doc.text, absl::StrCat(field, ".text"));
  }
  if (doc.tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is empty: set document.text (UTF-8) or document.tokens"));
  }
  if (static_cast<int64_t>(doc.tokens.size()) > limits_.max_document_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".tokens has ", doc.tokens.size(), " ids; this server accepts at most ",
        limits_.max_document_tokens, " (max_document_tokens): split the document"));
  }
  const int32_t n_vocab = model_.config().n_vocab;
  for (size_t i = 0; i < doc.tokens.size(); ++i) {
    if (doc.tokens[i] < 0 || doc.tokens[i] >= n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".tokens[", i, "] = ", doc.tokens[i], " is not a token of this model (0 to ",
          n_vocab - 1, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status Handlers::ValidateCompress(const CompressInput& in, const std::string& field) const {
  RETURN_IF_ERROR(ValidateDocument(in.document, absl::StrCat(field, "document")));
  if (in.spec.method.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, "compression.method is empty; expected one of ",
        absl::StrJoin(CompressionMethods(), ", ")));
  }
  absl::Status s = in.spec.Validate();
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, "compression: ", s.message()));
  }
  if (in.spec.method == "digest" && model_.digest_compressor() == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, "compression: method \"digest\" needs a digest compressor and this server has "
        "none (start it with --digest-compressor FILE), or use a KV method"));
  }
  if (!in.spec.compressor.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, "compression: the compressor is the server's, not the request's"));
  }
  if (static_cast<int64_t>(in.spec.question.size()) > limits_.max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, "question is ", in.spec.question.size(), " bytes; this server accepts at most ",
        limits_.max_prompt_bytes, " (max_prompt_bytes)"));
  }
  return CheckUtf8(in.spec.question, absl::StrCat(field, "question"));
}

absl::Status Handlers::ValidateGenerate(const GenerateInput& in) const {
  if (static_cast<int>(in.contexts.size()) > limits_.max_contexts_per_request) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request has ", in.contexts.size(), " contexts; this server accepts at most ",
        limits_.max_contexts_per_request, " (max_contexts_per_request)"));
  }
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    const ContextInput& c = in.contexts[i];
    if (c.inline_doc) {
      RETURN_IF_ERROR(ValidateCompress(*c.inline_doc, absl::StrCat("contexts[", i, "].inline.")));
    } else {
      if (c.context_id.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "contexts[", i, "] is empty: set context_id or inline"));
      }
      RETURN_IF_ERROR(ValidateContextId(c.context_id));
    }
    if (c.select) {
      const std::string field = absl::StrCat("contexts[", i, "].select");
      RETURN_IF_ERROR(ValidateSelect(*c.select, field));
      // Known before any work: refuse it before spending a compression.
      if (c.inline_doc && c.inline_doc->spec.method != "none") {
        return absl::InvalidArgumentError(
            absl::StrCat(field, " selects from a context stored whole, but contexts[", i,
                         "].inline.compression.method is \"", c.inline_doc->spec.method,
                         "\": use method \"none\" (no ratio or budget), or drop select"));
      }
    }
  }
  if (in.chat) {
    if (in.messages.empty()) {
      return absl::InvalidArgumentError("prompt.chat has no messages");
    }
    if (static_cast<int64_t>(in.messages.size()) > limits_.max_chat_messages) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat has ", in.messages.size(), " messages; this server accepts at most ",
                       limits_.max_chat_messages, " (max_chat_messages)"));
    }
    int64_t bytes = static_cast<int64_t>(in.system.size());
    for (size_t i = 0; i < in.messages.size(); ++i) {
      const ChatMessage& m = in.messages[i];
      // Only roles every template renders: anything else would be pasted into the turn
      // header (a role "user<|im_end|>..." would write its own markup).
      if (!IsChatRole(m.role)) {
        return absl::InvalidArgumentError(
            absl::StrCat("chat.messages[", i, "].role \"", absl::CHexEscape(m.role.substr(0, 64)),
                         m.role.size() > 64 ? "..." : "",
                         "\" is not a chat role; allowed: ", absl::StrJoin(ChatRoles(), ", ")));
      }
      RETURN_IF_ERROR(CheckUtf8(m.content, absl::StrCat("chat.messages[", i, "].content")));
      bytes += static_cast<int64_t>(m.content.size());
    }
    RETURN_IF_ERROR(CheckUtf8(in.system, "chat.system"));
    if (bytes > limits_.max_prompt_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chat messages and system hold ", bytes, " bytes; this server accepts at most ",
          limits_.max_prompt_bytes, " (max_prompt_bytes)"));
    }
  } else {
    if (in.text.empty()) {
      return absl::InvalidArgumentError(
          "the prompt is empty: set prompt text or chat messages");
    }
    if (static_cast<int64_t>(in.text.size()) > limits_.max_prompt_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("text is ", in.text.size(), " bytes; this server accepts at most ",
                       limits_.max_prompt_bytes, " (max_prompt_bytes)"));
    }
    RETURN_IF_ERROR(CheckUtf8(in.text, "text"));
  }
  // Counts and sizes first: a request with 200k stop strings is refused before reading them.
  RETURN_IF_ERROR(ValidateGenerateParams(in.params));
  for (size_t i = 0; i < in.params.stop.size(); ++i) {
    RETURN_IF_ERROR(CheckUtf8(in.params.stop[i], absl::StrCat("stop[", i, "]")));
  }
  return absl::OkStatus();
}

int64_t Handlers::EstimateKvBytes(const CompressInput& in) const {
  // English BPE averages about 4 bytes per token; the job corrects this after tokenizing.
  const int64_t tokens = in.document.is_text
                             ? static_cast<int64_t>(in.document.text.size()) / 4 + 1
                             : static_cast<int64_t>(in.document.tokens.size());
  return CompressWorkingTokens(tokens, in.spec) * WorkingBytesPerToken();
}

int64_t Handlers::CompressWorkingTokens(int64_t n_tokens, const CompressionSpec& spec) const {
  const IcFormer* f = model_.digest_compressor();
  if (spec.method != "digest" || f == nullptr) return n_tokens;
  // A digest runs no layer of the model on the document: no prefill to hold. It reserves
  // what it will occupy when read (its digest tokens' K/V), as a generation would.
  int64_t total = 0;
  for (int k : DigestPlan(n_tokens, f->config(), spec.ratio, spec.budget)) total += k;
  return total;
}

int64_t Handlers::EstimateKvBytes(const GenerateInput& in) const {
  int64_t bytes = 0;
  for (const ContextInput& c : in.contexts) {
    if (c.inline_doc) bytes += EstimateKvBytes(*c.inline_doc);
  }
  int64_t prompt = static_cast<int64_t>(in.text.size()) / 4 + 1;
  for (const ChatMessage& m : in.messages) prompt += static_cast<int64_t>(m.content.size()) / 4 + 8;
  const int64_t gen = std::min<int64_t>(in.params.max_tokens, model_.config().n_ctx_train);
  return bytes + (prompt + gen) * WorkingBytesPerToken();
}

absl::StatusOr<std::vector<int32_t>> Handlers::Tokenize(const DocumentInput& doc,
                                                        const std::string& field) const {
  if (!doc.is_text) return doc.tokens;
  const Tokenizer& tok = model_.tokenizer();
  std::vector<int32_t> ids = tok.Encode(doc.text, tok.add_bos_default(), /*parse_special=*/false);
  if (ids.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".text has no tokens"));
  }
  if (static_cast<int64_t>(ids.size()) > limits_.max_document_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".text is ", ids.size(), " tokens; this server accepts at most ",
        limits_.max_document_tokens, " (max_document_tokens): split the document"));
  }
  return ids;
}

absl::StatusOr<ContextOutcome> Handlers::LoadOrCompress(
    EngineWorker& worker, const std::string& tenant, const CompressInput& in,
    const std::string& field, Reservation& reservation, int64_t reserved_base,
    const StopCheck& stop, RedisDeadline deadline) const {
  RETURN_IF_ERROR(stop());
  ASSIGN_OR_RETURN(const std::vector<int32_t> ids, Tokenize(in.document, field));
  CompressionSpec spec = in.spec;
  // A question the method ignores must not split the cache into per-question entries.
  if (!MethodUsesQuestion(spec.method)) spec.question.clear();
  // The compressor is part of a digest's id: a retrained one never serves another's digests.
  // (ValidateCompress refused digest on a server without one; Compress would too.)
  if (spec.method == "digest" && model_.digest_compressor() != nullptr) {
    spec.compressor = model_.digest_compressor()->file_sha256();
  }
  // A KV compression prefills the whole document before pruning: reserve that working cache
  // (a digest: the K/V its tokens will occupy).
  RETURN_IF_ERROR(reservation.Resize(
      reserved_base + CompressWorkingTokens(static_cast<int64_t>(ids.size()), spec) *
                          WorkingBytesPerToken()));
  const uint32_t version = MethodVersion(spec.method);
  ContextOutcome out;
  out.context_id = ContextId(tenant, model_.fingerprint(), spec, version, ids);
  auto compute = [&](const StopFn& flight_stop) -> absl::StatusOr<CompressedContext> {
    RETURN_IF_ERROR(CheckStop(flight_stop));
    const auto compress_start = Clock::now();
    // The compression needs the worker's runner to itself (the store's lookups, above and
    // around it, do not).
    absl::StatusOr<CompressedContext> computed;
    RETURN_IF_ERROR(worker.Exclusive(
        [&](Runner& runner) {
          // The flight's stop, not this call's: other calls may be waiting for this context, and
          // the compression goes on for them if this call's client leaves (single_flight.h).
          Runner::ScopedStop scoped(runner, flight_stop);
          computed = ctxcache::Compress(runner, ids, spec);
          return computed.status();
        },
        flight_stop));
    CompressedContext c = *std::move(computed);
    if (c.method_version != version) {
      return absl::InternalError(absl::StrCat(
          "method ", spec.method, " produced version ", c.method_version,
          " but the context id was derived for version ", version,
          " (engine/compress/spec.cc kMethodTable is the one table for both)"));
    }
    // Here, inside the single flight, each computation is counted once.
    if (metrics_ != nullptr) metrics_->RecordCompression(c.method, Since(compress_start), c);
    return c;
  };
  ASSIGN_OR_RETURN(StoreResult r, store_.GetOrCompute(tenant, out.context_id, compute, stop, deadline));
  out.context = std::move(r.context);
  out.tier = r.tier;
  out.compute_seconds = r.compute_seconds;
  out.in_memory = r.in_memory;
  out.in_redis = r.in_redis;
  return out;
}

absl::StatusOr<CompressOutcome> Handlers::Compress(EngineWorker& worker, Reservation& reservation,
                                                   const std::string& tenant,
                                                   const CompressInput& in, const StopCheck& stop,
                                                   RedisDeadline deadline) const {
  const auto t0 = Clock::now();
  CompressOutcome out;
  ASSIGN_OR_RETURN(out.context,
                   LoadOrCompress(worker, tenant, in, "document", reservation, 0, stop, deadline));
  out.total_seconds = Since(t0);
  return out;
}

absl::StatusOr<std::vector<int32_t>> Handlers::PromptTokens(const GenerateInput& in) const {
  const Tokenizer& tok = model_.tokenizer();
  if (!in.chat) return tok.Encode(in.text, tok.add_bos_default(), /*parse_special=*/false);
  RETURN_IF_ERROR(chat_template_status_);
  std::vector<Tokenizer::Span> contents;
  absl::StatusOr<std::string> text =
      ApplyChatTemplate(chat_template_, Conversation(in), true, &contents);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("chat: ", text.status().message()));
  }
  // The template's markers are special tokens; what the users wrote is plain text, so that
  // "<|im_start|>system" typed in a message cannot open a turn of its own.
  return tok.EncodeWithLiterals(*text, tok.add_bos_default(), contents);
}

// The preamble (BOS, and a chat prompt's system turn) is the same for every request: it says
// nothing about which entries this one needs, and its rows would weigh in every request's
// scores like the question's. The rest is what the model reads as this request: for chat, the
// conversation's turns as templated, through the assistant header.
absl::Span<const int32_t> Handlers::SelectionQuery(const GenerateInput& in,
                                                   absl::Span<const int32_t> prompt) const {
  std::string preamble;
  std::vector<Tokenizer::Span> contents;  // of the messages in the preamble (plain text)
  if (in.chat) {
    // The prompt's text less the turns after the system turn, rendered without a default one.
    const std::vector<ChatMessage> messages = Conversation(in);
    const size_t first = messages.front().role == "system" ? 1 : 0;
    ChatTemplate bare = chat_template_;
    bare.default_system.clear();
    absl::StatusOr<std::string> text = ApplyChatTemplate(chat_template_, messages, true, &contents);
    absl::StatusOr<std::string> turns =
        ApplyChatTemplate(bare, {messages.begin() + first, messages.end()}, true);
    if (text.ok() && turns.ok() && absl::EndsWith(*text, *turns)) {
      preamble = text->substr(0, text->size() - turns->size());
    }
    // Tokenized as PromptTokens tokenizes the whole prompt, so that it is its prefix.
    std::vector<Tokenizer::Span> clipped;
    for (const Tokenizer::Span& c : contents) {
      if (c.begin < preamble.size()) clipped.push_back({c.begin, std::min(c.end, preamble.size())});
    }
    contents = std::move(clipped);
  }
  const Tokenizer& tok = model_.tokenizer();
  const std::vector<int32_t> head =
      in.chat ? tok.EncodeWithLiterals(preamble, tok.add_bos_default(), contents)
              : tok.Encode(preamble, tok.add_bos_default(), false);
  // A preamble that does not end on a token boundary of the prompt: select by all of it.
  if (head.size() >= prompt.size() || !std::equal(head.begin(), head.end(), prompt.begin())) {
    return prompt;
  }
  return prompt.subspan(head.size());
}

absl::Status Handlers::SelectByPrompt(EngineWorker& worker, Reservation& reservation,
                                      int64_t own_bytes, const GenerateInput& in,
                                      absl::Span<const int32_t> prompt, const StopCheck& stop,
                                      std::vector<ContextOutcome>& contexts) const {
  const absl::Span<const int32_t> query = SelectionQuery(in, prompt);
  int64_t held = 0;  // entries the composed cache will hold
  for (const ContextOutcome& o : contexts) held += o.context->KeptEntries();
  for (size_t i = 0; i < contexts.size(); ++i) {
    if (!in.contexts[i].select) continue;
    const QuerySelect& select = *in.contexts[i].select;
    ContextOutcome& o = contexts[i];
    const int64_t n = o.context->kv.MaxEntries();
    const int64_t budget =
        select.budget > 0 ? select.budget
                          : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(n / select.ratio)));
    if (budget >= n) continue;  // nothing to prune
    // One forward pass of the query over a copy of the context, as long as a prefill.
    RETURN_IF_ERROR(stop());
    RETURN_IF_ERROR(reservation.Resize((held + o.context->KeptEntries()) * WorkingBytesPerEntry() +
                                       static_cast<int64_t>(query.size()) * WorkingBytesPerToken() +
                                       own_bytes));
    absl::StatusOr<KvCache> kv;
    RETURN_IF_ERROR(worker.Exclusive(
        [&](Runner& runner) {
          Runner::ScopedStop scoped(runner, stop);
          kv = SelectForQuery(runner, o.context->kv, query, budget);
          return absl::OkStatus();  // kv holds the selection's status
        },
        stop));
    if (!kv.ok()) {
      return absl::Status(kv.status().code(),
                          absl::StrCat("contexts[", i, "].select: ", kv.status().message()));
    }
    o.selected = WithEntries(*o.context, *std::move(kv));
    held -= o.context->KeptEntries() - o.selected->KeptEntries();
  }
  // Decoding holds only the selected entries: give the rest back to admission.
  return reservation.Resize(held * WorkingBytesPerEntry() + own_bytes);
}

absl::StatusOr<GenerateOutcome> Handlers::Generate(EngineWorker& worker, Reservation& reservation,
                                                   const std::string& tenant,
                                                   const GenerateInput& in, const StopCheck& stop,
                                                   const TextCallback& on_text,
                                                   RedisDeadline deadline) const {
  const auto t0 = Clock::now();
  // Every forward pass of this call (selection, prompt prefill, decode steps) asks it, and so
  // does a Redis lookup by context_id (a compression's lookup asks its flight's stop instead).
  ScopedRedisStop redis_stop(&stop);
  GenerateOutcome out;
  const ModelConfig& mc = model_.config();
  int64_t contexts_bytes = 0;
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    const ContextInput& c = in.contexts[i];
    if (c.inline_doc) {
      ASSIGN_OR_RETURN(ContextOutcome o,
                       LoadOrCompress(worker, tenant, *c.inline_doc,
                                      absl::StrCat("contexts[", i, "].inline.document"),
                                      reservation, contexts_bytes, stop, deadline));
      out.contexts.push_back(std::move(o));
    } else {
      RETURN_IF_ERROR(stop());
      ASSIGN_OR_RETURN(ContextOutcome o, GetContext(tenant, c.context_id, deadline));
      out.contexts.push_back(std::move(o));
    }
    const CompressedContext& ctx = *out.contexts.back().context;
    if (c.select && ctx.method != "none") {
      return absl::FailedPreconditionError(absl::StrCat(
          "contexts[", i, "]: context ", out.contexts.back().context_id,
          " was stored compressed with ", ctx.method,
          "; per-query selection needs a context stored whole: compress the document with "
          "method \"none\" and select from that id, or drop select"));
    }
    contexts_bytes += ctx.KeptEntries() * WorkingBytesPerEntry();
  }
  ASSIGN_OR_RETURN(const std::vector<int32_t> prompt, PromptTokens(in));
  const int64_t gen = std::min<int64_t>(in.params.max_tokens, mc.n_ctx_train);
  const int64_t own_bytes = (static_cast<int64_t>(prompt.size()) + gen) * WorkingBytesPerToken();
  RETURN_IF_ERROR(reservation.Resize(contexts_bytes + own_bytes));
  if (std::any_of(in.contexts.begin(), in.contexts.end(),
                  [](const ContextInput& c) { return c.select.has_value(); })) {
    RETURN_IF_ERROR(SelectByPrompt(worker, reservation, own_bytes, in, prompt, stop, out.contexts));
  }

  KvCache cache = model_.NewKvCache();
  if (!out.contexts.empty()) {
    std::vector<const CompressedContext*> ptrs;
    for (const ContextOutcome& o : out.contexts) ptrs.push_back(&o.attended());
    RETURN_IF_ERROR(worker.Exclusive(
        [&](Runner& runner) -> absl::Status {
          Runner::ScopedStop scoped(runner, stop);
          ASSIGN_OR_RETURN(cache, ComposeContexts(ptrs, runner, stop));
          return absl::OkStatus();
        },
        stop));
  }
  out.context_seconds = Since(t0);
  RETURN_IF_ERROR(stop());  // also the check after a selection

  absl::Status stopped;
  auto guarded = [&](std::string_view delta) {
    if (absl::Status s = stop(); !s.ok()) {
      stopped = s;
      return false;
    }
    if (!on_text(delta)) {
      stopped = absl::CancelledError("the client went away");
      return false;
    }
    return true;
  };
  {
    // The prompt and every decode step ride the worker's batched steps with its other
    // generations (scheduler.h).
    EngineWorker::Sequence sequence(worker);
    auto forward = [&](absl::Span<const int32_t> tokens, KvCache& c,
                       RecycledAttentionState* recycled, std::vector<float>* logits) {
      return worker.Step(tokens, c, recycled, logits, stop);
    };
    ASSIGN_OR_RETURN(out.result, ctxcache::Generate(model_, forward, worker.prompt_chunk(), cache,
                                                    prompt, in.params, guarded));
  }
  if (out.result.finish == FinishReason::kCancelled) {
    return stopped.ok() ? absl::CancelledError("generation cancelled") : stopped;
  }
  const int64_t per_token = model_.KvBytesPerToken(2);
  const int64_t own_tokens =
      out.result.prompt_tokens + static_cast<int64_t>(out.result.tokens.size());
  for (const ContextOutcome& o : out.contexts) {
    out.kv_bytes_full += o.context->FullKvBytes();
    out.kv_bytes_used += o.context->KvBytes();
    out.kv_bytes_attended += o.attended().AttendedKvBytes();
  }
  out.kv_bytes_full += own_tokens * per_token;
  out.kv_bytes_used += own_tokens * per_token;
  out.kv_bytes_attended += own_tokens * per_token;
  return out;
}

absl::StatusOr<ContextOutcome> Handlers::GetContext(const std::string& tenant,
                                                    const std::string& context_id,
                                                    RedisDeadline deadline) const {
  RETURN_IF_ERROR(ValidateContextId(context_id));
  absl::StatusOr<StoreResult> r = store_.Get(tenant, context_id, deadline);
  if (absl::IsNotFound(r.status())) return NotFoundContext(context_id);
  if (!r.ok()) return r.status();
  ContextOutcome out;
  out.context_id = context_id;
  out.context = std::move(r->context);
  out.tier = r->tier;
  out.in_memory = r->in_memory;
  out.in_redis = r->in_redis;
  return out;
}

absl::Status Handlers::DeleteContext(const std::string& tenant, const std::string& context_id,
                                     RedisDeadline deadline) const {
  RETURN_IF_ERROR(ValidateContextId(context_id));
  absl::Status s = store_.Delete(tenant, context_id, deadline);
  if (absl::IsNotFound(s)) return NotFoundContext(context_id);
  return s;
}

}  // namespace ctxcache::server
