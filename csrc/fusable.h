// What the fused kernels can take as it is: the one statement of the rules.
// The optimizer's per-step triage (fusable.cpp: _first_unfusable and
// _pair_kinds) and the op-boundary checks (check_inputs.h) both read them
// from here; torch_fastaccum/_plan.py only acts on the kinds they return.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastaccum {

// The storage dtypes the kernels are built for (csrc/cpu/kernels.h order).
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

// Two tensors of one shape lay their elements out in the same order when
// their strides agree on every dimension of size > 1.
inline bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// How the optimizer handles one (param, grad) pair. The numbers are part of
// the contract with torch_fastaccum/_plan.py (PairKind there).
enum class PairKind : int64_t {
  kNoGrad = 0,       // skipped, as SGD skips it
  kFusable = 1,      // straight to the kernels
  kStandIn = 2,      // complex (real view) or not dense / not like its param:
                     // the kernels get a dense real stand-in, copied back
  kSparse = 3,       // torch's unfused sparse SGD math
  kMismatch = 4,     // grad differs from its param in dtype, shape or device
  kBadDtype = 5,     // no kernel for the dtype (integer, bool, float8, ...)
  kBadLayout = 6,    // a param that is not strided, or a grad neither strided
                     // nor sparse COO (CSR, ...)
};

inline PairKind pair_kind(const at::Tensor& p, const at::Tensor& g) {
  if (!g.defined()) return PairKind::kNoGrad;
  if (g.scalar_type() != p.scalar_type() || g.sizes() != p.sizes() ||
      g.device() != p.device())
    return PairKind::kMismatch;
  const auto t = p.scalar_type();
  const bool complex = at::isComplexType(t);
  if (!is_kernel_dtype(complex ? c10::toRealValueType(t) : t))
    return PairKind::kBadDtype;
  if (p.layout() != at::kStrided) return PairKind::kBadLayout;
  if (g.layout() == at::kSparse) return PairKind::kSparse;
  if (g.layout() != at::kStrided) return PairKind::kBadLayout;
  if (complex || !p.is_non_overlapping_and_dense() || !same_memory_order(g, p))
    return PairKind::kStandIn;
  return PairKind::kFusable;
}

}  // namespace fastaccum
