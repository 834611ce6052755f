// Host twin of cuda_host_cuda.cpp for builds without CUDA.
#include "pinned_pool/cuda_host.hpp"

namespace zinf {

bool cuda_host_register(void*, std::uint64_t) noexcept { return false; }
void cuda_host_unregister(void*) noexcept {}
int cuda_device_count() noexcept { return 0; }

}  // namespace zinf
