// The native half of the emulated AVX-512 test: runs job images
// (emu_job.hpp) on this machine with the scalar tier, the reference every
// other tier must match, or the AVX2 tier (a check of the emulator itself).
//
//   avx512_emulated_reference IN OUT
//
// IN and OUT are sequences of records, each a little-endian 64-bit byte
// count followed by that many bytes of one job image. Each image is copied to
// a 64-byte aligned buffer (the guest loads images at page boundaries, so
// every tensor has the same alignment in both places), run, and written out.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "cpu_adam/kernel_table.hpp"
#include "emu_job.hpp"

namespace {

using zinf::cpu_adam::emulated::Job;
namespace emu = zinf::cpu_adam::emulated;

bool has_avx2() {
  // The kernels of the AVX2 tier need AVX2, FMA and F16C and the OS's YMM state.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

struct AlignedFree {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{64}); }
};

int fail(const char* what, const char* path) {
  std::fprintf(stderr, "avx512_emulated_reference: %s %s\n", what, path);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return fail("cannot open", argv[1]);
  std::FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return fail("cannot create", argv[2]);
  const bool avx2 = has_avx2();
  int jobs = 0;
  for (;;) {
    std::uint64_t size = 0;
    const std::size_t got = std::fread(&size, 1, sizeof size, in);
    if (got == 0 && std::feof(in)) break;
    if (got != sizeof size || size < sizeof(Job) || size > (std::uint64_t{1} << 30)) {
      return fail("bad record header in", argv[1]);
    }
    std::unique_ptr<unsigned char[], AlignedFree> image(
        new (std::align_val_t{64}) unsigned char[size]);
    if (std::fread(image.get(), 1, size, in) != size) return fail("short record in", argv[1]);
    Job& job = *reinterpret_cast<Job*>(image.get());
    if (job.magic != emu::kJobMagic) {
      job.status = emu::kBadMagic;
    } else if (job.tier == emu::kScalar) {
      emu::run_kernel_job(job, zinf::cpu_adam::scalar_kernels());
    } else if (job.tier == emu::kAvx2 && avx2) {
      emu::run_kernel_job(job, zinf::cpu_adam::avx2_kernels());
    } else {
      job.status = emu::kNoTier;
    }
    if (std::fwrite(&size, 1, sizeof size, out) != sizeof size ||
        std::fwrite(image.get(), 1, size, out) != size) {
      return fail("cannot write", argv[2]);
    }
    ++jobs;
  }
  std::fclose(in);
  if (std::fclose(out) != 0) return fail("cannot write", argv[2]);
  std::fprintf(stderr, "avx512_emulated_reference: ran %d jobs natively\n", jobs);
  return 0;
}
