// CUDA impls of fastaccum::nonfinite_check_ and fastaccum::unscale_check_
// (semantics: csrc/cpu/nonfinite_check_cpu.cpp, NOTE: [op contract] in
// csrc/ops.cpp). One pass over the gradients, forward order; no host sync.
//
// List order (depth 1): grads. Written only by unscale_check_.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../check_inputs.h"
#include "../sgd_math.h"
#include "chunk_loop.cuh"
#include "multi_tensor_apply.cuh"

namespace fastaccum::cuda {
namespace {

// found_inf <- 1 when some (unscaled) element is inf/NaN; sumsq += sum(x^2).
// With kWrite, x = g * mul is also stored back. mul is
// float(1/double(*grad_scale)) * factor when grad_scale is a device pointer,
// else `factor` (the host already folded a CPU scale into it).
template <typename scalar_t, bool kWrite>
struct CheckFunctor {
  float* found_inf;
  float* sumsq;  // nullptr: no sum of squares
  const float* grad_scale;
  double factor;

  template <typename Meta>
  __device__ __forceinline__ void operator()(const Meta& meta, int slot,
                                             int64_t start, int64_t n) const {
    using op_t = at::opmath_type<scalar_t>;
    op_t mul = op_t(1);
    if constexpr (kWrite) {
      double m = factor;
      if (grad_scale != nullptr)
        m = static_cast<double>(
                static_cast<float>(1.0 / static_cast<double>(*grad_scale))) *
            factor;
      mul = static_cast<op_t>(m);
    }
    const bool want_sumsq = sumsq != nullptr;
    scalar_t* const ptrs[1] = {static_cast<scalar_t*>(meta.addresses[0][slot]) +
                               start};
    op_t probe = op_t(0);
    op_t sq = op_t(0);
    auto op = [&](op_t (&r)[1]) {
      if constexpr (kWrite) r[0] = r[0] * mul;
      probe = probe + nonfinite_probe(r[0]);
      if (want_sumsq) sq = sq + r[0] * r[0];
    };
    for_each_element<1>(ptrs, n, 1u, kWrite ? 1u : 0u, op);
    // Racing writes of the same 1.0 are harmless (NOTE: [op contract]).
    if (::isnan(probe)) *found_inf = 1.f;
    if (want_sumsq) {
      const op_t total = block_sum(sq);
      if (threadIdx.x == 0) atomicAdd(sumsq, static_cast<float>(total));
    }
  }
};

void check_impl(at::TensorList grads, const at::Tensor& found_inf,
                const c10::optional<at::Tensor>& sumsq, bool write,
                const float* grad_scale, double factor) {
  const auto device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "grads are on ", device,
              ", so found_inf (on ", found_inf.device(), "), grad_scale and "
              "sumsq must be there too");
  TORCH_CHECK(found_inf.device() == device, "found_inf is on ",
              found_inf.device(), " but grads are on ", device);
  float* sumsq_ptr = nullptr;
  if (sumsq) {
    TORCH_CHECK(sumsq->device() == device, "sumsq is on ", sumsq->device(),
                " but grads are on ", device);
    sumsq_ptr = sumsq->mutable_data_ptr<float>();
  }
  float* found_inf_ptr = found_inf.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(),
      "fastaccum_check_cuda", [&] {
        if (write) {
          multi_tensor_apply<1, false>(
              {grads}, {}, 1u, /*reverse=*/false,
              CheckFunctor<scalar_t, true>{found_inf_ptr, sumsq_ptr,
                                           grad_scale, factor});
        } else {
          multi_tensor_apply<1, false>(
              {grads}, {}, 0u, /*reverse=*/false,
              CheckFunctor<scalar_t, false>{found_inf_ptr, sumsq_ptr, nullptr,
                                            1.0});
        }
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
    // A host read of host memory: no device sync. Same reciprocal as torch's
    // GradScaler.unscale_: float(1/double(scale)).
    factor *= static_cast<double>(
        static_cast<float>(1.0 / grad_scale.item<double>()));
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
