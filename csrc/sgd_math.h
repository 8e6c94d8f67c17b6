// The per-element math of torch_fastaccum, written once for every backend.
//
// NOTE: [one math, two backends]
// The same templates run with V = float/double (CUDA, and the CPU scalar tail)
// and with V = at::vec::Vectorized<float/double> (the CPU vector loop). They
// only use +, -, * and construction from a scalar, which both provide, so the
// CPU and CUDA kernels cannot drift apart in the order of operations, which is
// torch.optim.SGD's:
//   g = -g if maximize;  g = g + wd*p;
//   b = g on the first real update, else b = momentum*b + (1-dampening)*g;
//   g = g + momentum*b if nesterov else g = b;   p = p - lr*g.
// Unscaling (1/loss_scale) and accumulation averaging (1/K) are folded into a
// single multiplier applied to g before everything else.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTACCUM_HD __host__ __device__ __forceinline__
#else
// static: each CPU capability build (csrc/cpu/kernels_*.cpp) keeps its own
// copy, so the linker can never hand AVX2 code to the baseline path.
#define FASTACCUM_HD static inline
#endif

namespace fastaccum {

// Hyper-parameters of one fused SGD call, already in the math type.
template <typename opmath_t>
struct SgdHyper {
  opmath_t lr;
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t grad_mul;  // inv_scale * grad_factor; 1 when nothing to fold
  bool nesterov;
  bool maximize;
  bool has_momentum;
  bool scale_grad;  // grad_mul != 1: skip the multiply otherwise (exact parity)
};

// One SGD update of a register tile. `b` is read unless `first`, and written
// whenever the hyper-parameters have momentum.
template <typename V, typename opmath_t>
FASTACCUM_HD V sgd_math(V p, V g, V& b, bool first, const SgdHyper<opmath_t>& h) {
  if (h.scale_grad) g = g * V(h.grad_mul);
  if (h.maximize) g = V(opmath_t(0)) - g;
  if (h.weight_decay != opmath_t(0)) g = g + V(h.weight_decay) * p;
  if (h.has_momentum) {
    if (first) {
      b = g;
    } else {
      b = V(h.momentum) * b + V(h.one_minus_dampening) * g;
    }
    if (h.nesterov) {
      g = g + V(h.momentum) * b;
    } else {
      g = b;
    }
  }
  return p - V(h.lr) * g;
}

// x * 0 is 0 for every finite x and NaN for +-inf and NaN, so a running sum of
// it is NaN iff some element was not finite; branch-free and vectorisable.
template <typename V>
FASTACCUM_HD V nonfinite_probe(V x) {
  return x * V(0);
}

}  // namespace fastaccum
