// Built where the build has no CUDA: there is never a CUDA device.
#include "swap/device_copy.hpp"

namespace zinf::swap {

std::unique_ptr<DeviceCopier> make_cuda_copier(int) { return nullptr; }

}  // namespace zinf::swap
