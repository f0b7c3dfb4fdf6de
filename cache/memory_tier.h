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
// An evicted context stays alive for as long as a request holds its shared_ptr; the tier only
// drops its own reference.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/compress/compressed_context.h"

namespace ctxcache {

class MemoryTier {
 public:
  struct Stats {
    int64_t bytes = 0, entries = 0, evictions = 0, hits = 0, misses = 0;
    int64_t oversize = 0;  // Puts refused because one entry exceeds the whole budget
  };

  // capacity_bytes <= 0 disables the tier (every Put is refused, every Get misses).
  explicit MemoryTier(int64_t capacity_bytes);
  MemoryTier(const MemoryTier&) = delete;
  MemoryTier& operator=(const MemoryTier&) = delete;

  // What an entry is charged against the budget.
  static int64_t EntryBytes(const std::string& tenant, const std::string& key,
                            const CompressedContext& context);

  // The entry, now most recently used; nullptr on a miss. record=false leaves the hit and
  // miss counters alone (a second look by the same request).
  std::shared_ptr<const CompressedContext> Get(const std::string& tenant, const std::string& key,
                                               bool record = true);
  // Inserts or replaces, then evicts least-recently-used entries until the budget holds. An
  // entry larger than the whole budget is not stored (it would evict everything and then
  // itself): returns false.
  bool Put(const std::string& tenant, const std::string& key,
           std::shared_ptr<const CompressedContext> context);
  // True when the entry was present.
  bool Erase(const std::string& tenant, const std::string& key);
  void Clear();

  int64_t capacity_bytes() const { return capacity_bytes_; }
  Stats GetStats() const;

 private:
  using Key = std::pair<std::string, std::string>;  // (tenant, key)
  struct Entry {
    Key key;
    std::shared_ptr<const CompressedContext> context;
    int64_t bytes = 0;
  };
  using List = std::list<Entry>;  // front: most recently used

  // Unlinks an entry and hands back its context, for the caller to free outside the lock.
  std::shared_ptr<const CompressedContext> RemoveLocked(List::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t capacity_bytes_;
  mutable absl::Mutex mu_;
  List lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Key, List::iterator> index_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
