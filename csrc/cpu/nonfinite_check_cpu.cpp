// CPU impls of fastaccum::nonfinite_check_ and fastaccum::unscale_check_:
// one pass over a gradient list that flags inf/NaN and, on request, sums the
// squares (for norm clipping); unscale_check_ also writes g * inv_scale * factor.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../check_inputs.h"
#include "../sgd_math.h"
#include "multi_tensor_chunks.h"
#include "kernels.h"

namespace fastaccum::cpu {
namespace {

void check_impl(at::TensorList grads, at::Tensor& found_inf, double mul,
                bool write, const c10::optional<at::Tensor>& sumsq) {
  check_uniform(grads, "grads");
  check_scalar_f32(found_inf, "found_inf");
  TORCH_CHECK(found_inf.device().is_cpu(), "found_inf must be on the CPU");
  if (sumsq) {
    check_scalar_f32(*sumsq, "sumsq");
    TORCH_CHECK(sumsq->device().is_cpu(), "sumsq must be on the CPU");
  }
  if (grads.empty()) return;
  const auto kernel = kernels().check[dtype_index(grads[0].scalar_type())];
  const auto chunks = make_chunks(grads);
  std::vector<ChunkResult> results(chunks.size());
  std::vector<char*> ptrs(grads.size());
  const int64_t elem = grads[0].element_size();
  for (size_t t = 0; t < grads.size(); ++t)
    ptrs[t] = static_cast<char*>(grads[t].data_ptr());
  const bool want_sumsq = sumsq.has_value();
  parallel_chunks(chunks, [&](int64_t c, const Chunk& ch) {
    results[c] = kernel(ptrs[ch.tensor] + ch.begin * elem, ch.end - ch.begin,
                        mul, write, want_sumsq);
  });
  bool nonfinite = false;
  double total = 0.0;
  for (const auto& r : results) {
    nonfinite |= r.nonfinite;
    total += r.sumsq;
  }
  if (nonfinite) found_inf.fill_(1.0);
  if (sumsq) sumsq->add_(total);
}

void nonfinite_check_cpu(at::TensorList grads, at::Tensor found_inf,
                         const c10::optional<at::Tensor>& sumsq) {
  check_impl(grads, found_inf, 1.0, /*write=*/false, sumsq);
}

void unscale_check_cpu(at::TensorList grads, at::Tensor found_inf,
                       const at::Tensor& grad_scale, double factor,
                       const c10::optional<at::Tensor>& sumsq) {
  check_scalar_f32(grad_scale, "grad_scale");
  check_impl(grads, found_inf, inv_scale(grad_scale.item<float>()) * factor,
             /*write=*/true, sumsq);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("nonfinite_check_", &nonfinite_check_cpu);
  m.impl("unscale_check_", &unscale_check_cpu);
}

}  // namespace fastaccum::cpu
