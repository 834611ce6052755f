// When the kernel or a sandbox refuses io_uring, the automatic engine falls
// back to the posix engine with one log line naming the reason, and an
// explicit request for io_uring fails naming it. The refusal is real: a
// child process installs a seccomp filter that answers io_uring_setup with
// EPERM, as container runtimes do.
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "aio/engine.hpp"
#include "aio/file.hpp"
#include "aio/uring_engine.hpp"
#include "core/error.hpp"
#include "test_util.hpp"
#include "zinf_config.h"

namespace zinf::aio {
namespace {

using zinf::testing::aligned_bytes;
using zinf::testing::run_in_child;
using zinf::testing::TempDir;

bool refuse_io_uring_setup(int error_number) {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (static_cast<unsigned>(error_number) & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program{static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])), filter};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0;
}

using zinf::testing::slurp;

TEST(UringFallback, SeccompRefusalFallsBackToPosixAndSaysWhy) {
#if !ZINF_HAVE_LIBURING
  GTEST_SKIP() << "built without liburing: nothing to fall back from";
#endif
  TempDir dir;
  const std::string log_path = (dir / "stderr.log").string();
  const int code = run_in_child([&] {
    std::FILE* log = std::freopen(log_path.c_str(), "w", stderr);
    if (log == nullptr) return 10;
    if (!refuse_io_uring_setup(EPERM)) return 11;
    auto engine = make_engine(EngineKind::automatic, AioOptions{});
    if (engine->name() != "posix") return 12;
    File file = File::open(dir / "f.bin", OpenMode::create);
    auto out = aligned_bytes(1 << 20);
    auto in = aligned_bytes(1 << 20);
    std::memset(out.get(), 0x5A, 1 << 20);
    engine->wait(engine->submit({Op::write, &file, 0, out.get(), 1 << 20}));
    engine->wait(engine->submit({Op::read, &file, 0, in.get(), 1 << 20}));
    if (std::memcmp(out.get(), in.get(), 1 << 20) != 0) return 13;
    try {
      make_engine(EngineKind::uring, AioOptions{});
      return 14;  // an explicit io_uring request must not fall back silently
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::unsupported) return 15;
      if (std::string(error.what()).find("seccomp") == std::string::npos) return 16;
    }
    std::fflush(stderr);
    return 0;
  });
  ASSERT_EQ(code, 0) << "child failed at step " << code << "; its stderr:\n" << slurp(log_path);
  const std::string log = slurp(log_path);
  EXPECT_NE(log.find("io_uring is not available"), std::string::npos) << log;
  EXPECT_NE(log.find("seccomp"), std::string::npos) << log;
  EXPECT_NE(log.find("posix"), std::string::npos) << log;
  // One line, not one per engine.
  EXPECT_EQ(log.find("io_uring is not available"), log.rfind("io_uring is not available")) << log;
}

TEST(UringFallback, RefusalReasonsAreSpecific) {
#if !ZINF_HAVE_LIBURING
  GTEST_SKIP() << "built without liburing";
#else
  EXPECT_NE(describe_uring_refusal(ENOMEM).find("RLIMIT_MEMLOCK"), std::string::npos);
  const std::string eperm = describe_uring_refusal(EPERM);
  EXPECT_NE(eperm.find("EPERM"), std::string::npos);
  const std::string enosys = describe_uring_refusal(ENOSYS);
  EXPECT_NE(enosys.find("ENOSYS"), std::string::npos);
#endif
}

}  // namespace
}  // namespace zinf::aio
