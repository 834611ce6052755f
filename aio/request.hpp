// Plain values that describe I/O: a request names a file, an offset, a
// buffer and a length; tickets name a submitted batch. Engines cut requests
// into block_size pieces; callers never see pieces.
#pragma once

#include <cstddef>
#include <cstdint>

namespace zinf::aio {

class File;

enum class Op : std::uint8_t { read, write };

inline const char* to_string(Op op) { return op == Op::read ? "read" : "write"; }

struct Request {
  Op op = Op::read;
  const File* file = nullptr;
  std::uint64_t offset_bytes = 0;
  std::byte* buffer = nullptr;  // for writes the engine only reads from it
  std::uint64_t length_bytes = 0;
};

// A memory range an engine may register (io_uring fixed buffers). The owner
// keeps it alive until it is unregistered.
struct MemoryRegion {
  std::byte* data = nullptr;
  std::uint64_t size_bytes = 0;
};

// Names a batch of requests submitted together; waited on exactly once.
struct Ticket {
  std::uint64_t id = 0;
  bool valid() const { return id != 0; }
};

// DeepSpeed's "aio" block, with the same names and defaults.
struct AioOptions {
  std::uint64_t block_size = 1 << 20;     // bytes per piece
  std::uint32_t queue_depth = 8;          // pieces in flight per worker ring
  std::uint32_t intra_op_parallelism = 1; // worker rings (or threads)
  bool single_submit = false;             // submit pieces one by one
  bool overlap_events = true;             // refill the queue while reaping
  bool use_sqpoll = false;                // io_uring SQPOLL (opt-in: costs a core)
};

}  // namespace zinf::aio
