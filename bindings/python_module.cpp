// zinf._zinf: the C++ side of the Python package. It knows nothing of torch:
// the package's Python layer (bindings/zinf/) checks tensors (CPU,
// contiguous, dtype) and passes their addresses and sizes, which keeps this
// module buildable against any torch. Every call that waits releases the
// GIL. zinf::Error becomes ValueError (config, invalid), OSError with errno
// and filename (I/O kinds), or RuntimeError (the rest).
#include <fmt/format.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/handle.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/memory_plan.hpp"
#include "swap/swap_store.hpp"
#include "zero3/checkpoint.hpp"
#include "zero3/communicator.hpp"
#include "zero3/engine.hpp"
#include "zinf_config.h"

namespace py = pybind11;

namespace {

using zinf::Error;
using zinf::ErrorKind;

std::atomic<std::uint64_t> pinned_live_bytes{0};
std::atomic<std::uint64_t> pinned_live_buffers{0};

void raise_python(const Error& error) {
  switch (error.kind()) {
    case ErrorKind::config:
    case ErrorKind::invalid:
      PyErr_SetString(PyExc_ValueError, error.what());
      return;
    case ErrorKind::io:
    case ErrorKind::no_space:
    case ErrorKind::alignment:
    case ErrorKind::unsupported:
    case ErrorKind::in_use: {
      const int number = error.error_number();
      py::object args = error.context().path.empty()
                            ? py::make_tuple(number, std::string(error.what()))
                            : py::make_tuple(number, std::string(error.what()), error.context().path);
      PyErr_SetObject(PyExc_OSError, args.ptr());
      return;
    }
    default:
      PyErr_SetString(PyExc_RuntimeError, error.what());
      return;
  }
}

// Page-locked memory for one tensor, from a pool of exactly the size. When
// the last reference goes (the tensor made over it holds one through the
// buffer protocol), the pool is kept for the next PinnedMemory of that size
// (up to ZINF_PINNED_CACHE_BYTES idle, default 1 GiB) instead of being
// unlocked and unmapped: prefetching a unit every step must not mmap, mlock
// and fault in fresh memory each time.
struct IdlePinned {
  std::unique_ptr<zinf::PinnedPool> pool;
  zinf::PinnedBuffer lease;
};

class PinnedCache {
 public:
  static PinnedCache& instance() {
    static PinnedCache cache;
    return cache;
  }
  std::optional<IdlePinned> take(std::uint64_t bytes) {
    std::lock_guard lock(mutex_);
    const auto it = idle_.find(bytes);
    if (it == idle_.end()) return std::nullopt;
    IdlePinned found = std::move(it->second);
    idle_.erase(it);
    idle_bytes_ -= bytes;
    return found;
  }
  void give(std::uint64_t bytes, IdlePinned pinned) {
    std::lock_guard lock(mutex_);
    if (idle_bytes_ + bytes > cap_) return;  // destroyed on return: unlocked and unmapped
    idle_.emplace(bytes, std::move(pinned));
    idle_bytes_ += bytes;
  }
  std::uint64_t idle_bytes() const {
    std::lock_guard lock(mutex_);
    return idle_bytes_;
  }
  void clear() {
    std::multimap<std::uint64_t, IdlePinned> gone;
    {
      std::lock_guard lock(mutex_);
      gone.swap(idle_);
      idle_bytes_ = 0;
    }
  }

