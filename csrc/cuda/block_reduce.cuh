// Block-wide reductions of the CUDA kernels (device code for nvcc and the
// host emulator alike, see cuda_or_emulator.h).
#pragma once

#include "../sgd_math.h"
#include "cuda_or_emulator.h"

namespace fastaccum::cuda {

struct Plus {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxNan {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return max_nan(a, b); }
};

// NOTE: [block sum]
// `combine` of `v` over the block, valid in thread 0; a one-dimensional block
// whose size is a multiple of 32. Every thread must call it, and at most once
// per block and combine: there is no barrier after the shared-memory read, so
// a second call could overwrite warp_sums before warp 0 has read them.
// The order is fixed (a shuffle tree per warp, then a tree over the warp
// results, T(0) for absent warps), so the result depends only on the
// per-thread values; the emulator test rebuilds that order exactly
// (tests/emulator/reference.h).
template <typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T v, Combine combine) {
  __shared__ T warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o));
  const unsigned lane = threadIdx.x % 32u;
  const unsigned warp = threadIdx.x / 32u;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = (blockDim.x + 31u) / 32u;
    v = lane < warps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o));
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  return block_reduce(v, Plus{});
}

// Max of `v` over the block, NaN if any is NaN (max_nan).
template <typename T>
__device__ __forceinline__ T block_max(T v) {
  return block_reduce(v, MaxNan{});
}

}  // namespace fastaccum::cuda
