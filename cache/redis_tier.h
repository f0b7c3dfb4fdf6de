// The Redis tier of the context cache: codec blobs (cache/codec.h, fp16, lossless for the
// engine's contexts) shared by every replica, split into parts, published by a metadata key
// written last, with a TTL and an optional per-tenant byte quota.
//
// Key layout (P = key_prefix, T = escaped tenant, K = escaped cache key):
//   P T ":m:" K                  metadata, written last: "ctxm1 <write id> <parts> <bytes>
//                                <crc32c>" (crc32c in hex, of the whole blob)
//   P T ":p:" K ":" W ":" i      part i (0-based) of write W, at most max_part_bytes
//   P T ":q:z", P T ":q:n"       the tenant's quota ledger (sorted set) and running total
// Tenants and keys are escaped (every byte outside [A-Za-z0-9._-] becomes %XX), so neither
// holds ':' and no tenant name can produce a key inside another tenant's namespace.
//
// Why a reader never sees half an entry: a writer stores the parts under a fresh random write
// id, and only when every part is acknowledged does it publish the metadata naming that id
// (SET ... GET, atomically returning the entry it replaced, whose parts it then deletes). A
// writer that dies midway leaves parts that no metadata names, which expire with their TTL.
// A reader takes the metadata, fetches the parts it names in one MGET, and checks count, size
// and CRC32C before decoding; a part missing (replaced or expired under it) is a miss.
//
// Quota accounting: each tenant has a ledger, a sorted set whose members are
// "<bytes>:<K>:<W>" scored by the entry's expiry time (ms, Redis server clock; +inf without
// TTL), and a counter of the bytes the ledger holds. A Lua script reserves space before a
// write: it drops expired members (subtracting their bytes), then adds the new one only if the
// total, less the entry being replaced, stays within the quota. So the check is atomic across
// replicas, expiry frees quota without anyone deleting, and a writer that dies after reserving
// holds its bytes only until they would have expired anyway. Replacing or deleting an entry
// releases its member (ZREM-guarded, so releasing twice is harmless). The ledger counts blob bytes,
// not Redis's per-key overhead. With tenant_quota_bytes = 0 there is no ledger at all (no extra
// round trip); enabling a quota later starts counting from the entries written after.
//
// Requires Redis >= 6.2 (SET ... GET). Not cluster-aware: keys of one entry may hash to
// different slots.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/context_store.h"
#include "cache/redis_client.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache {

class RedisTier {
 public:
  // `options.url` must be set (ParseRedisUrl errors are returned as they are).
  // `model_fingerprint`, when not empty, is checked on every read.
  static absl::StatusOr<std::unique_ptr<RedisTier>> Create(const RedisOptions& options,
                                                           std::string model_fingerprint);

  // Every operation takes the caller's absolute deadline (steady clock; kNoRedisDeadline: none)
  // and ends by the smaller of it and now + command_timeout_ms, all its round trips together
  // (RedisClient::OperationDeadline): DeadlineExceeded, with what ran out, when it does not.
  //
  // The entry. Errors:
  //  * NotFound: absent, expired, or incomplete (a part replaced or expired under the reader);
  //  * DataLoss: damaged (metadata unreadable, size or checksum mismatch, codec refuses it);
  //  * FailedPrecondition: made by another model;
  //  * Unavailable / DeadlineExceeded: Redis unreachable or slow (RedisClient).
  absl::StatusOr<CompressedContext> Get(const std::string& tenant, const std::string& key,
                                        RedisDeadline deadline = kNoRedisDeadline);
  // Stores (or replaces) the entry. ResourceExhausted when the tenant's quota has no room:
  // nothing is written. Otherwise transport errors, or Internal for an error reply.
  absl::Status Put(const std::string& tenant, const std::string& key,
                   const CompressedContext& context, RedisDeadline deadline = kNoRedisDeadline);
  // True when an entry was there.
  absl::StatusOr<bool> Delete(const std::string& tenant, const std::string& key,
                              RedisDeadline deadline = kNoRedisDeadline);

  // Bytes the tenant's quota ledger holds now (0 without a ledger). For tests and operators.
  absl::StatusOr<int64_t> TenantUsage(const std::string& tenant,
                                      RedisDeadline deadline = kNoRedisDeadline);

  // Key layout (see top), public for tests and tools.
  static std::string Escape(const std::string& s);
  std::string TenantPrefix(const std::string& tenant) const;
  std::string MetaKey(const std::string& tenant, const std::string& key) const;
  std::string PartKey(const std::string& tenant, const std::string& key,
                      const std::string& write_id, int64_t part) const;

  // The metadata record (see top), public for tests and the fuzz target: what a reader parses
  // comes from a shared Redis and may be anything.
  struct Meta {
    std::string write_id;  // 32 lowercase hex digits
    int64_t parts = 0, bytes = 0;
    uint32_t crc = 0;
  };
  static std::string FormatMeta(const Meta& meta);
  // DataLoss unless `text` is exactly what FormatMeta writes for a meta within the limits.
  static absl::StatusOr<Meta> ParseMeta(std::string_view text);

  bool connected() const { return client_->connected(); }
  RedisClient& client() { return *client_; }

 private:
  RedisTier(const RedisOptions& options, std::string model_fingerprint,
            std::unique_ptr<RedisClient> client);
  std::vector<std::string> PartKeys(const std::string& tenant, const std::string& key,
                                    const Meta& meta) const;
  std::string LedgerMember(const std::string& key, const Meta& meta) const;
  absl::Status Reserve(const std::string& tenant, const std::string& key, const std::string& member,
                       int64_t bytes, RedisOperationDeadline deadline);
  // Best effort: drops a replaced or deleted entry's parts and its ledger member.
  absl::Status Discard(const std::string& tenant, const std::string& key, const Meta& meta,
                       RedisOperationDeadline deadline);

  const RedisOptions options_;
  const std::string model_fingerprint_;
  std::unique_ptr<RedisClient> client_;
};

}  // namespace ctxcache