 private:
  PinnedCache() {
    const char* text = std::getenv("ZINF_PINNED_CACHE_BYTES");
    if (text != nullptr && *text != '\0') cap_ = std::strtoull(text, nullptr, 10);
  }
  mutable std::mutex mutex_;
  std::multimap<std::uint64_t, IdlePinned> idle_;
  std::uint64_t idle_bytes_ = 0;
  std::uint64_t cap_ = std::uint64_t{1} << 30;
};

class PinnedMemory {
 public:
  explicit PinnedMemory(std::uint64_t bytes) : bytes_(bytes) {
    if (auto reused = PinnedCache::instance().take(bytes)) {
      pool_ = std::move(reused->pool);
      lease_ = std::move(reused->lease);
    } else {
      zinf::PinnedPoolOptions options;
      options.budget_bytes = std::max<std::uint64_t>(bytes, 1);
      options.allow_unpinned = true;  // a low RLIMIT_MEMLOCK is logged once, not fatal
      pool_ = std::make_unique<zinf::PinnedPool>(options);
      lease_ = pool_->acquire(std::max<std::uint64_t>(bytes, 1));
    }
    pinned_live_bytes += bytes_;
    ++pinned_live_buffers;
  }
  ~PinnedMemory() {
    pinned_live_bytes -= bytes_;
    --pinned_live_buffers;
    try {
      PinnedCache::instance().give(bytes_, IdlePinned{std::move(pool_), std::move(lease_)});
    } catch (...) {
      // Not kept: freed here.
    }
  }
  std::uintptr_t address() const { return reinterpret_cast<std::uintptr_t>(lease_.data()); }
  std::uint64_t size() const { return bytes_; }
  bool page_locked() const { return pool_->page_locked(); }
  std::byte* data() const { return lease_.data(); }

 private:
  std::uint64_t bytes_;
  std::unique_ptr<zinf::PinnedPool> pool_;
  zinf::PinnedBuffer lease_;
};

std::byte* as_pointer(std::uintptr_t address) { return reinterpret_cast<std::byte*>(address); }

zinf::cpu_adam::DType dtype_of(const std::string& name) { return zinf::cpu_adam::parse_dtype(name); }

// One tensor's buffers as the Python layer describes them:
// (param, dtype, count, grad, grad dtype, exp_avg, exp_avg_sq, states dtype, copy, copy dtype)
using TensorTuple = std::tuple<std::uintptr_t, std::string, std::uint64_t, std::uintptr_t, std::string,
                               std::uintptr_t, std::uintptr_t, std::string, std::uintptr_t, std::string>;

std::vector<zinf::cpu_adam::TensorState> tensor_states(const std::vector<TensorTuple>& tensors) {
  std::vector<zinf::cpu_adam::TensorState> states;
  states.reserve(tensors.size());
  for (const auto& [param, param_dtype, count, grad, grad_dtype, exp_avg, exp_avg_sq, state_dtype, copy,
                    copy_dtype] : tensors) {
    zinf::cpu_adam::TensorState s;
    s.param = {reinterpret_cast<void*>(param), count, dtype_of(param_dtype)};
    s.grad = {reinterpret_cast<void*>(grad), count, dtype_of(grad_dtype)};
    if (exp_avg) s.exp_avg = {reinterpret_cast<void*>(exp_avg), count, dtype_of(state_dtype)};
    if (exp_avg_sq) s.exp_avg_sq = {reinterpret_cast<void*>(exp_avg_sq), count, dtype_of(state_dtype)};
    if (copy) s.param_copy = {reinterpret_cast<void*>(copy), count, dtype_of(copy_dtype)};
    states.push_back(s);
  }
  return states;
}

}  // namespace

