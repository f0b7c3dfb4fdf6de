// The Redis tier (see redis_tier.h for the key layout, the write protocol and the quota).
#include "cache/redis_tier.h"

#include <hiredis/hiredis.h>

#include <random>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cache/codec.h"
#include "cache/crc32c.h"
#include "cache/invalidation.h"
#include "common/status.h"

namespace ctxcache {
namespace {

constexpr char kMetaTag[] = "ctxm1";
// Redis refuses bulk strings over proto-max-bulk-len, 512 MB by default.
constexpr int64_t kMaxPartBytes = int64_t{512} << 20;
// Bounds on metadata read back from a shared Redis: nothing is allocated or looped over on
// the strength of a number that nobody checked.
constexpr int64_t kMaxParts = 1 << 20;
constexpr int64_t kMaxEntryBytes = int64_t{1} << 40;

// Drops expired ledger members (KEYS[1] ledger, KEYS[2] total) and leaves `now` (ms, server
// clock) and `used` (bytes) in locals. Shared by the scripts below.
constexpr char kLuaPrune[] = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if #expired > 0 then
  local freed = 0
  for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, '^(%d+):')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
  redis.call('DECRBY', KEYS[2], string.format('%.0f', freed))
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
)lua";

// ARGV: quota, bytes, member, ttl_ms (0: none), the replaced entry's member ("" when none).
// The entry being replaced (if the ledger holds it) is credited, because the writer releases it
// once the new one is published: replacing a damaged or foreign entry near the quota must not
// be refused. (The ledger lives in the tenant's hash slot and the metadata in the context's, so
// the writer reads the metadata first and names the member here.) Returns {1, used after} or
// {0, used}.
constexpr char kLuaReserve[] = R"lua(
local bytes = tonumber(ARGV[2])
local credit = 0
if ARGV[5] ~= '' and redis.call('ZSCORE', KEYS[1], ARGV[5]) then
  credit = tonumber(string.match(ARGV[5], '^(%d+):'))
end
if used - credit + bytes > tonumber(ARGV[1]) then return {0, used} end
local ttl = tonumber(ARGV[4])
local score = '+inf'
if ttl > 0 then score = string.format('%.0f', now + ttl) end
if redis.call('ZADD', KEYS[1], score, ARGV[3]) == 1 then
  used = redis.call('INCRBY', KEYS[2], ARGV[2])
end
if ttl > 0 then
  -- The ledger outlives its longest-lived member.
  redis.call('PEXPIRE', KEYS[1], ttl + 60000)
  redis.call('PEXPIRE', KEYS[2], ttl + 60000)
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
return {1, used}
)lua";

// Publishes an entry: KEYS[1] metadata, KEYS[2] the context's delete counter. ARGV: the
// metadata text, ttl seconds (0: none), the delete counter the writer read ("": unknown, no
// check). Returns {1, the replaced metadata or nil} or {0, the counter now}: deleted since.
constexpr char kLuaPublish[] = R"lua(
if ARGV[3] ~= '' then
  local deletes = redis.call('GET', KEYS[2]) or '0'
  if deletes ~= ARGV[3] then return {0, deletes} end
end
local old = redis.call('GET', KEYS[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return {1, old}
)lua";

// ARGV: member. Returns the bytes released (0 if the member was not there).
constexpr char kLuaRelease[] = R"lua(
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local bytes = tonumber(string.match(ARGV[1], '^(%d+):'))
  redis.call('DECRBY', KEYS[2], bytes)
  return bytes
end
return 0
)lua";

constexpr char kLuaUsage[] = "return used";

std::string RandomWriteId() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }());
  return absl::StrFormat("%016x%016x", rng(), rng());
}

std::string ReplyText(const redisReply& reply) { return std::string(reply.str, reply.len); }

// An error reply as a status; OK for anything else.
absl::Status ReplyError(const redisReply& reply, std::string_view what) {
  if (reply.type != REDIS_REPLY_ERROR) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("redis refused ", std::string(what), ": ", ReplyText(reply)));
}

