// The Redis tier of the context cache: codec blobs (cache/codec.h, fp16, lossless for the
// engine's contexts) shared by every replica, split into parts, published by a metadata key
// written last, with a TTL and an optional per-tenant byte quota.
//
// Key layout (P = key_prefix, T = escaped tenant, K = escaped cache key; {...} is a Redis
// Cluster hash tag, so that every key of one context shares one hash slot, and the quota ledger
// of one tenant another):
//   P "{" T ":" K "}:m"            metadata, written last: "ctxm1 <write id> <parts> <bytes>
//                                  <crc32c>" (crc32c in hex, of the whole blob)
//   P "{" T ":" K "}:p:" W ":" i   part i (0-based) of write W, at most max_part_bytes
//   P "{" T ":" K "}:d"            the context's delete counter (see "Deletes" below)
//   P "{" T "}:q:z", P "{" T "}:q:n"  the tenant's quota ledger (sorted set) and running total
// Tenants and keys are escaped (every byte outside [A-Za-z0-9._-] becomes %XX), so neither
// holds ':' or a brace and no tenant name can produce a key inside another tenant's namespace;
// the prefix may hold neither brace (Create refuses it). The layout is the same on one node and
// on a cluster (cache/redis_router.h routes each pipeline by its hash tag).
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
// Deletes and replacements reach every replica: Delete removes the metadata, bumps the
// context's delete counter (kept kDeleteCounterTtlSeconds) and publishes an Invalidation on
// P "invalidate" (cache/invalidation.h), as does every writer after a Write (kStored, naming
// the write id Redis now holds, so that replicas holding another version drop theirs). A writer
// names the delete counter it read when it looked the context up before computing it; the
// metadata is published only if the counter still holds that value (one Lua script), so a
// context deleted while it was being computed, on any replica, is not stored again.
//
// Requires Redis >= 6.2 (GETDEL).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/context_store.h"
#include "cache/redis_client.h"
#include "cache/redis_router.h"
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
  //  * Unavailable / DeadlineExceeded: Redis unreachable or slow (RedisClient, RedisCluster).
  absl::StatusOr<CompressedContext> Get(const std::string& tenant, const std::string& key,
                                        RedisDeadline deadline = kNoRedisDeadline) {
    return Read(tenant, key, deadline).context;
  }
  // Get with what a writer needs afterwards: the entry's write id, and the context's delete
  // counter as read with the metadata (also on a miss; unset when Redis could not be asked).
  struct ReadResult {
    absl::StatusOr<CompressedContext> context = absl::NotFoundError("");
    std::string write_id;            // of the entry read, when context is OK
    std::optional<int64_t> deletes;  // the delete counter (0: never deleted)
  };
  ReadResult Read(const std::string& tenant, const std::string& key,
                  RedisDeadline deadline = kNoRedisDeadline);

  // Stores (or replaces) the entry; its write id. ResourceExhausted when the tenant's quota has
  // no room: nothing is written. Aborted when `expected_deletes` is set and the context's
  // delete counter no longer holds it (deleted since it was looked up): nothing is published.
  // Otherwise transport errors, or Internal for an error reply. Announces nothing: the writer
  // records the write id where it keeps the context, then announces it (Announce, kStored), so
  // that its own announcement, echoed back, finds its copy current.
  absl::StatusOr<std::string> Write(const std::string& tenant, const std::string& key,
                                    const CompressedContext& context,
                                    std::optional<int64_t> expected_deletes,
                                    RedisDeadline deadline = kNoRedisDeadline);
  // Write without the delete check, then the announcement (best effort).
  absl::Status Put(const std::string& tenant, const std::string& key,
                   const CompressedContext& context, RedisDeadline deadline = kNoRedisDeadline);
  // True when an entry was there. Bumps the delete counter and announces the delete
  // (Invalidation kDeleted) whether or not it was there, so that a retry reaches replicas a
  // failed announcement missed: an error from the announcement is returned (the entry is gone).
  absl::StatusOr<bool> Delete(const std::string& tenant, const std::string& key,
                              RedisDeadline deadline = kNoRedisDeadline);
  // Publishes on the invalidation channel (InvalidationChannel()).
  absl::Status Announce(const std::string& message, RedisDeadline deadline = kNoRedisDeadline);

  // Bytes the tenant's quota ledger holds now (0 without a ledger). For tests and operators.
  absl::StatusOr<int64_t> TenantUsage(const std::string& tenant,
                                      RedisDeadline deadline = kNoRedisDeadline);

  // Key layout (see top), public for tests and tools.
  static std::string Escape(const std::string& s);
  // The hash-tagged namespace of one context, P "{" T ":" K "}", and the tenant's, P "{" T "}".
  std::string ContextPrefix(const std::string& tenant, const std::string& key) const;
  std::string TenantPrefix(const std::string& tenant) const;
  std::string MetaKey(const std::string& tenant, const std::string& key) const;
  std::string PartKey(const std::string& tenant, const std::string& key,
                      const std::string& write_id, int64_t part) const;
  std::string DeleteCounterKey(const std::string& tenant, const std::string& key) const;
  std::string InvalidationChannel() const { return options_.key_prefix + "invalidate"; }
  static constexpr int64_t kDeleteCounterTtlSeconds = 24 * 3600;

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

  bool connected() const { return router_->connected(); }
  RedisRouter& router() { return *router_; }

 private:
  RedisTier(const RedisOptions& options, std::string model_fingerprint,
            std::unique_ptr<RedisRouter> router);
  std::vector<std::string> PartKeys(const std::string& tenant, const std::string& key,
                                    const Meta& meta) const;
  std::string LedgerMember(const std::string& key, const Meta& meta) const;
  // `replaced`: the ledger member of the entry this write replaces ("" when none), credited.
  absl::Status Reserve(const std::string& tenant, const std::string& member,
                       const std::string& replaced, int64_t bytes, RedisOperationDeadline deadline);
  // Best effort: drops a replaced or deleted entry's parts and its ledger member.
  absl::Status Discard(const std::string& tenant, const std::string& key, const Meta& meta,
                       RedisOperationDeadline deadline);

  const RedisOptions options_;
  const std::string model_fingerprint_;
  std::unique_ptr<RedisRouter> router_;
};

}  // namespace ctxcache
