// The C API over the C++ library: every entry point catches, records the
// message and errno for zinf_last_error_*() and returns a status.
#include "bindings/c/zinf.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aio/handle.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "swap/swap_store.hpp"
#include "zinf_config.h"

struct zinf_config {
  zinf::config::Config config;
};
struct zinf_aio_handle {
  std::unique_ptr<zinf::aio::Handle> handle;
};
struct zinf_cpu_optimizer {
  std::unique_ptr<zinf::cpu_adam::CpuOptimizer> optimizer;
  std::string tier;
};
struct zinf_swap_store {
  std::unique_ptr<zinf::swap::SwapStore> store;
};

namespace {

thread_local std::string last_message;
thread_local int last_errno = 0;

zinf_status status_of(zinf::ErrorKind kind) {
  using zinf::ErrorKind;
  switch (kind) {
    case ErrorKind::config: return ZINF_ERROR_CONFIG;
    case ErrorKind::invalid: return ZINF_ERROR_INVALID;
    case ErrorKind::io: return ZINF_ERROR_IO;
    case ErrorKind::no_space: return ZINF_ERROR_NO_SPACE;
    case ErrorKind::alignment: return ZINF_ERROR_ALIGNMENT;
    case ErrorKind::unsupported: return ZINF_ERROR_UNSUPPORTED;
    case ErrorKind::resource: return ZINF_ERROR_RESOURCE;
    case ErrorKind::timeout: return ZINF_ERROR_TIMEOUT;
    case ErrorKind::cancelled: return ZINF_ERROR_CANCELLED;
    case ErrorKind::corrupt: return ZINF_ERROR_CORRUPT;
    case ErrorKind::in_use: return ZINF_ERROR_IN_USE;
    case ErrorKind::comm: return ZINF_ERROR_COMM;
    case ErrorKind::internal: return ZINF_ERROR_INTERNAL;
  }
  return ZINF_ERROR_INTERNAL;
}

template <class Body>
zinf_status guarded(Body&& body) {
  last_message.clear();
  last_errno = 0;
  try {
    body();
    return ZINF_OK;
  } catch (const zinf::Error& error) {
    last_message = error.what();
    last_errno = error.error_number();
    return status_of(error.kind());
  } catch (const std::bad_alloc&) {
    last_message = "out of memory";
    return ZINF_ERROR_RESOURCE;
  } catch (const std::exception& error) {
    last_message = error.what();
    return ZINF_ERROR_INTERNAL;
  }
}

zinf_status invalid(const char* message) {
  last_message = message;
  last_errno = 0;
  return ZINF_ERROR_INVALID;
}

zinf::cpu_adam::Buffer buffer_of(const zinf_tensor& t) {
  return {t.data, t.count, static_cast<zinf::cpu_adam::DType>(t.dtype)};
}

}  // namespace

