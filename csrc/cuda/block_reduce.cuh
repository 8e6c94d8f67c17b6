// Block-wide reductions of the CUDA kernels (device code for nvcc and the
// host emulator alike, see cuda_or_emulator.h).
#pragma once

#include "cuda_or_emulator.h"

namespace fastaccum::cuda {

// NOTE: [block sum]
// Sum of `v` over the block, valid in thread 0; a one-dimensional block whose
// size is a multiple of 32. Every thread must call it, and at most once per
// block: there is no barrier after the shared-memory read, so a second call
// could overwrite warp_sums before warp 0 has read them.
// The order of additions is fixed (a shuffle tree per warp, then a tree over
// the warp sums), so the result depends only on the per-thread values; the
// emulator test rebuilds that order exactly (tests/emulator/reference.h).
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const unsigned lane = threadIdx.x % 32u;
  const unsigned warp = threadIdx.x / 32u;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = (blockDim.x + 31u) / 32u;
    v = lane < warps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// NaN-propagating max: a NaN anywhere gives NaN, as torch's max norm.
template <typename T>
__device__ __forceinline__ T max_nan(T m, T x) {
  return (x > m || x != x) ? x : m;
}

// Max of `v` over the block (NaN if any is NaN), valid in thread 0; the same
// shape and rules as block_sum (NOTE: [block sum]), with max_nan for +.
template <typename T>
__device__ __forceinline__ T block_max(T v) {
  __shared__ T warp_maxes[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_down_sync(0xffffffffu, v, o));
  const unsigned lane = threadIdx.x % 32u;
  const unsigned warp = threadIdx.x / 32u;
  if (lane == 0) warp_maxes[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned warps = (blockDim.x + 31u) / 32u;
    v = lane < warps ? warp_maxes[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_down_sync(0xffffffffu, v, o));
  }
  return v;
}

}  // namespace fastaccum::cuda
