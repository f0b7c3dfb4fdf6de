// The in-process tier of the context cache: decoded contexts, shared read-only with the
// requests that use them, evicted least-recently-used first when the byte budget is spent.
//
// Entries are keyed by (tenant, key) as a pair, never by a concatenation a crafted key could
// collide with. An entry is charged EntryBytes(): what its resident copy occupies (K/V as
// stored: fp16 rows or int8 / int4 codes with scales, kv_cache.h; an int32 position per
// entry; the digest as fp32) plus its two key strings, so that the budget bounds the
// process's memory. The KV part equals the "KV bytes" the service reports per context;
// positions add 4 bytes per entry.
//
// Tenant shares (optional): with a per-tenant budget, a tenant's contexts never hold more
// than that many bytes. A Put that would take its tenant past the share evicts that tenant's
// own least-recently-used entries first, so a tenant filling the tier pushes out its own
// contexts, not the others'. When shares add up to more than the whole budget and it is full,
// the entry evicted is the least recently used of a tenant holding more than an even split of
// the budget among the tenants holding entries: a tenant within its even split is not evicted
// by the others' traffic. Without shares the tier is one LRU over every tenant.
//
// An evicted context stays alive for as long as a request holds its shared_ptr; the tier only
// drops its own reference.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache {

class MemoryTier {
 public:
  struct Stats {
    int64_t bytes = 0, entries = 0, evictions = 0, hits = 0, misses = 0;
    // Puts refused because one entry exceeds the whole budget or its tenant's share.
    int64_t oversize = 0;
    // Of `evictions`, those that kept a tenant within its share (its own entries).
    int64_t tenant_evictions = 0;
  };

  // capacity_bytes <= 0 disables the tier (every Put is refused, every Get misses).
  // tenant_capacity_bytes: each tenant's share; <= 0 = no per-tenant limit.
  explicit MemoryTier(int64_t capacity_bytes, int64_t tenant_capacity_bytes = 0);
  MemoryTier(const MemoryTier&) = delete;
  MemoryTier& operator=(const MemoryTier&) = delete;

  // What an entry is charged against the budget.
  static int64_t EntryBytes(const std::string& tenant, const std::string& key,
                            const CompressedContext& context);

  // The entry, now most recently used; nullptr on a miss. record=false leaves the hit and
  // miss counters alone (a second look by the same request).
  std::shared_ptr<const CompressedContext> Get(const std::string& tenant, const std::string& key,
                                               bool record = true);
  // Inserts or replaces, then evicts least-recently-used entries until the budget holds
  // (first the tenant's own, when a share is set and the tenant would exceed it). An entry
  // larger than the whole budget or the tenant's share is not stored (it would evict
  // everything and then itself): returns false. `write_id`: the Redis entry this context
  // is a copy of ("" when not known to be in Redis).
  bool Put(const std::string& tenant, const std::string& key,
           std::shared_ptr<const CompressedContext> context, std::string write_id = "");
  // True when the entry was present.
  bool Erase(const std::string& tenant, const std::string& key);
  // Records that the entry, if it still holds `context`, is a copy of Redis's write
  // `write_id` (its write has landed). True when it did.
  bool SetWriteId(const std::string& tenant, const std::string& key,
                  const CompressedContext* context, const std::string& write_id);
  // Erases the entry if it still holds `context`. True when it did.
  bool EraseIfHolds(const std::string& tenant, const std::string& key,
                    const CompressedContext* context);
  // Erases the entry unless it is a copy of `write_id` (Redis now holds that write: any other
  // copy is older or unknown). True when an entry was erased.
  bool EraseUnlessWriteId(const std::string& tenant, const std::string& key,
                          const std::string& write_id);
  void Clear();

  int64_t capacity_bytes() const { return capacity_bytes_; }
  int64_t tenant_capacity_bytes() const { return tenant_capacity_bytes_; }
  Stats GetStats() const;
  // Bytes held per tenant, for every tenant that has stored an entry since the tier was made
  // (0 once its entries are gone, so that a per-tenant gauge falls back to zero).
  std::map<std::string, int64_t> TenantBytes() const;

 private:
  using Key = std::pair<std::string, std::string>;  // (tenant, key)
  struct Entry {
    Key key;
    std::shared_ptr<const CompressedContext> context;
    int64_t bytes = 0;
    std::string write_id;  // the Redis write it copies; "" unknown
  };
  using List = std::list<Entry>;  // front: most recently used

  // Unlinks an entry and hands back its context, for the caller to free outside the lock.
  std::shared_ptr<const CompressedContext> RemoveLocked(List::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // With shares, the entry to evict when the whole budget is exceeded: the least recently used
  // entry of a tenant holding more than an even split of the budget.
  List::iterator BudgetVictimLocked(const std::string& inserting)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evicts `tenant`'s least-recently-used entries until `incoming` more bytes fit its share.
  void MakeRoomInShareLocked(const std::string& tenant, int64_t incoming,
                             std::vector<std::shared_ptr<const CompressedContext>>* dropped)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t capacity_bytes_;
  const int64_t tenant_capacity_bytes_;
  mutable absl::Mutex mu_;
  List lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Key, List::iterator> index_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int64_t> tenant_bytes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
