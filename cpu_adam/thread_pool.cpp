#include "cpu_adam/thread_pool.hpp"

#include <pthread.h>
#include <xmmintrin.h>

#include <cstdio>

#include "core/error.hpp"

namespace zinf::cpu_adam {

ThreadPool::ThreadPool(std::size_t threads) {
  ZINF_CHECK(threads >= 1 && threads <= 1024, "the optimizer needs between 1 and 1024 threads");
  workers_.reserve(threads - 1);
  try {
    for (std::size_t i = 1; i < threads; ++i) {
      workers_.emplace_back([this, i] {
        char name[16];
        std::snprintf(name, sizeof name, "zinf-adam-%zu", i);
        pthread_setname_np(pthread_self(), name);
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
    Job job = nullptr;
    void* context = nullptr;
    unsigned mxcsr = 0;
    {
      std::unique_lock lock(mutex_);
      start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
      context = context_;
      mxcsr = mxcsr_;
    }
    const unsigned own_mxcsr = _mm_getcsr();
    _mm_setcsr(mxcsr);
    std::exception_ptr error;
    try {
      job(context, index);
    } catch (...) {
      error = std::current_exception();
    }
    _mm_setcsr(own_mxcsr);
    std::lock_guard lock(mutex_);
    if (error && !error_) error_ = error;
    if (--running_ == 0) done_.notify_one();
  }
}

void ThreadPool::run_job(Job job, void* context) {
  std::lock_guard serial(run_mutex_);
  {
    std::lock_guard lock(mutex_);
    job_ = job;
    context_ = context;
    mxcsr_ = _mm_getcsr();
    running_ = workers_.size();
    error_ = nullptr;
    ++generation_;
  }
  start_.notify_all();
  std::exception_ptr mine;
  try {
    job(context, 0);
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
