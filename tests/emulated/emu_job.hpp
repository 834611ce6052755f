// One unit of work for the emulated AVX-512 test, shared by the guest that
// runs inside the CPU emulator (avx512_guest.cpp) and the native reference
// program (avx512_reference.cpp). A job is an image: this header at its first
// byte, followed by the buffers it names by byte offset from that byte, so
// the same image means the same thing at any address, in the guest's memory
// or in the host's. avx512_emulated_test.py builds the images and mirrors
// this layout (the static_asserts below pin the offsets it uses).
//
// Header-only, freestanding: no standard library beyond <cstddef>/<cstdint>,
// since the guest has no C or C++ runtime.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu_adam/kernel_table.hpp"

namespace zinf::cpu_adam::emulated {

inline constexpr std::uint32_t kJobMagic = 0x554d455au;  // "ZEMU"
inline constexpr std::uint32_t kMaxSteps = 4;

enum JobKind : std::uint32_t {
  kProbe = 0,  // report CPUID/XGETBV as the kernel dispatcher reads them
  kAdam = 1,
  kAdagrad = 2,
  kLion = 3,
  kBandwidth = 4,
};

enum JobTier : std::uint32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

enum JobStatus : std::int32_t {
  kNotRun = -1,
  kDone = 0,
  kBadMagic = 1,
  kBadJob = 2,      // kind, tier, dtype index or step count out of range
  kNoKernel = 3,    // the table has no kernel for the dtype combination
  kNoTier = 4,      // this program does not carry the requested tier
};

struct Job {
  // ---- in
  std::uint32_t magic;
  std::uint32_t kind;  // JobKind
  std::uint32_t tier;  // JobTier
  std::uint32_t param_dtype, grad_dtype, state_dtype, copy;  // KernelTable indices
  std::uint32_t steps;                                        // 1..kMaxSteps
  std::uint64_t begin, end;                                   // element range of every call
  // Byte offsets from the job's first byte of element 0 of each tensor.
  std::uint64_t param, grad, exp_avg, exp_avg_sq, param_copy;
  std::uint64_t grad_step_bytes;  // step k reads its grads at grad + k * grad_step_bytes
  AdamScalars adam[kMaxSteps];
  AdagradScalars adagrad[kMaxSteps];
  LionScalars lion[kMaxSteps];
  // ---- out
  std::int32_t status;
  std::uint32_t steps_done;
  char table_name[16];
  // kProbe: leaf 1 (eax ebx ecx edx), leaf 7.0, leaf 7.1, then XCR0.
  std::uint32_t cpuid1[4];
  std::uint32_t cpuid7_0[4];
  std::uint32_t cpuid7_1[4];
  std::uint64_t xcr0;
};

// The layout avx512_emulated_test.py writes and reads.
static_assert(sizeof(AdamScalars) == 40 && offsetof(AdamScalars, adamw) == 36 &&
              offsetof(AdamScalars, use_weight_decay) == 37);
static_assert(sizeof(AdagradScalars) == 16 && offsetof(AdagradScalars, use_weight_decay) == 12);
static_assert(sizeof(LionScalars) == 28 && offsetof(LionScalars, use_weight_decay) == 24);
static_assert(offsetof(Job, begin) == 32 && offsetof(Job, param) == 48 &&
              offsetof(Job, grad_step_bytes) == 88 && offsetof(Job, adam) == 96 &&
              offsetof(Job, adagrad) == 256 && offsetof(Job, lion) == 320 &&
              offsetof(Job, status) == 432 && offsetof(Job, steps_done) == 436 &&
              offsetof(Job, table_name) == 440 && offsetof(Job, cpuid1) == 456 &&
              offsetof(Job, cpuid7_0) == 472 && offsetof(Job, cpuid7_1) == 488 &&
              offsetof(Job, xcr0) == 504 && sizeof(Job) == 512);

// Runs a kernel job against `table` (not kProbe, which the guest answers
// itself). Every step calls the kernel once over [begin, end).
inline void run_kernel_job(Job& job, const KernelTable& table) {
  job.steps_done = 0;
  for (int i = 0; i < 16; ++i) {
    job.table_name[i] = 0;
    if (table.name[i] == 0) break;
    if (i < 15) job.table_name[i] = table.name[i];
  }
  if (job.kind < kAdam || job.kind > kBandwidth || job.param_dtype > 2 || job.grad_dtype > 2 ||
      job.state_dtype > 2 || job.copy > 2 || job.steps < 1 || job.steps > kMaxSteps ||
      job.begin > job.end) {
    job.status = kBadJob;
    return;
  }
  const std::uint32_t p = job.param_dtype, g = job.grad_dtype, s = job.state_dtype, c = job.copy;
  auto* base = reinterpret_cast<unsigned char*>(&job);
  void* param = base + job.param;
  void* exp_avg = base + job.exp_avg;
  void* exp_avg_sq = base + job.exp_avg_sq;
  // A job without a copy keeps param_copy at 0; the kernel never reads it.
  void* copy = c == 0 ? nullptr : base + job.param_copy;
  const bool present = (job.kind == kAdam && table.adam[p][g][s][c] != nullptr) ||
                       (job.kind == kAdagrad && table.adagrad[p][g][s][c] != nullptr) ||
                       (job.kind == kLion && table.lion[p][g][s][c] != nullptr) ||
                       (job.kind == kBandwidth && table.bandwidth[p][g][s][c] != nullptr);
  if (!present) {
    job.status = kNoKernel;
    return;
  }
  for (std::uint32_t k = 0; k < job.steps; ++k) {
    const void* grad = base + job.grad + k * job.grad_step_bytes;
    switch (job.kind) {
      case kAdam:
        table.adam[p][g][s][c](job.adam[k], param, grad, exp_avg, exp_avg_sq, copy, job.begin,
                               job.end);
        break;
      case kAdagrad:
        table.adagrad[p][g][s][c](job.adagrad[k], param, grad, exp_avg_sq, copy, job.begin,
                                  job.end);
        break;
      case kLion:
        table.lion[p][g][s][c](job.lion[k], param, grad, exp_avg, copy, job.begin, job.end);
        break;
      default:
        table.bandwidth[p][g][s][c](param, grad, exp_avg, exp_avg_sq, copy, job.begin, job.end);
        break;
    }
    job.steps_done = k + 1;
  }
  job.status = kDone;
}

}  // namespace zinf::cpu_adam::emulated
