// fastaccum::_first_unfusable: the optimizer's per-step triage of a param
// group in one C++ call instead of a Python loop over tensors (a Python
// attribute check costs ~1 us per tensor; 10,000-tensor models step often).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "check_inputs.h"

namespace fastaccum {
namespace {

bool fusable(const at::Tensor& p, const at::Tensor& g) {
  if (g.layout() != at::kStrided || p.layout() != at::kStrided) return false;
  const auto t = p.scalar_type();
  if (t != at::kFloat && t != at::kDouble && t != at::kHalf &&
      t != at::kBFloat16)
    return false;
  return g.scalar_type() == t && g.device() == p.device() &&
         g.sizes() == p.sizes() && p.is_non_overlapping_and_dense() &&
         same_memory_order(g, p);
}

// [first, signature]. first is -1 when every (param, grad) pair with a grad
// can go straight to the fused kernels as it is; otherwise the index of the
// first pair that needs the careful Python path (errors, sparse, complex,
// non-dense layouts). signature hashes the (device, dtype) of every param
// with a grad, in order, so the caller's cached (device, dtype) split notices
// params moved or cast in place (module.to(), .half()).
std::vector<int64_t> first_unfusable(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads) {
  TORCH_CHECK(grads.size() == params.size(), "grads has ", grads.size(),
              " entries but params has ", params.size());
  uint64_t signature = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    if (!fusable(params[i], *g)) return {static_cast<int64_t>(i), 0};
    const auto& d = params[i].device();
    const uint64_t key = (static_cast<uint64_t>(i) << 24) ^
                         (static_cast<uint64_t>(d.type()) << 16) ^
                         (static_cast<uint64_t>(d.index() + 1) << 8) ^
                         static_cast<uint64_t>(params[i].scalar_type());
    signature = (signature ^ key) * 1099511628211ull;
  }
  return {-1, static_cast<int64_t>(signature >> 1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastaccum, m) {
  m.def("_first_unfusable(Tensor[] params, Tensor?[] grads) -> int[]",
        &first_unfusable);
}

}  // namespace fastaccum
