// A persistent pool for the optimizer: run(fn) calls fn(i) for i in
// [0, threads) on threads that live as long as the pool (the caller's thread
// is index 0), and returns when all are done. One hand-off per step, never a
// thread start per tensor, and no allocation: the job is passed by address.
// Workers run each job under the caller's floating-point control state
// (MXCSR: flush-to-zero, denormals-are-zero, rounding), so results do not
// depend on which thread computed them.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace zinf::cpu_adam {

class ThreadPool {
 public:
  explicit ThreadPool(std::size_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  std::size_t size() const { return workers_.size() + 1; }
  // Runs fn(index) on every thread; rethrows the first exception. Not
  // reentrant: one run at a time per pool.
  template <class Fn>
  void run(Fn&& fn) {
    run_job(&invoke<std::remove_reference_t<Fn>>, &fn);
  }

 private:
  using Job = void (*)(void* context, std::size_t index);
  template <class Fn>
  static void invoke(void* context, std::size_t index) {
    (*static_cast<Fn*>(context))(index);
  }
  void run_job(Job job, void* context);
  void work(std::size_t index);

  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  Job job_ = nullptr;
  void* context_ = nullptr;
  unsigned mxcsr_ = 0;
  std::uint64_t generation_ = 0;
  std::size_t running_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::mutex run_mutex_;
  std::vector<std::thread> workers_;
};

}  // namespace zinf::cpu_adam