bool IsOkStatusReply(const redisReply& reply) {
  return reply.type == REDIS_REPLY_STATUS && ReplyText(reply) == "OK";
}

}  // namespace

RedisTier::RedisTier(const RedisOptions& options, std::string model_fingerprint,
                     std::unique_ptr<RedisRouter> router)
    : options_(options),
      model_fingerprint_(std::move(model_fingerprint)),
      router_(std::move(router)) {}

absl::StatusOr<std::unique_ptr<RedisTier>> RedisTier::Create(const RedisOptions& options,
                                                             std::string model_fingerprint) {
  if (options.ttl_seconds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis ttl_seconds must be >= 0 (0: no expiry), got ", options.ttl_seconds));
  }
  if (options.tenant_quota_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redis tenant_quota_bytes must be >= 0 (0: unlimited), got ", options.tenant_quota_bytes));
  }
  if (options.max_part_bytes < 1 || options.max_part_bytes > kMaxPartBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redis max_part_bytes must be in 1..", kMaxPartBytes, ", got ", options.max_part_bytes));
  }
  if (options.key_prefix.find_first_of("{}") != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "redis key_prefix must not hold '{' or '}' (the key layout's hash tags), got \"",
        options.key_prefix, "\""));
  }
  RedisClientOptions client_options;
  client_options.pool_size = options.pool_size;
  client_options.connect_timeout_ms = options.connect_timeout_ms;
  client_options.command_timeout_ms = options.command_timeout_ms;
  client_options.backoff_initial_ms = options.backoff_initial_ms;
  client_options.backoff_max_ms = options.backoff_max_ms;
  ASSIGN_OR_RETURN(std::unique_ptr<RedisRouter> router,
                   CreateRedisRouter(options.url, client_options));
  return std::unique_ptr<RedisTier>(
      new RedisTier(options, std::move(model_fingerprint), std::move(router)));
}

std::string RedisTier::Escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
        c == '_' || c == '-') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

std::string RedisTier::ContextPrefix(const std::string& tenant, const std::string& key) const {
  return absl::StrCat(options_.key_prefix, "{", Escape(tenant), ":", Escape(key), "}");
}

std::string RedisTier::TenantPrefix(const std::string& tenant) const {
  return absl::StrCat(options_.key_prefix, "{", Escape(tenant), "}");
}

std::string RedisTier::MetaKey(const std::string& tenant, const std::string& key) const {
  return absl::StrCat(ContextPrefix(tenant, key), ":m");
}

std::string RedisTier::PartKey(const std::string& tenant, const std::string& key,
                               const std::string& write_id, int64_t part) const {
  return absl::StrCat(ContextPrefix(tenant, key), ":p:", write_id, ":", part);
}

std::string RedisTier::DeleteCounterKey(const std::string& tenant, const std::string& key) const {
  return absl::StrCat(ContextPrefix(tenant, key), ":d");
}

std::vector<std::string> RedisTier::PartKeys(const std::string& tenant, const std::string& key,
                                             const Meta& meta) const {
  std::vector<std::string> keys;
  keys.reserve(meta.parts);
  for (int64_t i = 0; i < meta.parts; ++i) keys.push_back(PartKey(tenant, key, meta.write_id, i));
  return keys;
}

std::string RedisTier::LedgerMember(const std::string& key, const Meta& meta) const {
  return absl::StrCat(meta.bytes, ":", Escape(key), ":", meta.write_id);
}

std::string RedisTier::FormatMeta(const Meta& meta) {
  return absl::StrFormat("%s %s %d %d %08x", kMetaTag, meta.write_id, meta.parts, meta.bytes,
                         meta.crc);
}

