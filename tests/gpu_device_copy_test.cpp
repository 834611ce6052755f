// GPU suite: the CUDA copier of the swap layer's device tier moves bytes
// from pinned-pool memory to the device and back unchanged, in order. Skips,
// saying so, where no CUDA device is visible.
#include <cstring>

#include <gtest/gtest.h>

#include "pinned_pool/cuda_host.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/device_copy.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

TEST(GpuDeviceCopy, CudaCopierRoundTripsPinnedBuffersThroughTheDevice) {
  if (cuda_device_count() == 0) {
    GTEST_SKIP() << "no CUDA device visible (no GPU or no driver): the GPU suite runs only on a GPU machine";
  }
  auto copier = make_device_copier(DeviceKind::cuda);
  EXPECT_EQ(copier->name(), "cuda");
  PinnedPoolOptions options;
  options.budget_bytes = 128ull << 20;
  PinnedPool pool(options);
  PinnedBuffer out = pool.acquire(48ull << 20);
  PinnedBuffer back = pool.acquire(48ull << 20);
  testing::fill_random(out.span(), 11);
  void* device = copier->allocate_device(out.size());
  const CopyTicket up = copier->to_device(device, out.data(), out.size());
  const CopyTicket down = copier->to_host(back.data(), device, back.size());
  copier->wait(up);
  copier->wait(down);
  copier->free_device(device);
  EXPECT_EQ(std::memcmp(out.data(), back.data(), out.size()), 0);
}

}  // namespace
}  // namespace zinf::swap
