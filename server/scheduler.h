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
//
// Continuous batching: a worker serves up to max_batch jobs at once. Each job runs on a job
// thread of its own and reaches the worker's engine through an EngineWorker: work that needs
// the Runner to itself (compression, selection, composition) runs between steps (Exclusive),
// and every forward pass of a generation joins the worker's next step (Step), which runs the
// decode tokens of all its sequences, and at most step_prompt_tokens of their prompts, as one
// Runner::ForwardBatch. Sequences join and leave between steps. Exclusive work does not stall
// them: its passes let a step through (Runner::set_interleave) after every step_prompt_tokens
// rows' worth of layers, as a long prompt's chunks do.
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
#include "common/stop.h"
#include "engine/model.h"

namespace ctxcache::server {

struct SchedulerOptions {
  int workers = 1;
  int threads_per_worker = 1;
  int max_batch = 1;                 // jobs a worker serves at once (sequences per step)
  int64_t step_prompt_tokens = 512;  // prompt tokens per step (chunks of a long prompt)
  int max_queue_depth = 64;
  int64_t max_kv_bytes = int64_t{1} << 30;
  int tenant_max_inflight = 0;  // queued + running jobs per tenant; 0 = no per-tenant limit
  // Worker i runs its passes on devices[i] when i < devices.size() and it is set (a GPU,
  // engine/device_forward.h); the others on the CPU. The devices outlive the scheduler.
  std::vector<DeviceForward*> devices;
};

class Scheduler;

// One engine worker as its jobs see it: a Runner and its threads, shared by the jobs the
// worker serves at once, and the step loop that batches their generations (see above).
// Thread-safe; the worker's own thread does all engine work.
class EngineWorker {
 public:
  EngineWorker(const Model& model, int threads, int64_t step_prompt_tokens,
               DeviceForward* device = nullptr);
  // Finishes what was submitted, then stops the worker's thread.
  ~EngineWorker();
  EngineWorker(const EngineWorker&) = delete;
  EngineWorker& operator=(const EngineWorker&) = delete;

  const Model& model() const { return model_; }
  // Runs fn with the worker's Runner to itself, between steps; fn's status. `stop` (the
  // call's) is asked while it waits for its turn: a stopped call leaves without running fn.
  absl::Status Exclusive(const std::function<absl::Status(Runner&)>& fn, const StopFn& stop);
  // A forward pass of `tokens` on `cache` (logits of the last token into *logits when set)
  // in the worker's next step, with the other sequences'. At most prompt_chunk() tokens.
  // `stop` (this call's) is asked before joining and while waiting to; a step every sequence
  // of which has stopped ends early (each cache then partly written: discard it).
  absl::Status Step(absl::Span<const int32_t> tokens, KvCache& cache,
                    RecycledAttentionState* recycled, std::vector<float>* logits,
                    const StopFn& stop);
  int64_t prompt_chunk() const { return step_prompt_tokens_; }
  // A generation in progress on this worker: while one lives, a step waits (briefly) for its
  // next forward pass before running, so that every sequence rides every step.
  class Sequence {
   public:
    explicit Sequence(EngineWorker& worker);
    ~Sequence();
    Sequence(const Sequence&) = delete;
    Sequence& operator=(const Sequence&) = delete;

   private:
    EngineWorker& worker_;
  };

  // Time spent running steps and exclusive work (growing while one runs), the Runner's
  // scratch after its last work, steps run and the sequences they carried.
  double busy_seconds() const;
  int64_t scratch_bytes() const;
  int64_t steps() const;
  int64_t step_sequences() const;
  // Of those steps, the ones run between the layers of exclusive work.
  int64_t interleaved_steps() const;

 private:
  struct Request {
    BatchSequence seq;
    const StopFn* stop;
    absl::Status status;
    bool done = false;
  };
  struct Task {
    const std::function<absl::Status(Runner&)>* fn;
    absl::Status status;
    bool done = false;
  };
  void Loop();
  // Waits until the worker has done `item` (queued in `queue`); when `stop` fires first while
  // it is still queued, takes it out and returns the stop's status.
  template <typename T>
  absl::Status WaitDone(std::unique_lock<std::mutex>& lock, std::list<T*>& queue, T& item,
                        const StopFn& stop) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the next step's requests out of steps_: every decode pass, and prompt chunks up to
  // step_prompt_tokens (the first always).
  std::vector<Request*> TakeBatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the requests as one batch on the worker's runner, setting each one's status.
  void RunStep(Runner& runner, std::vector<Request*>& batch);
  // Marks a step's requests done and counts the step.
  void FinishStep(const std::vector<Request*>& batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Called by the runner between the layers of exclusive work's passes (rows: the pass's
  // rows): runs a waiting step once the work done since the last one reaches a step's
  // worth (step_prompt_tokens rows through every layer). Worker thread only.
  void InterleaveStep(Runner& runner, int64_t rows);

  const Model& model_;
  const int threads_;
  const int64_t step_prompt_tokens_;
  DeviceForward* const device_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // the worker waits for requests and tasks
  std::condition_variable done_cv_;  // callers wait for theirs to be done
  std::list<Request*> steps_ ABSL_GUARDED_BY(mu_);
  std::list<Task*> tasks_ ABSL_GUARDED_BY(mu_);
  int sequences_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  double busy_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point busy_since_ ABSL_GUARDED_BY(mu_){};
  int64_t scratch_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t steps_run_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t step_sequences_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t interleaved_steps_ ABSL_GUARDED_BY(mu_) = 0;
  // Rows x layers of exclusive work since the last step (worker thread only).
  int64_t exclusive_credit_ = 0;
  std::thread thread_;
};

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
  int max_batch = 0;        // jobs each worker serves at once
  double busy_seconds = 0;  // total time workers spent running jobs (monotonic)
  int64_t steps = 0;        // batched steps run (monotonic)
  int64_t step_sequences = 0;  // sequences those steps carried (monotonic)
  int64_t interleaved_steps = 0;  // of the steps, those run inside exclusive work (monotonic)
  // Scratch buffers the workers' Runners hold, as of each worker's last finished job (each
  // keeps up to 128 MiB between jobs, scheduler.cc; what a running job grows is not seen here).
  int64_t scratch_bytes = 0;
  // Every tenant that has submitted a job (bounded by the tenants auth knows).
  std::map<std::string, TenantSchedulerStats> tenants;
};

class Scheduler {
 public:
  using Clock = std::chrono::steady_clock;
  // Runs on a job thread, served by `worker`. queue_seconds: time spent queued.
  using Work =
      std::function<void(EngineWorker& worker, Reservation& reservation, double queue_seconds)>;
  // The job will never run (cancelled, deadline passed in the queue, shutdown): the reason.
  using Abandon = std::function<void(const absl::Status& reason)>;

  Scheduler(const Model& model, const SchedulerOptions& options);
  // Abandons queued jobs (UNAVAILABLE), lets running ones finish, joins the threads.
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
  void JobLoop();
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
  // Per worker: the jobs it serves now (at most max_batch).
  std::vector<int> active_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, TenantSchedulerStats> tenants_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<EngineWorker>> workers_;
  std::vector<std::thread> job_threads_;  // workers x max_batch
};

}  // namespace ctxcache::server
