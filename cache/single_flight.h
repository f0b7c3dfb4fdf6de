// Single flight: concurrent calls for the same key share one computation. The first caller
// (the leader) runs the function on its own thread; callers that arrive while it runs (the
// waiters) wait for it and receive a copy of its result, value or error alike. Once the
// leader finishes the key is free again, so a later call computes afresh: results are never
// cached here (errors in particular must not stick), which is the cache tiers' job.
//
// Each caller brings its own stop (common/stop.h: its call's cancellation and deadline):
//  - a waiter whose stop fires leaves at once with its own status; the others keep waiting;
//  - the computation gets a flight stop that fires only when nobody wants the result any
//    more: the leader's stop has fired and no waiter is left. So the leader's client leaving
//    does not fail the waiters (the computation goes on for them on the leader's thread; the
//    leader's own call still ends with its stop's status), and a flight whose every caller
//    left stops promptly;
//  - a waiter that receives a result the flight stopped for (its callers all left just as it
//    joined) tries again, as leader or waiter of a new flight, rather than inherit a status
//    that is not its own.
//
// A function must not call Do with its own key (it would wait for itself).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/stop.h"

namespace ctxcache {

template <typename T>
class SingleFlight {
 public:
  // How often a waiter asks its own stop while it waits: the delay between its client giving
  // up and the waiter's worker being free again.
  static constexpr absl::Duration kWaiterPoll = absl::Milliseconds(5);

  // Runs fn(flight_stop) (absl::StatusOr<T>(const StopFn&), or fn() for a computation that
  // cannot stop) or joins the run already in flight
  // for `key`. `stop` is this caller's own stop (null: never stops). `leader`, when given, says
  // whether this call ran fn.
  template <typename Fn>
  absl::StatusOr<T> Do(const std::string& key, Fn&& fn, bool* leader = nullptr) {
    return Do(key, std::forward<Fn>(fn), StopFn(), leader);
  }
  template <typename Fn>
  absl::StatusOr<T> Do(const std::string& key, Fn&& fn, const StopFn& stop,
                       bool* leader = nullptr) {
    for (;;) {
      std::shared_ptr<Call> call;
      bool is_leader = false;
      {
        absl::MutexLock lock(&mu_);
        auto [it, inserted] = calls_.try_emplace(key);
        if (inserted) it->second = std::make_shared<Call>();
        call = it->second;
        is_leader = inserted;
        if (!is_leader) call->waiters.fetch_add(1);
      }
      if (leader != nullptr) *leader = is_leader;
      if (is_leader) return Lead(key, call.get(), fn, stop);
      std::optional<absl::StatusOr<T>> result = Wait(call.get(), stop);
      if (result) return *std::move(result);
      // The flight stopped because its callers had all left just as this one joined: its
      // status is not this caller's. Start or join a new flight.
    }
  }

  // Runs in flight (keys with a leader). For tests that must know a first caller leads
  // before a second one arrives.
  int64_t InFlight() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(calls_.size());
  }

  // Callers waiting on the run in flight for `key` (0 when none is). For tests that need to
  // know every thread has joined before letting the leader finish.
  int64_t Waiters(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    auto it = calls_.find(key);
    return it == calls_.end() ? 0 : it->second->waiters.load();
  }

 private:
  struct Call {
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::StatusOr<T> result ABSL_GUARDED_BY(mu) = absl::InternalError("single flight: no result");
    // Waiters still waiting (a waiter that leaves on its own stop takes itself off).
    std::atomic<int64_t> waiters{0};
    // The flight stop fired: the result is the stop's status, not the computation's.
    std::atomic<bool> stopped{false};
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

  template <typename Fn>
  absl::StatusOr<T> Lead(const std::string& key, Call* call, Fn& fn, const StopFn& stop) {
    // Fires once the leader's caller has given up and no waiter is left; then it reports the
    // leader's status (the only caller left to hear it).
    StopFn flight_stop = [call, &stop]() -> absl::Status {
      absl::Status s = CheckStop(stop);
      if (s.ok() || call->waiters.load() > 0) return absl::OkStatus();
      call->stopped.store(true);
      return s;
    };
    {
      // The guard publishes a result even if fn throws, so waiters never hang.
      Publisher publisher{this, &key, call};
      if constexpr (std::is_invocable_v<Fn&, const StopFn&>) {
        publisher.result = fn(flight_stop);
      } else {
        publisher.result = fn();  // a computation that never stops
      }
    }
    // The result went to the waiters (and, through fn, to the cache tiers); the leader's own
    // call ends with its own status if its caller gave up meanwhile.
    absl::Status own = CheckStop(stop);
    if (!own.ok()) return own;
    absl::MutexLock lock(&call->mu);
    return call->result;
  }

  // The result, or nullopt when the flight stopped for want of callers (try again).
  std::optional<absl::StatusOr<T>> Wait(Call* call, const StopFn& stop) {
    absl::MutexLock lock(&call->mu);
    if (!stop) {
      call->mu.Await(absl::Condition(&call->done));
    } else {
      while (!call->mu.AwaitWithTimeout(absl::Condition(&call->done), kWaiterPoll)) {
        absl::Status s = stop();
        if (!s.ok()) {
          call->waiters.fetch_sub(1);
          return absl::StatusOr<T>(s);
        }
      }
    }
    call->waiters.fetch_sub(1);
    if (call->stopped.load() && !call->result.ok()) return std::nullopt;
    return call->result;
  }

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ctxcache
