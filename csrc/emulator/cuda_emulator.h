// A host emulator of the parts of CUDA that the fastaccum kernels use, so
// their own code (csrc/cuda/*.cuh: functors, metadata fill, chunk loop, block
// reductions, launcher) runs on every CI machine, none of which has a GPU.
// Only for host compilers; the test programs in tests/emulator include the
// kernel headers with this in place of cuda_runtime.h (see
// csrc/cuda/cuda_or_emulator.h).
//
// NOTE: [emulator model]
// * A launch runs its blocks one after another, in a random (seeded) order,
//   synchronously: launches on one stream stay ordered, as on a GPU.
// * Every thread of a block is a cooperative fiber (ucontext). A fiber runs
//   until it reaches a barrier (__syncthreads, a warp shuffle, __syncwarp) or
//   a preemption point (every atomic), then the scheduler resumes a random
//   runnable fiber. So the threads of a block interleave in a random order at
//   every point where the kernel's correctness may depend on it.
// * __syncthreads waits for every thread of the block; warp operations for
//   the 32 lanes of the warp (full masks only, which is all the kernels use).
//   The emulator aborts, with the seed and the barrier's source line, when
//   threads wait at different barriers, when a thread exits while others
//   wait at a barrier (or reaches one after another exited), and when no
//   thread can run (deadlock).
// * Kernel arguments are copied at launch, as the driver does; a parameter
//   declared FASTACCUM_GRID_PARAM is then passed to every thread by reference
//   to that one copy (__grid_constant__ on the GPU).
// * __shared__ is `static`: one copy per kernel instantiation, left stale
//   from the block before, as uninitialised shared memory is on a GPU.
// * What it does not model: memory ordering between threads (every access is
//   sequentially consistent here), concurrent blocks (blocks are sequential,
//   so a cross-block race shows up only through the random block order),
//   timing, and device rounding (FMA contraction by nvcc).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulator.h is for host compilers; nvcc has the real CUDA"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// The running fiber's coordinates: the scheduler sets them before it resumes
// a fiber, so kernel code reads them as it would the CUDA built-ins.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
inline constexpr int warpSize = 32;

// 16- and 8-byte vector types with CUDA's alignment.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Read-only cache load, and a load that skips L1 (for data other blocks
// wrote during the launch): plain loads here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

namespace fastaccum::emu {

// ---- test controls --------------------------------------------------------

// Seeds the block order and the thread interleaving (default 1).
void set_seed(uint64_t seed);
uint64_t seed();
// Launches run since the start (or the last reset_launch_count).
size_t launch_count();
void reset_launch_count();
// Runs block `block` of launch `launch` only when the filter says so (all
// blocks when it is empty). For tests that map a huge tensor sparsely and run
// only the blocks of its last chunks.
using BlockFilter = std::function<bool(size_t launch, unsigned block)>;
void set_block_filter(BlockFilter filter);

// Every float/double atomicAdd, in execution order, while logging is on.
struct AtomicAdd {
  const void* address;
  double value;  // the operand, widened exactly
};
void set_atomic_logging(bool on);
const std::vector<AtomicAdd>& atomic_log();
void clear_atomic_log();

// ---- execution ------------------------------------------------------------

// Runs body() once per thread of every block of the grid (see NOTE:
// [emulator model]).
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// kernel<<<grid, block, 0, stream>>>(args...): the arguments are converted to
// the kernel's parameter types and copied once, at launch.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, cudaStream_t /*stream*/,
            void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<Params>...> copied(std::forward<Args>(args)...);
  run_grid(grid, block, [&] { std::apply(kernel, copied); });
}

// ---- what the CUDA built-ins call -----------------------------------------

void sync_block(const std::source_location& site);
void sync_warp(unsigned mask, const std::source_location& site);
// A full-mask warp exchange: lane L deposits `bits` and receives the deposit
// of lane src_lane(L), computed by the caller's operation.
enum class Shuffle { kIdx, kUp, kDown, kXor };
uint64_t shuffle(Shuffle kind, unsigned mask, uint64_t bits, int arg, int width,
                 const std::source_location& site);
