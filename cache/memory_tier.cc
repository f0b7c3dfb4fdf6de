// The in-process LRU tier (see memory_tier.h).
#include "cache/memory_tier.h"

#include <vector>

namespace ctxcache {

MemoryTier::MemoryTier(int64_t capacity_bytes, int64_t tenant_capacity_bytes)
    : capacity_bytes_(capacity_bytes), tenant_capacity_bytes_(tenant_capacity_bytes) {}

int64_t MemoryTier::EntryBytes(const std::string& tenant, const std::string& key,
                               const CompressedContext& context) {
  // What the resident copy holds: K and V as stored (fp16 rows, or int8 / int4 codes with
  // their scales; kv_cache.h), an int32 position per entry, the digest as fp32, and the two
  // key strings (so that empty contexts are not free).
  const int64_t entries = context.kv.TotalEntries();
  return context.kv.StoredBytes() + entries * static_cast<int64_t>(sizeof(int32_t)) +
         static_cast<int64_t>(context.digest.size() * sizeof(float)) +
         static_cast<int64_t>(tenant.size() + key.size());
}

std::shared_ptr<const CompressedContext> MemoryTier::Get(const std::string& tenant,
                                                         const std::string& key, bool record) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key(tenant, key));
  if (it == index_.end()) {
    if (record) ++stats_.misses;
    return nullptr;
  }
  lru_.splice(lru_.begin(), lru_, it->second);  // iterators stay valid through splice
  if (record) ++stats_.hits;
  return it->second->context;
}

bool MemoryTier::Put(const std::string& tenant, const std::string& key,
                     std::shared_ptr<const CompressedContext> context, std::string write_id) {
  if (context == nullptr) return false;
  const int64_t bytes = EntryBytes(tenant, key, *context);
  // Dropped contexts are freed after the lock is released (declared before it).
  std::vector<std::shared_ptr<const CompressedContext>> dropped;
  absl::MutexLock lock(&mu_);
  Key k(tenant, key);
  if (auto it = index_.find(k); it != index_.end()) dropped.push_back(RemoveLocked(it->second));
  const bool shared = tenant_capacity_bytes_ > 0;
  if (bytes > capacity_bytes_ || (shared && bytes > tenant_capacity_bytes_)) {
    ++stats_.oversize;
    return false;
  }
  if (shared) MakeRoomInShareLocked(tenant, bytes, &dropped);
  while (stats_.bytes + bytes > capacity_bytes_ && !lru_.empty()) {
    dropped.push_back(RemoveLocked(shared ? BudgetVictimLocked(tenant) : std::prev(lru_.end())));
    ++stats_.evictions;
  }
  lru_.push_front(Entry{k, std::move(context), bytes, std::move(write_id)});
  index_.emplace(std::move(k), lru_.begin());
  stats_.bytes += bytes;
  ++stats_.entries;
  tenant_bytes_[tenant] += bytes;
  return true;
}

MemoryTier::List::iterator MemoryTier::BudgetVictimLocked(const std::string& inserting) {
  // An even split of the whole budget among the tenants holding entries (the inserting one
  // included): some tenant holds more than that whenever the budget is exceeded, unless the
  // new entry itself is what exceeds it. A walk per eviction, under the lock: entries are
  // contexts of KBs to MBs, so a tier holds thousands at most.
  int64_t holders = 1;  // the inserting tenant
  for (const auto& [tenant, bytes] : tenant_bytes_) {
    if (bytes > 0 && tenant != inserting) ++holders;
  }
  const int64_t even = capacity_bytes_ / holders;
  auto above_even = [&](const std::string& tenant) {
    auto it = tenant_bytes_.find(tenant);
    return it != tenant_bytes_.end() && it->second > even;
  };
  for (auto it = lru_.end(); it != lru_.begin();) {
    --it;
    if (above_even(it->key.first)) return it;
  }
  // Everyone is within an even split: the newcomer makes room from its own entries first.
  for (auto it = lru_.end(); it != lru_.begin();) {
    --it;
    if (it->key.first == inserting) return it;
  }
  return std::prev(lru_.end());
}

void MemoryTier::MakeRoomInShareLocked(
    const std::string& tenant, int64_t incoming,
    std::vector<std::shared_ptr<const CompressedContext>>* dropped) {
  auto held = [&] {
    auto it = tenant_bytes_.find(tenant);
    return it == tenant_bytes_.end() ? int64_t{0} : it->second;
  };
  // One walk from the least recently used end, skipping other tenants' entries. Erasing
  // `victim` leaves `it` valid (std::list).
  for (auto it = lru_.end(); it != lru_.begin() && held() + incoming > tenant_capacity_bytes_;) {
    auto victim = std::prev(it);
    if (victim->key.first != tenant) {
      it = victim;
      continue;
    }
    dropped->push_back(RemoveLocked(victim));
    ++stats_.evictions;
    ++stats_.tenant_evictions;
  }
}

bool MemoryTier::Erase(const std::string& tenant, const std::string& key) {
  std::shared_ptr<const CompressedContext> dropped;
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key(tenant, key));
  if (it == index_.end()) return false;
  dropped = RemoveLocked(it->second);
  return true;
}

bool MemoryTier::SetWriteId(const std::string& tenant, const std::string& key,
                            const CompressedContext* context, const std::string& write_id) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key(tenant, key));
  if (it == index_.end() || it->second->context.get() != context) return false;
  it->second->write_id = write_id;
  return true;
}

bool MemoryTier::EraseIfHolds(const std::string& tenant, const std::string& key,
                              const CompressedContext* context) {
  std::shared_ptr<const CompressedContext> dropped;
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key(tenant, key));
  if (it == index_.end() || it->second->context.get() != context) return false;
  dropped = RemoveLocked(it->second);
  return true;
}

bool MemoryTier::EraseUnlessWriteId(const std::string& tenant, const std::string& key,
                                    const std::string& write_id) {
  std::shared_ptr<const CompressedContext> dropped;
  absl::MutexLock lock(&mu_);
  auto it = index_.find(Key(tenant, key));
  if (it == index_.end() || it->second->write_id == write_id) return false;
  dropped = RemoveLocked(it->second);
  return true;
}

void MemoryTier::Clear() {
  // Release the contexts outside the lock: freeing a few hundred MB of vectors takes a while
  // and would stall every concurrent lookup.
  List dropped;
  {
    absl::MutexLock lock(&mu_);
    dropped.swap(lru_);
    index_.clear();
    for (auto& [tenant, bytes] : tenant_bytes_) bytes = 0;
    stats_.bytes = 0;
    stats_.entries = 0;
  }
}

MemoryTier::Stats MemoryTier::GetStats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

std::map<std::string, int64_t> MemoryTier::TenantBytes() const {
  absl::MutexLock lock(&mu_);
  return std::map<std::string, int64_t>(tenant_bytes_.begin(), tenant_bytes_.end());
}

std::shared_ptr<const CompressedContext> MemoryTier::RemoveLocked(List::iterator it) {
  std::shared_ptr<const CompressedContext> context = std::move(it->context);
  stats_.bytes -= it->bytes;
  tenant_bytes_[it->key.first] -= it->bytes;
  --stats_.entries;
  index_.erase(it->key);
  lru_.erase(it);
  return context;
}

}  // namespace ctxcache
