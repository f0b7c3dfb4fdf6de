// Engine workers and admission control (see scheduler.h).
#include "server/scheduler.h"

#include <malloc.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ctxcache::server {
namespace {

std::string Mb(int64_t bytes) { return absl::StrFormat("%.1f MB", bytes / 1e6); }

// A worker's scratch above this after a job is released (see WorkerLoop). A plain prefill
// chunk (2048 tokens) of Qwen2.5-0.5B needs ~120 MB (its feed-forward rows: 80 MB) and stays;
// what grows with the context (observed attention for scoring: 250 MB for kvzip on 8K tokens,
// ~1 GB at 32K) goes back.
constexpr int64_t kKeepScratchBytes = int64_t{128} << 20;

}  // namespace

absl::Status Reservation::Resize(int64_t bytes) {
  absl::Status s = scheduler_->ResizeReservation(bytes_, bytes);
  if (s.ok()) bytes_ = bytes;
  return s;
}

void Reservation::Release() { scheduler_->ReleaseRunning(this); }

Scheduler::Scheduler(const Model& model, const SchedulerOptions& options)
    : model_(model), options_(options), job_started_(std::max(0, options.workers)),
      scratch_bytes_(std::max(0, options.workers)) {
  for (int i = 0; i < options_.workers; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

Scheduler::~Scheduler() {
  Shutdown();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

absl::Status Scheduler::KvExhausted(int64_t need) const {
  if (need > options_.max_kv_bytes) {
    // Never fits, however long the client waits: not RESOURCE_EXHAUSTED ("retry later").
    return absl::FailedPreconditionError(absl::StrCat(
        "this request needs about ", Mb(need),
        " of KV memory, more than the server's whole budget of ", Mb(options_.max_kv_bytes),
        " (max_kv_bytes), so retrying will not help: send fewer or shorter "
        "contexts, a smaller max_tokens, or a higher compression ratio"));
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "server busy: this request needs about ", Mb(need), " of KV memory and ",
      Mb(reserved_), " of the ", Mb(options_.max_kv_bytes), " budget are held by ",
      running_ + static_cast<int>(queue_.size()), " in-flight requests; retry with backoff"));
}

absl::StatusOr<uint64_t> Scheduler::Submit(int64_t kv_bytes_estimate, Clock::time_point deadline,
                                           Work work, Abandon abandon) {
  return Submit(std::string(), kv_bytes_estimate, deadline, std::move(work), std::move(abandon));
}

absl::StatusOr<uint64_t> Scheduler::Submit(const std::string& tenant, int64_t kv_bytes_estimate,
                                           Clock::time_point deadline, Work work, Abandon abandon) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down; retry on another replica");
  TenantSchedulerStats* slots = tenant.empty() ? nullptr : &tenants_[tenant];
  // Before the shared limits, so that a tenant flooding the queue hears about its own limit
  // (and the others keep the queue's remaining room).
  if (slots != nullptr && options_.tenant_max_inflight > 0 &&
      slots->in_flight >= options_.tenant_max_inflight) {
    ++slots->refused;
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", tenant, "' already has ", slots->in_flight,
        " request(s) queued or running, its own limit (tenant_max_inflight ",
        options_.tenant_max_inflight,
        "); other tenants are still served: retry with backoff once some of yours finish"));
  }
  if (static_cast<int>(queue_.size()) >= options_.max_queue_depth) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "server busy: ", queue_.size(), " requests are already waiting for ", options_.workers,
        " engine worker(s) (max_queue_depth ", options_.max_queue_depth,
        "); retry with backoff"));
  }
  if (reserved_ + kv_bytes_estimate > options_.max_kv_bytes) return KvExhausted(kv_bytes_estimate);
  const uint64_t ticket = next_ticket_++;
  reserved_ += kv_bytes_estimate;
  if (slots != nullptr) ++slots->in_flight;
  queue_.push_back(Job{tenant, ticket, kv_bytes_estimate, deadline, Clock::now(), std::move(work),
                       std::move(abandon)});
  lock.unlock();
  cv_.notify_one();
  return ticket;
}

bool Scheduler::Cancel(uint64_t ticket, const absl::Status& reason) {
  Abandon abandon;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->ticket != ticket) continue;
      reserved_ -= it->kv_bytes;
      ReleaseTenantSlot(it->tenant);
      abandon = std::move(it->abandon);
      queue_.erase(it);
      break;
    }
  }
  if (!abandon) return false;
  abandon(reason);
  return true;
}

