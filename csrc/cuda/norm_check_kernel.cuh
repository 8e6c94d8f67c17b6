// The norm pass of a fused clip_grad_norm_ on the GPU (NOTE: [norm check] in
// csrc/ops.cpp): its functor, the one-block finishing kernel and the launch
// sequence. Device code for nvcc and the host emulator alike
// (cuda_or_emulator.h); the torch side is norm_check_cuda.cu, the CPU twin
// csrc/cpu/norm_check_cpu.cpp, the test on the CPU
// tests/emulator/test_norm_check_kernel.cpp.
//
// NOTE: [deterministic norm]
// No float atomics: block b of the call (numbered across its launches by
// meta.block_base) reduces its chunk in a fixed tree (block_sum/block_max)
// and writes partials[b]; after the last launch, one block of the finishing
// kernel reads the partials in a fixed order (thread t takes t, t + 512, ...)
// and reduces them in the same fixed tree. The result depends only on the
// data and the launch plan, never on block scheduling.
//
// List order (depth 1): grads, read only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../sgd_math.h"
#include "block_reduce.cuh"
#include "chunk_loop.cuh"
#include "cuda_or_emulator.h"
#include "kernel_launch.h"
#include "multi_tensor_apply.cuh"
#include "opmath.h"

namespace fastaccum::cuda {

struct NormArgs {
  float* found_inf = nullptr;       // set to 1 when some x is inf/NaN
  double* partials = nullptr;       // one per block of the call
  const float* grad_scale = nullptr;  // device loss scale, or nullptr
  double factor = 1.0;  // 1/K, times the reciprocal of a host-side scale
  bool inf_norm = false;            // max |x| instead of sum x^2
};

template <typename scalar_t>
struct NormFunctor {
  NormArgs a;

  template <typename Meta>
  __device__ __forceinline__ void operator()(const Meta& meta, int slot,
                                             int64_t start, int64_t n) const {
    using op_t = opmath_t<scalar_t>;
    double m = a.factor;
    if (a.grad_scale != nullptr) m = inv_scale(*a.grad_scale) * a.factor;
    const bool scale = m != 1.0;
    const op_t mul = static_cast<op_t>(m);
    scalar_t* const ptrs[1] = {static_cast<scalar_t*>(meta.addresses[0][slot]) +
                               start};
    op_t probe = op_t(0);
    op_t acc = op_t(0);
    const bool inf_norm = a.inf_norm;
    auto op = [&](op_t (&r)[1]) {
      op_t x = r[0];
      // Rounded to the storage type: the value .grad holds after an unscale.
      if (scale) x = static_cast<op_t>(static_cast<scalar_t>(x * mul));
      probe = probe + nonfinite_probe(x);
      if (inf_norm) {
        acc = max_nan(acc, x < op_t(0) ? op_t(0) - x : x);
      } else {
        acc = acc + x * x;
      }
    };
    for_each_element<1>(ptrs, n, 1u, 0u, op);
    // Racing writes of the same 1.0 are harmless (NOTE: [op contract]).
    if (is_nan(probe)) *a.found_inf = 1.f;
    const op_t total = inf_norm ? block_max(acc) : block_sum(acc);
    if (threadIdx.x == 0)
      a.partials[meta.block_base + blockIdx.x] = static_cast<double>(total);
  }
};

// One block: out[0] <- the reduction of partials[0, count) (0 when count is
// 0), as float or double.
template <typename out_t>
__global__ void __launch_bounds__(kBlockSize)
    norm_finish_kernel(const double* partials, int64_t count, out_t* out,
                       bool inf_norm) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
    acc = inf_norm ? max_nan(acc, partials[i]) : acc + partials[i];
  const double total = inf_norm ? block_max(acc) : block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<out_t>(total);
}

// Blocks of the norm pass over tensors of these sizes: the size of the
// partials workspace.
inline int64_t norm_partials_count(const int64_t* numels, size_t count) {
  int64_t blocks = 0;
  for (size_t t = 0; t < count; ++t)
    blocks += (numels[t] + plan::kChunkSize - 1) / plan::kChunkSize;
  return blocks;
}

// The whole pass on `stream`: the chunk launches, then the finishing block.
// `partials` holds norm_partials_count(numels, count) doubles; `out` is a
// float (or double, out_t) on the device.
template <typename scalar_t, typename out_t>
void norm_check_launch(size_t count, void* const* grads, const int64_t* numels,
                       const NormArgs& a, out_t* out, cudaStream_t stream) {
  TensorLists<1> lists;
  lists.count = count;
  lists.addresses[0] = grads;
  lists.numels = numels;
  multi_tensor_apply<1, false>(lists, /*reverse=*/false, stream,
                               NormFunctor<scalar_t>{a});
  launch_kernel(&norm_finish_kernel<out_t>, 1u, static_cast<unsigned>(kBlockSize),
                stream, static_cast<const double*>(a.partials),
                norm_partials_count(numels, count), out, a.inf_norm);
}

}  // namespace fastaccum::cuda
