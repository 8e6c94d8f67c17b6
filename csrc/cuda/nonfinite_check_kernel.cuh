// The gradient check on the GPU: its functor and launch. Device code for nvcc
// and the host emulator alike (cuda_or_emulator.h); the torch side is
// nonfinite_check_cuda.cu. The CPU twin is csrc/cpu/nonfinite_check_cpu.cpp;
// the test of this file on the CPU is
// tests/emulator/test_nonfinite_check_kernel.cpp.
//
// List order (depth 1): grads, written only by the unscale variant.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../sgd_math.h"
#include "block_reduce.cuh"
#include "chunk_loop.cuh"
#include "cuda_or_emulator.h"
#include "multi_tensor_apply.cuh"
#include "opmath.h"

namespace fastaccum::cuda {

// Outputs and the unscale multiplier of one check call.
// found_inf <- 1 when some (unscaled) element is inf/NaN; sumsq += sum(x^2).
// With `write`, x = g * mul is also stored back; mul is
// float(1/double(*grad_scale)) * factor when grad_scale is set, else `factor`
// (the host already folded a CPU scale into it).
struct CheckArgs {
  float* found_inf = nullptr;
  float* sumsq = nullptr;  // nullptr: no sum of squares
  const float* grad_scale = nullptr;
  double factor = 1.0;
};

template <typename scalar_t, bool kWrite>
struct CheckFunctor {
  CheckArgs a;

  __device__ __forceinline__ void operator()(const Chunk<1>& c) const {
    using op_t = opmath_t<scalar_t>;
    op_t mul = op_t(1);
    if constexpr (kWrite) {
      double m = a.factor;
      if (a.grad_scale != nullptr)
        m = inv_scale(*a.grad_scale) * a.factor;
      mul = static_cast<op_t>(m);
    }
    const bool want_sumsq = a.sumsq != nullptr;
    const int64_t n = c.n;
    scalar_t* const ptrs[1] = {static_cast<scalar_t*>(c.addresses[0]) + c.start};
    op_t probe = op_t(0);
    op_t sq = op_t(0);
    auto op = [&](op_t (&r)[1]) {
      if constexpr (kWrite) r[0] = r[0] * mul;
      probe = probe + nonfinite_probe(r[0]);
      if (want_sumsq) sq = sq + r[0] * r[0];
    };
    for_each_element<1>(ptrs, n, 1u, kWrite ? 1u : 0u, op);
    // Racing writes of the same 1.0 are harmless (NOTE: [op contract]).
    if (is_nan(probe)) *a.found_inf = 1.f;
    if (want_sumsq) {
      const op_t total = block_sum(sq);
      if (threadIdx.x == 0) atomicAdd(a.sumsq, static_cast<float>(total));
    }
  }
};

// One pass over `count` gradients at `grads` (numels in `numels`), forward
// order, on `stream`: one launch in table mode (NOTE: [launch modes]).
// `write` selects the unscale variant.
template <typename scalar_t>
void nonfinite_check_launch(size_t count, void* const* grads,
                            const int64_t* numels, const CheckArgs& a,
                            bool write, const LaunchMode& mode,
                            cudaStream_t stream) {
  TensorLists<1> lists;
  lists.count = count;
  lists.addresses[0] = grads;
  lists.numels = numels;
  if (write) {
    multi_tensor_apply_in<1, false>(mode, kCheckTable, lists, stream,
                                    CheckFunctor<scalar_t, true>{a});
  } else {  // grad_scale and factor are unused: nothing is unscaled
    multi_tensor_apply_in<1, false>(mode, kCheckTable, lists, stream,
                                    CheckFunctor<scalar_t, false>{a});
  }
}

}  // namespace fastaccum::cuda
