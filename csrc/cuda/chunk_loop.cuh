// Device-side memory access of one chunk (see multi_tensor_apply.cuh): loads
// a few parallel lists into registers in the math type, hands each element to
// the op, stores back the lists the op changes. The ops keep only the math.
// Device code for nvcc and for the host emulator alike (cuda_or_emulator.h).
#pragma once

#include <cstdint>

#include "cuda_or_emulator.h"
#include "opmath.h"

namespace fastaccum::cuda {

// 16 bytes: the widest global load/store a thread can issue in one instruction.
inline constexpr int kVecBytes = 16;
// Elements per thread per trip of the unaligned loop: independent loads in
// flight, as PyTorch's kILP.
inline constexpr int kIlp = 4;

// Packs per thread per trip of the vector loop, for kVec elements a pack.
// Every loaded list of every pack holds its registers for the whole trip,
// and the kernels have at most 40 (__launch_bounds__(512, 3) on sm_90).
// With the next power of two (powers, so that a whole chunk is whole trips)
// ptxas (CUDA 13) spills inside the kernels' loops: for three lists (24 data
// registers next to the update's constants), for two lists of 8-element
// half packs (their float conversions), for one list of 2-element packs (in
// the fp64 norm's scalar loop).
template <int kLists, int kVec>
inline constexpr int kPacksInFlight = kLists == 1   ? (kVec == 2 ? 2 : 4)
                                      : kLists == 2 ? (kVec <= 4 ? 2 : 1)
                                                    : 1;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The pack width, in bytes, of the vector loop for a chunk whose lists start
// at `ptrs`, counting the lists of `mask` (load | store): 16, 8, or 0 for the
// scalar loop alone (see NOTE: [chunk loop]).
template <int kLists, typename scalar_t>
__host__ __device__ __forceinline__ int vector_bytes(scalar_t* const (&ptrs)[kLists],
                                                     unsigned mask) {
  // The lowest set address bit of any touched list bounds their common alignment.
  uintptr_t bits = 0;
#pragma unroll
  for (int d = 0; d < kLists; ++d)
    if ((mask >> d) & 1u) bits |= reinterpret_cast<uintptr_t>(ptrs[d]);
  if (bits % kVecBytes == 0) return kVecBytes;
  if (sizeof(scalar_t) < 8 && bits % 8 == 0) return 8;
  return 0;
}

// Packs v, v + stride, ..., v + (kN - 1) * stride of every touched list:
// all loads first, then the op on each element, then all stores.
template <int kN, typename VecT, int kLists, typename scalar_t, typename Op>
__device__ __forceinline__ void move_packs(scalar_t* const (&ptrs)[kLists], int v,
                                           int stride, unsigned load, unsigned store,
                                           Op& op) {
  using op_t = opmath_t<scalar_t>;
  constexpr int kVec = sizeof(VecT) / sizeof(scalar_t);
  VecT in[kN][kLists];
  // Independent loads, so the thread has kN * (loaded lists) in flight.
#pragma unroll
  for (int k = 0; k < kN; ++k)
#pragma unroll
    for (int d = 0; d < kLists; ++d)
      if ((load >> d) & 1u) in[k][d] = reinterpret_cast<const VecT*>(ptrs[d])[v + k * stride];
#pragma unroll
  for (int k = 0; k < kN; ++k)
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      op_t r[kLists];
#pragma unroll
      for (int d = 0; d < kLists; ++d)
        r[d] = ((load >> d) & 1u) ? static_cast<op_t>(in[k][d].v[e]) : op_t(0);
      op(r);
#pragma unroll
      for (int d = 0; d < kLists; ++d)
        if ((store >> d) & 1u) in[k][d].v[e] = static_cast<scalar_t>(r[d]);
    }
#pragma unroll
  for (int k = 0; k < kN; ++k)
#pragma unroll
    for (int d = 0; d < kLists; ++d)
      if ((store >> d) & 1u) reinterpret_cast<VecT*>(ptrs[d])[v + k * stride] = in[k][d];
}