void Scheduler::Shutdown() {
  std::list<Job> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Job& j : queue_) {
      reserved_ -= j.kv_bytes;
      ReleaseTenantSlot(j.tenant);
    }
    dropped.swap(queue_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (Job& j : dropped) {
    j.abandon(absl::UnavailableError("the server is shutting down; retry on another replica"));
  }
}

SchedulerStats Scheduler::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  // Busy time includes the running jobs' time so far, so that the counter grows smoothly
  // instead of in steps as long jobs end (a scrape mid-job sees the work being done).
  double busy = busy_seconds_;
  const Clock::time_point now = Clock::now();
  for (const Clock::time_point& t : job_started_) {
    if (t != Clock::time_point{}) busy += std::chrono::duration<double>(now - t).count();
  }
  SchedulerStats stats{static_cast<int>(queue_.size()), running_, reserved_,
                       options_.max_kv_bytes, options_.max_queue_depth, options_.workers, busy};
  for (int64_t b : scratch_bytes_) stats.scratch_bytes += b;
  stats.tenants.insert(tenants_.begin(), tenants_.end());
  return stats;
}

void Scheduler::ReleaseRunning(Reservation* reservation) {
  std::lock_guard<std::mutex> lock(mu_);
  reserved_ -= reservation->bytes_;
  reservation->bytes_ = 0;
  ReleaseTenantSlot(reservation->tenant_);
  reservation->tenant_.clear();
}

void Scheduler::ReleaseTenantSlot(const std::string& tenant) {
  if (tenant.empty()) return;
  // Entries stay at zero rather than go: tenants are few (auth's), and a gauge read from
  // them must fall back to 0.
  if (auto it = tenants_.find(tenant); it != tenants_.end()) --it->second.in_flight;
}

absl::Status Scheduler::ResizeReservation(int64_t from, int64_t to) {
  std::lock_guard<std::mutex> lock(mu_);
  if (to > from && reserved_ - from + to > options_.max_kv_bytes) return KvExhausted(to);
  reserved_ += to - from;
  return absl::OkStatus();
}

void Scheduler::WorkerLoop(int index) {
  // Each worker owns its threads and scratch; the Model's weights are shared read-only.
  ThreadPool pool(options_.threads_per_worker);
  Runner runner(model_, &pool);
  for (;;) {
    Job job;
    Clock::time_point started;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
      if (job.deadline <= Clock::now()) {
        reserved_ -= job.kv_bytes;
        ReleaseTenantSlot(job.tenant);
        lock.unlock();
        job.abandon(absl::DeadlineExceededError(
            "the deadline passed while the request waited for an engine worker; the server is "
            "busy: retry with a longer deadline or later"));
        continue;
      }
      ++running_;
      started = Clock::now();
      job_started_[index] = started;
    }
    const double queue_seconds = std::chrono::duration<double>(started - job.enqueued).count();
    Reservation reservation(this, job.kv_bytes, std::move(job.tenant));
    job.work(runner, reservation, queue_seconds);
    ReleaseRunning(&reservation);
    // A worker's scratch keeps the size of its largest job; kept, every worker's would ratchet
    // up to the largest document it ever saw (memory soak, SmolLM2: idle RSS ranged 877-1210
    // MiB over 40 minutes without the release, 612-961 MiB with it). Past kKeepScratchBytes
    // it goes back; the next large job allocates again: measured 360 ms for 200 MB (page
    // faults and zeroing, on a busy 2-core machine), next to the ~10 s of a 2K-token kvzip
    // compression whose scratch is that large. What is kept is exported (worker scratch gauge)
    // so that the memory soak can tell it from a leak.
    if (runner.ScratchBytes() > kKeepScratchBytes) runner.ReleaseScratch();
    const int64_t scratch = runner.ScratchBytes();
    // Give the job's freed working memory back to the system. glibc keeps freed blocks in its
    // arenas (the mmap threshold grows to 32 MiB after the first large free, so the engine's
    // big buffers come from the arenas): in the memory soak (bench/soak.py memory) RSS climbed
    // to 1.8 GiB, and one malloc_trim brought it to 0.95 GiB. Measured cost: 0.02 ms when
    // nothing is free, 42 ms to return 256 MiB (the kernel freeing the pages), paid after the
    // job's answer has been sent.
    malloc_trim(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_seconds_ += std::chrono::duration<double>(Clock::now() - job_started_[index]).count();
      job_started_[index] = Clock::time_point{};
      scratch_bytes_[index] = scratch;
      --running_;
    }
  }
}

}  // namespace ctxcache::server
