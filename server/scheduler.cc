// Engine workers and admission control (see scheduler.h).
#include "server/scheduler.h"

#include <malloc.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"

namespace ctxcache::server {
namespace {

std::string Mb(int64_t bytes) { return absl::StrFormat("%.1f MB", bytes / 1e6); }

// A worker's scratch above this after a job is released (see WorkerLoop). A plain prefill
// chunk (2048 tokens) of Qwen2.5-0.5B needs ~120 MB (its feed-forward rows: 80 MB) and stays;
// what grows with the context (observed attention for scoring: 250 MB for kvzip on 8K tokens,
// ~1 GB at 32K) goes back.
constexpr int64_t kKeepScratchBytes = int64_t{128} << 20;

// How often a call waiting for its turn on a worker asks its stop.
constexpr auto kStopPoll = std::chrono::milliseconds(10);

}  // namespace

absl::Status Reservation::Resize(int64_t bytes) {
  absl::Status s = scheduler_->ResizeReservation(bytes_, bytes);
  if (s.ok()) bytes_ = bytes;
  return s;
}

void Reservation::Release() { scheduler_->ReleaseRunning(this); }

Scheduler::Scheduler(const Model& model, const SchedulerOptions& options)
    : model_(model), options_(options), active_(std::max(0, options.workers)) {
  for (int i = 0; i < options_.workers; ++i) {
    DeviceForward* device =
        i < static_cast<int>(options_.devices.size()) ? options_.devices[i] : nullptr;
    workers_.push_back(std::make_unique<EngineWorker>(model_, options_.threads_per_worker,
                                                      options_.step_prompt_tokens, device));
  }
  const int slots = std::max(0, options_.workers) * std::max(1, options_.max_batch);
  for (int i = 0; i < slots; ++i) job_threads_.emplace_back([this] { JobLoop(); });
}

Scheduler::~Scheduler() {
  Shutdown();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  // Running jobs finish (their workers still serve them), then the workers stop.
  for (std::thread& t : job_threads_) t.join();
  workers_.clear();
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
  SchedulerStats stats;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats.queued = static_cast<int>(queue_.size());
    stats.running = running_;
    stats.reserved_kv_bytes = reserved_;
    stats.tenants.insert(tenants_.begin(), tenants_.end());
  }
  stats.max_kv_bytes = options_.max_kv_bytes;
  stats.max_queue_depth = options_.max_queue_depth;
  stats.workers = options_.workers;
  stats.max_batch = std::max(1, options_.max_batch);
  for (const std::unique_ptr<EngineWorker>& w : workers_) {
    stats.busy_seconds += w->busy_seconds();
    stats.scratch_bytes += w->scratch_bytes();
    stats.steps += w->steps();
    stats.step_sequences += w->step_sequences();
    stats.interleaved_steps += w->interleaved_steps();
  }
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

void Scheduler::JobLoop() {
  for (;;) {
    Job job;
    Clock::time_point started;
    int w = 0;
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
      // The least busy worker; one always has a free slot, as there are workers x max_batch
      // job threads.
      w = static_cast<int>(std::min_element(active_.begin(), active_.end()) - active_.begin());
      ++active_[w];
    }
    const double queue_seconds = std::chrono::duration<double>(started - job.enqueued).count();
    Reservation reservation(this, job.kv_bytes, std::move(job.tenant));
    job.work(*workers_[w], reservation, queue_seconds);
    ReleaseRunning(&reservation);
    // Give the job's freed working memory back to the system. glibc keeps freed blocks in its
    // arenas (the mmap threshold grows to 32 MiB after the first large free, so the engine's
    // big buffers come from the arenas): in the memory soak (bench/soak.py memory) RSS climbed
    // to 1.8 GiB, and one malloc_trim brought it to 0.95 GiB. Measured cost: 0.02 ms when
    // nothing is free, 42 ms to return 256 MiB (the kernel freeing the pages), paid on the
    // job's thread after its answer has been sent.
    malloc_trim(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --active_[w];
      --running_;
    }
  }
}

EngineWorker::EngineWorker(const Model& model, int threads, int64_t step_prompt_tokens,
                           DeviceForward* device)
    : model_(model),
      threads_(threads),
      step_prompt_tokens_(std::max<int64_t>(1, step_prompt_tokens)),
      device_(device) {
  thread_ = std::thread([this] { Loop(); });
}

EngineWorker::~EngineWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

