// Argument checks shared by the CPU and CUDA impls. Python validates user
// input first with friendlier messages; these guard the op boundary itself
// (direct torch.ops calls, opcheck).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fusable.h"

namespace fastaccum {

// Every tensor of `list` shares the device and dtype of `ref`, and is dense
// and non-overlapping with the strides of `ref`, so the kernels may walk its
// storage as one flat span of numel() elements.
inline void check_like(at::TensorList refs, at::TensorList list,
                       const char* name) {
  TORCH_CHECK(list.size() == refs.size(), name, " has ", list.size(),
              " tensors but params has ", refs.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& r = refs[i];
    TORCH_CHECK(t.device() == r.device(), name, "[", i, "] is on ", t.device(),
                " but its param is on ", r.device());
    TORCH_CHECK(t.scalar_type() == r.scalar_type(), name, "[", i, "] has dtype ",
                t.scalar_type(), " but its param has ", r.scalar_type());
    TORCH_CHECK(t.sizes() == r.sizes(), name, "[", i, "] has shape ", t.sizes(),
                " but its param has ", r.sizes());
    TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "] must be dense");
    TORCH_CHECK(same_memory_order(t, r), name, "[", i, "] has strides ",
                t.strides(), " but its param has ", r.strides());
  }
}

// One device and one dtype for the whole list, every tensor a dense span.
inline void check_uniform(at::TensorList list, const char* name) {
  if (list.empty()) return;
  const auto device = list[0].device();
  const auto dtype = list[0].scalar_type();
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(),
                " but ", name, "[0] is on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ",
                t.scalar_type(), " but ", name, "[0] has ", dtype);
    TORCH_CHECK(t.layout() == at::kStrided, name, "[", i, "] must be dense");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), name, "[", i,
                "] must be non-overlapping and dense");
    TORCH_CHECK(is_kernel_dtype(t.scalar_type()), name, "[", i,
                "] must be float32, float64, float16 or bfloat16, got ",
                t.scalar_type());
  }
}

// norm_check_'s norm type (2 or inf: returns whether it is inf) and its
// output: one element, float32, or float64 for float64 grads.
inline bool check_norm_args(at::TensorList grads, const at::Tensor& norm_out,
                            double norm_type) {
  const bool inf_norm = norm_type > 0 && norm_type * 0.5 == norm_type;
  TORCH_CHECK(inf_norm || norm_type == 2.0,
              "norm_type must be 2.0 or inf, got ", norm_type);
  TORCH_CHECK(norm_out.numel() == 1, "norm_out must have one element, got ",
              norm_out.numel());
  const bool f64 = !grads.empty() && grads[0].scalar_type() == at::kDouble;
  const auto want = f64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(norm_out.scalar_type() == want ||
                  (grads.empty() && norm_out.scalar_type() == at::kDouble),
              "norm_out must be ", want, " for ",
              grads.empty() ? at::kFloat : grads[0].scalar_type(),
              " grads, got ", norm_out.scalar_type());
  return inf_norm;
}

inline void check_scalar_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, name, " must have one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ",
              t.scalar_type());
}

// The lists of one fastaccum::fused_sgd_ call: one device and dtype, grads and
// buffers shaped and laid out like their params, and (with momentum) one
// float32 step counter per param on its device.
inline void check_sgd_lists(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers,
                            at::TensorList steps, bool has_momentum) {
  check_uniform(params, "params");
  check_like(params, grads, "grads");
  if (!has_momentum) {
    TORCH_CHECK(momentum_buffers.empty() && steps.empty(),
                "momentum_buffers and steps must be empty when momentum == 0");
    return;
  }
  check_like(params, momentum_buffers, "momentum_buffers");
  TORCH_CHECK(steps.size() == params.size(), "steps has ", steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    check_scalar_f32(steps[i], "steps[i]");
    TORCH_CHECK(steps[i].device() == params[i].device(), "steps[", i,
                "] is on ", steps[i].device(), " but its param is on ",
                params[i].device());
  }
}

// Index of a storage dtype in the CPU kernel table (csrc/cpu/kernels.h order).
inline int dtype_index(at::ScalarType t) {
  TORCH_CHECK(is_kernel_dtype(t), "fastaccum kernels support float32, float64, "
              "float16 and bfloat16, got ", t);
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;  // bfloat16
  }
}

}  // namespace fastaccum
