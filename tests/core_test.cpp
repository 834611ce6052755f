#include <cerrno>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/units.hpp"
#include "test_util.hpp"

namespace zinf {
namespace {

TEST(Units, ParsesBinarySuffixes) {
  EXPECT_EQ(parse_bytes("4096"), 4096u);
  EXPECT_EQ(parse_bytes("64K"), 64 * KiB);
  EXPECT_EQ(parse_bytes("16M"), 16 * MiB);
  EXPECT_EQ(parse_bytes("16MiB"), 16 * MiB);
  EXPECT_EQ(parse_bytes("4g"), 4 * GiB);
  EXPECT_EQ(parse_bytes("1.5G"), 3 * GiB / 2);
  EXPECT_EQ(parse_bytes(" 2 MB "), 2 * MiB);
}

TEST(Units, RejectsNonsenseNamingTheText) {
  for (const char* bad : {"", "M", "12Q", "-4K", "0.5", "1.2.3M"}) {
    try {
      parse_bytes(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& error) {
      EXPECT_EQ(error.kind(), ErrorKind::invalid);
      EXPECT_NE(std::string(error.what()).find(std::string("'") + bad + "'"), std::string::npos);
    }
  }
}

TEST(Units, ParsesDecimalCounts) {
  EXPECT_EQ(parse_count("1000"), 1000u);
  EXPECT_EQ(parse_count("100k"), 100000u);
  EXPECT_EQ(parse_count("10M"), 10000000u);
  EXPECT_EQ(parse_count("0.4G"), 400000000u);
  EXPECT_EQ(parse_count("7B"), 7000000000u);
  EXPECT_EQ(parse_count("4.1G"), 4100000000u);
  EXPECT_EQ(parse_count("1.3b"), 1300000000u);
  EXPECT_EQ(parse_count("1.5t"), 1500000000000u);
  for (const char* bad : {"", "M", "1.5", "-3", "10Q"}) EXPECT_THROW(parse_count(bad), Error) << bad;
}

TEST(Units, FormatsHumanSizes) {
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(4 * KiB), "4 KiB");
  EXPECT_EQ(format_bytes(3 * GiB / 2), "1.5 GiB");
}

TEST(Units, AlignmentArithmetic) {
  EXPECT_EQ(align_up(1, 4096), 4096u);
  EXPECT_EQ(align_up(4096, 4096), 4096u);
  EXPECT_EQ(align_down(8191, 4096), 4096u);
  EXPECT_TRUE(is_power_of_two(4096));
  EXPECT_FALSE(is_power_of_two(0));
  EXPECT_FALSE(is_power_of_two(4095));
}

TEST(Errors, IoErrorCarriesPathOffsetLengthAndErrno) {
  const Error error = io_error("read", "/nvme/x.swp", 8192, 4096, EIO);
  EXPECT_EQ(error.kind(), ErrorKind::io);
  EXPECT_EQ(error.context().path, "/nvme/x.swp");
  EXPECT_EQ(error.context().offset_bytes, 8192u);
  EXPECT_EQ(error.context().length_bytes, 4096u);
  EXPECT_EQ(error.error_number(), EIO);
  const std::string text = error.what();
  EXPECT_NE(text.find("/nvme/x.swp"), std::string::npos);
  EXPECT_NE(text.find("offset 8192"), std::string::npos);
  EXPECT_NE(text.find("length 4096"), std::string::npos);
  EXPECT_NE(text.find("EIO"), std::string::npos);
}

TEST(Errors, NoSpaceIsItsOwnKind) {
  EXPECT_EQ(io_error("write", "/x", 0, 1, ENOSPC).kind(), ErrorKind::no_space);
  EXPECT_EQ(io_error("write", "/x", 0, 1, EDQUOT).kind(), ErrorKind::no_space);
}

TEST(Errors, ConfigErrorNamesKeyPath) {
  ErrorContext ctx;
  ctx.key_path = "aio.queue_depth";
  const Error error(ErrorKind::config, "must be positive", ctx);
  EXPECT_EQ(std::string(error.what()), "aio.queue_depth: must be positive");
}

}  // namespace
}  // namespace zinf

namespace zinf {
namespace {

// replace_file writes manifests, store identities and checkpoint
// descriptions into directories other users may share: a symlink planted
// where a temporary used to be is never followed, and nothing is left.
TEST(AtomicFile, APlantedSymlinkIsNotFollowedAndNoTemporaryStays) {
  testing::TempDir dir;
  const auto victim = dir / "victim";
  std::ofstream(victim) << "precious";
  const auto target = dir / "zinf.manifest";
  std::filesystem::create_symlink(victim, dir / "zinf.manifest.tmp");
  replace_file(target, std::string_view("{\"new\": true}\n"), true);
  std::ifstream in(victim);
  std::string kept;
  std::getline(in, kept);
  EXPECT_EQ(kept, "precious");
  std::ifstream written(target);
  std::string line;
  std::getline(written, line);
  EXPECT_EQ(line, "{\"new\": true}");
  std::size_t entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    (void)entry;
    ++entries;
  }
  EXPECT_EQ(entries, 3u);  // victim, the planted link, the manifest: no temporary left
  // A target in a missing directory fails naming the path and leaves nothing.
  EXPECT_THROW(replace_file(dir / "missing" / "x", std::string_view("x"), false), Error);
}

}  // namespace
}  // namespace zinf
