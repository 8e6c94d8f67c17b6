// The fused SGD update on the GPU: its functor, the step-counter kernel and
// the launch sequence of one call. Device code for nvcc and the host emulator
// alike (cuda_or_emulator.h); the torch side (argument checks, scalars that
// live on the host, dtype dispatch) is fused_sgd_cuda.cu. The CPU twin is
// csrc/cpu/fused_sgd_cpu.cpp; the math of both is csrc/sgd_math.h; the test
// of this file on the CPU is tests/emulator/test_fused_sgd_kernel.cpp.
//
// List order: params (written), grads (written with write_grad),
// momentum_buffers (written; only when momentum != 0, then depth 3 and one
// step counter per tensor).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../sgd_math.h"
#include "chunk_loop.cuh"
#include "cuda_or_emulator.h"
#include "kernel_launch.h"
#include "multi_tensor_apply.cuh"
#include "opmath.h"

namespace fastaccum::cuda {

// Hyper-parameters as the host has them (doubles, as the schema passes them);
// each block converts them to opmath exactly as the CPU impl does, after
// reading the device scalars.
struct SgdArgsDevice {
  double lr;               // used when neither lr pointer is set
  const float* lr_f32;     // a float32 CUDA lr_tensor
  const double* lr_f64;    // any other CUDA lr_tensor, as float64
  double weight_decay;
  double momentum;
  double one_minus_dampening;
  double grad_factor;       // 1/K, times the scale reciprocal of a CPU scale
  const float* grad_scale;  // CUDA loss scale, or nullptr
  const float* found_inf;   // CUDA flag, or nullptr
  bool nesterov;
  bool maximize;
  bool write_grad;  // store the unscaled grad back (also on a skipped step)
  bool skipped;     // the host already knows found_inf is set
  // The clip coefficient of a fused clip_grad_norm_: on the device, or `clip`
  // when the host has it; clip_grad says whether there is one.
  const float* clip_coef = nullptr;
  double clip = 1.0;
  bool clip_grad = false;
};

// NOTE: [update prologue]
// Each device scalar (found_inf, lr, grad_scale, clip_coef, the step
// counter) is its own global load of ~0.5-1 us latency; the functor issues
// all of them before any branch depends on one, so a block waits for them
// once rather than one after another.
template <typename scalar_t, bool kMomentum>
struct SgdFunctor {
  static constexpr int kDepth = kMomentum ? 3 : 2;
  SgdArgsDevice a;

  __device__ __forceinline__ void operator()(const Chunk<kDepth>& c) const {
    using op_t = opmath_t<scalar_t>;
    // Set by an earlier launch on this stream (the check pass), so it is
    // final for every block, and uniform in a block.
    const float found = a.found_inf != nullptr ? *a.found_inf : 0.f;
    const float lr32 = a.lr_f32 != nullptr ? *a.lr_f32 : 0.f;
    const double lr64 = a.lr_f64 != nullptr ? *a.lr_f64 : 0.0;
    const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.f;
    const float coef = a.clip_coef != nullptr ? *a.clip_coef : 1.f;
    // Read before any block of this tensor may advance it (NOTE: [step
    // counters]), so every block sees the value from before the call.
    const float step = kMomentum ? *c.step : 1.f;

    const bool skip = a.skipped || found != 0.f;
    if constexpr (kMomentum) {
      if (c.ticket != nullptr && !skip) advance_step_when_last(c);
    }
    if (skip && !a.write_grad) return;
    const double lr = a.lr_f32 != nullptr   ? static_cast<double>(lr32)
                      : a.lr_f64 != nullptr ? lr64
                                            : a.lr;
    double grad_mul = a.grad_factor;
    if (a.grad_scale != nullptr) grad_mul *= inv_scale(scale);
    const double clip = a.clip_coef != nullptr ? static_cast<double>(coef) : a.clip;
    const SgdHyper<op_t> h{static_cast<op_t>(lr),
                           static_cast<op_t>(a.weight_decay),
                           static_cast<op_t>(a.momentum),
                           static_cast<op_t>(a.one_minus_dampening),
                           static_cast<op_t>(grad_mul),
                           a.nesterov,
                           a.maximize,
                           kMomentum,
                           grad_mul != 1.0,
                           static_cast<op_t>(clip),
                           // A coefficient of exactly 1 changes nothing.
                           a.clip_grad && clip != 1.0};
    // Writing g * 1 back would only cost bandwidth.
    const unsigned grad_bit =
        a.write_grad && (h.scale_grad || h.clip_grad) ? 0b010u : 0u;
    const int64_t n = c.n;
    scalar_t* const grads = static_cast<scalar_t*>(c.addresses[1]) + c.start;
    if (skip) {
      // As torch's GradScaler leaves a skipped step: grads unscaled, nothing
      // else touched.
      if (grad_bit == 0u) return;
      scalar_t* const ptrs[1] = {grads};
      auto op = [&](op_t (&r)[1]) { r[0] = unscaled_grad<op_t, op_t>(r[0], h); };
      for_each_element<1>(ptrs, n, 0b1u, 0b1u, op);
      return;
    }
    if constexpr (kMomentum) {
      const bool first = step == 0.f;
      scalar_t* const ptrs[3] = {
          static_cast<scalar_t*>(c.addresses[0]) + c.start, grads,
          static_cast<scalar_t*>(c.addresses[2]) + c.start};
      auto op = [&](op_t (&r)[3]) {
        r[1] = unscaled_grad<op_t, op_t>(r[1], h);
        r[0] = sgd_math<op_t, op_t>(r[0], r[1], r[2], first, h);
      };
      // A first update does not read the (possibly never written) buffer.
      for_each_element<3>(ptrs, n, first ? 0b011u : 0b111u, 0b101u | grad_bit, op);
    } else {
      scalar_t* const ptrs[2] = {
          static_cast<scalar_t*>(c.addresses[0]) + c.start, grads};
      auto op = [&](op_t (&r)[2]) {
        op_t unused = op_t(0);
        r[1] = unscaled_grad<op_t, op_t>(r[1], h);
        r[0] = sgd_math<op_t, op_t>(r[0], r[1], unused, false, h);
      };
      for_each_element<2>(ptrs, n, 0b11u, 0b01u | grad_bit, op);
    }
  }

