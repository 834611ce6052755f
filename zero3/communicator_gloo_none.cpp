// Built when Gloo or libtorch's c10d store is missing: no CPU communicator.
#include "zero3/communicator.hpp"

namespace zinf::zero3 {

std::unique_ptr<Communicator> make_gloo_communicator(const LaunchEnv&, std::chrono::milliseconds) {
  return nullptr;
}

bool gloo_available() { return false; }

}  // namespace zinf::zero3
