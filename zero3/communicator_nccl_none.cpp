// Built when CUDA or NCCL is missing: no GPU communicator.
#include "zero3/communicator.hpp"

namespace zinf::zero3 {

std::unique_ptr<Communicator> make_nccl_communicator(const LaunchEnv&, Communicator&, std::chrono::milliseconds) {
  return nullptr;
}

bool nccl_available() { return false; }

}  // namespace zinf::zero3
