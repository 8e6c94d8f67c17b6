// The host emulator itself (csrc/emulator): warp shuffles, barriers, atomics,
// the random block order and thread interleaving, and the aborts on a
// divergent barrier or a deadlock, each shown in a forked child. Built and
// run by tests/test_cuda_kernels_emulated.py.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <set>
#include <string>
#include <vector>

#include "../../csrc/cuda/kernel_launch.h"
#include "harness.h"

namespace {

using namespace emutest;
using fastaccum::cuda::launch_kernel;

static_assert(alignof(float4) == 16 && sizeof(float4) == 16);
static_assert(alignof(double2) == 16 && alignof(uint4) == 16 && alignof(float2) == 8);

// ---- kernels ------------------------------------------------------------------

__global__ void shuffle_kernel(int* out, int kind, int arg, int width) {
  const int lane = static_cast<int>(threadIdx.x % 32u);
  const int v = 1000 * static_cast<int>(threadIdx.x / 32u) + lane;
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

// Each thread writes its slot, waits, then reads its neighbour's: right only
// if the barrier really waits for every thread.
__global__ void neighbour_kernel(int* out) {
  __shared__ int slots[256];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x * 3u + blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1u) % blockDim.x];
  __syncthreads();  // before the next block's writes (same static slots here)
}

__global__ void order_kernel(std::vector<unsigned>* blocks, std::vector<unsigned>* threads) {
  if (threadIdx.x == 0) blocks->push_back(blockIdx.x);
  if (blockIdx.x == 0) threads->push_back(threadIdx.x);
}

__global__ void atomic_kernel(float* sum, unsigned* ticket, unsigned* got) {
  atomicAdd(sum, 0.5f);
  got[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(ticket, 1u);
}

__global__ void early_exit_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void two_barriers_kernel() {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    __syncthreads();
}

__global__ void mixed_wait_kernel(float* out) {
  if (threadIdx.x == 3) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
  }
}

__global__ void lane_exit_kernel(float* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.f, 1);
}

__global__ void full_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 2.f, 1);
}

__global__ void partial_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 2.f, 1);
}

// ---- helpers ------------------------------------------------------------------

// Runs fn in a child; the child must abort with `message` on stderr.
template <typename F>
void expect_abort(const std::string& name, const std::string& message, F&& fn) {
  int pipefd[2];
  if (pipe(pipefd) != 0) std::abort();
  const pid_t pid = fork();
  if (pid == 0) {
    close(pipefd[0]);
    dup2(pipefd[1], 2);
    fn();
    _exit(0);  // no abort: the parent reports it
  }
  close(pipefd[1]);
  std::string err;
  char buf[4096];
  ssize_t got;
  while ((got = read(pipefd[0], buf, sizeof buf)) > 0) err.append(buf, static_cast<size_t>(got));
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  check(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
        name + ": the emulator did not abort (status " + std::to_string(status) + ")");
  check(err.find(message) != std::string::npos,
        name + ": abort message lacks '" + message + "': " + err.substr(0, 300));
  check(err.find("seed") != std::string::npos, name + ": abort message lacks the seed");
}

int expected_lane(int kind, int lane, int arg, int width) {
  const int base = lane - lane % width;
  switch (kind) {
    case 0: return base + arg % width;
    case 1: return lane - base >= arg ? lane - arg : lane;
    case 2: return lane - base + arg < width ? lane + arg : lane;
    default: {
      const int src = lane ^ arg;
      return src < base + width ? src : lane;
    }
  }
}