// Collectives through a Python object (zinf.distributed's, over a
// torch.distributed process group): the engine's worker thread calls in
// with the GIL taken here; the buffers travel as memoryviews over the
// engine's memory. A failure (a peer gone) is Error{comm} from then on.
class PythonCommunicator final : public zinf::zero3::Communicator {
 public:
  PythonCommunicator(py::object collectives, int rank, int world_size, std::string backend)
      : collectives_(std::move(collectives)), rank_(rank), world_size_(world_size), backend_(std::move(backend)) {}
  ~PythonCommunicator() override {
    py::gil_scoped_acquire gil;
    collectives_ = py::object();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string_view backend() const override { return backend_; }

  void all_gather(const void* send, void* recv, std::size_t bytes) override {
    call("all_gather", bytes, [&](py::object f) {
      f(view(send, bytes), view(recv, bytes * static_cast<std::size_t>(world_size_)), bytes);
    });
  }
  void reduce_scatter(const float* send, float* recv, std::size_t count) override {
    call("reduce_scatter", count * sizeof(float), [&](py::object f) {
      f(view(send, count * sizeof(float) * static_cast<std::size_t>(world_size_)), view(recv, count * sizeof(float)),
        count);
    });
  }
  void all_reduce(float* data, std::size_t count, zinf::zero3::ReduceOp op) override {
    call("all_reduce", count * sizeof(float), [&](py::object f) {
      f(view(data, count * sizeof(float)), count, op == zinf::zero3::ReduceOp::sum ? "sum" : "max");
    });
  }
  void broadcast(void* data, std::size_t bytes, int root) override {
    call("broadcast", bytes, [&](py::object f) { f(view(data, bytes), bytes, root); });
  }
  void barrier() override {
    call("barrier", 1, [&](py::object f) { f(); });
  }

 private:
  static py::memoryview view(const void* data, std::size_t bytes) {
    return py::memoryview::from_memory(const_cast<void*>(data), static_cast<py::ssize_t>(bytes), false);
  }
  template <class Body>
  void call(const char* what, std::size_t bytes, Body&& body) {
    if (bytes == 0) return;
    if (failed_) {
      throw Error(ErrorKind::comm, fmt::format("{}: the torch.distributed communicator failed earlier: {}", what,
                                               first_failure_));
    }
    py::gil_scoped_acquire gil;
    try {
      body(collectives_.attr(what));
    } catch (py::error_already_set& error) {
      failed_ = true;
      first_failure_ = error.what();
      throw Error(ErrorKind::comm, fmt::format("{} over torch.distributed ({}, rank {} of {}) failed: {}", what,
                                               backend_, rank_, world_size_, first_failure_));
    }
  }

  py::object collectives_;
  int rank_;
  int world_size_;
  std::string backend_;
  std::atomic<bool> failed_{false};
  std::string first_failure_;
};

// The engine with the communicator it runs on. Destroyed without the GIL:
// the worker may be inside a collective that needs it to finish.
struct EngineHandle {
  std::unique_ptr<zinf::zero3::Communicator> comm;
  std::unique_ptr<zinf::zero3::Engine> engine;
  ~EngineHandle() {
    {
      py::gil_scoped_release release;
      engine.reset();
    }
    comm.reset();
  }
  zinf::zero3::Engine& get() {
    if (!engine) throw Error(ErrorKind::invalid, "the engine was closed");
    return *engine;
  }
};

zinf::swap::ParamGroupSettings group_settings(std::optional<float> lr, std::optional<std::pair<float, float>> betas,
                                              std::optional<float> eps, std::optional<float> weight_decay) {
  zinf::swap::ParamGroupSettings settings;
  settings.lr = lr;
  if (betas) {
    settings.beta1 = betas->first;
    settings.beta2 = betas->second;
  }
  settings.eps = eps;
  settings.weight_decay = weight_decay;
  return settings;
}

// `values` into the caller's buffer of `count` floats at `address`.
void copy_floats_out(const std::vector<float>& values, std::uintptr_t address, std::uint64_t count,
                     const std::string& param, const std::string& what) {
  if (values.size() != count) {
    throw Error(ErrorKind::invalid,
                fmt::format("'{}' of '{}': {} elements, the buffer holds {}", what, param, values.size(), count));
  }
  std::memcpy(reinterpret_cast<float*>(address), values.data(), count * sizeof(float));
}

py::dict describe_param(const zinf::zero3::ParamDescription& d) {
  py::dict out;
  out["name"] = d.name;
  out["shape"] = d.shape;
  out["module"] = d.module;
  out["elements"] = d.elements;
  out["shard_elements"] = d.shard_elements;
  out["persistent"] = d.persistent;
  out["trainable"] = d.trainable;
  return out;
}

double seconds(std::chrono::nanoseconds t) { return std::chrono::duration<double>(t).count(); }

PYBIND11_MODULE(_zinf, m) {
  m.doc() = "zinf's C++ core (use the zinf package, not this module)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& error) {
      raise_python(error);
    }
  });

  py::class_<zinf::aio::Handle>(m, "AioHandle")
      .def(py::init([](std::uint64_t block_size, std::uint32_t queue_depth, bool single_submit,
                       bool overlap_events, std::uint32_t intra_op_parallelism) {
             zinf::aio::HandleOptions options;
             options.aio.block_size = block_size;
             options.aio.queue_depth = queue_depth;
             options.aio.single_submit = single_submit;
             options.aio.overlap_events = overlap_events;
             options.aio.intra_op_parallelism = intra_op_parallelism;
             zinf::aio::validate(options.aio);
             return std::make_unique<zinf::aio::Handle>(options);
           }),
           py::arg("block_size"), py::arg("queue_depth"), py::arg("single_submit"), py::arg("overlap_events"),
           py::arg("intra_op_parallelism"))
      .def("read", [](zinf::aio::Handle& h, std::uintptr_t address, std::uint64_t bytes, const std::string& path,
                      std::uint64_t offset, bool async_op) {
             py::gil_scoped_release release;
             if (async_op) h.async_pread(as_pointer(address), bytes, path, offset);
             else h.pread(as_pointer(address), bytes, path, offset);
           })
      .def("write", [](zinf::aio::Handle& h, std::uintptr_t address, std::uint64_t bytes, const std::string& path,
                       std::uint64_t offset, bool async_op) {
             py::gil_scoped_release release;
             if (async_op) h.async_pwrite(as_pointer(address), bytes, path, offset);
             else h.pwrite(as_pointer(address), bytes, path, offset);
           })
      .def("wait", [](zinf::aio::Handle& h) {
             py::gil_scoped_release release;
             return h.wait();
           })
      .def("pending", &zinf::aio::Handle::pending)
      .def("engine", [](const zinf::aio::Handle& h) { return std::string(h.engine_name()); })
      .def_property_readonly("block_size", [](const zinf::aio::Handle& h) { return h.options().block_size; })
      .def_property_readonly("queue_depth", [](const zinf::aio::Handle& h) { return h.options().queue_depth; })
      .def_property_readonly("single_submit", [](const zinf::aio::Handle& h) { return h.options().single_submit; })
      .def_property_readonly("overlap_events", [](const zinf::aio::Handle& h) { return h.options().overlap_events; })
      .def_property_readonly("intra_op_parallelism",
                             [](const zinf::aio::Handle& h) { return h.options().intra_op_parallelism; });

  py::class_<PinnedMemory, std::shared_ptr<PinnedMemory>>(m, "PinnedMemory", py::buffer_protocol())
      .def(py::init<std::uint64_t>(), py::arg("bytes"))
      .def_property_readonly("address", &PinnedMemory::address)
      .def_property_readonly("size", &PinnedMemory::size)
      .def_property_readonly("page_locked", &PinnedMemory::page_locked)
      .def_buffer([](PinnedMemory& memory) {
        return py::buffer_info(memory.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(memory.size())}, {1});
      });
  m.def("pinned_bytes_in_use", [] { return pinned_live_bytes.load(); });
  m.def("pinned_buffers_in_use", [] { return pinned_live_buffers.load(); });
  m.def("pinned_cached_bytes", [] { return PinnedCache::instance().idle_bytes(); },
        "page-locked bytes kept idle for reuse");
  m.def("release_cached_pinned", [] { PinnedCache::instance().clear(); },
        "unlock and unmap the idle page-locked buffers");

  py::class_<zinf::cpu_adam::CpuOptimizer>(m, "CpuOptimizer")
      .def(py::init([](std::size_t threads) { return std::make_unique<zinf::cpu_adam::CpuOptimizer>(threads); }),
           py::arg("threads"))
      .def_property_readonly("tier", [](const zinf::cpu_adam::CpuOptimizer& o) {
        return std::string(zinf::cpu_adam::to_string(o.tier()));
      })
      .def("adam_step",
           [](zinf::cpu_adam::CpuOptimizer& o, float lr, float beta1, float beta2, float eps, float weight_decay,
              bool adamw_mode, bool bias_correction, std::int64_t step, const std::vector<TensorTuple>& tensors) {
             zinf::cpu_adam::AdamOptions options{lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction};
             const auto states = tensor_states(tensors);
             py::gil_scoped_release release;
             o.adam_step(options, step, states);
           })
      .def("adagrad_step",
           [](zinf::cpu_adam::CpuOptimizer& o, float lr, float eps, float weight_decay, std::int64_t step,
              const std::vector<TensorTuple>& tensors) {
             zinf::cpu_adam::AdagradOptions options{lr, eps, weight_decay};
             const auto states = tensor_states(tensors);
             py::gil_scoped_release release;
             o.adagrad_step(options, step, states);
           })
      .def("lion_step",
           [](zinf::cpu_adam::CpuOptimizer& o, float lr, float beta1, float beta2, float weight_decay,
              std::int64_t step, const std::vector<TensorTuple>& tensors) {
             zinf::cpu_adam::LionOptions options{lr, beta1, beta2, weight_decay};
             const auto states = tensor_states(tensors);
             py::gil_scoped_release release;
             o.lion_step(options, step, states);
           });

  // The swap store, for the package's TensorSwapper: buffers are the
  // caller's (page-aligned PinnedMemory of padded_size bytes).
  py::class_<zinf::swap::SwapStore>(m, "SwapStore")
      .def(py::init([](const std::vector<std::string>& directories, std::uint64_t block_size,
                       std::uint32_t queue_depth, std::uint32_t intra_op_parallelism, bool sync) {
             zinf::swap::SwapStoreOptions options;
             for (const auto& d : directories) options.directories.emplace_back(d);
             options.aio.block_size = block_size;
             options.aio.queue_depth = queue_depth;
             options.aio.intra_op_parallelism = intra_op_parallelism;
             options.sync = sync;
             zinf::aio::validate(options.aio);
             py::gil_scoped_release release;
             return std::make_unique<zinf::swap::SwapStore>(options);
           }),
           py::arg("directories"), py::arg("block_size"), py::arg("queue_depth"), py::arg("intra_op_parallelism"),
           py::arg("sync"))
      .def_property_readonly("alignment", &zinf::swap::SwapStore::alignment)
      .def("padded_size", &zinf::swap::SwapStore::padded_size)
      .def("write", [](zinf::swap::SwapStore& s, const std::string& key, std::uintptr_t address, std::uint64_t bytes,
                       std::uint64_t capacity) {
             py::gil_scoped_release release;
             s.write_sync(key, std::span(as_pointer(address), capacity), bytes);
           })
      .def("read_async", [](zinf::swap::SwapStore& s, const std::string& key, std::uintptr_t address,
                            std::uint64_t capacity) {
             return s.read(key, std::span(as_pointer(address), capacity)).id;
           })
      .def("wait", [](zinf::swap::SwapStore& s, std::uint64_t ticket) {
             py::gil_scoped_release release;
             return s.wait(zinf::swap::SwapTicket{ticket});
           })
      .def("size_of", [](const zinf::swap::SwapStore& s, const std::string& key) -> std::optional<std::uint64_t> {
             const auto extent = s.find(key);
             if (!extent) return std::nullopt;
             return extent->size_bytes;
           })
      .def("keys", &zinf::swap::SwapStore::keys)
      .def("remove", [](zinf::swap::SwapStore& s, const std::string& key) { s.remove(key); })
      .def("set_attribute", [](zinf::swap::SwapStore& s, const std::string& name, const std::string& value) {
             s.set_attribute(name, value);
           })
      .def("attribute", [](const zinf::swap::SwapStore& s, const std::string& name) { return s.attribute(name); })
      .def("commit", [](zinf::swap::SwapStore& s) {
             py::gil_scoped_release release;
             s.commit();
           });

  // The ZeRO engine (zero3/engine.hpp) for zinf.initialize. `collectives`
  // is None for a world of one, else an object with all_gather,
  // reduce_scatter, all_reduce, broadcast and barrier over memoryviews.
  py::class_<EngineHandle>(m, "Engine")
      .def(py::init([](const std::string& config_json, py::object collectives, int rank, int world_size,
                       const std::string& backend, std::size_t optimizer_threads,
                       bool loss_divided_by_accumulation) {
             const auto config = zinf::config::load_config_string(config_json);
             auto handle = std::make_unique<EngineHandle>();
             if (collectives.is_none()) {
               if (world_size != 1) throw Error(ErrorKind::invalid, "a world of more than one needs collectives");
               handle->comm = zinf::zero3::make_local_communicator();
             } else {
               handle->comm = std::make_unique<PythonCommunicator>(collectives, rank, world_size, backend);
             }
             zinf::zero3::EngineOptions options;
             options.optimizer_threads = optimizer_threads;
             options.loss_divided_by_accumulation = loss_divided_by_accumulation;
             handle->engine = std::make_unique<zinf::zero3::Engine>(config, *handle->comm, options);
             return handle;
           }),
           py::arg("config_json"), py::arg("collectives"), py::arg("rank"), py::arg("world_size"),
           py::arg("backend"), py::arg("optimizer_threads") = 0, py::arg("loss_divided_by_accumulation") = false)
      .def("add_module", [](EngineHandle& h, std::string name) { return h.get().add_module(std::move(name)); })
      .def("add_param",
           [](EngineHandle& h, zinf::zero3::ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
              std::uintptr_t address, std::uint64_t count) {
             const auto* values = reinterpret_cast<const float*>(address);
             return h.get().add_param(module, std::move(name), std::move(shape), std::span(values, count));
           },
           py::arg("module"), py::arg("name"), py::arg("shape"), py::arg("address"), py::arg("count"))
      // `fill(offset, view)` writes elements [offset, offset + n) of the
      // flattened param into `view` (n fp32 values) when finalize() builds
      // this rank's shard: values that are never whole in memory
      // (zinf.zero.Init's staged shards).
      .def("add_param_from",
           [](EngineHandle& h, zinf::zero3::ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
              py::function fill) {
             // Held and dropped with the GIL: finalize() calls it without.
             auto callback = std::shared_ptr<py::function>(new py::function(std::move(fill)), [](py::function* f) {
               py::gil_scoped_acquire gil;
               delete f;
             });
             return h.get().add_param(module, std::move(name), std::move(shape),
                                      [callback](std::uint64_t offset, std::span<float> out) {
                                        py::gil_scoped_acquire gil;
                                        (*callback)(offset, py::memoryview::from_memory(
                                                                out.data(),
                                                                static_cast<py::ssize_t>(out.size_bytes()), false));
                                      });
           },
           py::arg("module"), py::arg("name"), py::arg("shape"), py::arg("fill"))
      // Param groups (engine.hpp): settings left None are the optimizer's.
      .def("add_param_group",
           [](EngineHandle& h, std::optional<float> lr, std::optional<std::pair<float, float>> betas,
              std::optional<float> eps, std::optional<float> weight_decay) {
             return h.get().add_param_group(group_settings(lr, betas, eps, weight_decay));
           },
           py::arg("lr") = py::none(), py::arg("betas") = py::none(), py::arg("eps") = py::none(),
           py::arg("weight_decay") = py::none())
      .def("set_param_group",
           [](EngineHandle& h, zinf::zero3::ParamIndex p, std::size_t group) { h.get().set_param_group(p, group); },
           py::arg("param"), py::arg("group"))
      .def("set_trainable",
           [](EngineHandle& h, zinf::zero3::ParamIndex p, bool trainable) { h.get().set_trainable(p, trainable); },
           py::arg("param"), py::arg("trainable"))
      .def("set_param_group_settings",
           [](EngineHandle& h, std::size_t group, std::optional<float> lr,
              std::optional<std::pair<float, float>> betas, std::optional<float> eps,
              std::optional<float> weight_decay) {
             h.get().set_param_group_settings(group, group_settings(lr, betas, eps, weight_decay));
           },
           py::arg("group"), py::arg("lr") = py::none(), py::arg("betas") = py::none(),
           py::arg("eps") = py::none(), py::arg("weight_decay") = py::none())
      .def("finalize", [](EngineHandle& h) {
             py::gil_scoped_release release;
             h.get().finalize();
           })
      .def("pre_forward", [](EngineHandle& h, zinf::zero3::ModuleIndex m) {
             py::gil_scoped_release release;
             h.get().pre_forward(m);
           })
      .def("post_forward", [](EngineHandle& h, zinf::zero3::ModuleIndex m) {
             py::gil_scoped_release release;
             h.get().post_forward(m);
           })
      .def("pre_backward", [](EngineHandle& h, zinf::zero3::ModuleIndex m) {
             py::gil_scoped_release release;
             h.get().pre_backward(m);
           })
      .def("post_backward", [](EngineHandle& h, zinf::zero3::ModuleIndex m) {
             py::gil_scoped_release release;
             h.get().post_backward(m);
           })
      .def("step", [](EngineHandle& h, std::optional<bool> boundary) {
             py::gil_scoped_release release;
             return h.get().step(boundary);
           },
           py::arg("boundary") = py::none())
      .def("drop_gradients", [](EngineHandle& h) {
             py::gil_scoped_release release;
             h.get().drop_gradients();
           })
      .def("empty_partition_cache", [](EngineHandle& h) {
             py::gil_scoped_release release;
             h.get().empty_partition_cache();
           })
      // The whole param in the working precision (padded to the gathered
      // size), and its fp32 gradient buffer: views of the engine's memory,
      // valid while the engine says (see engine.hpp).
      .def("param", [](EngineHandle& h, zinf::zero3::ParamIndex p) {
             auto& engine = h.get();
             const auto& d = engine.describe(p);
             void* data = engine.param(p);
             const std::uint64_t element = engine.working_dtype() == zinf::cpu_adam::DType::f32 ? 4 : 2;
             return py::memoryview::from_memory(data, static_cast<py::ssize_t>(d.elements * element), false);
           })
      .def("grad", [](EngineHandle& h, zinf::zero3::ParamIndex p) {
             auto& engine = h.get();
             const auto& d = engine.describe(p);
             return py::memoryview::from_memory(engine.grad(p), static_cast<py::ssize_t>(d.elements * sizeof(float)),
                                                false);
           })
      // A param's fp32 master ("param"), gradient ("grad") or optimizer
      // state ("exp_avg", ...): whole ("gather", "set_values") or this
      // rank's shard ("local", "set_local"), through `count` floats at
      // `address` (see Engine::gather_values).
      .def("gather", [](EngineHandle& h, zinf::zero3::ParamIndex p, const std::string& what, std::uintptr_t address,
                        std::uint64_t count) {
             std::vector<float> values;
             {
               py::gil_scoped_release release;
               values = h.get().gather_values(p, what);
             }
             copy_floats_out(values, address, count, h.get().describe(p).name, what);
           })
      .def("local", [](EngineHandle& h, zinf::zero3::ParamIndex p, const std::string& what, std::uintptr_t address,
                       std::uint64_t count) {
             std::vector<float> values;
             {
               py::gil_scoped_release release;
               values = h.get().local_values(p, what);
             }
             copy_floats_out(values, address, count, h.get().describe(p).name, what);
           })
      .def("set_values", [](EngineHandle& h, zinf::zero3::ParamIndex p, const std::string& what,
                            std::uintptr_t address, std::uint64_t count) {
             const auto* values = reinterpret_cast<const float*>(address);
             py::gil_scoped_release release;
             h.get().set_values(p, what, std::span(values, count));
           })
      .def("set_local", [](EngineHandle& h, zinf::zero3::ParamIndex p, const std::string& what,
                           std::uintptr_t address, std::uint64_t count) {
             const auto* values = reinterpret_cast<const float*>(address);
             py::gil_scoped_release release;
             h.get().set_local_values(p, what, std::span(values, count));
           })
      .def("describe", [](EngineHandle& h, zinf::zero3::ParamIndex p) { return describe_param(h.get().describe(p)); })
      .def_property_readonly("param_count", [](EngineHandle& h) { return h.get().param_count(); })
      .def_property_readonly("cached_device_bytes", [](EngineHandle& h) { return h.get().cached_device_bytes(); })
      .def_property_readonly("loss_scale", [](EngineHandle& h) { return h.get().loss_scale(); })
      .def_property("learning_rate", [](EngineHandle& h) { return h.get().learning_rate(); },
                    [](EngineHandle& h, double lr) { h.get().set_learning_rate(lr); })
      .def_property_readonly("optimizer_step", [](EngineHandle& h) { return h.get().optimizer_step(); })
      .def_property_readonly("working_dtype", [](EngineHandle& h) {
             return std::string(zinf::cpu_adam::to_string(h.get().working_dtype()));
           })
      .def("stats", [](EngineHandle& h) {
             const auto s = h.get().stats();
             py::dict out;
             out["gathers"] = s.gathers;
             out["prefetched"] = s.prefetched;
             out["reduce_scatters"] = s.reduce_scatters;
             out["optimizer_steps"] = s.optimizer_steps;
             out["micro_steps"] = s.micro_steps;
             out["skipped_steps"] = s.skipped_steps;
             out["fetch_wait_s"] = seconds(s.fetch_wait);
             out["fetch_busy_s"] = seconds(s.fetch_busy);
             out["reduce_busy_s"] = seconds(s.reduce_busy);
             out["step_s"] = seconds(s.step_time);
             out["last_grad_norm"] = s.last_grad_norm;
             out["order_changes"] = s.order_changes;
             out["nvme_written_bytes"] = s.nvme_written_bytes;
             out["nvme_read_bytes"] = s.nvme_read_bytes;
             return out;
           })
      .def("save_checkpoint", [](EngineHandle& h, const std::string& dir) {
             py::gil_scoped_release release;
             h.get().save_checkpoint(dir);
           })
      .def("load_checkpoint", [](EngineHandle& h, const std::string& dir, bool optimizer_states) {
             py::gil_scoped_release release;
             h.get().load_checkpoint(dir, optimizer_states);
           }, py::arg("dir"), py::arg("optimizer_states") = true)
      .def("close", [](EngineHandle& h) {
             {
               py::gil_scoped_release release;
               h.engine.reset();
             }
             h.comm.reset();
           })
      .def_property_readonly("closed", [](EngineHandle& h) { return !h.engine; });

  // A zero3 checkpoint's params whole in fp32, with no engine (zinf.utils.
  // zero_to_fp32): sink(name, shape, trainable, memoryview) per param, the
  // view valid during the call; each param's memory goes once handed over.
  m.def("consolidate_checkpoint", [](const std::string& dir, py::function sink) {
    std::vector<zinf::zero3::ConsolidatedParam> params;
    {
      py::gil_scoped_release release;
      params = zinf::zero3::consolidate_checkpoint(dir);
    }
    for (auto& p : params) {
      sink(p.name, p.shape, p.trainable,
           py::memoryview::from_memory(p.values.data(), static_cast<py::ssize_t>(p.values.size() * sizeof(float)),
                                       false));
      std::vector<float>().swap(p.values);
    }
  }, py::arg("dir"), py::arg("sink"));

  m.def("check_config", [](const std::string& json_text) {
    const auto result = zinf::config::parse_config(json_text);
    std::vector<std::string> problems;
    for (const auto& problem : result.problems) problems.push_back(problem.line());
    return problems;
  });
  // What the engine will allocate for a config (swap/memory_plan.hpp), per
  // rank and tier, for the DeepSpeed-style estimators (zinf.runtime.zero).
  m.def("plan_memory", [](const std::string& json_text, std::uint64_t params, std::uint32_t world_size,
                          std::uint64_t largest_param, std::uint32_t ranks_per_node, bool device_is_host) {
    const auto parsed = zinf::config::parse_config(json_text);
    if (!parsed.problems.empty()) {
      throw zinf::Error(zinf::ErrorKind::config, parsed.problems.front().line());
    }
    zinf::swap::PlanInput input;
    input.params = params;
    input.world_size = world_size;
    input.largest_param = largest_param;
    input.ranks_per_node = ranks_per_node;
    input.device_is_host = device_is_host;
    const auto plan = zinf::swap::plan_memory(parsed.config, input);
    const auto tiers = [](const zinf::swap::TierBytes& t) {
      return py::dict(py::arg("gpu") = t.gpu, py::arg("pinned") = t.pinned, py::arg("pageable") = t.pageable,
                      py::arg("nvme") = t.nvme);
    };
    py::list stages;
    for (const auto& stage : plan.stages) {
      stages.append(py::dict(py::arg("stage") = stage.stage, py::arg("per_rank") = tiers(stage.per_rank)));
    }
    return py::dict(py::arg("stages") = stages, py::arg("chosen_stage") = plan.chosen_stage,
                    py::arg("per_rank") = tiers(plan.chosen), py::arg("transient_host") = plan.transient_host,
                    py::arg("ranks_per_node") = plan.ranks_per_node);
  }, py::arg("config"), py::arg("params"), py::arg("world_size") = 1, py::arg("largest_param") = 0,
     py::arg("ranks_per_node") = 0, py::arg("device_is_host") = false);
  m.attr("__version__") = ZINF_VERSION;
}
