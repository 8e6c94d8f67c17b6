// CUDA impl of fastaccum::norm_check_ (NOTE: [norm check] in csrc/ops.cpp):
// argument checks, the partials workspace, dtype dispatch; the kernels are
// norm_check_kernel.cuh. One read pass over the gradients in one launch (by
// value: plus a one-block launch); no host sync (a CPU grad_scale is read on
// the host).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "launch_mode.h"
#include "norm_check_kernel.cuh"
#include "tensor_addresses.h"

namespace fastaccum::cuda {
namespace {

void norm_check_cuda(at::TensorList grads, at::Tensor found_inf,
                     at::Tensor norm_out, double norm_type,
                     const c10::optional<at::Tensor>& grad_scale,
                     double factor) {
  check_uniform(grads, "grads");
  check_scalar_f32(found_inf, "found_inf");
  NormArgs a;
  a.inf_norm = check_norm_args(grads, norm_out, norm_type);
  if (grad_scale) check_scalar_f32(*grad_scale, "grad_scale");
  const c10::Device device = grads.empty() ? norm_out.device() : grads[0].device();
  TORCH_CHECK(device.is_cuda(), "grads are on ", device,
              ", so found_inf (on ", found_inf.device(), "), norm_out and "
              "grad_scale must be there too (grad_scale may be on the CPU)");
  TORCH_CHECK(found_inf.device() == device, "found_inf is on ",
              found_inf.device(), " but grads are on ", device);
  TORCH_CHECK(norm_out.device() == device, "norm_out is on ",
              norm_out.device(), " but grads are on ", device);
  a.factor = factor;
  if (grad_scale) {
    if (grad_scale->is_cpu()) {
      a.factor *= inv_scale(grad_scale->item<float>());  // host memory: no sync
    } else {
      TORCH_CHECK(grad_scale->device() == device, "grad_scale is on ",
                  grad_scale->device(), " but grads are on ", device);
      a.grad_scale = grad_scale->const_data_ptr<float>();
    }
  }
  a.found_inf = found_inf.mutable_data_ptr<float>();
  const std::vector<void*> ptrs = addresses(grads, /*written=*/false);
  const std::vector<int64_t> sizes = numels(grads);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(device.index()).stream();
  TorchTableSource tables(device, stream);
  const LaunchMode mode = tables.launch_mode();
  // By value, the partials need a workspace: stream-ordered caching-allocator
  // memory, private to the graph being captured. Table mode keeps them in
  // the table's scratch.
  at::Tensor partials;
  if (mode.tables == nullptr) {
    const int64_t blocks = norm_partials_count(sizes.data(), sizes.size());
    partials = at::empty({blocks}, at::TensorOptions().dtype(at::kDouble).device(device));
    a.partials = partials.mutable_data_ptr<double>();
  }
  const auto dtype = grads.empty() ? at::kFloat : grads[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "fastaccum_norm_check_cuda", [&] {
        if (norm_out.scalar_type() == at::kDouble) {
          norm_check_launch<scalar_t, double>(
              grads.size(), ptrs.data(), sizes.data(), a,
              norm_out.mutable_data_ptr<double>(), mode, stream);
        } else {
          norm_check_launch<scalar_t, float>(
              grads.size(), ptrs.data(), sizes.data(), a,
              norm_out.mutable_data_ptr<float>(), mode, stream);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) {
  m.impl("norm_check_", &norm_check_cuda);
}

}  // namespace fastaccum::cuda