absl::StatusOr<RedisTier::Meta> RedisTier::ParseMeta(std::string_view text) {
  const std::vector<absl::string_view> f =
      absl::StrSplit(absl::string_view(text.data(), text.size()), ' ');
  Meta meta;
  // Exactly FormatMeta's spelling: absl's number parsers alone would also take a sign,
  // leading zeros, surrounding whitespace and a crc of any width, which the quota script's Lua
  // pattern reads differently (or not at all), so one entry could be accounted two ways.
  auto lower_hex = [](absl::string_view s, size_t n) {
    return s.size() == n && s.find_first_not_of("0123456789abcdef") == absl::string_view::npos;
  };
  auto count = [](absl::string_view s, int64_t* v) {
    return !s.empty() && s.size() <= 18 && s[0] != '0' &&
           s.find_first_not_of("0123456789") == absl::string_view::npos && absl::SimpleAtoi(s, v);
  };
  const bool ok = f.size() == 5 && f[0] == kMetaTag && lower_hex(f[1], 32) &&
                  count(f[2], &meta.parts) && count(f[3], &meta.bytes) && lower_hex(f[4], 8) &&
                  absl::SimpleHexAtoi(f[4], &meta.crc) && meta.parts >= 1 &&
                  meta.parts <= kMaxParts && meta.bytes >= meta.parts &&
                  meta.bytes <= kMaxEntryBytes;
  if (!ok) {
    return absl::DataLossError(
        absl::StrCat("unreadable cache metadata \"", std::string(text.substr(0, 120)), "\""));
  }
  meta.write_id = std::string(f[1]);
  return meta;
}

absl::Status RedisTier::Reserve(const std::string& tenant, const std::string& member,
                                const std::string& replaced, int64_t bytes,
                                RedisOperationDeadline deadline) {
  const std::string prefix = TenantPrefix(tenant);
  const std::string ledger = absl::StrCat(prefix, ":q:z"), total = absl::StrCat(prefix, ":q:n");
  const std::string script = absl::StrCat(kLuaPrune, kLuaReserve);
  const std::string quota = std::to_string(options_.tenant_quota_bytes);
  const std::string size = std::to_string(bytes);
  const std::string ttl_ms = std::to_string(options_.ttl_seconds * 1000);
  ASSIGN_OR_RETURN(RedisReply reply, router_->Command(ledger,
                                                      {"EVAL", script, "2", ledger, total, quota,
                                                       size, member, ttl_ms, replaced},
                                                      deadline));
  RETURN_IF_ERROR(ReplyError(*reply, "the quota reservation"));
  if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
      reply->element[0]->type != REDIS_REPLY_INTEGER ||
      reply->element[1]->type != REDIS_REPLY_INTEGER) {
    return absl::InternalError("redis: unexpected reply to the quota reservation");
  }
  if (reply->element[0]->integer == 0) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant quota: ", reply->element[1]->integer,
                                                     " of ", options_.tenant_quota_bytes,
                                                     " bytes used, no room for ", bytes, " more"));
  }
  return absl::OkStatus();
}

