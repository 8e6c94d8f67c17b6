// CPU impl of fastaccum::norm_check_ (semantics: NOTE: [norm check] in
// csrc/ops.cpp): one read-only pass that flags inf/NaN and reduces the
// gradient norm of x = g * mul, for a fused clip_grad_norm_. The chunks run
// in parallel; their partials are combined in chunk order, so the result does
// not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "../sgd_math.h"
#include "kernels.h"
#include "multi_tensor_chunks.h"

namespace fastaccum::cpu {
namespace {

void norm_check_cpu(at::TensorList grads, at::Tensor found_inf,
                    at::Tensor norm_out, double norm_type,
                    const c10::optional<at::Tensor>& grad_scale,
                    double factor) {
  check_uniform(grads, "grads");
  check_scalar_f32(found_inf, "found_inf");
  TORCH_CHECK(found_inf.device().is_cpu(), "found_inf must be on the CPU");
  const bool inf_norm = check_norm_args(grads, norm_out, norm_type);
  TORCH_CHECK(norm_out.device().is_cpu(), "norm_out must be on the CPU");
  double mul = factor;
  if (grad_scale) {
    check_scalar_f32(*grad_scale, "grad_scale");
    mul *= inv_scale(grad_scale->item<float>());
  }
  if (grads.empty()) {
    norm_out.fill_(0.0);
    return;
  }
  const auto kernel = kernels().norm[dtype_index(grads[0].scalar_type())];
  const auto chunks = make_chunks(grads);
  std::vector<NormChunk> results(chunks.size());
  std::vector<const char*> ptrs(grads.size());
  const int64_t elem = grads[0].element_size();
  for (size_t t = 0; t < grads.size(); ++t)
    ptrs[t] = static_cast<const char*>(grads[t].const_data_ptr());
  parallel_chunks(chunks, [&](int64_t c, const Chunk& ch) {
    results[c] = kernel(ptrs[ch.tensor] + ch.begin * elem, ch.end - ch.begin,
                        mul, inf_norm);
  });
  bool nonfinite = false;
  double total = 0.0;
  for (const auto& r : results) {
    nonfinite |= r.nonfinite;
    total = inf_norm ? max_nan(total, r.value) : total + r.value;
  }
  if (nonfinite) found_inf.fill_(1.0);
  norm_out.fill_(total);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("norm_check_", &norm_check_cpu);
}

}  // namespace fastaccum::cpu
