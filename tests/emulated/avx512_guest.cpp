// The guest program of the emulated AVX-512 test: linked, with no C or C++
// runtime, against the very kernel-tier archives meson builds for zinf
// (libzinf_cpu_adam_{avx512,avx2,scalar}.a), loaded by
// avx512_emulated_test.py into the memory of an emulated x86-64 CPU in long
// mode and started at zinf_emu_start with RDI pointing at a Job
// (emu_job.hpp). It runs the job and executes HLT, which ends the emulation.
//
// The scalar and AVX2 tiers ride along to check the emulator against this
// machine, except where ZINF_EMU_AVX512_ONLY is defined: in sanitizer builds
// those two archives are instrumented and cannot run without a runtime (the
// AVX-512 archive never is; see cpu_adam/meson.build).
//
// There is no operating system: no syscalls, no exceptions, no static
// constructors (the tiers need none: their tables are function-local
// statics), and only the few runtime symbols the compiler may call on its
// own are defined here.
#include <cpuid.h>

#include <cstddef>
#include <cstdint>

#include "cpu_adam/kernel_table.hpp"
#include "cpu_adam/xgetbv.hpp"
#include "emu_job.hpp"

namespace zinf::cpu_adam::emulated {
namespace {

void probe(Job& job) {
  unsigned* r = job.cpuid1;
  __cpuid(1, r[0], r[1], r[2], r[3]);
  r = job.cpuid7_0;
  __cpuid_count(7, 0, r[0], r[1], r[2], r[3]);
  r = job.cpuid7_1;
  __cpuid_count(7, 1, r[0], r[1], r[2], r[3]);
  // XGETBV faults unless CR4.OSXSAVE is set, which CPUID.1:ECX bit 27 reports.
  job.xcr0 = (job.cpuid1[2] & bit_OSXSAVE) != 0 ? xgetbv0() : 0;
  job.status = kDone;
}

}  // namespace

extern "C" void zinf_emu_run(Job* job) {
  job->status = kNotRun;
  if (job->magic != kJobMagic) {
    job->status = kBadMagic;
    return;
  }
  switch (job->tier) {
#ifndef ZINF_EMU_AVX512_ONLY
    case kScalar:
      if (job->kind == kProbe) break;
      run_kernel_job(*job, scalar_kernels());
      return;
    case kAvx2:
      if (job->kind == kProbe) break;
      run_kernel_job(*job, avx2_kernels());
      return;
#endif
    case kAvx512:
      if (job->kind == kProbe) break;
      run_kernel_job(*job, avx512_kernels());
      return;
    default: job->status = kNoTier; return;
  }
  probe(*job);
}

}  // namespace zinf::cpu_adam::emulated

// Entry point: the host sets RSP to a 16-byte aligned stack top and RDI to
// the job, so the call below leaves the stack as the ABI wants it.
__asm__(
    ".pushsection .text.zinf_emu_start, \"ax\", @progbits\n"
    ".globl zinf_emu_start\n"
    ".type zinf_emu_start, @function\n"
    "zinf_emu_start:\n"
    "  call zinf_emu_run\n"
    "1:\n"
    "  hlt\n"
    "  jmp 1b\n"
    ".size zinf_emu_start, . - zinf_emu_start\n"
    ".popsection\n");

// ---- the runtime symbols compiled code may call without being asked --------
// Function-local statics (the tiers' tables): one thread, no contention. The
// guard's first byte says "initialised", as in the Itanium C++ ABI.
extern "C" int __cxa_guard_acquire(std::uint64_t* guard) {
  return *reinterpret_cast<volatile unsigned char*>(guard) == 0 ? 1 : 0;
}
extern "C" void __cxa_guard_release(std::uint64_t* guard) {
  *reinterpret_cast<volatile unsigned char*>(guard) = 1;
}
extern "C" void __cxa_guard_abort(std::uint64_t*) {}

// GCC may emit calls to these for block copies and clears even when
// freestanding; this file is built with -fno-tree-loop-distribute-patterns so
// the loops below do not become calls to themselves.
extern "C" void* memcpy(void* dst, const void* src, std::size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
  return dst;
}
extern "C" void* memmove(void* dst, const void* src, std::size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  if (d < s) {
    for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    for (std::size_t i = n; i > 0; --i) d[i - 1] = s[i - 1];
  }
  return dst;
}
extern "C" void* memset(void* dst, int value, std::size_t n) {
  auto* d = static_cast<unsigned char*>(dst);
  for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<unsigned char>(value);
  return dst;
}
extern "C" int memcmp(const void* a, const void* b, std::size_t n) {
  const auto* x = static_cast<const unsigned char*>(a);
  const auto* y = static_cast<const unsigned char*>(b);
  for (std::size_t i = 0; i < n; ++i) {
    if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
  }
  return 0;
}
