// Request and response conversion (see convert.h).
#include "server/convert.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ctxcache::server {

namespace pb = ::ctxcache::v1;

namespace {

CompressInput CompressFromProto(const pb::CompressRequest& req) {
  CompressInput in;
  const pb::Document& d = req.document();
  if (d.content_case() == pb::Document::kTokens) {
    in.document.is_text = false;
    in.document.tokens.assign(d.tokens().ids().begin(), d.tokens().ids().end());
  } else {
    in.document.is_text = true;
    in.document.text = d.text();
  }
  const pb::CompressionParams& p = req.compression();
  CompressionSpec& s = in.spec;
  s.method = p.method();
  s.ratio = p.ratio();
  s.budget = p.budget();
  s.per_layer = p.per_layer();
  if (p.has_n_sink()) s.n_sink = p.n_sink();
  if (p.has_window()) s.window = p.window();
  if (p.has_chunk()) s.chunk = p.chunk();
  if (p.has_kernel()) s.kernel = p.kernel();
  if (p.has_pooling()) s.pooling = p.pooling();
  if (p.has_n_future()) s.n_future = p.n_future();
  if (p.has_max_positions()) s.max_positions = p.max_positions();
  if (p.has_separators()) s.separators = p.separators();
  if (p.has_kv_dtype()) s.kv_dtype = p.kv_dtype();
  if (p.has_head_budget()) s.head_budget = p.head_budget();
  if (p.has_head_budget_alpha()) s.head_budget_alpha = p.head_budget_alpha();
  s.question = req.question();
  return in;
}

}  // namespace

absl::StatusOr<CompressInput> FromProto(const pb::CompressRequest& req) {
  return CompressFromProto(req);
}

absl::StatusOr<GenerateInput> FromProto(const pb::GenerateRequest& req) {
  GenerateInput in;
  for (const pb::ContextRef& ref : req.contexts()) {
    ContextInput c;
    if (ref.source_case() == pb::ContextRef::kInline) {
      c.inline_doc = CompressFromProto(ref.inline_());
    } else {
      c.context_id = ref.context_id();
    }
    if (ref.has_select()) c.select = QuerySelect{ref.select().ratio(), ref.select().budget()};
    in.contexts.push_back(std::move(c));
  }
  if (req.prompt_case() == pb::GenerateRequest::kChat) {
    in.chat = true;
    for (const pb::ChatMessage& m : req.chat().messages()) {
      in.messages.push_back(ChatMessage{m.role(), m.content()});
    }
    in.system = req.chat().system();
  } else {
    in.text = req.text();
  }
  const pb::SamplingParams& sp = req.sampling();
  SamplingParams& s = in.params.sampling;
  if (sp.has_temperature()) s.temperature = sp.temperature();
  if (sp.has_top_k()) s.top_k = sp.top_k();
  if (sp.has_top_p()) s.top_p = sp.top_p();
  if (sp.has_min_p()) s.min_p = sp.min_p();
  if (sp.has_repetition_penalty()) s.repetition_penalty = sp.repetition_penalty();
  if (sp.has_repeat_last_n()) s.repeat_last_n = sp.repeat_last_n();
  s.seed = sp.seed();
  const pb::DecodePolicy& dp = req.decode();
  DecodePolicy& d = in.params.decode;
  switch (dp.kind()) {
    case pb::DecodePolicy::KIND_FULL:
      d.kind = DecodePolicy::Kind::kFull;
      break;
    case pb::DecodePolicy::KIND_RECYCLED:
      d.kind = DecodePolicy::Kind::kRecycled;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("decode.kind ", static_cast<int>(dp.kind()),
                       " is unknown; use KIND_FULL or KIND_RECYCLED"));
  }
  if (dp.has_stride()) d.stride = dp.stride();
  if (dp.has_top_k()) d.top_k = dp.top_k();
  if (dp.has_pool_kernel()) d.pool_kernel = dp.pool_kernel();
  d.dynamic = dp.dynamic();
  if (dp.has_similarity_threshold()) d.similarity_threshold = dp.similarity_threshold();
  if (req.has_max_tokens()) in.params.max_tokens = req.max_tokens();
  in.params.stop.assign(req.stop().begin(), req.stop().end());
  in.params.ignore_eos = req.ignore_eos();
  return in;
}