// A point where another thread of the block may run first (random, seeded).
void preempt();
void log_atomic_add(const void* address, double value);

template <typename T>
T shuffle_value(Shuffle kind, unsigned mask, T v, int arg, int width,
                const std::source_location& site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle(kind, mask, bits, arg, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace fastaccum::emu

inline void __syncthreads(
    const std::source_location site = std::source_location::current()) {
  fastaccum::emu::sync_block(site);
}
inline void __syncwarp(
    unsigned mask = 0xffffffffu,
    const std::source_location site = std::source_location::current()) {
  fastaccum::emu::sync_warp(mask, site);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize,
              const std::source_location site = std::source_location::current()) {
  return fastaccum::emu::shuffle_value(fastaccum::emu::Shuffle::kIdx, mask, v,
                                       src_lane, width, site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                 const std::source_location site = std::source_location::current()) {
  return fastaccum::emu::shuffle_value(fastaccum::emu::Shuffle::kUp, mask, v,
                                       static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                   const std::source_location site = std::source_location::current()) {
  return fastaccum::emu::shuffle_value(fastaccum::emu::Shuffle::kDown, mask, v,
                                       static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize,
                  const std::source_location site = std::source_location::current()) {
  return fastaccum::emu::shuffle_value(fastaccum::emu::Shuffle::kXor, mask, v,
                                       lane_mask, width, site);
}

// A fence orders nothing here (every access is sequentially consistent); it
// is a preemption point, so the threads around it interleave either way.
inline void __threadfence() { fastaccum::emu::preempt(); }

// Atomics: one fiber runs at a time, so a read-modify-write is atomic; each
// is also a preemption point, so the order of atomics across threads varies
// with the seed. They return the old value, as CUDA's do.
template <typename T>
T atomic_rmw_(T* address, T value, T (*op)(T, T)) {
  fastaccum::emu::preempt();
  const T old = *address;
  *address = op(old, value);
  return old;
}
inline float atomicAdd(float* a, float v) {
  fastaccum::emu::log_atomic_add(a, v);
  return atomic_rmw_<float>(a, v, [](float x, float y) { return x + y; });
}
inline double atomicAdd(double* a, double v) {
  fastaccum::emu::log_atomic_add(a, v);
  return atomic_rmw_<double>(a, v, [](double x, double y) { return x + y; });
}
inline int atomicAdd(int* a, int v) {
  return atomic_rmw_<int>(a, v, [](int x, int y) { return x + y; });
}
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  return atomic_rmw_<unsigned>(a, v, [](unsigned x, unsigned y) { return x + y; });
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return atomic_rmw_<unsigned long long>(
      a, v, [](unsigned long long x, unsigned long long y) { return x + y; });
}
inline int atomicMax(int* a, int v) {
  return atomic_rmw_<int>(a, v, [](int x, int y) { return x > y ? x : y; });
}
inline unsigned atomicMax(unsigned* a, unsigned v) {
  return atomic_rmw_<unsigned>(a, v, [](unsigned x, unsigned y) { return x > y ? x : y; });
}
inline float atomicExch(float* a, float v) {
  return atomic_rmw_<float>(a, v, [](float, float y) { return y; });
}
inline unsigned atomicExch(unsigned* a, unsigned v) {
  return atomic_rmw_<unsigned>(a, v, [](unsigned, unsigned y) { return y; });
}
// atomicCAS for the types CUDA has it for.
template <typename T, typename = std::enable_if_t<std::is_same_v<T, int> ||
                                                  std::is_same_v<T, unsigned> ||
                                                  std::is_same_v<T, unsigned long long>>>
T atomicCAS(T* a, T compare, T v) {
  fastaccum::emu::preempt();
  const T old = *a;
  if (old == compare) *a = v;
  return old;
}
