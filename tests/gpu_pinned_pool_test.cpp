// GPU suite: runs only where a CUDA device is visible and skips, saying so,
// everywhere else. The pinned pool must register its region with CUDA, and
// a device round trip through pool memory must return the same bytes.
#include <cuda_runtime_api.h>

#include <cstring>

#include <gtest/gtest.h>

#include "core/units.hpp"
#include "pinned_pool/cuda_host.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "test_util.hpp"

namespace zinf {
namespace {

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device visible (no GPU or no driver): the GPU suite runs only on a GPU machine";
    }
  }
};

TEST_F(GpuTest, PoolIsCudaRegisteredAndRoundTripsThroughTheDevice) {
  PinnedPoolOptions options;
  options.budget_bytes = 64 * MiB;
  PinnedPool pool(options);
  ASSERT_TRUE(pool.cuda_registered()) << pool.description();
  PinnedBuffer out = pool.acquire(32 * MiB);
  PinnedBuffer in = pool.acquire(32 * MiB);
  zinf::testing::fill_random(out.span(), 5);
  void* device = nullptr;
  ASSERT_EQ(cudaMalloc(&device, out.size()), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(device, out.data(), out.size(), cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(in.data(), device, in.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(device);
  EXPECT_EQ(std::memcmp(out.data(), in.data(), out.size()), 0);
}

TEST_F(GpuTest, RegistrationCanBeDeclined) {
  PinnedPoolOptions options;
  options.budget_bytes = 4 * MiB;
  options.cuda_register = false;
  PinnedPool pool(options);
  EXPECT_FALSE(pool.cuda_registered());
}

}  // namespace
}  // namespace zinf
