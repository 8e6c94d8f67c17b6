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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// NOTE: [chunk loop]
// for_each_element(ptrs, n, load, store, op) calls op(r) once per element
// i < n, where r[d] is ptrs[d][i] in opmath (float for half/bf16), or 0 when
// bit d of `load` is clear; afterwards r[d] is written back to ptrs[d][i] for
// every bit d of `store`. The element order across threads is unspecified.
// * Vector path: when every list it touches (load | store) starts 16-byte
//   aligned, the first n - n % kVec elements move as 16-byte packs; the rest
//   (< kVec per chunk) go through the scalar loop. Chunk starts keep a
//   tensor's alignment (kChunkSize * sizeof(T) is a multiple of 16), so a
//   misaligned storage offset is the only thing that forces the scalar path.
// * Scalar path: strided, bounded by n, kIlp independent elements per thread
//   per trip so that loads of one trip overlap.
// * All threads of the block run both loops to completion (no early return),
//   so a caller may __syncthreads() afterwards.
template <int kLists, typename scalar_t, typename Op>
__device__ __forceinline__ void for_each_element(scalar_t* const (&ptrs)[kLists],
                                                 int64_t n, unsigned load,
                                                 unsigned store, Op& op) {
  using op_t = opmath_t<scalar_t>;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  using VecT = Pack<scalar_t, kVec>;

  bool aligned = true;
#pragma unroll
  for (int d = 0; d < kLists; ++d)
    if (((load | store) >> d) & 1u)
      aligned &= reinterpret_cast<uintptr_t>(ptrs[d]) % kVecBytes == 0;

  int64_t done = 0;
  if (aligned) {
    const int64_t packs = n / kVec;
    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
      VecT in[kLists];
#pragma unroll
      for (int d = 0; d < kLists; ++d)
        if ((load >> d) & 1u) in[d] = reinterpret_cast<const VecT*>(ptrs[d])[v];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        op_t r[kLists];
#pragma unroll
        for (int d = 0; d < kLists; ++d)
          r[d] = ((load >> d) & 1u) ? static_cast<op_t>(in[d].v[e]) : op_t(0);
        op(r);
#pragma unroll
        for (int d = 0; d < kLists; ++d)
          if ((store >> d) & 1u) in[d].v[e] = static_cast<scalar_t>(r[d]);
      }
#pragma unroll
      for (int d = 0; d < kLists; ++d)
        if ((store >> d) & 1u) reinterpret_cast<VecT*>(ptrs[d])[v] = in[d];
    }
    done = packs * kVec;
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
