// A persistent pool for the optimizer: run(fn) calls fn(i) for i in
// [0, threads) on threads that live as long as the pool (the caller's thread
// is index 0), and returns when all are done. One hand-off per step, never a
// thread start per tensor.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
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
  void run(const std::function<void(std::size_t)>& fn);

 private:
  void work(std::size_t index);

  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::uint64_t generation_ = 0;
  std::size_t running_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::mutex run_mutex_;
  std::vector<std::thread> workers_;
};

}  // namespace zinf::cpu_adam
