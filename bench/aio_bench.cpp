// Micro-benchmarks of zinf's own overheads: pinned-pool leases, and the cost
// of a request through the engine framework (ticket, pieces, worker hand-off,
// completion) with a device that does no work, next to the memory and
// io_uring engines doing real 4 KiB transfers.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <vector>

#include "aio/engine.hpp"
#include "aio/file.hpp"
#include "aio/thread_pool_engine.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"

namespace {

using namespace zinf;
using namespace zinf::aio;

void BM_PoolAcquireRelease(benchmark::State& state) {
  PinnedPoolOptions options;
  options.budget_bytes = 256 * MiB;
  PinnedPool pool(options);
  const auto bytes = static_cast<std::uint64_t>(state.range(0));
  for (auto _ : state) {
    PinnedBuffer lease = pool.acquire(bytes);
    benchmark::DoNotOptimize(lease.data());
  }
}
BENCHMARK(BM_PoolAcquireRelease)->Arg(4096)->Arg(1 << 20)->Arg(64 << 20);

// Holding 64 leases while acquiring one more: the free list is not empty.
void BM_PoolAcquireReleaseFragmented(benchmark::State& state) {
  PinnedPoolOptions options;
  options.budget_bytes = 256 * MiB;
  PinnedPool pool(options);
  std::vector<PinnedBuffer> held;
  for (int i = 0; i < 64; ++i) {
    held.push_back(pool.acquire(1 << 20));
    if (i % 2 == 0) held.back().release();
  }
  for (auto _ : state) {
    PinnedBuffer lease = pool.acquire(512 << 10);
    benchmark::DoNotOptimize(lease.data());
  }
}
BENCHMARK(BM_PoolAcquireReleaseFragmented);

class NullDevice final : public SyncDevice {
 public:
  std::int64_t transfer(Op, const File&, std::uint64_t, std::byte*, std::uint64_t length) override {
    return static_cast<std::int64_t>(length);
  }
  std::string_view name() const override { return "null"; }
};

std::filesystem::path scratch_file() {
  const char* dir = std::getenv("ZINF_BENCH_DIR");
  return std::filesystem::path(dir != nullptr ? dir : "/var/tmp") / "zinf-aio-bench.bin";
}

struct Fixture {
  Fixture() : file(File::open(scratch_file(), OpenMode::create)) {
    file.preallocate(64 * MiB);
    PinnedPoolOptions options;
    options.budget_bytes = 64 * MiB;
    pool = std::make_unique<PinnedPool>(options);
    lease = pool->acquire(64 * MiB);
  }
  ~Fixture() {
    lease.release();
    std::filesystem::remove(scratch_file());
  }
  File file;
  std::unique_ptr<PinnedPool> pool;
  PinnedBuffer lease;
};

// state.range(0): requests per ticket (4 KiB each).
void run_requests(benchmark::State& state, Engine& engine, Fixture& fixture) {
  const auto per_ticket = static_cast<std::size_t>(state.range(0));
  std::vector<Request> requests(per_ticket);
  for (std::size_t i = 0; i < per_ticket; ++i) {
    requests[i] = Request{Op::read, &fixture.file, i * 4096, fixture.lease.data() + i * 4096, 4096};
  }
  // Reads of never-written blocks return zeros; write them once so reads
  // are of real data on every engine.
  for (auto& r : requests) r.op = Op::write;
  engine.wait(engine.submit(requests));
  for (auto& r : requests) r.op = Op::read;
  for (auto _ : state) engine.wait(engine.submit(requests));
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(per_ticket));
}

void BM_FrameworkOverheadNullDevice(benchmark::State& state) {
  Fixture fixture;
  AioOptions options;
  options.queue_depth = 1;
  ThreadPoolEngine engine(options, std::make_unique<NullDevice>(), 1, "null");
  run_requests(state, engine, fixture);
}
BENCHMARK(BM_FrameworkOverheadNullDevice)->Arg(1)->Arg(64)->UseRealTime();

void BM_MemoryEngine4K(benchmark::State& state) {
  Fixture fixture;
  AioOptions options;
  options.queue_depth = 1;
  auto engine = make_memory_engine(options);
  run_requests(state, *engine, fixture);
}
BENCHMARK(BM_MemoryEngine4K)->Arg(1)->Arg(64)->UseRealTime();

void BM_UringEngine4KFixed(benchmark::State& state) {
  Fixture fixture;
  AioOptions options;
  options.queue_depth = 64;
  auto engine = make_engine(EngineKind::uring, options);
  const MemoryRegion region = fixture.pool->region();
  engine->register_buffers(std::span(&region, 1));
  engine->register_file(fixture.file);
  run_requests(state, *engine, fixture);
  engine->unregister_file(fixture.file);
  engine->unregister_buffers();
}
BENCHMARK(BM_UringEngine4KFixed)->Arg(1)->Arg(64)->UseRealTime();

void BM_PosixEngine4K(benchmark::State& state) {
  Fixture fixture;
  AioOptions options;
  options.queue_depth = 64;
  auto engine = make_posix_engine(options);
  run_requests(state, *engine, fixture);
}
BENCHMARK(BM_PosixEngine4K)->Arg(1)->Arg(64)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