void ToProto(const RequestLimits& limits, pb::Limits* out) {
  out->set_max_document_tokens(limits.max_document_tokens);
  out->set_max_document_bytes(limits.max_document_bytes);
  out->set_max_contexts_per_request(limits.max_contexts_per_request);
  out->set_max_prompt_bytes(limits.max_prompt_bytes);
  out->set_max_chat_messages(limits.max_chat_messages);
  out->set_max_ratio(kMaxRatio);
  out->set_max_budget(kMaxCompressBudget);
  out->set_max_n_sink(kMaxNSink);
  out->set_max_window(kMaxWindow);
  out->set_max_chunk(kMaxChunk);
  out->set_max_kernel(kMaxKernel);
  out->set_max_n_future(kMaxNFuture);
  out->set_max_positions(kMaxPositions);
  out->set_max_separators_bytes(kMaxSeparatorsBytes);
  out->set_max_tokens(kMaxGenerateTokens);
  out->set_max_stop_strings(kMaxStopStrings);
  out->set_max_stop_bytes(kMaxStopBytes);
  out->set_max_top_k(kMaxSamplingTopK);
  out->set_max_repeat_last_n(kMaxRepeatLastN);
  out->set_max_recycled_stride(kMaxRecycledStride);
  out->set_max_recycled_top_k(kMaxRecycledTopK);
  out->set_max_recycled_pool_kernel(kMaxRecycledPoolKernel);
  for (const char* role : ChatRoles()) out->add_chat_roles(role);
}

pb::CacheTier ToProto(CacheTier tier) {
  switch (tier) {
    case CacheTier::kComputed:
      return pb::CACHE_TIER_COMPUTED;
    case CacheTier::kMemory:
      return pb::CACHE_TIER_MEMORY;
    case CacheTier::kRedis:
      return pb::CACHE_TIER_REDIS;
  }
  return pb::CACHE_TIER_UNSPECIFIED;
}

pb::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return pb::FINISH_REASON_STOP;
    case FinishReason::kEndOfGeneration:
      return pb::FINISH_REASON_END_OF_GENERATION;
    case FinishReason::kContextFull:
      return pb::FINISH_REASON_CONTEXT_FULL;
    case FinishReason::kCancelled:
      break;  // a cancelled call ends with a status, never a usage message
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

void ToProto(const ContextOutcome& o, pb::ContextInfo* info) {
  const CompressedContext& c = *o.context;
  info->set_context_id(o.context_id);
  info->set_method(c.method);
  info->set_params(c.params);
  info->set_method_version(c.method_version);
  info->set_original_tokens(c.source_tokens);
  const int64_t heads = int64_t{c.kv.n_layers()} * c.kv.n_kv_heads();
  info->set_kept_tokens(heads > 0 ? static_cast<double>(c.KeptEntries()) / heads : 0.0);
  info->set_kept_entries(c.KeptEntries());
  info->set_full_entries(c.FullEntries());
  info->set_full_kv_bytes(c.FullKvBytes());
  info->set_kv_bytes(c.KvBytes());
  info->set_next_position(c.kv.next_position);
  info->set_tier(ToProto(o.tier));
}

void ToProto(const GenerateOutcome& o, double queue_seconds, pb::Usage* u) {
  const GenerateResult& r = o.result;
  u->set_prompt_tokens(r.prompt_tokens);
  u->set_completion_tokens(static_cast<int64_t>(r.tokens.size()));
  int64_t original = 0;
  double kept = 0;
  for (const ContextOutcome& c : o.contexts) {
    const CompressedContext& ctx = *c.context;
    original += ctx.source_tokens;
    const int64_t heads = int64_t{ctx.kv.n_layers()} * ctx.kv.n_kv_heads();
    if (heads > 0) kept += static_cast<double>(ctx.KeptEntries()) / heads;
    pb::ContextUsage* cu = u->add_contexts();
    cu->set_context_id(c.context_id);
    cu->set_tier(ToProto(c.tier));
    cu->set_original_tokens(ctx.source_tokens);
    cu->set_kept_entries(ctx.KeptEntries());
    cu->set_full_entries(ctx.FullEntries());
    cu->set_kv_bytes(ctx.KvBytes());
    cu->set_full_kv_bytes(ctx.FullKvBytes());
    cu->set_compute_ms(c.compute_seconds * 1e3);
    cu->set_attended_entries(c.attended().KeptEntries());
    cu->set_kv_bytes_attended(c.attended().AttendedKvBytes());
  }
  u->set_context_tokens_original(original);
  u->set_context_tokens_kept(kept);
  u->set_kv_bytes_full(o.kv_bytes_full);
  u->set_kv_bytes_used(o.kv_bytes_used);
  u->set_kv_bytes_saved(o.kv_bytes_full - o.kv_bytes_used);
  u->set_kv_bytes_attended(o.kv_bytes_attended);
  u->set_queue_ms(queue_seconds * 1e3);
  u->set_context_ms(o.context_seconds * 1e3);
  u->set_ttft_ms((o.context_seconds + r.prefill_seconds) * 1e3);
  const double decoded = r.tokens.size() > 1 ? static_cast<double>(r.tokens.size() - 1) : 0.0;
  u->set_decode_tokens_per_second(r.decode_seconds > 0 ? decoded / r.decode_seconds : 0.0);
  u->set_finish_reason(ToProto(r.finish));
}

}  // namespace ctxcache::server
