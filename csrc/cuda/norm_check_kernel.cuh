// The norm pass of a fused clip_grad_norm_ on the GPU (NOTE: [norm check] in
// csrc/ops.cpp): its functor, the one-block finishing kernel and the launch
// sequence. Device code for nvcc and the host emulator alike
// (cuda_or_emulator.h); the torch side is norm_check_cuda.cu, the CPU twin
// csrc/cpu/norm_check_cpu.cpp, the test on the CPU
// tests/emulator/test_norm_check_kernel.cpp.
//
// NOTE: [deterministic norm]
// No float atomics: block b of the call (Chunk::block, numbered across the
// launches of a by-value call) reduces its chunk in a fixed tree
// (block_sum/block_max) and writes partials[b]; then one block reads the
// partials in a fixed order (thread t takes t, t + 512, ...) and reduces
// them in the same fixed tree (reduce_partials). That block is, in table
// mode, the last block of the launch to finish (a ticket in the table's
// header: one launch in all), in by-value mode the finishing kernel after
// the last launch. The result depends only on the data and the chunking,
// never on block scheduling, and is the same in both modes.
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
  // Table mode: the call's ticket (0 between calls) and where the last block
  // writes the norm (an out_t); nullptr in by-value mode.
  unsigned* done = nullptr;
  void* out = nullptr;
};

// The reduction of partials[0, count), valid in thread 0; every thread of
// the block calls it (block_reduce). __ldcg: other blocks of the same launch
// wrote them, so they must not come from this SM's L1.
__device__ __forceinline__ double reduce_partials(const double* partials,
                                                  int64_t count, bool inf_norm) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double p = __ldcg(partials + i);
    acc = inf_norm ? max_nan(acc, p) : acc + p;
  }
  return inf_norm ? block_max(acc) : block_sum(acc);
}

template <typename scalar_t, typename out_t>
struct NormFunctor {
  NormArgs a;

  __device__ __forceinline__ void operator()(const Chunk<1>& c) const {
    using op_t = opmath_t<scalar_t>;
    double m = a.factor;
    if (a.grad_scale != nullptr) m = inv_scale(*a.grad_scale) * a.factor;
    const bool scale = m != 1.0;
    const op_t mul = static_cast<op_t>(m);
    const int64_t n = c.n;
    scalar_t* const ptrs[1] = {static_cast<scalar_t*>(c.addresses[0]) + c.start};
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
    if (threadIdx.x == 0) a.partials[c.block] = static_cast<double>(total);
    if (a.done == nullptr) return;  // by value: norm_finish_kernel finishes

    __shared__ unsigned last;
    if (threadIdx.x == 0) {
      __threadfence();  // this block's partial is visible before its ticket
      last = atomicAdd(a.done, 1u) == gridDim.x - 1u ? 1u : 0u;
    }
    // Also the barrier between this block's two block reductions.
    __syncthreads();
    if (last == 0u) return;
    const double norm = reduce_partials(a.partials, gridDim.x, inf_norm);
    if (threadIdx.x == 0) {
      *static_cast<out_t*>(a.out) = static_cast<out_t>(norm);
      *a.done = 0u;  // ready for the next call
    }
  }
};

// One block: out[0] <- the reduction of partials[0, count) (0 when count is
// 0), as float or double.
template <typename out_t>
__global__ void __launch_bounds__(kBlockSize)
    norm_finish_kernel(const double* partials, int64_t count, out_t* out,
                       bool inf_norm) {
  const double total = reduce_partials(partials, count, inf_norm);
  if (threadIdx.x == 0) *out = static_cast<out_t>(total);
}

// Blocks of the norm pass over tensors of these sizes: the size of the
// by-value partials workspace.
inline int64_t norm_partials_count(const int64_t* numels, size_t count) {
  int64_t blocks = 0;
  for (size_t t = 0; t < count; ++t)
    blocks += (numels[t] + plan::kChunkSize - 1) / plan::kChunkSize;
  return blocks;
}

// The whole pass on `stream` (NOTE: [launch modes]). Table mode: one launch
// (the finishing kernel alone for a list without elements, to write the 0);
// a.partials is the table's scratch. By value: the chunk launches, then the
// finishing block; a.partials holds norm_partials_count(numels, count)
// doubles. `out` is a float (or double, out_t) on the device.
template <typename scalar_t, typename out_t>
void norm_check_launch(size_t count, void* const* grads, const int64_t* numels,
                       NormArgs a, out_t* out, const LaunchMode& mode,
                       cudaStream_t stream) {
  TensorLists<1> lists;
  lists.count = count;
  lists.addresses[0] = grads;
  lists.numels = numels;
  if (mode.tables != nullptr) {
    const TableRef t = upload_table(lists, true, kNormTable, *mode.tables);
    if (t.layout.block_count > 0) {
      a.partials = t.partials();
      a.done = &t.header()->call_ticket;
      a.out = out;
      multi_tensor_apply_table<1>(t, stream, NormFunctor<scalar_t, out_t>{a});
      return;
    }
    a.partials = nullptr;
  } else {
    multi_tensor_apply_by_value<1, false>(lists, mode.arg_bytes, stream,
                                          NormFunctor<scalar_t, out_t>{a});
  }
  launch_kernel(&norm_finish_kernel<out_t>, 1u, static_cast<unsigned>(kBlockSize),
                stream, static_cast<const double*>(a.partials),
                a.partials == nullptr ? int64_t{0} : norm_partials_count(numels, count),
                out, a.inf_norm);
}

}  // namespace fastaccum::cuda
