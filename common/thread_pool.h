// A small fork-join pool for the engine's hot loops (matvec, matmul, attention).
//
// Decode calls ParallelFor a few hundred times per token, so dispatch latency matters more
// than generality: workers spin briefly on a generation counter before sleeping on it
// (a raw futex; libstdc++ 12's atomic::wait lost wake-ups here), and work is split statically into one contiguous
// range per thread. The calling thread takes range 0, so a pool of N threads starts N-1.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace ctxcache {

class ThreadPool {
 public:
  // n_threads counts the caller; values < 1 mean 1. pin: pin thread i to CPU i (best effort).
  explicit ThreadPool(int n_threads, bool pin = false);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int n_threads() const { return n_threads_; }

  // Calls fn(begin, end, thread_index) on disjoint ranges covering [0, n). Range boundaries
  // are multiples of `align` (except the final end). Blocks until all ranges are done.
  // Not reentrant: fn must not call ParallelFor on the same pool.
  template <typename Fn>
  void ParallelFor(int64_t n, int64_t align, Fn&& fn) {
    auto trampoline = [](void* ctx, int64_t b, int64_t e, int t) {
      (*static_cast<std::remove_reference_t<Fn>*>(ctx))(b, e, t);
    };
    Run(n, align, trampoline, &fn);
  }
  template <typename Fn>
  void ParallelFor(int64_t n, Fn&& fn) {
    ParallelFor(n, 1, std::forward<Fn>(fn));
  }

  // The number of hardware threads usable by this process (sched affinity), at least 1.
  static int HardwareThreads();

 private:
  using Task = void (*)(void* ctx, int64_t begin, int64_t end, int thread_index);
  void Run(int64_t n, int64_t align, Task task, void* ctx);
  void WorkerLoop(int index);
  void RunRange(int index);

  int n_threads_;
  std::vector<std::thread> workers_;
  // Job description, published by a release-increment of generation_.
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int64_t align_ = 1;
  // 32-bit because futexes are; only equality with the last seen value matters.
  std::atomic<uint32_t> generation_{0};
  std::atomic<uint32_t> pending_{0};
  // Threads asleep (or about to sleep) on either futex: notifiers skip the wake syscall
  // when this is 0. seq_cst on both sides makes the check-then-sleep race-free.
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace ctxcache