void add_cases() {
  add_case("shuffles", [] {
    const char* names[] = {"shfl", "shfl_up", "shfl_down", "shfl_xor"};
    for (int kind = 0; kind < 4; ++kind)
      for (const int width : {32, 8})
        for (const int arg : {1, 3, 16}) {
          if (arg >= width) continue;
          std::vector<int> out(128, -1);
          launch_kernel(&shuffle_kernel, 1u, 128u, nullptr, out.data(), kind, arg, width);
          for (int t = 0; t < 128; ++t) {
            const int want = 1000 * (t / 32) + expected_lane(kind, t % 32, arg, width);
            check(out[t] == want, std::string(names[kind]) + " width " + std::to_string(width) +
                                      " arg " + std::to_string(arg) + " thread " + std::to_string(t) +
                                      ": got " + std::to_string(out[t]) + ", want " +
                                      std::to_string(want));
          }
        }
  });
  add_case("syncthreads_orders_shared_memory", [] {
    for (uint64_t seed = 1; seed <= 5; ++seed) {
      fastaccum::emu::set_seed(seed);
      std::vector<int> out(4 * 256, -1);
      launch_kernel(&neighbour_kernel, 4u, 256u, nullptr, out.data());
      for (unsigned b = 0; b < 4; ++b)
        for (unsigned t = 0; t < 256; ++t)
          check(out[b * 256 + t] == static_cast<int>(((t + 1) % 256) * 3 + b),
                "neighbour read, block " + std::to_string(b) + " thread " + std::to_string(t));
    }
  });
  add_case("random_block_and_thread_order", [] {
    auto run = [](uint64_t seed) {
      fastaccum::emu::set_seed(seed);
      std::vector<unsigned> blocks, threads;
      launch_kernel(&order_kernel, 64u, 64u, nullptr, &blocks, &threads);
      return std::make_pair(blocks, threads);
    };
    const auto a = run(7), b = run(7), c = run(8);
    check(a == b, "the same seed must give the same order");
    check(a.first != c.first, "another seed must give another block order");
    check(a.second != c.second, "another seed must give another thread order");
    auto sorted = a.first;
    std::sort(sorted.begin(), sorted.end());
    std::vector<unsigned> all(64);
    for (unsigned i = 0; i < 64; ++i) all[i] = i;
    check(sorted == all, "every block runs exactly once");
    auto ts = a.second;
    std::sort(ts.begin(), ts.end());
    check(ts == all, "every thread runs exactly once");
  });
  add_case("atomics", [] {
    float sum = 0.f;
    unsigned ticket = 0;
    std::vector<unsigned> got(3 * 96);
    launch_kernel(&atomic_kernel, 3u, 96u, nullptr, &sum, &ticket, got.data());
    check(sum == 144.f, "atomicAdd(float) total: " + std::to_string(sum));
    check(ticket == 288u, "atomicAdd(unsigned) total");
    std::set<unsigned> distinct(got.begin(), got.end());
    check(distinct.size() == got.size() && *distinct.rbegin() == 287u,
          "atomicAdd returns each old value once");
  });
  add_case("launch_counter_and_block_filter", [] {
    fastaccum::emu::reset_launch_count();
    std::vector<unsigned> blocks, threads;
    fastaccum::emu::set_block_filter([](size_t launch, unsigned block) { return launch == 1 || block % 2 == 0; });
    launch_kernel(&order_kernel, 10u, 32u, nullptr, &blocks, &threads);
    check(blocks.size() == 5, "filtered launch runs the chosen blocks");
    launch_kernel(&order_kernel, 10u, 32u, nullptr, &blocks, &threads);
    fastaccum::emu::set_block_filter(nullptr);
    check(blocks.size() == 15, "a launch the filter passes runs whole");
    check(fastaccum::emu::launch_count() == 2, "launch counter");
  });
  add_case("aborts", [] {
    float out[64];
    expect_abort("thread exits before __syncthreads", "divergent barrier",
                 [] { launch_kernel(&early_exit_kernel, 1u, 64u, nullptr); });
    expect_abort("two __syncthreads sites", "different __syncthreads",
                 [] { launch_kernel(&two_barriers_kernel, 1u, 64u, nullptr); });
    expect_abort("lane at __syncthreads, warp at a shuffle", "deadlock",
                 [&] { launch_kernel(&mixed_wait_kernel, 1u, 32u, nullptr, out); });
    expect_abort("lane exits before a shuffle", "divergent warp barrier",
                 [&] { launch_kernel(&lane_exit_kernel, 1u, 64u, nullptr, out); });
    expect_abort("partial mask", "full masks only",
                 [&] { launch_kernel(&partial_mask_kernel, 1u, 64u, nullptr, out); });
    expect_abort("partial warp", "partial warp",
                 [&] { launch_kernel(&full_warp_kernel, 1u, 40u, nullptr, out); });
  });
}

}  // namespace

int main(int argc, char** argv) {
  add_cases();
  return emutest::run_all(argc, argv);
}
