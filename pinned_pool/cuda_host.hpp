// Registers host memory with CUDA (cudaHostRegister) so device copies from
// it run at full PCIe speed. Built from cuda_host_cuda.cpp when the build
// finds CUDA, from cuda_host_none.cpp otherwise; both do nothing and return
// false where no GPU is present, so callers need no #ifdef.
#pragma once

#include <cstdint>

namespace zinf {

// True when the range is now registered with CUDA.
bool cuda_host_register(void* data, std::uint64_t bytes) noexcept;
void cuda_host_unregister(void* data) noexcept;
// Number of CUDA devices visible (0 without CUDA, a driver or a GPU).
int cuda_device_count() noexcept;

}  // namespace zinf
