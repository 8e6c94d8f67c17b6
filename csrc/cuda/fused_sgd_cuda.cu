// CUDA impl of fastaccum::fused_sgd_ (semantics: csrc/cpu/fused_sgd_cpu.cpp,
// NOTE: [op contract] in csrc/ops.cpp): argument checks, the scalars that live
// on the host, dtype dispatch; the kernels and their launch sequence are
// fused_sgd_kernel.cuh. No host sync: found_inf, grad_scale, a CUDA lr_tensor
// and the step counters are read by the kernels, so the whole call can be
// captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "fused_sgd_kernel.cuh"
#include "launch_mode.h"
#include "tensor_addresses.h"

namespace fastaccum::cuda {
namespace {

void fused_sgd_cuda(at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList steps,
                    double lr, const c10::optional<at::Tensor>& lr_tensor,
                    double weight_decay, double momentum, double dampening,
                    bool nesterov, bool maximize, double grad_factor,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf,
                    bool write_grads,
                    const c10::optional<at::Tensor>& clip_coef) {
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
                  nullptr,     nullptr,   nesterov,    maximize,
                  write_grads, false};
  if (found_inf) {
    if (found_inf->is_cpu()) {
      // Host memory: reading it costs no device sync. The kernels still run
      // on a skipped step when they must leave the grads unscaled.
      a.skipped = found_inf->item<float>() != 0.f;
      if (a.skipped && !write_grads) return;
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
      a.grad_factor *= inv_scale(grad_scale->item<float>());
    } else {
      on_device(*grad_scale, "grad_scale");
      a.grad_scale = grad_scale->const_data_ptr<float>();
    }
  }

  if (clip_coef) {
    check_scalar_f32(*clip_coef, "clip_coef");
    a.clip_grad = true;
    if (clip_coef->is_cpu()) {
      a.clip = clip_coef->item<float>();  // host memory: no device sync
    } else {
      on_device(*clip_coef, "clip_coef");
      a.clip_coef = clip_coef->const_data_ptr<float>();
    }
  }

  const std::vector<void*> param_ptrs = addresses(params, true);
  const std::vector<void*> grad_ptrs = addresses(grads, write_grads);
  std::vector<void*> buf_ptrs;
  std::vector<float*> step_ptrs;
  if (has_momentum) {
    buf_ptrs = addresses(momentum_buffers, true);
    step_ptrs.resize(steps.size());
    for (size_t i = 0; i < steps.size(); ++i)
      step_ptrs[i] = steps[i].mutable_data_ptr<float>();
  }
  const std::vector<int64_t> sizes = numels(params);
  SgdLists lists;
  lists.count = params.size();
  lists.params = param_ptrs.data();
  lists.grads = grad_ptrs.data();
  lists.momentum = has_momentum ? buf_ptrs.data() : nullptr;
  lists.numels = sizes.data();
  lists.steps = has_momentum ? step_ptrs.data() : nullptr;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(device.index()).stream();
  TorchTableSource tables(device, stream);
  const LaunchMode mode = tables.launch_mode();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(),
      "fastaccum_fused_sgd_cuda",
      [&] { fused_sgd_launch<scalar_t>(lists, a, mode, stream); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) { m.impl("fused_sgd_", &fused_sgd_cuda); }

}  // namespace fastaccum::cuda