  // Table mode: the last block of a tensor to have read its step counter
  // advances it and resets the tensor's ticket for the next call.
  __device__ __forceinline__ static void advance_step_when_last(const Chunk<kDepth>& c) {
    __syncthreads();  // every thread of this block has read *c.step
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(c.ticket, 1u) == static_cast<unsigned>(c.chunks - 1)) {
        *c.ticket = 0u;
        atomicAdd(c.step, 1.f);
      }
    }
  }
};

// Step counters advanced by a by-value launch; the table is the kernel
// argument (NOTE: [by-value metadata]).
template <int kCount>
struct StepList {
  float* ptr[kCount];
  int count;
};

template <int kCount>
__global__ void __launch_bounds__(kBlockSize)
    advance_steps_kernel(FASTACCUM_GRID_PARAM(StepList<kCount>) list,
                         const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  // Atomic so that a counter listed twice is advanced twice, as on the CPU.
  for (int i = static_cast<int>(threadIdx.x); i < list.count; i += static_cast<int>(blockDim.x))
    atomicAdd(list.ptr[i], 1.f);
}

template <size_t kArgBytes>
void advance_steps_within(float* const* steps, size_t count,
                          const float* found_inf, cudaStream_t stream) {
  constexpr int kCount = static_cast<int>(plan::steps_per_launch(kArgBytes));
  static_assert(sizeof(StepList<kCount>) + sizeof(float*) <= kArgBytes);
  thread_local StepList<kCount> list{};
  for (size_t begin = 0; begin < count; begin += kCount) {
    const size_t end = std::min(count, begin + static_cast<size_t>(kCount));
    list.count = static_cast<int>(end - begin);
    for (size_t i = begin; i < end; ++i) list.ptr[i - begin] = steps[i];
    launch_kernel(&advance_steps_kernel<kCount>, 1u,
                  static_cast<unsigned>(kBlockSize), stream, list, found_inf);
  }
}

// NOTE: [step counters]
// steps[i] == 0 selects b = g in the update, so no update block may see an
// advanced counter: blocks of one tensor run unordered, and in by-value mode
// a tensor cut between two launches is read by both.
// * Table mode: each block reads the counter, then takes a ticket of its
//   tensor; the block that takes the last one advances it (all the others
//   have read it by then), inside the update launch.
// * By value: a separate launch after the last update launch, stream-ordered
//   behind all of them, under the same found_inf condition;
//   plan::steps_per_launch counters per launch.
inline void advance_steps(float* const* steps, size_t count,
                          const float* found_inf, size_t arg_bytes,
                          cudaStream_t stream) {
  with_arg_budget(arg_bytes, [&](auto budget) {
    advance_steps_within<decltype(budget)::value>(steps, count, found_inf, stream);
  });
}

// The device addresses of one fused_sgd_ call: `count` tensors per list,
// list 0's numels; momentum and steps only when a.momentum != 0.
struct SgdLists {
  size_t count = 0;
  void* const* params = nullptr;
  void* const* grads = nullptr;
  void* const* momentum = nullptr;
  const int64_t* numels = nullptr;
  float* const* steps = nullptr;
};

// All launches of one fused_sgd_ call on `stream` (NOTE: [launch modes]):
// the update, then in by-value mode with momentum the step counters.
template <typename scalar_t>
void fused_sgd_launch(const SgdLists& l, const SgdArgsDevice& a,
                      const LaunchMode& mode, cudaStream_t stream) {
  if (l.count == 0) return;
  if (a.momentum != 0.0) {
    TensorLists<3> lists;
    lists.count = l.count;
    lists.addresses[0] = l.params;
    lists.addresses[1] = l.grads;
    lists.addresses[2] = l.momentum;
    lists.numels = l.numels;
    lists.steps = l.steps;
    multi_tensor_apply_in<3, true>(mode, kUpdateMomentumTable, lists, stream,
                                   SgdFunctor<scalar_t, true>{a});
    // In table mode the update advanced them (NOTE: [step counters]).
    if (mode.tables == nullptr && !a.skipped)
      advance_steps(l.steps, l.count, a.found_inf, mode.arg_bytes, stream);
  } else {
    TensorLists<2> lists;
    lists.count = l.count;
    lists.addresses[0] = l.params;
    lists.addresses[1] = l.grads;
    lists.numels = l.numels;
    multi_tensor_apply_in<2, false>(mode, kUpdateTable, lists, stream,
                                    SgdFunctor<scalar_t, false>{a});
  }
}

}  // namespace fastaccum::cuda
