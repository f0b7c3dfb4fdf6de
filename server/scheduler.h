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
// Jobs are plain functions; the network side keeps a ticket to take a job back out of the
// queue when its call is cancelled or its deadline passes before a worker picked it up.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model.h"

namespace ctxcache::server {

struct SchedulerOptions {
  int workers = 1;
  int threads_per_worker = 1;
  int max_queue_depth = 64;
  int64_t max_kv_bytes = int64_t{1} << 30;
};

class Scheduler;

// A running job's share of the KV budget; released when the job returns.
class Reservation {
 public:
  // Sets this job's reservation to `bytes` (up or down). RESOURCE_EXHAUSTED when growing would
  // exceed the budget (the reservation is then unchanged).
  absl::Status Resize(int64_t bytes);
  int64_t bytes() const { return bytes_; }

 private:
  friend class Scheduler;
  Reservation(Scheduler* scheduler, int64_t bytes) : scheduler_(scheduler), bytes_(bytes) {}
  Scheduler* scheduler_;
  int64_t bytes_;
};

struct SchedulerStats {
  int queued = 0;
  int running = 0;
  int64_t reserved_kv_bytes = 0;
  int64_t max_kv_bytes = 0;
  int max_queue_depth = 0;
  int workers = 0;
  double busy_seconds = 0;  // total time workers spent running jobs (monotonic)
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
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace ctxcache::server
