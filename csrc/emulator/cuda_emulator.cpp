// The scheduler of the CUDA host emulator (see NOTE: [emulator model] in
// cuda_emulator.h): one fiber per thread of the running block, switched with
// ucontext, a seeded random choice of the next fiber at every barrier and
// preemption point, and the checks that turn a divergent barrier or a
// deadlock into an abort with the seed that reproduces it.
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTACCUM_EMU_ASAN 1
#else
#define FASTACCUM_EMU_ASAN 0
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

namespace fastaccum::emu {
namespace {

// Room for a kernel frame and its by-value parameters (a metadata table is
// a reference to the launch's one copy, FASTACCUM_GRID_PARAM) plus
// sanitizer redzones; a guard page below turns an overflow into a fault.
// Small on purpose: ASan clears a stack's shadow on every switch to it.
constexpr size_t kStackBytes = 64 * 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes above a guard page
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  State state = State::kRunnable;
  void* fake_stack = nullptr;  // ASan's per-fiber fake stack
};

struct Site {
  const char* file = "";
  unsigned line = 0;
  unsigned column = 0;
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column &&
           (file == o.file || std::strcmp(file, o.file) == 0);
  }
  static Site of(const std::source_location& s) {
    return {s.file_name(), static_cast<unsigned>(s.line()),
            static_cast<unsigned>(s.column())};
  }
  std::string str() const {
    return std::string(file) + ":" + std::to_string(line);
  }
};

struct WarpBarrier {
  unsigned arrived = 0;
  unsigned exited = 0;  // lanes that finished the kernel
  Site site;
  Shuffle kind = Shuffle::kIdx;
  bool is_sync = false;  // __syncwarp rather than a shuffle
  uint64_t deposit[32] = {};
  int source[32] = {};
  uint64_t result[32] = {};
};

struct Emulator {
  uint64_t seed = 1;
  std::mt19937_64 rng{1};
  size_t launches = 0;
  BlockFilter filter;
  bool log_atomics = false;
  std::vector<AtomicAdd> atomics;

  // The running block.
  std::vector<Fiber> fibers;
  std::vector<unsigned> runnable;  // fiber indices
  std::vector<WarpBarrier> warps;
  unsigned block_arrived = 0;
  Site block_site;
  unsigned done = 0;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
};

Emulator& emu() {
  static Emulator e;
  return e;
}

[[noreturn]] void fail(const std::string& what) {
  const Emulator& e = emu();
  std::fprintf(stderr,
               "CUDA emulator: %s\n  (block (%u,%u,%u), thread (%u,%u,%u), "
               "launch %zu, seed %llu)\n",
               what.c_str(), blockIdx.x, blockIdx.y, blockIdx.z,
               e.current ? e.current->tid.x : 0u, e.current ? e.current->tid.y : 0u,
               e.current ? e.current->tid.z : 0u, e.launches,
               static_cast<unsigned long long>(e.seed));
  std::fflush(stderr);
  std::abort();
}

unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// ---- context switches (ASan must be told about every stack change) --------

void to_scheduler(bool fiber_done) {
  Emulator& e = emu();
  Fiber* f = e.current;
#if FASTACCUM_EMU_ASAN
  __sanitizer_start_switch_fiber(fiber_done ? nullptr : &f->fake_stack,
                                 e.scheduler_stack_bottom,
                                 e.scheduler_stack_size);
#endif
  if (fiber_done) {
    setcontext(&e.scheduler);
    fail("setcontext returned");
  }
  swapcontext(&f->context, &e.scheduler);
#if FASTACCUM_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &e.scheduler_stack_bottom,
                                  &e.scheduler_stack_size);
#endif
}

void resume(Fiber& f) {
  Emulator& e = emu();
  e.current = &f;
  threadIdx = f.tid;
#if FASTACCUM_EMU_ASAN
  __sanitizer_start_switch_fiber(&e.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&e.scheduler, &f.context);
#if FASTACCUM_EMU_ASAN
  __sanitizer_finish_switch_fiber(e.scheduler_fake_stack, nullptr, nullptr);
#endif
  e.current = nullptr;
}

void finish_thread();

void fiber_entry() {
  Emulator& e = emu();
#if FASTACCUM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_stack_bottom,
                                  &e.scheduler_stack_size);
#endif
  (*e.body)();
  finish_thread();
}

// ---- barriers --------------------------------------------------------------

void wait_here(State s) {
  emu().current->state = s;
  to_scheduler(false);
}

