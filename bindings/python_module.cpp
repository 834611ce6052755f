// zinf._zinf: the C++ side of the Python package. It knows nothing of torch:
// the package's Python layer (bindings/zinf/) checks tensors (CPU,
// contiguous, dtype) and passes their addresses and sizes, which keeps this
// module buildable against any torch. Every call that waits releases the
// GIL. zinf::Error becomes ValueError (config, invalid), OSError with errno
// and filename (I/O kinds), or RuntimeError (the rest).
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
#include "swap/swap_store.hpp"
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

  m.def("check_config", [](const std::string& json_text) {
    const auto result = zinf::config::parse_config(json_text);
    std::vector<std::string> problems;
    for (const auto& problem : result.problems) problems.push_back(problem.line());
    return problems;
  });
  m.attr("__version__") = ZINF_VERSION;
}
