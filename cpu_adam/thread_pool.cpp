#include "cpu_adam/thread_pool.hpp"

#include <pthread.h>

#include <string>

#include "core/error.hpp"

namespace zinf::cpu_adam {

ThreadPool::ThreadPool(std::size_t threads) {
  ZINF_CHECK(threads >= 1 && threads <= 1024, "the optimizer needs between 1 and 1024 threads");
  workers_.reserve(threads - 1);
  try {
    for (std::size_t i = 1; i < threads; ++i) {
      workers_.emplace_back([this, i] {
        const std::string name = "zinf-adam-" + std::to_string(i);
        pthread_setname_np(pthread_self(), name.c_str());
        work(i);
      });
    }
  } catch (...) {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    start_.notify_all();
    for (auto& worker : workers_) worker.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  start_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::work(std::size_t index) {
  std::uint64_t seen = 0;
  for (;;) {
    const std::function<void(std::size_t)>* job = nullptr;
    {
      std::unique_lock lock(mutex_);
      start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
    }
    std::exception_ptr error;
    try {
      (*job)(index);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard lock(mutex_);
    if (error && !error_) error_ = error;
    if (--running_ == 0) done_.notify_one();
  }
}

void ThreadPool::run(const std::function<void(std::size_t)>& fn) {
  std::lock_guard serial(run_mutex_);
  {
    std::lock_guard lock(mutex_);
    job_ = &fn;
    running_ = workers_.size();
    error_ = nullptr;
    ++generation_;
  }
  start_.notify_all();
  std::exception_ptr mine;
  try {
    fn(0);
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock lock(mutex_);
  done_.wait(lock, [&] { return running_ == 0; });
  job_ = nullptr;
  if (mine) std::rethrow_exception(mine);
  if (error_) std::rethrow_exception(error_);
}

}  // namespace zinf::cpu_adam