absl::Status RedisTier::Discard(const std::string& tenant, const std::string& key, const Meta& meta,
                                RedisOperationDeadline deadline) {
  // The parts live in the context's hash slot, the ledger in the tenant's: two pipelines.
  std::vector<std::string> keys = PartKeys(tenant, key, meta);
  RedisArgs del = {"DEL"};
  for (const std::string& k : keys) del.push_back(k);
  ASSIGN_OR_RETURN(RedisReply deleted, router_->Command(keys[0], del, deadline));
  RETURN_IF_ERROR(ReplyError(*deleted, "a cleanup"));
  if (options_.tenant_quota_bytes > 0) {
    const std::string prefix = TenantPrefix(tenant);
    const std::string ledger = absl::StrCat(prefix, ":q:z"), total = absl::StrCat(prefix, ":q:n");
    const std::string member = LedgerMember(key, meta);
    ASSIGN_OR_RETURN(
        RedisReply released,
        router_->Command(ledger, {"EVAL", kLuaRelease, "2", ledger, total, member}, deadline));
    RETURN_IF_ERROR(ReplyError(*released, "a cleanup"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> RedisTier::Write(const std::string& tenant, const std::string& key,
                                             const CompressedContext& context,
                                             std::optional<int64_t> expected_deletes,
                                             RedisDeadline deadline) {
  const RedisOperationDeadline op = router_->OperationDeadline(deadline);
  ASSIGN_OR_RETURN(std::string blob, EncodeContext(context, BlobDtype::kF16));
  Meta meta;
  meta.write_id = RandomWriteId();
  meta.bytes = static_cast<int64_t>(blob.size());
  meta.parts = (meta.bytes + options_.max_part_bytes - 1) / options_.max_part_bytes;
  meta.crc = Crc32c(blob);
  const std::string meta_key = MetaKey(tenant, key);  // RedisArgs only views its arguments
  if (options_.tenant_quota_bytes > 0) {
    // The entry this one replaces, if any, is credited (see kLuaReserve).
    std::string replaced;
    ASSIGN_OR_RETURN(RedisReply old, router_->Command(meta_key, {"GET", meta_key}, op));
    RETURN_IF_ERROR(ReplyError(*old, "GET of the metadata"));
    if (old->type == REDIS_REPLY_STRING) {
      if (absl::StatusOr<Meta> m = ParseMeta(ReplyText(*old)); m.ok()) {
        replaced = LedgerMember(key, *m);
      }
    }
    RETURN_IF_ERROR(Reserve(tenant, LedgerMember(key, meta), replaced, meta.bytes, op));
  }

  const std::string ttl = std::to_string(options_.ttl_seconds);
  const std::vector<std::string> part_keys = PartKeys(tenant, key, meta);
  std::vector<RedisArgs> commands;
  commands.reserve(part_keys.size());
  const std::string_view bytes(blob);
  for (int64_t i = 0; i < meta.parts; ++i) {
    RedisArgs set = {"SET", part_keys[i],
                     bytes.substr(i * options_.max_part_bytes, options_.max_part_bytes)};
    if (options_.ttl_seconds > 0) set.insert(set.end(), {"EX", ttl});
    commands.push_back(std::move(set));
  }
  absl::Status status;
  if (absl::StatusOr<std::vector<RedisReply>> replies = router_->Pipeline(meta_key, commands, op);
      !replies.ok()) {
    status = replies.status();
  } else {
    for (const RedisReply& r : *replies) {
      if (!IsOkStatusReply(*r)) {
        status = r->type == REDIS_REPLY_ERROR
                     ? ReplyError(*r, "a part")
                     : absl::InternalError("redis: unexpected reply to SET of a part");
        break;
      }
    }
  }
  if (!status.ok()) {
    // Nothing names these parts yet: drop them and give the reservation back (best effort;
    // they expire anyway), within what is left of the operation's deadline.
    Discard(tenant, key, meta, op).IgnoreError();
    return status;
  }

  // Every part is stored: publish, unless the context was deleted since the writer looked it
  // up. The script returns the entry this one replaces.
  const std::string meta_text = FormatMeta(meta);
  const std::string counter_key = DeleteCounterKey(tenant, key);
  const std::string expected =
      expected_deletes.has_value() ? std::to_string(*expected_deletes) : std::string();
  // A transport error here leaves it unknown whether the metadata landed, so the parts stay
  // (they expire); an error reply means it did not.
  ASSIGN_OR_RETURN(
      RedisReply reply,
      router_->Command(meta_key,
                       {"EVAL", kLuaPublish, "2", meta_key, counter_key, meta_text,
                        options_.ttl_seconds > 0 ? std::string_view(ttl) : "0", expected},
                       op));
  if (reply->type == REDIS_REPLY_ERROR) {
    Discard(tenant, key, meta, op).IgnoreError();
    return ReplyError(*reply, "the metadata");
  }
  if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 1 ||
      reply->element[0]->type != REDIS_REPLY_INTEGER) {
    Discard(tenant, key, meta, op).IgnoreError();
    return absl::InternalError("redis: unexpected reply to the metadata's publication");
  }
  if (reply->element[0]->integer == 0) {
    Discard(tenant, key, meta, op).IgnoreError();
    return absl::AbortedError(
        "the context was deleted while it was being computed: not stored again");
  }
  if (reply->elements >= 2 && reply->element[1]->type == REDIS_REPLY_STRING) {
    absl::StatusOr<Meta> old = ParseMeta(ReplyText(*reply->element[1]));
    if (old.ok() && old->write_id != meta.write_id) Discard(tenant, key, *old, op).IgnoreError();
  }
  return meta.write_id;
}

RedisTier::ReadResult RedisTier::Read(const std::string& tenant, const std::string& key,
                                      RedisDeadline deadline) {
  ReadResult out;
  auto fail = [&out](absl::Status status) {
    out.context = std::move(status);
    return std::move(out);
  };
  // One deadline for both round trips (metadata and delete counter, then every part), both to
  // the node serving the context's hash slot.
  const RedisOperationDeadline op = router_->OperationDeadline(deadline);
  // RedisArgs only view their arguments: the keys must outlive the commands.
  const std::string meta_key = MetaKey(tenant, key), counter_key = DeleteCounterKey(tenant, key);
  const std::vector<RedisArgs> first = {{"GET", meta_key}, {"GET", counter_key}};
  absl::StatusOr<std::vector<RedisReply>> replies = router_->Pipeline(meta_key, first, op);
  if (!replies.ok()) return fail(replies.status());
  const redisReply& meta_reply = *(*replies)[0];
  const redisReply& counter = *(*replies)[1];
  if (absl::Status s = ReplyError(meta_reply, "GET of the metadata"); !s.ok()) return fail(s);
  if (counter.type == REDIS_REPLY_NIL) {
    out.deletes = 0;
  } else if (int64_t n = 0; counter.type == REDIS_REPLY_STRING &&
                            absl::SimpleAtoi(ReplyText(counter), &n) && n >= 0) {
    out.deletes = n;
  }  // else unreadable: unknown, the writer then publishes without the check
  if (meta_reply.type == REDIS_REPLY_NIL) return fail(absl::NotFoundError("not in the redis tier"));
  if (meta_reply.type != REDIS_REPLY_STRING) {
    return fail(absl::DataLossError("cache metadata is not a string"));
  }
  absl::StatusOr<Meta> meta = ParseMeta(ReplyText(meta_reply));
  if (!meta.ok()) return fail(meta.status());

  const std::vector<std::string> part_keys = PartKeys(tenant, key, *meta);
  RedisArgs mget = {"MGET"};
  for (const std::string& k : part_keys) mget.push_back(k);
  absl::StatusOr<RedisReply> parts = router_->Command(meta_key, mget, op);
  if (!parts.ok()) return fail(parts.status());
  if (absl::Status s = ReplyError(**parts, "MGET of the parts"); !s.ok()) return fail(s);
  if ((*parts)->type != REDIS_REPLY_ARRAY ||
      (*parts)->elements != static_cast<size_t>(meta->parts)) {
    return fail(absl::InternalError("redis: unexpected reply to MGET of the parts"));
  }
  size_t total = 0;
  for (size_t i = 0; i < (*parts)->elements; ++i) {
    const redisReply& part = *(*parts)->element[i];
    if (part.type == REDIS_REPLY_NIL) {
      return fail(absl::NotFoundError(absl::StrCat("redis entry incomplete: part ", i, " of ",
                                                   meta->parts, " is gone (replaced or expired)")));
    }
    if (part.type != REDIS_REPLY_STRING) return fail(absl::DataLossError("a part is not a string"));
    total += part.len;
  }
  if (total != static_cast<size_t>(meta->bytes)) {
    return fail(absl::DataLossError(absl::StrCat("redis entry damaged: parts hold ", total,
                                                 " bytes, metadata says ", meta->bytes)));
  }
  std::string blob;
  blob.reserve(total);
  for (size_t i = 0; i < (*parts)->elements; ++i) {
    blob.append((*parts)->element[i]->str, (*parts)->element[i]->len);
  }
  parts->reset();  // the parts' copy is no longer needed; a blob can be tens of MB
  if (const uint32_t crc = Crc32c(blob); crc != meta->crc) {
    return fail(absl::DataLossError(
        absl::StrFormat("redis entry damaged: checksum %08x, metadata says %08x", crc, meta->crc)));
  }
  absl::StatusOr<CompressedContext> context = DecodeContext(blob, model_fingerprint_);
  if (!context.ok() && !absl::IsFailedPrecondition(context.status())) {
    // The codec's own checks (its CRC, field ranges): damage, whatever the code.
    return fail(
        absl::DataLossError(absl::StrCat("redis entry damaged: ", context.status().message())));
  }
  if (context.ok()) out.write_id = meta->write_id;
  out.context = std::move(context);
  return out;
}

absl::StatusOr<bool> RedisTier::Delete(const std::string& tenant, const std::string& key,
                                       RedisDeadline deadline) {
  const RedisOperationDeadline op = router_->OperationDeadline(deadline);
  const std::string meta_key = MetaKey(tenant, key), counter_key = DeleteCounterKey(tenant, key);
  const std::string counter_ttl = std::to_string(kDeleteCounterTtlSeconds);
  const std::vector<RedisArgs> commands = {
      {"GETDEL", meta_key}, {"INCR", counter_key}, {"EXPIRE", counter_key, counter_ttl}};
  ASSIGN_OR_RETURN(std::vector<RedisReply> replies, router_->Pipeline(meta_key, commands, op));
  for (const RedisReply& r : replies) RETURN_IF_ERROR(ReplyError(*r, "the delete"));
  const redisReply& reply = *replies[0];
  const bool found = reply.type == REDIS_REPLY_STRING;
  // Unreadable metadata names no parts we could find; they expire with their TTL.
  if (found) {
    if (absl::StatusOr<Meta> meta = ParseMeta(ReplyText(reply)); meta.ok()) {
      RETURN_IF_ERROR(Discard(tenant, key, *meta, op));
    }
  }
  RETURN_IF_ERROR(
      Announce(FormatInvalidation({Invalidation::Kind::kDeleted, tenant, key, ""}), op.at));
  return found;
}

absl::Status RedisTier::Put(const std::string& tenant, const std::string& key,
                            const CompressedContext& context, RedisDeadline deadline) {
  ASSIGN_OR_RETURN(const std::string write_id, Write(tenant, key, context, std::nullopt, deadline));
  // Best effort: a replica that misses it holds an equal context under the same key.
  Announce(FormatInvalidation({Invalidation::Kind::kStored, tenant, key, write_id}), deadline)
      .IgnoreError();
  return absl::OkStatus();
}

absl::Status RedisTier::Announce(const std::string& message, RedisDeadline deadline) {
  const std::string channel = InvalidationChannel();
  absl::StatusOr<int64_t> published =
      router_->Publish(channel, message, router_->OperationDeadline(deadline));
  if (!published.ok()) {
    return absl::Status(published.status().code(),
                        absl::StrCat("the invalidation could not be announced to the other "
                                     "replicas: ",
                                     published.status().message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RedisTier::TenantUsage(const std::string& tenant, RedisDeadline deadline) {
  if (options_.tenant_quota_bytes <= 0) return 0;
  const std::string prefix = TenantPrefix(tenant);
  const std::string script = absl::StrCat(kLuaPrune, kLuaUsage);
  const std::string ledger = absl::StrCat(prefix, ":q:z");
  ASSIGN_OR_RETURN(
      RedisReply reply,
      router_->Command(ledger, {"EVAL", script, "2", ledger, absl::StrCat(prefix, ":q:n")},
                       router_->OperationDeadline(deadline)));
  RETURN_IF_ERROR(ReplyError(*reply, "the usage query"));
  if (reply->type != REDIS_REPLY_INTEGER) {
    return absl::InternalError("redis: unexpected reply to the usage query");
  }
  return static_cast<int64_t>(reply->integer);
}

}  // namespace ctxcache
