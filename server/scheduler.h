// The engine side of the service: a pool of engine workers sharing the read-only Model, each
// with its own Runner (scratch buffers) and thread pool, fed from one bounded FIFO queue.
//
// Admission happens at Submit, on the network thread, so an overloaded server answers at once
// instead of queueing without bound: RESOURCE_EXHAUSTED when the queue is full or when the
// KV bytes that queued and running jobs have reserved plus this job's estimate exceed the
// budget. A running job may raise its reservation once it knows its real size (contexts
// loaded, prompt tokenized); that fails the same way when the budget cannot cover it. A job
// that needs more than the whole budget can never run: FAILED_PRECONDITION, not "retry".
//
// Tenant slots (optional): with tenant_max_inflight > 0, a tenant's queued plus running jobs
// are capped, so one tenant flooding the queue is refused (RESOURCE_EXHAUSTED naming its own
// limit) while the others are still admitted. Jobs submitted without a tenant are not counted.
//
// Jobs are plain functions; the network side keeps a ticket to take a job back out of the
// queue when its call is cancelled or its deadline passes before a worker picked it up.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model.h"

namespace ctxcache::server {

struct SchedulerOptions {
  int workers = 1;
  int threads_per_worker = 1;
  int max_queue_depth = 64;
  int64_t max_kv_bytes = int64_t{1} << 30;
  int tenant_max_inflight = 0;  // queued + running jobs per tenant; 0 = no per-tenant limit
};

class Scheduler;

// A running job's share of the KV budget; released when the job returns.
class Reservation {
 public:
  // Sets this job's reservation to `bytes` (up or down). RESOURCE_EXHAUSTED when growing would
  // exceed the budget (the reservation is then unchanged).
  absl::Status Resize(int64_t bytes);
  int64_t bytes() const { return bytes_; }
  // Frees the reservation and the job's tenant slot before the job returns: call it before
  // the client can see its call end, so that the client's next call finds both free.
  void Release();

 private:
  friend class Scheduler;
  Reservation(Scheduler* scheduler, int64_t bytes, std::string tenant)
      : scheduler_(scheduler), bytes_(bytes), tenant_(std::move(tenant)) {}
  Scheduler* scheduler_;
  int64_t bytes_;
  std::string tenant_;  // whose slot this job holds; empty: none (or released)
};

struct TenantSchedulerStats {
  int in_flight = 0;    // queued + running
  int64_t refused = 0;  // Submits refused because the tenant was at tenant_max_inflight
};

struct SchedulerStats {
  int queued = 0;
  int running = 0;
  int64_t reserved_kv_bytes = 0;
  int64_t max_kv_bytes = 0;
  int max_queue_depth = 0;
  int workers = 0;
  double busy_seconds = 0;  // total time workers spent running jobs (monotonic)
  // Scratch buffers the workers' Runners hold, as of each worker's last finished job (each
  // keeps up to 128 MiB between jobs, scheduler.cc; what a running job grows is not seen here).
  int64_t scratch_bytes = 0;
  // Every tenant that has submitted a job (bounded by the tenants auth knows).
  std::map<std::string, TenantSchedulerStats> tenants;
};

class Scheduler {
 public:
  using Clock = std::chrono::steady_clock;
  // Runs on a worker with that worker's Runner. queue_seconds: time spent queued.
  using Work = std::function<void(Runner& runner, Reservation& reservation, double queue_seconds)>;
  // The job will never run (cancelled, deadline passed in the queue, shutdown): the reason.
  using Abandon = std::function<void(const absl::Status& reason)>;

  Scheduler(const Model& model, const SchedulerOptions& options);
  // Abandons queued jobs (UNAVAILABLE), lets running ones finish, joins the workers.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a job or refuses it (RESOURCE_EXHAUSTED with what is full and what to do;
  // UNAVAILABLE after Shutdown). A job whose deadline has passed when a worker reaches it is
  // abandoned with DEADLINE_EXCEEDED instead of run. Returns a ticket for Cancel.
  absl::StatusOr<uint64_t> Submit(int64_t kv_bytes_estimate, Clock::time_point deadline,
                                  Work work, Abandon abandon);
  // The same for `tenant`'s job: it holds one of the tenant's slots until it leaves the
  // scheduler (finished, cancelled, abandoned); refused when the tenant has none left.
  absl::StatusOr<uint64_t> Submit(const std::string& tenant, int64_t kv_bytes_estimate,
                                  Clock::time_point deadline, Work work, Abandon abandon);
  // Takes a queued job out and runs its Abandon with `reason`; false when it already started
  // (or finished), in which case the job itself must notice the cancellation.
  bool Cancel(uint64_t ticket, const absl::Status& reason);
  // Refuses new jobs and abandons queued ones (UNAVAILABLE); running jobs continue.
  void Shutdown();

  SchedulerStats Stats() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  friend class Reservation;
  struct Job {
    std::string tenant;  // empty: not counted against a tenant
    uint64_t ticket;
    int64_t kv_bytes;
    Clock::time_point deadline;
    Clock::time_point enqueued;
    Work work;
    Abandon abandon;
  };
  void WorkerLoop(int index);
  absl::Status ResizeReservation(int64_t from, int64_t to);
  absl::Status KvExhausted(int64_t need) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A job of `tenant` left the scheduler: its slot is free again.
  void ReleaseTenantSlot(const std::string& tenant) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees a running job's reservation and slot (Reservation::Release, and at the job's end).
  void ReleaseRunning(Reservation* reservation);

  const Model& model_;
  const SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::list<Job> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 1;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
  double busy_seconds_ ABSL_GUARDED_BY(mu_) = 0;  // jobs finished
  // Per worker: when its current job started; Clock::time_point{} while idle.
  std::vector<Clock::time_point> job_started_ ABSL_GUARDED_BY(mu_);
  // Per worker: its Runner's ScratchBytes() after its last job (after the release).
  std::vector<int64_t> scratch_bytes_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, TenantSchedulerStats> tenants_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace ctxcache::server