// The first n - n % kVec elements as kBytes-wide packs of kVec; returns how
// many elements that was. n < 2^31, so pack indices fit an int (64-bit ones
// cost the loop registers it needs for data).
template <int kBytes, int kPacksWanted, int kLists, typename scalar_t, typename Op>
__device__ __forceinline__ int64_t pack_loop(scalar_t* const (&ptrs)[kLists], int64_t n,
                                             unsigned load, unsigned store, Op& op) {
  constexpr int kVec = kBytes / static_cast<int>(sizeof(scalar_t));
  constexpr int kPacks = kPacksWanted > 0 ? kPacksWanted : kPacksInFlight<kLists, kVec>;
  using VecT = Pack<scalar_t, kVec>;
  static_assert(sizeof(VecT) == kBytes && alignof(VecT) == kBytes);
  const int packs = static_cast<int>(n / kVec);
  const int stride = static_cast<int>(blockDim.x);
  // Pack k of a trip is v + k * stride: each is one coalesced access of the
  // block, and thread t still takes packs t, t + stride, ... in this order
  // (tests/emulator/reference.h rebuilds it). Full trips need no bound
  // checks, which would cost registers; a last partial trip goes a pack at
  // a time.
  int v = static_cast<int>(threadIdx.x);
  if constexpr (kPacks > 1) {
    const int full = packs - packs % (stride * kPacks);
    for (; v < full; v += stride * kPacks)
      move_packs<kPacks, VecT>(ptrs, v, stride, load, store, op);
  }
  for (; v < packs; v += stride) move_packs<1, VecT>(ptrs, v, stride, load, store, op);
  return static_cast<int64_t>(packs) * kVec;
}

// NOTE: [chunk loop]
// for_each_element(ptrs, n, load, store, op) calls op(r) once per element
// i < n, where r[d] is ptrs[d][i] in opmath (float for half/bf16), or 0 when
// bit d of `load` is clear; afterwards r[d] is written back to ptrs[d][i] for
// every bit d of `store`. The element order across threads is unspecified.
// * Bytes in flight: HBM streams at its bandwidth only with bandwidth x
//   latency bytes outstanding, some 25 KB per SM on an H200 (4.8 TB/s,
//   ~0.7 us, 132 SMs). One 16-byte load per thread per trip gives at most
//   24 KB (3 blocks of 512 threads), and less on average, since a thread's
//   next load waits for its math and stores. So each trip of the vector
//   loop issues every load of several packs (kPacksInFlight, or the kPacks
//   template argument) before any math, then the math, then the stores.
//   How many is a register budget: 4 for one list (the check and norm
//   passes), 2 for two (the update without momentum), 1 for three (with
//   momentum); one step fewer for fp64 and 8-byte fp32 packs of one list
//   and for 16-byte half packs of two.
// * Pack width, per chunk (vector_bytes): 16-byte packs when every list it
//   touches (load | store) starts 16-byte aligned; else 8-byte packs when
//   they all start 8-byte aligned and the element is narrower than 8 bytes,
//   so that a half tensor whose storage offset is a multiple of 4 elements,
//   not 8, still moves in vectors rather than 2-byte scalars; else the
//   scalar loop alone. Chunk starts keep a tensor's alignment (kChunkSize *
//   sizeof(T) is a multiple of 16), so the storage offset alone decides.
//   The elements after the last whole pack (fewer than a pack) go through
//   the scalar loop, and so does all of an n >= 2^31 (no chunk is that big).
// * Scalar loop: strided, bounded by n, kIlp independent elements per thread
//   per trip so that loads of one trip overlap.
// * All threads of the block run every loop to completion (no early return),
//   so a caller may __syncthreads() afterwards.
template <int kLists, int kPacks = 0, typename scalar_t, typename Op>
__device__ __forceinline__ void for_each_element(scalar_t* const (&ptrs)[kLists],
                                                 int64_t n, unsigned load,
                                                 unsigned store, Op& op) {
  using op_t = opmath_t<scalar_t>;

  int64_t done = 0;
  const int bytes = n <= INT32_MAX ? vector_bytes(ptrs, load | store) : 0;
  if (bytes == kVecBytes) {
    done = pack_loop<kVecBytes, kPacks>(ptrs, n, load, store, op);
  } else if constexpr (sizeof(scalar_t) < 8) {
    if (bytes == 8) done = pack_loop<8, kPacks>(ptrs, n, load, store, op);
  }

  for (int64_t base = done; base < n;
       base += static_cast<int64_t>(blockDim.x) * kIlp) {
    op_t r[kIlp][kLists];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
#pragma unroll
      for (int d = 0; d < kLists; ++d)
        r[k][d] = (i < n && ((load >> d) & 1u)) ? static_cast<op_t>(ptrs[d][i])
                                                : op_t(0);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      if (i < n) {
        op(r[k]);
#pragma unroll
        for (int d = 0; d < kLists; ++d)
          if ((store >> d) & 1u) ptrs[d][i] = static_cast<scalar_t>(r[k][d]);
      }
    }
  }
}

}  // namespace fastaccum::cuda