EngineWorker::Sequence::Sequence(EngineWorker& worker) : worker_(worker) {
  std::lock_guard<std::mutex> lock(worker_.mu_);
  ++worker_.sequences_;
}

EngineWorker::Sequence::~Sequence() {
  {
    std::lock_guard<std::mutex> lock(worker_.mu_);
    --worker_.sequences_;
  }
  // A step may be waiting for this sequence's next pass: it need not any more.
  worker_.work_cv_.notify_all();
}

template <typename T>
absl::Status EngineWorker::WaitDone(std::unique_lock<std::mutex>& lock, std::list<T*>& queue,
                                    T& item, const StopFn& stop) {
  // Polled: a stop is a flag or a deadline, with nothing to notify us. Taken back out while
  // still queued, so that a call cancelled behind a long compression ends at once.
  while (!done_cv_.wait_for(lock, kStopPoll, [&] { return item.done; })) {
    if (absl::Status s = CheckStop(stop); !s.ok()) {
      auto it = std::find(queue.begin(), queue.end(), &item);
      if (it != queue.end()) {
        queue.erase(it);
        return s;
      }
    }
  }
  return item.status;
}

absl::Status EngineWorker::Exclusive(const std::function<absl::Status(Runner&)>& fn,
                                     const StopFn& stop) {
  RETURN_IF_ERROR(CheckStop(stop));
  Task task{&fn, absl::OkStatus()};
  std::unique_lock<std::mutex> lock(mu_);
  tasks_.push_back(&task);
  work_cv_.notify_all();
  return WaitDone(lock, tasks_, task, stop);
}

absl::Status EngineWorker::Step(absl::Span<const int32_t> tokens, KvCache& cache,
                                RecycledAttentionState* recycled, std::vector<float>* logits,
                                const StopFn& stop) {
  RETURN_IF_ERROR(CheckStop(stop));
  if (static_cast<int64_t>(tokens.size()) > step_prompt_tokens_) {
    return absl::InvalidArgumentError(
        absl::StrCat("a step takes at most ", step_prompt_tokens_, " tokens, got ", tokens.size()));
  }
  Request request{BatchSequence{tokens, &cache, recycled, logits}, &stop, absl::OkStatus()};
  std::unique_lock<std::mutex> lock(mu_);
  steps_.push_back(&request);
  work_cv_.notify_all();
  return WaitDone(lock, steps_, request, stop);
}

double EngineWorker::busy_seconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  // Including the work running now, so that the counter grows smoothly instead of in steps
  // as long work ends (a scrape mid-job sees the work being done).
  double busy = busy_seconds_;
  if (busy_since_ != std::chrono::steady_clock::time_point{}) {
    busy += std::chrono::duration<double>(std::chrono::steady_clock::now() - busy_since_).count();
  }
  return busy;
}

int64_t EngineWorker::scratch_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return scratch_bytes_;
}

int64_t EngineWorker::steps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return steps_run_;
}

int64_t EngineWorker::step_sequences() const {
  std::lock_guard<std::mutex> lock(mu_);
  return step_sequences_;
}

int64_t EngineWorker::interleaved_steps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return interleaved_steps_;
}

std::vector<EngineWorker::Request*> EngineWorker::TakeBatch() {
  std::vector<Request*> batch;
  int64_t prompt_tokens = 0;
  for (auto it = steps_.begin(); it != steps_.end();) {
    const int64_t n = static_cast<int64_t>((*it)->seq.tokens.size());
    if (n > 1 && prompt_tokens > 0 && prompt_tokens + n > step_prompt_tokens_) {
      ++it;
      continue;
    }
    if (n > 1) prompt_tokens += n;
    batch.push_back(*it);
    it = steps_.erase(it);
  }
  return batch;
}

void EngineWorker::FinishStep(const std::vector<Request*>& batch) {
  ++steps_run_;
  step_sequences_ += static_cast<int64_t>(batch.size());
  for (Request* r : batch) r->done = true;
}

void EngineWorker::InterleaveStep(Runner& runner, int64_t rows) {
  exclusive_credit_ += rows;
  // A step's worth: what a step's prompt chunk costs at most. Until then the waiting
  // sequences wait (each interleaved step reads every weight once more); past it, a step
  // that arrives runs at the next layer.
  if (exclusive_credit_ < step_prompt_tokens_ * model_.config().n_layers) return;
  std::vector<Request*> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch = TakeBatch();
  }
  if (batch.empty()) return;
  exclusive_credit_ = 0;
  RunStep(runner, batch);
  {
    std::lock_guard<std::mutex> lock(mu_);
    FinishStep(batch);
    ++interleaved_steps_;
  }
  done_cv_.notify_all();
}

