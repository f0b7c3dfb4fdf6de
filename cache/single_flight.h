// Single flight: concurrent calls for the same key share one computation. The first caller
// (the leader) runs the function; callers that arrive while it runs wait and receive a copy
// of the leader's result, value or error alike. Once the leader finishes the key is free
// again, so a later call computes afresh: results are never cached here (errors in particular
// must not stick), which is the cache tiers' job.
//
// A function must not call Do with its own key (it would wait for itself).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace ctxcache {

template <typename T>
class SingleFlight {
 public:
  // Runs fn() (absl::StatusOr<T>()) or joins the run already in flight for `key`. `leader`,
  // when given, says whether this call ran fn.
  template <typename Fn>
  absl::StatusOr<T> Do(const std::string& key, Fn&& fn, bool* leader = nullptr) {
    std::shared_ptr<Call> call;
    bool is_leader = false;
    {
      absl::MutexLock lock(&mu_);
      auto [it, inserted] = calls_.try_emplace(key);
      if (inserted) it->second = std::make_shared<Call>();
      call = it->second;
      is_leader = inserted;
      if (!is_leader) ++call->waiters;
    }
    if (leader != nullptr) *leader = is_leader;
    if (!is_leader) {
      absl::MutexLock lock(&call->mu);
      call->mu.Await(absl::Condition(&call->done));
      return call->result;
    }
    // The guard publishes a result even if fn throws, so waiters never hang.
    Publisher publisher{this, &key, call.get()};
    publisher.result = fn();
    return publisher.result;
  }

  // Callers waiting on the run in flight for `key` (0 when none is). For tests that need to
  // know every thread has joined before letting the leader finish.
  int64_t Waiters(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    auto it = calls_.find(key);
    return it == calls_.end() ? 0 : it->second->waiters;
  }

 private:
  struct Call {
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::StatusOr<T> result ABSL_GUARDED_BY(mu) = absl::InternalError("single flight: no result");
    int64_t waiters = 0;  // guarded by SingleFlight::mu_
  };
  struct Publisher {
    SingleFlight* self;
    const std::string* key;
    Call* call;
    absl::StatusOr<T> result = absl::InternalError("single flight: the computation threw");
    ~Publisher() {
      {
        // Unregister first, so a call arriving after this point starts a new flight rather
        // than joining one that is over.
        absl::MutexLock lock(&self->mu_);
        self->calls_.erase(*key);
      }
      absl::MutexLock lock(&call->mu);
      call->result = result;
      call->done = true;
    }
  };

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
