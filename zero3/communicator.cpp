#include "zero3/communicator.hpp"

#include <charconv>
#include <optional>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"
#include "swap/strict_device.hpp"

namespace zinf::zero3 {

std::string_view to_string(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "automatic";
    case Backend::local: return "local";
    case Backend::gloo: return "gloo";
    case Backend::nccl: return "nccl";
  }
  return "unknown";
}

namespace {

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

long env_integer(const char* name, long min, long max, long fallback) {
  const auto text = env(name);
  if (!text) return fallback;
  long value = 0;
  const auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), value);
  if (ec != std::errc() || end != text->data() + text->size() || value < min || value > max) {
    ErrorContext ctx;
    ctx.key_path = name;
    throw Error(ErrorKind::config,
                fmt::format("environment variable {}='{}' is not a whole number in [{}, {}]", name,
                            *text, min, max),
                std::move(ctx));
  }
  return value;
}

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string_view backend() const override { return "local"; }
  void all_gather(const void* send, void* recv, std::size_t bytes) override {
    if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
  }
  void reduce_scatter(const float* send, float* recv, std::size_t count) override {
    if (send != recv && count > 0) std::memmove(recv, send, count * sizeof(float));
  }
  void all_reduce(float*, std::size_t, ReduceOp) override {}
  void broadcast(void*, std::size_t, int root) override {
    if (root != 0) {
      throw Error(ErrorKind::invalid, fmt::format("broadcast from rank {} in a world of one", root));
    }
  }
  void barrier() override {}
};

}  // namespace

LaunchEnv launch_env_from_environment() {
  LaunchEnv launch;
  const bool has_rank = env("RANK").has_value();
  const bool has_world = env("WORLD_SIZE").has_value();
  if (has_rank != has_world) {
    // The message is formatted before ctx is handed over: a by-value
    // parameter may be moved-into before the other arguments are evaluated.
    const std::string missing = has_rank ? "WORLD_SIZE" : "RANK";
    const std::string message = fmt::format("environment variable {} is set but {} is not: a launcher sets both",
                                            has_rank ? "RANK" : "WORLD_SIZE", missing);
    ErrorContext ctx;
    ctx.key_path = missing;
    throw Error(ErrorKind::config, message, std::move(ctx));
  }
  launch.world_size = static_cast<int>(env_integer("WORLD_SIZE", 1, 1 << 20, 1));
  launch.rank = static_cast<int>(env_integer("RANK", 0, launch.world_size - 1, 0));
  launch.local_rank = static_cast<int>(env_integer("LOCAL_RANK", 0, 1 << 20, launch.rank));
  launch.master_addr = env("MASTER_ADDR").value_or("127.0.0.1");
  launch.master_port = static_cast<std::uint16_t>(env_integer("MASTER_PORT", 1, 65535, 29500));
  const auto agent = env("TORCHELASTIC_USE_AGENT_STORE");
  launch.agent_store = agent && (*agent == "True" || *agent == "true" || *agent == "1");
  return launch;
}

namespace {

class StrictDeviceCommunicator final : public Communicator {
 public:
  StrictDeviceCommunicator(std::unique_ptr<Communicator> host, std::shared_ptr<swap::StrictDevice> device)
      : host_(std::move(host)), device_(std::move(device)) {}

  int rank() const override { return host_->rank(); }
  int world_size() const override { return host_->world_size(); }
  std::string_view backend() const override { return "strict device"; }
  bool device_memory() const override { return true; }

  void all_gather(const void* send, void* recv, std::size_t bytes) override {
    const std::byte* in = device_->access(send, bytes, "all_gather send buffer");
    std::byte* out = device_->access(recv, bytes * world_size(), "all_gather receive buffer");
    host_->all_gather(in, out, bytes);
  }
  void reduce_scatter(const float* send, float* recv, std::size_t count) override {
    const auto* in = reinterpret_cast<const float*>(
        device_->access(send, count * world_size() * sizeof(float), "reduce_scatter send buffer"));
    auto* out = reinterpret_cast<float*>(device_->access(recv, count * sizeof(float), "reduce_scatter receive buffer"));
    host_->reduce_scatter(in, out, count);
  }
  void all_reduce(float* data, std::size_t count, ReduceOp op) override {
    auto* view = reinterpret_cast<float*>(device_->access(data, count * sizeof(float), "all_reduce buffer"));
    host_->all_reduce(view, count, op);
  }
  void broadcast(void* data, std::size_t bytes, int root) override {
    host_->broadcast(device_->access(data, bytes, "broadcast buffer"), bytes, root);
  }
  void barrier() override { host_->barrier(); }

 private:
  std::unique_ptr<Communicator> host_;
  std::shared_ptr<swap::StrictDevice> device_;
};

}  // namespace

std::unique_ptr<Communicator> make_strict_device_communicator(std::unique_ptr<Communicator> host,
                                                              std::shared_ptr<swap::StrictDevice> device) {
  ZINF_CHECK(host != nullptr && device != nullptr, "strict device communicator without a host communicator or device");
  return std::make_unique<StrictDeviceCommunicator>(std::move(host), std::move(device));
}

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

std::unique_ptr<Communicator> make_communicator(const LaunchEnv& launch,
                                                const CommunicatorOptions& options) {
  std::chrono::milliseconds timeout = options.timeout;
  timeout = std::chrono::seconds(
      env_integer("ZINF_COMM_TIMEOUT_S", 1, 7 * 24 * 3600,
                  std::chrono::duration_cast<std::chrono::seconds>(timeout).count()));
  Backend backend = options.backend;
  if (backend == Backend::automatic) backend = launch.world_size == 1 ? Backend::local : Backend::gloo;
  switch (backend) {
    case Backend::automatic:
    case Backend::local:
      if (launch.world_size != 1) {
        throw Error(ErrorKind::invalid,
                    fmt::format("the local communicator serves a world of one, not {}",
                                launch.world_size));
      }
      return make_local_communicator();
    case Backend::gloo: {
      auto comm = make_gloo_communicator(launch, timeout);
      if (!comm) {
        throw Error(ErrorKind::unsupported,
                    "this build of zinf has no Gloo communicator (install libgloo-dev and "
                    "libtorch-dev and rebuild)");
      }
      return comm;
    }
    case Backend::nccl: {
      if (!nccl_available()) {
        throw Error(ErrorKind::unsupported,
                    "this build of zinf has no NCCL communicator (needs CUDA and NCCL at build time)");
      }
      // Only needed to hand NCCL's unique id around; gone once NCCL is up.
      const std::unique_ptr<Communicator> bootstrap =
          launch.world_size == 1 ? make_local_communicator() : make_gloo_communicator(launch, timeout);
      if (!bootstrap) {
        throw Error(ErrorKind::unsupported,
                    "the NCCL communicator meets its peers over Gloo, which this build lacks");
      }
      return make_nccl_communicator(launch, *bootstrap, timeout);
    }
  }
  throw Error(ErrorKind::internal, "unknown communicator backend");
}

}  // namespace zinf::zero3
