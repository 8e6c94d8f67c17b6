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
//
// NOTE: [rounding like torch]
// torch's SGD is a chain of tensor ops, and every `x.add_(y, alpha=a)` is one
// fused multiply-add, round(x + a*y), in its vectorised CPU and its CUDA
// kernels, while `x.mul_(a)` rounds on its own. The math below makes exactly
// those roundings, with explicit fmadd calls (no reliance on the compiler's
// contraction choices): momentum is round(round(b*mu) + (1-tau)*g), not
// round(mu*b + (1-tau)*g). With a power-of-two K and loss scale, grad_mul is
// exact, and fp32 parameters then match torch's default path bit for bit.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTACCUM_HD __host__ __device__ __forceinline__
#else
// static: each CPU capability build (csrc/cpu/kernels_*.cpp) keeps its own
// copy, so the linker can never hand AVX2 code to the baseline path.
#define FASTACCUM_HD static inline
#endif

namespace fastaccum {

// a*b + c with one rounding. Scalars here; at::vec::Vectorized gets
// at::vec::fmadd through argument-dependent lookup.
FASTACCUM_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__GNUC__)
  return __builtin_fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FASTACCUM_HD double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#elif defined(__GNUC__)
  return __builtin_fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

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
  // The clip coefficient of a fused clip_grad_norm_, applied after grad_mul
  // as its own rounding, as torch clips the already unscaled grads.
  opmath_t clip = opmath_t(1);
  bool clip_grad = false;
};

// The gradient SGD sees: the stored (accumulated, scaled) one times grad_mul,
// then times the clip coefficient when clipping.
// It is also what the reference loop leaves in .grad after its step (the
// unscaled mean), so the kernels write it back when asked to.
template <typename V, typename opmath_t>
FASTACCUM_HD V unscaled_grad(V g, const SgdHyper<opmath_t>& h) {
  if (h.scale_grad) g = g * V(h.grad_mul);
  return h.clip_grad ? g * V(h.clip) : g;
}

// One SGD update of a register tile, from g = unscaled_grad(stored grad).
// `b` is read unless `first`, and written whenever the hyper-parameters have
// momentum.
template <typename V, typename opmath_t>
FASTACCUM_HD V sgd_math(V p, V g, V& b, bool first, const SgdHyper<opmath_t>& h) {
  if (h.maximize) g = V(opmath_t(0)) - g;
  // torch: grad.add(param, alpha=wd)
  if (h.weight_decay != opmath_t(0)) g = fmadd(p, V(h.weight_decay), g);
  if (h.has_momentum) {
    if (first) {
      b = g;  // torch: grad.clone()
    } else {
      // torch: buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      b = fmadd(g, V(h.one_minus_dampening), b * V(h.momentum));
    }
    if (h.nesterov) {
      g = fmadd(b, V(h.momentum), g);  // torch: grad.add(buf, alpha=momentum)
    } else {
      g = b;
    }
  }
  return fmadd(g, V(opmath_t(0) - h.lr), p);  // torch: param.add_(grad, alpha=-lr)
}

// The unscale factor of a loss scale, as torch's GradScaler.unscale_ forms
// it: float(1 / double(scale)), widened back to double so that callers can
// fold 1/K into it before the one conversion to the math type. Every kernel,
// host side (a CPU scale) and device side (a device scale), takes it from
// here; the Python layer has no copy (its sparse path calls unscale_check_).
FASTACCUM_HD double inv_scale(float scale) {
  return static_cast<double>(static_cast<float>(1.0 / static_cast<double>(scale)));
}

// x * 0 is 0 for every finite x and NaN for +-inf and NaN, so a running sum of
// it is NaN iff some element was not finite; branch-free and vectorisable.
template <typename V>
FASTACCUM_HD V nonfinite_probe(V x) {
  return x * V(0);
}

// Max that propagates NaN (a NaN anywhere gives NaN), as torch's max
// norm; scalars, for the norm pass of every backend.
template <typename T>
FASTACCUM_HD T max_nan(T m, T x) {
  return (x > m || x != x) ? x : m;
}

// NaN test for scalars that needs neither <cmath>'s nor CUDA's isnan, so the
// kernel headers read the same under nvcc and a host compiler.
template <typename T>
FASTACCUM_HD bool is_nan(T x) {
  return x != x;
}

}  // namespace fastaccum