void EngineWorker::RunStep(Runner& runner, std::vector<Request*>& batch) {
  std::vector<BatchSequence> seqs;
  for (const Request* r : batch) seqs.push_back(r->seq);
  absl::Status status;
  {
    // The step stops early only when every sequence in it has stopped: the others' steps
    // must complete.
    Runner::ScopedStop scoped(runner, [&batch]() -> absl::Status {
      absl::Status first;
      for (const Request* r : batch) {
        absl::Status s = CheckStop(*r->stop);
        if (s.ok()) return s;
        if (first.ok()) first = s;
      }
      return first;
    });
    status = runner.ForwardBatch(seqs);
  }
  if (seqs.size() > 1 && (absl::IsInvalidArgument(status) || absl::IsOutOfRange(status))) {
    // A sequence the batch refused (checked before anything is written): run each alone, so
    // that only the refused ones get the error.
    for (size_t i = 0; i < batch.size(); ++i) {
      Runner::ScopedStop scoped(runner, *batch[i]->stop);
      batch[i]->status = runner.ForwardBatch(absl::MakeConstSpan(&seqs[i], 1));
    }
    return;
  }
  for (Request* r : batch) r->status = status;
}

void EngineWorker::Loop() {
  // The worker owns its threads and scratch; the Model's weights are shared read-only.
  ThreadPool pool(threads_);
  Runner runner(model_, &pool);
  runner.set_device(device_);
  using Clock = std::chrono::steady_clock;
  // How long a step waits for the sequences in a generation that have not asked for their
  // next pass yet (they sample and stream between steps: microseconds, unless a client's
  // stream pushes back); past it, the step runs without them.
  constexpr auto kGatherWait = std::chrono::milliseconds(2);
  bool last_was_step = false;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (steps_.empty() && tasks_.empty()) {
      if (stopping_) return;
      work_cv_.wait(lock, [&] { return stopping_ || !steps_.empty() || !tasks_.empty(); });
      continue;
    }
    // Steps and exclusive work alternate when both wait, so neither starves the other.
    const bool step = !steps_.empty() && (tasks_.empty() || !last_was_step);
    last_was_step = step;
    busy_since_ = Clock::now();
    if (step) {
      work_cv_.wait_until(lock, Clock::now() + kGatherWait, [&] {
        return stopping_ || static_cast<int>(steps_.size()) >= sequences_;
      });
      std::vector<Request*> batch = TakeBatch();
      if (batch.empty()) {  // every waiting sequence stopped during the gathering
        busy_since_ = Clock::time_point{};
        continue;
      }
      lock.unlock();
      RunStep(runner, batch);
      lock.lock();
      FinishStep(batch);
    } else {
      Task* task = tasks_.front();
      tasks_.pop_front();
      lock.unlock();
      // The task's passes let waiting steps through (a compression of a long document would
      // otherwise stall the worker's generations for its whole duration).
      exclusive_credit_ = 0;
      runner.set_interleave([this, &runner](int64_t rows) { InterleaveStep(runner, rows); });
      task->status = (*task->fn)(runner);
      runner.set_interleave(nullptr);
      // A worker's scratch keeps the size of its largest pass; kept, every worker's would
      // ratchet up to the largest document it ever saw (memory soak, SmolLM2: idle RSS ranged
      // 877-1210 MiB over 40 minutes without the release, 612-961 MiB with it). Past
      // kKeepScratchBytes it goes back; the next large job allocates again: measured 360 ms
      // for 200 MB (page faults and zeroing, on a busy 2-core machine), next to the ~10 s of
      // a 2K-token kvzip compression whose scratch is that large. What is kept is exported
      // (worker scratch gauge) so that the memory soak can tell it from a leak.
      if (runner.ScratchBytes() > kKeepScratchBytes) runner.ReleaseScratch();
      lock.lock();
      task->done = true;
    }
    scratch_bytes_ = runner.ScratchBytes();
    busy_seconds_ += std::chrono::duration<double>(Clock::now() - busy_since_).count();
    busy_since_ = Clock::time_point{};
    done_cv_.notify_all();
  }
}

}  // namespace ctxcache::server
