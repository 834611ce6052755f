// The CPU communicator: Gloo's collectives over TCP, with the ranks meeting
// through a c10d TCPStore (libtorch's, the store torchrun's workers use).
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include <fmt/format.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "core/error.hpp"
#include "core/log.hpp"
#include "zero3/communicator.hpp"

namespace zinf::zero3 {
namespace {

// Gloo's TCP pairs write with writev, which cannot pass MSG_NOSIGNAL: a
// peer rank that dies mid-collective would kill this rank with SIGPIPE
// (seen as a rare "signal 13" in the dying-rank test) instead of failing
// the collective with an error that names the peer. Python ignores
// SIGPIPE already; a C++ trainer that left it at its default gets it
// ignored here, once, so EPIPE comes back as an error. A handler the
// trainer installed is left alone.
void ignore_sigpipe_if_default() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      ::signal(SIGPIPE, SIG_IGN);
    }
  });
}

// Gloo's rendezvous talks to a gloo Store; this one forwards to c10d's.
class C10dStoreForGloo final : public gloo::rendezvous::Store {
 public:
  explicit C10dStoreForGloo(c10::intrusive_ptr<c10d::TCPStore> store) : store_(std::move(store)) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    store_->set(key, std::vector<std::uint8_t>(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    const auto value = store_->get(key);
    return std::vector<char>(value.begin(), value.end());
  }
  void wait(const std::vector<std::string>& keys) override { store_->wait(keys); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    store_->wait(keys, timeout);
  }

 private:
  c10::intrusive_ptr<c10d::TCPStore> store_;
};

bool is_loopback(const std::string& address) {
  if (address == "localhost" || address == "::1") return true;
  in_addr parsed{};
  return inet_pton(AF_INET, address.c_str(), &parsed) == 1 && (ntohl(parsed.s_addr) >> 24) == 127;
}

// Whether this host's name resolves to loopback addresses only (Debian's
// /etc/hosts maps it to 127.0.1.1; a container or a network namespace to
// 127.0.0.1): Gloo binds to that name's address by default, and peers on
// other machines cannot reach it.
bool hostname_is_loopback() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return true;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* found = nullptr;
  if (getaddrinfo(name, nullptr, &hints, &found) != 0) return true;
  bool loopback = true;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(a->ai_addr);
    if ((ntohl(in->sin_addr.s_addr) >> 24) != 127) loopback = false;
  }
  freeaddrinfo(found);
  return loopback;
}

