// CUDA implementation of cuda_host.hpp. Every CUDA call goes through
// cuda_ok(), which logs a failure and clears CUDA's sticky last error so a
// failed registration degrades (unregistered memory, one warning) instead of
// poisoning later calls.
#include <cuda_runtime_api.h>

#include <fmt/format.h>

#include "core/log.hpp"
#include "pinned_pool/cuda_host.hpp"

namespace zinf {
namespace {

bool cuda_ok(cudaError_t status, const char* what) noexcept {
  if (status == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear the sticky error
  log_once(fmt::format("cuda:{}", what), spdlog::level::warn,
           fmt::format("{} failed: {} ({})", what, cudaGetErrorString(status),
                       static_cast<int>(status)));
  return false;
}

}  // namespace

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no GPU: not an error here
    return 0;
  }
  return count;
}

bool cuda_host_register(void* data, std::uint64_t bytes) noexcept {
  if (cuda_device_count() == 0) return false;
  return cuda_ok(cudaHostRegister(data, bytes, cudaHostRegisterDefault), "cudaHostRegister");
}

void cuda_host_unregister(void* data) noexcept {
  cuda_ok(cudaHostUnregister(data), "cudaHostUnregister");
}

}  // namespace zinf