extern "C" {

const char* zinf_last_error_message(void) { return last_message.c_str(); }
int zinf_last_error_errno(void) { return last_errno; }
const char* zinf_version(void) { return ZINF_VERSION; }

const char* zinf_status_name(zinf_status status) {
  switch (status) {
    case ZINF_OK: return "ok";
    case ZINF_ERROR_CONFIG: return "config";
    case ZINF_ERROR_INVALID: return "invalid";
    case ZINF_ERROR_IO: return "io";
    case ZINF_ERROR_NO_SPACE: return "no_space";
    case ZINF_ERROR_ALIGNMENT: return "alignment";
    case ZINF_ERROR_UNSUPPORTED: return "unsupported";
    case ZINF_ERROR_RESOURCE: return "resource";
    case ZINF_ERROR_TIMEOUT: return "timeout";
    case ZINF_ERROR_CANCELLED: return "cancelled";
    case ZINF_ERROR_CORRUPT: return "corrupt";
    case ZINF_ERROR_IN_USE: return "in_use";
    case ZINF_ERROR_COMM: return "comm";
    case ZINF_ERROR_INTERNAL: return "internal";
  }
  return "unknown";
}

zinf_status zinf_config_load_file(const char* path, zinf_config** out) {
  if (path == nullptr || out == nullptr) return invalid("zinf_config_load_file: null argument");
  return guarded([&] { *out = new zinf_config{zinf::config::load_config_file(path)}; });
}

zinf_status zinf_config_load_string(const char* json, zinf_config** out) {
  if (json == nullptr || out == nullptr) return invalid("zinf_config_load_string: null argument");
  return guarded([&] { *out = new zinf_config{zinf::config::load_config_string(json)}; });
}

void zinf_config_destroy(zinf_config* config) { delete config; }
int zinf_config_zero_stage(const zinf_config* config) { return config ? config->config.zero.stage : -1; }

zinf_aio_options zinf_aio_options_default(void) { return zinf_aio_options{1048576, 128, 1, 0, 0}; }

zinf_status zinf_aio_handle_create(const zinf_aio_options* options, zinf_aio_handle** out) {
  if (out == nullptr) return invalid("zinf_aio_handle_create: null output");
  const zinf_aio_options o = options ? *options : zinf_aio_options_default();
  return guarded([&] {
    zinf::aio::HandleOptions handle_options;
    handle_options.aio.block_size = o.block_size;
    handle_options.aio.queue_depth = o.queue_depth;
    handle_options.aio.intra_op_parallelism = o.intra_op_parallelism;
    handle_options.aio.single_submit = o.single_submit != 0;
    handle_options.aio.overlap_events = o.overlap_events != 0;
    zinf::aio::validate(handle_options.aio);
    auto handle = std::make_unique<zinf_aio_handle>();
    handle->handle = std::make_unique<zinf::aio::Handle>(handle_options);
    *out = handle.release();
  });
}

void zinf_aio_handle_destroy(zinf_aio_handle* handle) { delete handle; }

zinf_status zinf_aio_handle_pread(zinf_aio_handle* handle, void* buffer, uint64_t bytes, const char* path,
                                  uint64_t file_offset, int async_op) {
  if (handle == nullptr || path == nullptr) return invalid("zinf_aio_handle_pread: null argument");
  return guarded([&] {
    auto* data = static_cast<std::byte*>(buffer);
    if (async_op) handle->handle->async_pread(data, bytes, path, file_offset);
    else handle->handle->pread(data, bytes, path, file_offset);
  });
}

zinf_status zinf_aio_handle_pwrite(zinf_aio_handle* handle, const void* buffer, uint64_t bytes, const char* path,
                                   uint64_t file_offset, int async_op) {
  if (handle == nullptr || path == nullptr) return invalid("zinf_aio_handle_pwrite: null argument");
  return guarded([&] {
    const auto* data = static_cast<const std::byte*>(buffer);
    if (async_op) handle->handle->async_pwrite(data, bytes, path, file_offset);
    else handle->handle->pwrite(data, bytes, path, file_offset);
  });
}

zinf_status zinf_aio_handle_wait(zinf_aio_handle* handle, uint64_t* completed) {
  if (handle == nullptr) return invalid("zinf_aio_handle_wait: null handle");
  return guarded([&] {
    const std::uint64_t n = handle->handle->wait();
    if (completed) *completed = n;
  });
}

zinf_adam_options zinf_adam_options_default(void) { return zinf_adam_options{1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1, 1}; }

zinf_status zinf_cpu_optimizer_create(size_t threads, zinf_cpu_optimizer** out) {
  if (out == nullptr) return invalid("zinf_cpu_optimizer_create: null output");
  return guarded([&] {
    auto optimizer = std::make_unique<zinf_cpu_optimizer>();
    const std::size_t n = threads != 0 ? threads : std::max(1u, std::thread::hardware_concurrency());
    optimizer->optimizer = std::make_unique<zinf::cpu_adam::CpuOptimizer>(n);
    optimizer->tier = std::string(zinf::cpu_adam::to_string(optimizer->optimizer->tier()));
    *out = optimizer.release();
  });
}

void zinf_cpu_optimizer_destroy(zinf_cpu_optimizer* optimizer) { delete optimizer; }

const char* zinf_cpu_optimizer_tier(const zinf_cpu_optimizer* optimizer) {
  return optimizer ? optimizer->tier.c_str() : "";
}

zinf_status zinf_cpu_optimizer_adam_step(zinf_cpu_optimizer* optimizer, const zinf_adam_options* options,
                                         int64_t step, const zinf_tensor_state* tensors, size_t count) {
  if (optimizer == nullptr || options == nullptr || (tensors == nullptr && count > 0)) {
    return invalid("zinf_cpu_optimizer_adam_step: null argument");
  }
  return guarded([&] {
    std::vector<zinf::cpu_adam::TensorState> states(count);
    for (std::size_t i = 0; i < count; ++i) {
      states[i].param = buffer_of(tensors[i].param);
      states[i].grad = buffer_of(tensors[i].grad);
      if (tensors[i].exp_avg.data) states[i].exp_avg = buffer_of(tensors[i].exp_avg);
      if (tensors[i].exp_avg_sq.data) states[i].exp_avg_sq = buffer_of(tensors[i].exp_avg_sq);
      if (tensors[i].param_copy.data) states[i].param_copy = buffer_of(tensors[i].param_copy);
    }
    zinf::cpu_adam::AdamOptions adam{options->lr,           options->beta1,           options->beta2, options->eps,
                                     options->weight_decay, options->adamw_mode != 0, options->bias_correction != 0};
    optimizer->optimizer->adam_step(adam, step, states);
  });
}

zinf_status zinf_swap_store_open(const char* const* directories, size_t count, zinf_swap_store** out) {
  if (directories == nullptr || count == 0 || out == nullptr) return invalid("zinf_swap_store_open: no directories");
  return guarded([&] {
    zinf::swap::SwapStoreOptions options;
    for (std::size_t i = 0; i < count; ++i) options.directories.emplace_back(directories[i]);
    auto store = std::make_unique<zinf_swap_store>();
    store->store = std::make_unique<zinf::swap::SwapStore>(options);
    *out = store.release();
  });
}

void zinf_swap_store_close(zinf_swap_store* store) { delete store; }

namespace {
struct AlignedFree {
  void operator()(std::byte* p) const { std::free(p); }
};
std::unique_ptr<std::byte, AlignedFree> aligned(std::uint64_t bytes, std::uint64_t alignment) {
  auto* p = static_cast<std::byte*>(std::aligned_alloc(alignment, std::max<std::uint64_t>(bytes, alignment)));
  if (p == nullptr) throw std::bad_alloc();
  return std::unique_ptr<std::byte, AlignedFree>(p);
}
}  // namespace

zinf_status zinf_swap_store_write(zinf_swap_store* store, const char* key, const void* data, uint64_t bytes) {
  if (store == nullptr || key == nullptr || (data == nullptr && bytes > 0)) {
    return invalid("zinf_swap_store_write: null argument");
  }
  return guarded([&] {
    auto& s = *store->store;
    // The store's O_DIRECT writes need an aligned, padded buffer.
    const std::uint64_t padded = s.padded_size(bytes);
    auto buffer = aligned(padded, s.alignment());
    if (bytes > 0) std::memcpy(buffer.get(), data, bytes);
    s.write_sync(key, std::span(buffer.get(), padded), bytes);
  });
}

zinf_status zinf_swap_store_read(zinf_swap_store* store, const char* key, void* out, uint64_t capacity,
                                 uint64_t* bytes) {
  if (store == nullptr || key == nullptr) return invalid("zinf_swap_store_read: null argument");
  return guarded([&] {
    auto& s = *store->store;
    const auto extent = s.find(key);
    if (!extent) throw zinf::Error(zinf::ErrorKind::invalid, std::string("no key '") + key + "' in the swap store");
    if (extent->size_bytes > capacity) {
      throw zinf::Error(zinf::ErrorKind::invalid, "key '" + std::string(key) + "' holds " +
                                                      std::to_string(extent->size_bytes) + " bytes, more than the " +
                                                      std::to_string(capacity) + " given");
    }
    auto buffer = aligned(s.padded_size(extent->size_bytes), s.alignment());
    const std::uint64_t n = s.read_sync(key, std::span(buffer.get(), s.padded_size(extent->size_bytes)));
    if (n > 0) std::memcpy(out, buffer.get(), n);
    if (bytes) *bytes = n;
  });
}

zinf_status zinf_swap_store_commit(zinf_swap_store* store) {
  if (store == nullptr) return invalid("zinf_swap_store_commit: null store");
  return guarded([&] { store->store->commit(); });
}

}  // extern "C"
