// Schemas of every fastaccum op. Kernels register per dispatch key in their
// own files (csrc/cpu/*_cpu.cpp, csrc/cuda/*_cuda.cu); fake impls live in
// torch_fastaccum/_ops.py.
//
// NOTE: [op contract]
// * found_inf is a float32 0-dim tensor that the caller zeroes; the check ops
//   only ever write 1.0 into it (racing writers are harmless).
// * grad_scale is the loss scale itself (as torch._fused_sgd_ takes it); the
//   kernels multiply by inv_scale(scale) = float(1/double(scale)) (sgd_math.h),
//   like torch's unscale, times the accumulation factor 1/K.
// * steps[i] counts the real updates of params[i] (float32 0-dim, on its
//   device): 0 means the momentum buffer has never been written, so the next
//   real update sets b = g. It is advanced only when the update happens, so a
//   step skipped on inf/NaN leaves momentum uninitialised, as torch's default
//   SGD path does. (torch 2.13's SGD(fused=True) does not: it fills the
//   buffers with empty_like before its kernel returns on found_inf, then uses
//   that memory as b on the next step; see README "Skipped steps" and
//   test_skipped_first_step_momentum_torch_fused_vs_ours in
//   tests/test_grad_scaler_parity.py.)
#include <torch/library.h>

#include <Python.h>

#include <string>

#include "cpu/kernels.h"

extern "C" {
// The .so is imported as torch_fastaccum._C only to run the static
// TORCH_LIBRARY initialisers below; it defines no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastaccum, m) {
  // Read-only pass: found_inf <- 1 if any grad element is inf/NaN;
  // sumsq += sum(g^2) over every grad (float32 0-dim), when given.
  m.def(
      "nonfinite_check_(Tensor[] grads, Tensor(a!) found_inf, "
      "Tensor(b!)? sumsq=None) -> ()");
  // In-place unscale: g <- g * float(1/scale) * factor, with the same check.
  m.def(
      "unscale_check_(Tensor(a!)[] grads, Tensor(b!) found_inf, "
      "Tensor grad_scale, *, float factor=1.0, Tensor(c!)? sumsq=None) -> ()");
  // NOTE: [norm check]
  // Read-only pass for a fused clip_grad_norm_: x = g * mul, where mul is
  // inv_scale(grad_scale) * factor (factor alone without grad_scale), x
  // rounded to the grads' dtype (what .grad holds after an unscale);
  // found_inf <- 1 if some x is inf/NaN; norm_out (float32, float64 for
  // float64 grads) <- sum(x^2) for norm_type 2, max|x| for inf (NaN if an x
  // is NaN), over the whole list; 0 for an empty list. Deterministic: the
  // same bits on every run (per-chunk partials combined in a fixed order, no
  // float atomics).
  m.def(
      "norm_check_(Tensor[] grads, Tensor(a!) found_inf, Tensor(b!) norm_out, "
      "*, float norm_type=2.0, Tensor? grad_scale=None, float factor=1.0) -> ()");
  // The fused SGD update (see sgd_math.h). Returns without touching params,
  // buffers or steps when found_inf is set. momentum_buffers and steps are
  // empty when momentum == 0. lr_tensor, when given, overrides lr. With
  // write_grads, every grad is left as g * grad_mul (the unscaled grad the
  // update used; also on a skipped step, as torch's GradScaler leaves it).
  // clip_coef (float32, one element, on the params' device or the CPU)
  // multiplies the unscaled grad once more, as a separate rounding: the
  // clipped grad of a fused clip_grad_norm_, also what write_grads leaves.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor(d!)[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, *, float lr, "
      "Tensor? lr_tensor=None, float weight_decay, float momentum, "
      "float dampening, bool nesterov, bool maximize, float grad_factor=1.0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool write_grads=False, Tensor? clip_coef=None) -> ()");
  // Which CPU kernel build runs here ("default" or "avx2"), for benchmarks
  // and tests; FASTACCUM_CPU_CAPABILITY overrides the choice.
  m.def("_cpu_capability() -> str",
        []() { return std::string(fastaccum::cpu::kernels().name); });
  // Debug: the CUDA launch plan (csrc/launch_plan.h), flat-encoded; impl and encoding in csrc/launch_plan_debug.cpp.
  m.def("_launch_plan(int[] numels, int depth, int chunk_size=0, int max_blocks=0, int max_tensors=0, int arg_bytes=4096) -> int[]");
  // Debug: the CUDA launches of one call of each pass, and the device-table
  // cache's counters; csrc/launch_info.cpp.
  m.def("_cuda_launch_count(int[] numels, bool momentum=True, bool by_value=False, int arg_bytes=32764) -> int[]");
  m.def("_cuda_table_stats(bool clear=False) -> int[]");
}
