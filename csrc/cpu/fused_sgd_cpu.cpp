// CPU impl of fastaccum::fused_sgd_: unscale x 1/K, maximize, weight decay,
// momentum (first real update included), dampening, nesterov and the lr step
// in one pass over params/grads/buffers, parallel across the whole list;
// with write_grads the unscaled grad is stored back in the same pass.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "../sgd_math.h"
#include "multi_tensor_chunks.h"
#include "kernels.h"

namespace fastaccum::cpu {
namespace {

void fused_sgd_cpu(at::TensorList params, at::TensorList grads,
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
  if (grad_scale) check_scalar_f32(*grad_scale, "grad_scale");
  if (lr_tensor)
    TORCH_CHECK(lr_tensor->numel() == 1, "lr_tensor must have one element");
  if (clip_coef) {
    check_scalar_f32(*clip_coef, "clip_coef");
    TORCH_CHECK(clip_coef->device().is_cpu(), "clip_coef must be on the CPU");
  }
  if (params.empty()) return;

  double grad_mul = grad_factor;
  if (grad_scale) {
    grad_mul *= inv_scale(grad_scale->item<float>());
  }
  // A host read on the CPU. A coefficient of exactly 1 (the norm was under
  // max_norm) changes nothing, so it costs nothing either.
  const double clip = clip_coef ? clip_coef->item<float>() : 1.0;
  const bool clip_grad = clip != 1.0;
  // Writing g * 1 back would only cost bandwidth.
  const bool write_g = write_grads && (grad_mul != 1.0 || clip_grad);
  const int dtype = dtype_index(params[0].scalar_type());
  const int64_t elem = params[0].element_size();
  const size_t n = params.size();
  std::vector<char*> gp(n);
  for (size_t t = 0; t < n; ++t)
    gp[t] = write_g ? static_cast<char*>(grads[t].data_ptr())
                        : const_cast<char*>(static_cast<const char*>(
                              grads[t].const_data_ptr()));

  double lr_value = lr;
  if (lr_tensor) lr_value = lr_tensor->item<double>();
  const SgdArgs args{lr_value,  weight_decay, momentum,
                     1.0 - dampening, grad_mul, nesterov,
                     maximize,  has_momentum, grad_mul != 1.0,
                     write_g,   clip,         clip_grad};

  // Host read: free on the CPU, and the contract of a skipped step. The
  // grads are still unscaled (and clipped) then, with write_grads, as
  // torch's GradScaler.step leaves them when it skips.
  if (found_inf && found_inf->item<float>() != 0.f) {
    if (write_g) {
      const auto keep_grad = kernels().grad[dtype];
      parallel_chunks(make_chunks(grads), [&](int64_t, const Chunk& c) {
        keep_grad(gp[c.tensor] + c.begin * elem, c.end - c.begin, args);
      });
    }
    return;
  }

  // Raw pointer reads/writes of the step counters: an op per tensor would
  // cost microseconds each.
  std::vector<char> first(n, 0);
  for (size_t i = 0; i < steps.size(); ++i)
    first[i] = *steps[i].const_data_ptr<float>() == 0.f;

  const auto kernel = kernels().sgd[dtype];
  std::vector<char*> pp(n), bp(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    pp[t] = static_cast<char*>(params[t].data_ptr());
    if (has_momentum) bp[t] = static_cast<char*>(momentum_buffers[t].data_ptr());
  }
  parallel_chunks(make_chunks(params), [&](int64_t, const Chunk& c) {
    const auto t = c.tensor;
    const int64_t off = c.begin * elem;
    kernel(pp[t] + off, gp[t] + off, has_momentum ? bp[t] + off : nullptr,
           c.end - c.begin, first[t] != 0, args);
  });
  for (const auto& s : steps) *s.data_ptr<float>() += 1.f;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) { m.impl("fused_sgd_", &fused_sgd_cpu); }

}  // namespace fastaccum::cpu
