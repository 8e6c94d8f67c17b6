// CUDA impl of fastaccum::fused_sgd_ (semantics: csrc/cpu/fused_sgd_cpu.cpp,
// NOTE: [op contract] in csrc/ops.cpp; math: csrc/sgd_math.h). No host sync:
// found_inf, grad_scale, a CUDA lr_tensor and the step counters are read by
// the kernels, so the whole call can be captured in a CUDA graph.
//
// List order: params (written), grads, momentum_buffers (written; only when
// momentum != 0, then depth 3 and one step counter per tensor).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../check_inputs.h"
#include "../sgd_math.h"
#include "chunk_loop.cuh"
#include "multi_tensor_apply.cuh"

namespace fastaccum::cuda {
namespace {

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
  double grad_factor;      // 1/K, times the scale reciprocal of a CPU scale
  const float* grad_scale;  // CUDA loss scale, or nullptr
  const float* found_inf;   // CUDA flag, or nullptr
  bool nesterov;
  bool maximize;
};

template <typename scalar_t, bool kMomentum>
struct SgdFunctor {
  SgdArgsDevice a;

  template <typename Meta>
  __device__ __forceinline__ void operator()(const Meta& meta, int slot,
                                             int64_t start, int64_t n) const {
    using op_t = at::opmath_type<scalar_t>;
    // Set by an earlier launch on this stream (the check pass), so it is
    // final for every block of every update launch.
    if (a.found_inf != nullptr && *a.found_inf != 0.f) return;
    const double lr = a.lr_f32 != nullptr   ? static_cast<double>(*a.lr_f32)
                      : a.lr_f64 != nullptr ? *a.lr_f64
                                            : a.lr;
    double grad_mul = a.grad_factor;
    if (a.grad_scale != nullptr)
      grad_mul *= static_cast<double>(
          static_cast<float>(1.0 / static_cast<double>(*a.grad_scale)));
    const SgdHyper<op_t> h{static_cast<op_t>(lr),
                           static_cast<op_t>(a.weight_decay),
                           static_cast<op_t>(a.momentum),
                           static_cast<op_t>(a.one_minus_dampening),
                           static_cast<op_t>(grad_mul),
                           a.nesterov,
                           a.maximize,
                           kMomentum,
                           grad_mul != 1.0};
    if constexpr (kMomentum) {
      // Read here, advanced only by a later launch (see NOTE: [step
      // counters]), so every block of a tensor, in whichever launch of this
      // call, sees the value from before the call.
      const bool first = *meta.steps[slot] == 0.f;
      scalar_t* const ptrs[3] = {
          static_cast<scalar_t*>(meta.addresses[0][slot]) + start,
          static_cast<scalar_t*>(meta.addresses[1][slot]) + start,
          static_cast<scalar_t*>(meta.addresses[2][slot]) + start};
      auto op = [&](op_t (&r)[3]) {
        r[0] = sgd_math<op_t, op_t>(r[0], r[1], r[2], first, h);
      };
      // A first update does not read the (possibly never written) buffer.
      for_each_element<3>(ptrs, n, first ? 0b011u : 0b111u, 0b101u, op);
    } else {
      scalar_t* const ptrs[2] = {
          static_cast<scalar_t*>(meta.addresses[0][slot]) + start,
          static_cast<scalar_t*>(meta.addresses[1][slot]) + start};
      auto op = [&](op_t (&r)[2]) {
        op_t unused = op_t(0);
        r[0] = sgd_math<op_t, op_t>(r[0], r[1], unused, false, h);
      };
      for_each_element<2>(ptrs, n, 0b11u, 0b01u, op);
    }
  }
};

// Step counters advanced per launch; the table is the kernel argument
// (3.9 KB < 4 KB), as in NOTE: [by-value metadata].
constexpr int kStepsPerLaunch = 480;
struct StepList {
  float* ptr[kStepsPerLaunch];
  int count;
};
static_assert(sizeof(StepList) + sizeof(float*) <= kMaxKernelArgBytes);

__global__ void advance_steps_kernel(const __grid_constant__ StepList list,
                                     const float* found_inf) {
  const int i = static_cast<int>(threadIdx.x);
  if (i >= list.count) return;
  if (found_inf != nullptr && *found_inf != 0.f) return;
  // Atomic so that a counter listed twice is advanced twice, as on the CPU.
  atomicAdd(list.ptr[i], 1.f);
}

// NOTE: [step counters]
// steps[i] == 0 selects b = g in the update, so no update block may see an
// advanced counter: blocks of one tensor run unordered, and a tensor cut
// between two launches is read by both. The counters are therefore advanced
// by a separate launch after the last update launch, stream-ordered behind
// all of them, and under the same found_inf condition. Its table holds 480
// pointers per launch (10x what a depth-1 multi_tensor_apply launch would),
// so this costs ceil(n / 480) tiny launches per call.
void advance_steps(at::TensorList steps, const float* found_inf,
                   cudaStream_t stream) {
  StepList list{};
  for (size_t begin = 0; begin < steps.size(); begin += kStepsPerLaunch) {
    const size_t end = std::min(steps.size(), begin + kStepsPerLaunch);
    list.count = static_cast<int>(end - begin);
    for (size_t i = begin; i < end; ++i)
      list.ptr[i - begin] = steps[i].mutable_data_ptr<float>();
    advance_steps_kernel<<<1, kStepsPerLaunch, 0, stream>>>(list, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void fused_sgd_cuda(at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList steps,
                    double lr, const c10::optional<at::Tensor>& lr_tensor,
                    double weight_decay, double momentum, double dampening,
                    bool nesterov, bool maximize, double grad_factor,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf) {
  const bool has_momentum = momentum != 0.0;
  check_sgd_lists(params, grads, momentum_buffers, steps, has_momentum);
  if (found_inf) check_scalar_f32(*found_inf, "found_inf");
  if (params.empty()) return;

  const c10::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_sgd_ (CUDA): params are on ", device,
              "; pass found_inf, grad_scale and lr_tensor on the params' "
              "device (or the CPU)");
  auto on_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(),
                " but params are on ", device);
  };

  SgdArgsDevice a{lr,          nullptr,   nullptr,     weight_decay,
                  momentum,    1.0 - dampening,        grad_factor,
                  nullptr,     nullptr,   nesterov,    maximize};
  if (found_inf) {
    if (found_inf->is_cpu()) {
      // Host memory: reading it costs no device sync.
      if (found_inf->item<float>() != 0.f) return;
    } else {
      on_device(*found_inf, "found_inf");
      a.found_inf = found_inf->const_data_ptr<float>();
    }
  }
  at::Tensor lr_f64;  // keeps a converted lr alive until the launches are queued
  if (lr_tensor) {
    TORCH_CHECK(lr_tensor->numel() == 1, "lr_tensor must have one element");
    if (lr_tensor->is_cpu()) {
      a.lr = lr_tensor->item<double>();
    } else {
      on_device(*lr_tensor, "lr_tensor");
      if (lr_tensor->scalar_type() == at::kFloat) {
        a.lr_f32 = lr_tensor->const_data_ptr<float>();
      } else {
        // Stream-ordered: the conversion runs before the update reads it.
        lr_f64 = lr_tensor->scalar_type() == at::kDouble
                     ? *lr_tensor
                     : lr_tensor->to(at::kDouble);
        a.lr_f64 = lr_f64.const_data_ptr<double>();
      }
    }
  }
  if (grad_scale) {
    check_scalar_f32(*grad_scale, "grad_scale");
    if (grad_scale->is_cpu()) {
      a.grad_factor *= static_cast<double>(
          static_cast<float>(1.0 / grad_scale->item<double>()));
    } else {
      on_device(*grad_scale, "grad_scale");
      a.grad_scale = grad_scale->const_data_ptr<float>();
    }
  }

  const bool reverse = update_order_reversed();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(),
      "fastaccum_fused_sgd_cuda", [&] {
        if (has_momentum) {
          multi_tensor_apply<3, true>({params, grads, momentum_buffers}, steps,
                                      0b101u, reverse,
                                      SgdFunctor<scalar_t, true>{a});
        } else {
          multi_tensor_apply<2, false>({params, grads}, {}, 0b01u, reverse,
                                       SgdFunctor<scalar_t, false>{a});
        }
      });
  if (has_momentum) {
    const c10::cuda::CUDAGuard guard(device);
    advance_steps(steps, a.found_inf,
                  c10::cuda::getCurrentCUDAStream(device.index()).stream());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) { m.impl("fused_sgd_", &fused_sgd_cuda); }

}  // namespace fastaccum::cuda
