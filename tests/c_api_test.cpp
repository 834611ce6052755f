// The C API as a C program sees it: `meson install` of this build into a
// scratch prefix, then tests/c_consumer/consumer.c compiled with the system
// C compiler against the installed header and library found by pkg-config
// (nothing from the source tree), and run.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "test_util.hpp"

namespace {

// Both streams together: what a failing step printed.
struct Outcome {
  int exit_code;
  std::string output;
};

Outcome sh(const std::string& command) {
  const auto o = zinf::testing::run_command(command);
  return {o.exit_code, o.out + o.err};
}

TEST(CApi, AConsumerBuildsAgainstTheInstalledLibraryAndRuns) {
  const char* build_root = std::getenv("ZINF_BUILD_ROOT");
  const char* source_root = std::getenv("ZINF_SOURCE_ROOT");
  ASSERT_NE(build_root, nullptr);
  ASSERT_NE(source_root, nullptr);
  zinf::testing::TempDir dir;
  const std::string prefix = (dir / "staging").string();
  Outcome o = sh("meson install -C " + std::string(build_root) + " --no-rebuild --quiet --destdir " + prefix);
  ASSERT_EQ(o.exit_code, 0) << o.output;
  // Find the installed zinf.pc, wherever the prefix and libdir put it.
  o = sh("find " + prefix + " -name zinf.pc");
  ASSERT_EQ(o.exit_code, 0) << o.output;
  std::string pc = o.output.substr(0, o.output.find('\n'));
  ASSERT_FALSE(pc.empty()) << "no zinf.pc installed under " << prefix;
  const std::string pc_dir = pc.substr(0, pc.rfind('/'));
  // The .pc names the real prefix; point it into the staging copy.
  o = sh("PKG_CONFIG_PATH=" + pc_dir + " pkg-config --variable=prefix zinf");
  ASSERT_EQ(o.exit_code, 0) << o.output;
  const std::string installed_prefix = o.output.substr(0, o.output.find('\n'));
  const std::string pkg = "PKG_CONFIG_PATH=" + pc_dir + " pkg-config --define-variable=prefix=" + prefix +
                          installed_prefix + " zinf";
  const std::string binary = (dir / "consumer").string();
  o = sh("cc -std=c11 -Wall -Wextra -Werror " + std::string(source_root) + "/tests/c_consumer/consumer.c -o " + binary +
             " $(" + pkg + " --cflags --libs) -lm");
  ASSERT_EQ(o.exit_code, 0) << o.output;
  o = sh("LD_LIBRARY_PATH=$(" + pkg + " --variable=libdir) " + binary + " " + dir.path().string());
  EXPECT_EQ(o.exit_code, 0) << o.output;
  EXPECT_NE(o.output.find("C consumer ok"), std::string::npos) << o.output;
  // Linked with the rpath docs/python.md shows, it runs with no
  // LD_LIBRARY_PATH; without either the loader refuses, naming the library.
  const std::string with_rpath = (dir / "consumer-rpath").string();
  o = sh("cc -std=c11 " + std::string(source_root) + "/tests/c_consumer/consumer.c -o " + with_rpath + " $(" + pkg +
         " --cflags --libs) -lm -Wl,-rpath,$(" + pkg + " --variable=libdir)");
  ASSERT_EQ(o.exit_code, 0) << o.output;
  o = sh("env -u LD_LIBRARY_PATH " + with_rpath + " " + dir.path().string());
  EXPECT_EQ(o.exit_code, 0) << o.output;
  if (sh("ldconfig -p | grep -q libzinf.so").exit_code != 0) {  // not also installed system-wide
    o = sh("env -u LD_LIBRARY_PATH " + binary + " " + dir.path().string());
    EXPECT_NE(o.exit_code, 0);
    EXPECT_NE(o.output.find("libzinf.so"), std::string::npos) << o.output;
  }
  // Only zinf_* symbols are exported.
  o = sh("nm -D --defined-only $(" + pkg + " --variable=libdir)/libzinf.so | grep -v ' zinf_' | grep -c ' T '");
  EXPECT_EQ(o.output.substr(0, o.output.find('\n')), "0") << "C++ symbols leak from libzinf.so";
}

}  // namespace
