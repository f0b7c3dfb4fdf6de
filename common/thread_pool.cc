#include "common/thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace ctxcache {
namespace {

// Spin iterations (a pause each, ~40-140 cycles) before a thread sleeps on a futex. Decode
// dispatches every ~10-100 us, so spinning this long (~0.5-2 ms) catches the next job without
// a wake-up; bounding it matters when the machine is oversubscribed: a thread that spun
// forever would burn the time slice its partner needs to finish.
constexpr int kSpinIterations = 1 << 14;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected) {
  // Returns at once if *word != expected (checked by the kernel atomically), else sleeps.
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
}

// Sleeps while *word == expected, announcing itself in *sleepers first.
void SleepWhileEqual(std::atomic<uint32_t>* word, uint32_t expected, std::atomic<int>* sleepers) {
  sleepers->fetch_add(1);
  if (word->load() == expected) FutexWait(word, expected);
  sleepers->fetch_sub(1);
}

// The CPUs this process may run on, in order (container cpusets respected), or empty.
std::vector<int> AllowedCpus() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  return cpus;
}

void PinToCpu(int cpu) {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
}

}  // namespace

int ThreadPool::HardwareThreads() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
    return std::max(1, CPU_COUNT(&allowed));
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool::ThreadPool(int n_threads, bool pin) : n_threads_(std::max(1, n_threads)) {
  // Thread i goes to the i-th allowed CPU. The set is read once, before the caller is pinned:
  // threads inherit the creator's affinity, so a worker reading it after would see only the
  // caller's CPU and stay there (every "pinned" pool ran on one core until this was fixed).
  const std::vector<int> cpus = pin ? AllowedCpus() : std::vector<int>();
  auto cpu_of = [&cpus](int i) { return i < static_cast<int>(cpus.size()) ? cpus[i] : -1; };
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) {
    const int cpu = cpu_of(i);
    workers_.emplace_back([this, i, cpu] {
      if (cpu >= 0) PinToCpu(cpu);
      WorkerLoop(i);
    });
  }
  if (cpu_of(0) >= 0) PinToCpu(cpu_of(0));
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1);
  FutexWakeAll(&generation_);
  for (auto& w : workers_) w.join();
}

void ThreadPool::RunRange(int index) {
  const int64_t chunks = (n_ + align_ - 1) / align_;
  const int64_t b = std::min(n_, chunks * index / n_threads_ * align_);
  const int64_t e = std::min(n_, chunks * (index + 1) / n_threads_ * align_);
  if (b < e) task_(ctx_, b, e, index);
}

void ThreadPool::Run(int64_t n, int64_t align, Task task, void* ctx) {
  if (n <= 0) return;
  if (n_threads_ == 1 || n <= align) {
    task(ctx, 0, n, 0);
    return;
  }
  task_ = task;
  ctx_ = ctx;
  n_ = n;
  align_ = std::max<int64_t>(1, align);
  pending_.store(n_threads_ - 1);
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) FutexWakeAll(&generation_);
  RunRange(0);
  int spins = 0;
  for (uint32_t p; (p = pending_.load(std::memory_order_acquire)) != 0;) {
    if (++spins < kSpinIterations) {
      CpuRelax();
    } else {
      SleepWhileEqual(&pending_, p, &sleepers_);
    }
  }
}

void ThreadPool::WorkerLoop(int index) {
  // Workers are started before any job is published, so the first job is generation 1.
  // (Loading generation_ here instead would miss a job published before this thread ran.)
  uint32_t seen = 0;
  for (;;) {
    uint32_t g;
    int spins = 0;
    while ((g = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpinIterations) {
        CpuRelax();
      } else {
        SleepWhileEqual(&generation_, seen, &sleepers_);
      }
    }
    seen = g;
    if (stop_.load()) return;
    RunRange(index);
    if (pending_.fetch_sub(1) == 1 && sleepers_.load() > 0) FutexWakeAll(&pending_);
  }
}

}  // namespace ctxcache