// The local IPv4 address this host reaches `host`:`port` from (the route's
// source address; a UDP connect sends nothing), or "" when there is none.
std::string local_address_towards(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return {};
  std::string local;
  const int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && connect(fd, found->ai_addr, found->ai_addrlen) == 0) {
    sockaddr_in mine{};
    socklen_t length = sizeof(mine);
    char text[INET_ADDRSTRLEN] = {};
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&mine), &length) == 0 &&
        inet_ntop(AF_INET, &mine.sin_addr, text, sizeof(text)) != nullptr) {
      local = text;
    }
  }
  if (fd >= 0) close(fd);
  freeaddrinfo(found);
  return local;
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(const LaunchEnv& launch, std::chrono::milliseconds timeout)
      : rank_(launch.rank), world_size_(launch.world_size), timeout_(timeout) {
    const std::string where = fmt::format("{}:{}", launch.master_addr, launch.master_port);
    try {
      c10d::TCPStoreOptions store_options;
      store_options.port = launch.master_port;
      store_options.isServer = launch.rank == 0 && !launch.agent_store;
      store_options.numWorkers = launch.agent_store ? c10::nullopt
                                                    : c10::optional<std::size_t>(launch.world_size);
      store_options.waitWorkers = !launch.agent_store;
      store_options.timeout = timeout;
      store_ = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, store_options);
    } catch (const std::exception& error) {
      throw Error(ErrorKind::comm,
                  fmt::format("rank {} of {}: rendezvous at {} (MASTER_ADDR:MASTER_PORT) failed: {}",
                              rank_, world_size_, where, first_line(error.what())));
    }
    try {
      gloo::transport::tcp::attr attr;
      if (const char* iface = std::getenv("GLOO_SOCKET_IFNAME"); iface != nullptr && *iface) {
        attr.iface = iface;
      } else if (is_loopback(launch.master_addr)) {
        // A one-machine job: stay on the loopback interface, whatever the
        // host name resolves to.
        attr.hostname = "127.0.0.1";
      } else if (const std::string towards = local_address_towards(launch.master_addr, launch.master_port);
                 hostname_is_loopback() && !towards.empty()) {
        // Several machines, and this one's name says loopback: listen on
        // the address that reaches the master, which the others reach too.
        attr.hostname = towards;
        log().info("zero3: rank {}: this host's name resolves to a loopback address; Gloo listens on {}, the "
                   "address towards MASTER_ADDR {} (GLOO_SOCKET_IFNAME chooses another interface)",
                   rank_, attr.hostname, launch.master_addr);
      }
      ignore_sigpipe_if_default();
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank_, world_size_);
      context->setTimeout(timeout);
      C10dStoreForGloo gloo_store(store_);
      gloo::rendezvous::PrefixStore prefixed("zinf.gloo", gloo_store);
      context->connectFullMesh(prefixed, device);
      context_ = std::move(context);
    } catch (const std::exception& error) {
      throw Error(ErrorKind::comm,
                  fmt::format("rank {} of {}: connecting to the other ranks through the store at {} "
                              "(MASTER_ADDR:MASTER_PORT) failed within {} s; did every rank start? {}",
                              rank_, world_size_, where,
                              std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                              first_line(error.what())));
    }
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string_view backend() const override { return "gloo"; }

  void all_gather(const void* send, void* recv, std::size_t bytes) override {
    run("all_gather", bytes, [&] {
      auto* out = static_cast<std::uint8_t*>(recv);
      gloo::AllgatherOptions opts(context_);
      // In place when the caller's block already sits at its offset.
      if (send != out + rank_ * bytes) opts.setInput(const_cast<std::uint8_t*>(static_cast<const std::uint8_t*>(send)), bytes);
      opts.setOutput(out, bytes * world_size_);
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }

  void reduce_scatter(const float* send, float* recv, std::size_t count) override {
    // Gloo 0.5's option-style API has no reduce-scatter (nor does c10d's
    // Gloo group in torch 1.13): all-reduce a copy and keep this rank's
    // block. Twice the traffic of a ring reduce-scatter; NCCL does the real
    // one on GPUs.
    run("reduce_scatter", count * sizeof(float), [&] {
      scratch_.assign(send, send + count * world_size_);
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(scratch_.data(), scratch_.size());
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
      std::memcpy(recv, scratch_.data() + rank_ * count, count * sizeof(float));
    });
  }

  void all_reduce(float* data, std::size_t count, ReduceOp op) override {
    run("all_reduce", count * sizeof(float), [&] {
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(data, count);
      if (op == ReduceOp::sum) {
        opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      } else {
        opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::max<float>));
      }
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }

  void broadcast(void* data, std::size_t bytes, int root) override {
    if (root < 0 || root >= world_size_) {
      throw Error(ErrorKind::invalid, fmt::format("broadcast from rank {} in a world of {}", root, world_size_));
    }
    run("broadcast", bytes, [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(static_cast<std::uint8_t*>(data), bytes);
      opts.setRoot(root);
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }

  void barrier() override {
    run("barrier", 0, [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    });
  }

 private:
  static std::string first_line(const char* what) {
    std::string text(what);
    // c10 errors append a C++ stack trace after the message.
    const auto cut = text.find("\nException raised from");
    if (cut != std::string::npos) text.resize(cut);
    return text;
  }

  template <class Body>
  void run(const char* op, std::size_t bytes, Body&& body) {
    std::lock_guard lock(mutex_);
    if (failed_) {
      throw Error(ErrorKind::comm, fmt::format("rank {} of {}: {} refused: an earlier collective "
                                               "failed, a peer rank died or stopped answering ({})",
                                               rank_, world_size_, op, failure_));
    }
    try {
      body();
    } catch (const std::exception& error) {
      failed_ = true;
      failure_ = fmt::format("{} of {} bytes: {}", op, bytes, first_line(error.what()));
      throw Error(ErrorKind::comm,
                  fmt::format("rank {} of {}: {} failed; a peer rank died or stopped answering "
                              "within {} s: {}", rank_, world_size_, failure_,
                              std::chrono::duration_cast<std::chrono::seconds>(timeout_).count(),
                              first_line(error.what())));
    }
  }

  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::TCPStore> store_;
  std::shared_ptr<gloo::Context> context_;
  std::mutex mutex_;
  bool failed_ = false;
  std::string failure_;
  std::vector<float> scratch_;
};

}  // namespace

std::unique_ptr<Communicator> make_gloo_communicator(const LaunchEnv& launch,
                                                     std::chrono::milliseconds timeout) {
  return std::make_unique<GlooCommunicator>(launch, timeout);
}

bool gloo_available() { return true; }

}  // namespace zinf::zero3
