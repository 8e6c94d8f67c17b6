// fastaccum::_first_unfusable and fastaccum::_pair_kinds: the optimizer's
// per-step triage of a param group in one C++ call instead of a Python loop
// over tensors (a Python attribute check costs ~1 us per tensor; 10,000-tensor
// models step often). The rules themselves are in fusable.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "fusable.h"

namespace fastaccum {
namespace {

at::Tensor grad_at(const c10::List<std::optional<at::Tensor>>& grads,
                   size_t i) {
  const std::optional<at::Tensor> g = grads[i];
  return g.has_value() ? *g : at::Tensor();
}

// [first, signature]. first is -1 when every (param, grad) pair with a grad
// is kFusable; otherwise the index of the first pair that is not (the caller
// then asks _pair_kinds). signature hashes the index, device and dtype of
// every param with a grad, so the caller's cached (device, dtype) split
// notices params moved or cast in place (module.to(), .half()).
std::vector<int64_t> first_unfusable(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads) {
  TORCH_CHECK(grads.size() == params.size(), "grads has ", grads.size(),
              " entries but params has ", params.size());
  uint64_t signature = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor g = grad_at(grads, i);
    const PairKind kind = pair_kind(params[i], g);
    if (kind == PairKind::kNoGrad) continue;
    if (kind != PairKind::kFusable) return {static_cast<int64_t>(i), 0};
    const auto& d = params[i].device();
    const uint64_t key = (static_cast<uint64_t>(i) << 24) ^
                         (static_cast<uint64_t>(d.type()) << 16) ^
                         (static_cast<uint64_t>(d.index() + 1) << 8) ^
                         static_cast<uint64_t>(params[i].scalar_type());
    signature = (signature ^ key) * 1099511628211ull;
  }
  return {-1, static_cast<int64_t>(signature >> 1)};
}

// The PairKind of every (param, grad) pair, for the per-tensor path.
std::vector<int64_t> pair_kinds(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads) {
  TORCH_CHECK(grads.size() == params.size(), "grads has ", grads.size(),
              " entries but params has ", params.size());
  std::vector<int64_t> out(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    out[i] = static_cast<int64_t>(pair_kind(params[i], grad_at(grads, i)));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastaccum, m) {
  m.def("_first_unfusable(Tensor[] params, Tensor?[] grads) -> int[]",
        &first_unfusable);
  m.def("_pair_kinds(Tensor[] params, Tensor?[] grads) -> int[]",
        &pair_kinds);
}

}  // namespace fastaccum