void make_runnable(Fiber& f) {
  f.state = State::kRunnable;
  emu().runnable.push_back(f.linear);
}

unsigned lanes_in_warp(unsigned warp) {
  const unsigned n = block_threads();
  return std::min(32u, n - warp * 32u);
}

void finish_thread() {
  Emulator& e = emu();
  Fiber& f = *e.current;
  if (e.block_arrived > 0)
    fail("thread exited while " + std::to_string(e.block_arrived) +
         " thread(s) wait at __syncthreads (" + e.block_site.str() +
         "): divergent barrier");
  WarpBarrier& w = e.warps[f.linear / 32u];
  ++w.exited;
  if (w.arrived > 0)
    fail("thread exited while " + std::to_string(w.arrived) +
         " lane(s) of its warp wait at a warp operation (" + w.site.str() +
         "): divergent warp barrier");
  f.state = State::kDone;
  ++e.done;
  to_scheduler(true);
}

void check_full_mask(unsigned mask, const Site& site) {
  if (mask != 0xffffffffu)
    fail("warp operation with mask " + std::to_string(mask) + " at " +
         site.str() + ": the emulator supports full masks only");
  const unsigned warp = emu().current->linear / 32u;
  if (lanes_in_warp(warp) != 32u)
    fail("full-mask warp operation at " + site.str() +
         " in a partial warp (block of " + std::to_string(block_threads()) +
         " threads)");
}

int source_lane(Shuffle kind, int lane, int arg, int width) {
  const int base = lane - lane % width;
  switch (kind) {
    case Shuffle::kIdx:
      return base + ((arg % width) + width) % width;
    case Shuffle::kUp:
      return lane % width >= arg ? lane - arg : lane;
    case Shuffle::kDown:
      return lane % width + arg < width ? lane + arg : lane;
    case Shuffle::kXor: {
      const int src = lane ^ arg;
      return src < base + width ? src : lane;
    }
  }
  return lane;
}

// Arrival of the current lane at a warp operation; returns its result.
uint64_t warp_arrive(bool is_sync, Shuffle kind, uint64_t bits, int arg,
                     int width, const Site& site) {
  Emulator& e = emu();
  Fiber& f = *e.current;
  const unsigned warp = f.linear / 32u;
  const unsigned lane = f.linear % 32u;
  WarpBarrier& w = e.warps[warp];
  if (w.exited > 0)
    fail("warp operation at " + site.str() +
         " after a lane of the warp exited: divergent warp barrier");
  if (w.arrived == 0) {
    w.site = site;
    w.kind = kind;
    w.is_sync = is_sync;
  } else if (!(w.site == site) || w.kind != kind || w.is_sync != is_sync) {
    fail("lanes of one warp at different warp operations: " + w.site.str() +
         " and " + site.str());
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("shuffle width " + std::to_string(width) + " at " + site.str() +
         " is not a power of two in [1, 32]");
  w.deposit[lane] = bits;
  w.source[lane] = source_lane(kind, static_cast<int>(lane), arg, width);
  if (w.source[lane] < 0 || w.source[lane] > 31)
    fail("shuffle source lane out of range at " + site.str());
  if (++w.arrived == 32u) {
    for (unsigned l = 0; l < 32u; ++l) w.result[l] = w.deposit[w.source[l]];
    w.arrived = 0;
    for (unsigned l = 0; l < 32u; ++l) {
      Fiber& other = e.fibers[warp * 32u + l];
      if (&other != &f) make_runnable(other);
    }
    make_runnable(f);
    to_scheduler(false);  // the last lane does not run on by right
  } else {
    wait_here(State::kAtWarpBarrier);
  }
  return w.result[lane];
}

void schedule_block() {
  Emulator& e = emu();
  const unsigned n = block_threads();
  while (e.done < n) {
    if (e.runnable.empty()) {
      std::string where;
      unsigned at_block = 0, at_warp = 0;
      for (const Fiber& f : e.fibers) {
        at_block += f.state == State::kAtBlockBarrier;
        at_warp += f.state == State::kAtWarpBarrier;
      }
      where = std::to_string(at_block) + " thread(s) at __syncthreads (" +
              (at_block ? e.block_site.str() : std::string("-")) + "), " +
              std::to_string(at_warp) + " at warp operations";
      e.current = nullptr;
      fail("deadlock: no thread can run; " + where);
    }
    std::uniform_int_distribution<size_t> pick(0, e.runnable.size() - 1);
    const size_t i = pick(e.rng);
    const unsigned next = e.runnable[i];
    e.runnable[i] = e.runnable.back();
    e.runnable.pop_back();
    resume(e.fibers[next]);
  }
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map a fiber stack");
  // Stacks grow down: a guard page below turns an overflow into a fault.
  if (mprotect(p, page, PROT_NONE) != 0) fail("cannot protect a stack guard");
  return static_cast<char*>(p) + page;
}

// getcontext returns twice in general; kept out of run_block so that no
// local of the caller can be clobbered (-Wclobbered).
[[gnu::noinline]] void start_context(Fiber& f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_entry, 0);
}

