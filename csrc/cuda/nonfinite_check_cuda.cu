// CUDA impls of fastaccum::nonfinite_check_ and fastaccum::unscale_check_
// (semantics: csrc/cpu/nonfinite_check_cpu.cpp, NOTE: [op contract] in
// csrc/ops.cpp): argument checks, a host-side scale, dtype dispatch; the
// kernel is nonfinite_check_kernel.cuh. One pass over the gradients, forward
// order (one launch, NOTE: [launch modes]); no host sync.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "launch_mode.h"
#include "nonfinite_check_kernel.cuh"
#include "tensor_addresses.h"

namespace fastaccum::cuda {
namespace {

void check_impl(at::TensorList grads, const at::Tensor& found_inf,
                const c10::optional<at::Tensor>& sumsq, bool write,
                const float* grad_scale, double factor) {
  const auto device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "grads are on ", device,
              ", so found_inf (on ", found_inf.device(), "), grad_scale and "
              "sumsq must be there too");
  TORCH_CHECK(found_inf.device() == device, "found_inf is on ",
              found_inf.device(), " but grads are on ", device);
  CheckArgs a;
  if (sumsq) {
    TORCH_CHECK(sumsq->device() == device, "sumsq is on ", sumsq->device(),
                " but grads are on ", device);
    a.sumsq = sumsq->mutable_data_ptr<float>();
  }
  a.found_inf = found_inf.mutable_data_ptr<float>();
  a.grad_scale = grad_scale;
  a.factor = factor;
  const std::vector<void*> ptrs = addresses(grads, write);
  const std::vector<int64_t> sizes = numels(grads);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(device.index()).stream();
  TorchTableSource tables(device, stream);
  const LaunchMode mode = tables.launch_mode();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(),
      "fastaccum_check_cuda", [&] {
        nonfinite_check_launch<scalar_t>(grads.size(), ptrs.data(),
                                         sizes.data(), a, write, mode, stream);
      });
}

void check_outputs(const at::Tensor& found_inf,
                   const c10::optional<at::Tensor>& sumsq) {
  check_scalar_f32(found_inf, "found_inf");
  if (sumsq) check_scalar_f32(*sumsq, "sumsq");
}

void nonfinite_check_cuda(at::TensorList grads, at::Tensor found_inf,
                          const c10::optional<at::Tensor>& sumsq) {
  check_uniform(grads, "grads");
  check_outputs(found_inf, sumsq);
  if (grads.empty()) return;
  check_impl(grads, found_inf, sumsq, /*write=*/false, nullptr, 1.0);
}

void unscale_check_cuda(at::TensorList grads, at::Tensor found_inf,
                        const at::Tensor& grad_scale, double factor,
                        const c10::optional<at::Tensor>& sumsq) {
  check_scalar_f32(grad_scale, "grad_scale");
  check_uniform(grads, "grads");
  check_outputs(found_inf, sumsq);
  if (grads.empty()) return;
  const float* scale_ptr = nullptr;
  if (grad_scale.is_cpu()) {
    // A host read of host memory: no device sync.
    factor *= inv_scale(grad_scale.item<float>());
  } else {
    TORCH_CHECK(grad_scale.device() == grads[0].device(), "grad_scale is on ",
                grad_scale.device(), " but grads are on ", grads[0].device());
    scale_ptr = grad_scale.const_data_ptr<float>();
  }
  check_impl(grads, found_inf, sumsq, /*write=*/true, scale_ptr, factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) {
  m.impl("nonfinite_check_", &nonfinite_check_cuda);
  m.impl("unscale_check_", &unscale_check_cuda);
}

}  // namespace fastaccum::cuda