void run_block(uint3 block, const std::function<void()>& body) {
  Emulator& e = emu();
  blockIdx = block;
  const unsigned n = block_threads();
  while (e.fibers.size() < n) {
    e.fibers.emplace_back();
    e.fibers.back().stack = new_stack();
  }
  e.warps.assign((n + 31u) / 32u, WarpBarrier{});
  e.runnable.clear();
  e.block_arrived = 0;
  e.done = 0;
  e.body = &body;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = {i % blockDim.x, (i / blockDim.x) % blockDim.y,
             i / (blockDim.x * blockDim.y)};
    f.state = State::kRunnable;
    f.fake_stack = nullptr;
    start_context(f);
    e.runnable.push_back(i);
  }
  schedule_block();
  e.body = nullptr;
}

}  // namespace

void set_seed(uint64_t s) {
  emu().seed = s;
  emu().rng.seed(s);
}
uint64_t seed() { return emu().seed; }
size_t launch_count() { return emu().launches; }
void reset_launch_count() { emu().launches = 0; }
void set_block_filter(BlockFilter filter) { emu().filter = std::move(filter); }
void set_atomic_logging(bool on) { emu().log_atomics = on; }
const std::vector<AtomicAdd>& atomic_log() { return emu().atomics; }
void clear_atomic_log() { emu().atomics.clear(); }

void log_atomic_add(const void* address, double value) {
  if (emu().log_atomics) emu().atomics.push_back({address, value});
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Emulator& e = emu();
  if (e.current != nullptr) fail("kernel launched from inside a kernel");
  if (block.x * block.y * block.z == 0 || grid.x * grid.y * grid.z == 0)
    fail("launch with an empty grid or block (cudaErrorInvalidConfiguration)");
  if (block.x * block.y * block.z > 1024)
    fail("launch with more than 1024 threads per block");
  const size_t launch = e.launches++;
  gridDim = grid;
  blockDim = block;
  std::vector<unsigned> order(static_cast<size_t>(grid.x) * grid.y * grid.z);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), e.rng);
  for (const unsigned b : order) {
    if (e.filter && !e.filter(launch, b)) continue;
    run_block({b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)}, body);
  }
}

void sync_block(const std::source_location& where) {
  Emulator& e = emu();
  if (e.current == nullptr) fail("__syncthreads outside a kernel");
  const Site site = Site::of(where);
  if (e.done > 0)
    fail("__syncthreads (" + site.str() + ") reached after " +
         std::to_string(e.done) + " thread(s) of the block exited: divergent barrier");
  if (e.block_arrived == 0) {
    e.block_site = site;
  } else if (!(e.block_site == site)) {
    fail("threads of one block at different __syncthreads: " +
         e.block_site.str() + " and " + site.str());
  }
  if (++e.block_arrived == block_threads()) {
    e.block_arrived = 0;
    for (Fiber& f : e.fibers)
      if (f.state == State::kAtBlockBarrier) make_runnable(f);
    make_runnable(*e.current);
    to_scheduler(false);
  } else {
    wait_here(State::kAtBlockBarrier);
  }
}

void sync_warp(unsigned mask, const std::source_location& where) {
  if (emu().current == nullptr) fail("__syncwarp outside a kernel");
  const Site site = Site::of(where);
  check_full_mask(mask, site);
  warp_arrive(true, Shuffle::kIdx, 0, 0, 32, site);
}

uint64_t shuffle(Shuffle kind, unsigned mask, uint64_t bits, int arg, int width,
                 const std::source_location& where) {
  if (emu().current == nullptr) fail("warp shuffle outside a kernel");
  const Site site = Site::of(where);
  check_full_mask(mask, site);
  return warp_arrive(false, kind, bits, arg, width, site);
}

void preempt() {
  Emulator& e = emu();
  if (e.current == nullptr) return;  // host code
  if (std::bernoulli_distribution(0.5)(e.rng)) {
    make_runnable(*e.current);
    to_scheduler(false);
  }
}

}  // namespace fastaccum::emu
