// Sequential references for the emulator tests, built from csrc/sgd_math.h:
// what every element of a fused SGD call and of a check call must end up as,
// the exact float sum each check block must add to sumsq, and each partial
// and the result of a norm pass.
#pragma once

#include <cstdint>
#include <vector>

#include "../../csrc/cuda/chunk_loop.cuh"
#include "../../csrc/cuda/multi_tensor_apply.cuh"
#include "../../csrc/cuda/opmath.h"
#include "../../csrc/sgd_math.h"

namespace emutest {

using fastaccum::SgdHyper;
using fastaccum::cuda::opmath_t;

// The hyper-parameters of one fused_sgd_ call in the math type, as the
// op contract defines them: grad_mul = factor * float(1/double(scale)).
// `clip` is the coefficient as a double (a device float widened); a
// coefficient of exactly 1 is no clip.
template <typename T>
SgdHyper<opmath_t<T>> sgd_hyper(double lr, double weight_decay, double momentum,
                                double dampening, bool nesterov, bool maximize,
                                double factor, const float* scale, bool clip_grad = false,
                                double clip = 1.0) {
  using op_t = opmath_t<T>;
  double grad_mul = factor;
  if (scale != nullptr) grad_mul *= fastaccum::inv_scale(*scale);
  return {static_cast<op_t>(lr),
          static_cast<op_t>(weight_decay),
          static_cast<op_t>(momentum),
          static_cast<op_t>(1.0 - dampening),
          static_cast<op_t>(grad_mul),
          nesterov,
          maximize,
          momentum != 0.0,
          grad_mul != 1.0,
          static_cast<op_t>(clip),
          clip_grad && clip != 1.0};
}

// Elements [begin, end) of one tensor, one at a time: p, g, b as stored
// before the call; on return p (and b with momentum) as they must be after,
// and g too when the call writes the grads back. `first` is the tensor's step
// counter being 0: b is then not read. `skipped`: found_inf was set.
template <typename T>
void sgd_reference(T* p, T* g, T* b, int64_t begin, int64_t end, bool first,
                   const SgdHyper<opmath_t<T>>& h, bool write_grad, bool skipped) {
  using op_t = opmath_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    // Unscaled, then clipped: two roundings in opmath, as torch unscales
    // the grads before clip_grad_norm_ scales them.
    op_t gi = static_cast<op_t>(g[i]);
    if (h.scale_grad) gi = gi * h.grad_mul;
    if (h.clip_grad) gi = gi * h.clip;
    if (write_grad && (h.scale_grad || h.clip_grad)) g[i] = static_cast<T>(gi);
    if (skipped) continue;
    op_t buf = (h.has_momentum && !first) ? static_cast<op_t>(b[i]) : op_t(0);
    const op_t out = fastaccum::sgd_math<op_t, op_t>(static_cast<op_t>(p[i]), gi, buf, first, h);
    p[i] = static_cast<T>(out);
    if (h.has_momentum) b[i] = static_cast<T>(buf);
  }
}

// The unscale multiplier of a check or norm call, as the kernels form it in
// double before the one conversion to the math type.
inline double unscale_mul(double factor, const float* scale) {
  return scale != nullptr ? fastaccum::inv_scale(*scale) * factor : factor;
}

template <typename T>
opmath_t<T> check_mul(double factor, const float* scale) {
  return static_cast<opmath_t<T>>(unscale_mul(factor, scale));
}

// Calls visit(thread, i) for each element i of a chunk of n, in the order
// NOTE: [chunk loop] gives each thread its elements: packs of `vector_bytes`
// (vector_bytes() of the device address: 16, 8, or 0 for none) dealt
// round-robin, then the strided tail.
template <typename T, typename Visit>
void chunk_order(int64_t n, int vector_bytes, Visit&& visit) {
  using fastaccum::cuda::kBlockSize;
  int64_t done = 0;
  if (vector_bytes > 0) {
    const int64_t vec = vector_bytes / static_cast<int64_t>(sizeof(T));
    const int64_t packs = n / vec;
    for (int64_t v = 0; v < packs; ++v)
      for (int64_t e = 0; e < vec; ++e) visit(static_cast<int>(v % kBlockSize), v * vec + e);
    done = packs * vec;
  }
  for (int64_t base = done; base < n; base += int64_t{kBlockSize} * fastaccum::cuda::kIlp)
    for (int k = 0; k < fastaccum::cuda::kIlp; ++k)
      for (int t = 0; t < kBlockSize; ++t) {
        const int64_t i = base + int64_t{k} * kBlockSize + t;
        if (i < n) visit(t, i);
      }
}

// The fixed tree of NOTE: [block sum] over one value per thread of a block
// of kBlockSize, with `combine` for + (block_max: max_nan): a shuffle-down
// tree per warp, then one over the warp results, padded with zeros.
template <typename V, typename Combine>
V block_tree(const std::vector<V>& per_thread, Combine combine) {
  // Lane l combines lane l + o, or itself past 31.
  auto warp_tree = [&](V (&v)[32]) {
    for (int o = 16; o > 0; o >>= 1) {
      V next[32];
      for (int l = 0; l < 32; ++l) next[l] = combine(v[l], l + o < 32 ? v[l + o] : v[l]);
      for (int l = 0; l < 32; ++l) v[l] = next[l];
    }
    return v[0];
  };
  constexpr int kWarps = fastaccum::cuda::kBlockSize / 32;
  V warp_results[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    V v[32];
    for (int l = 0; l < 32; ++l) v[l] = per_thread[w * 32 + l];
    warp_results[w] = warp_tree(v);
  }
  V v[32];
  for (int l = 0; l < 32; ++l) v[l] = l < kWarps ? warp_results[l] : V(0);
  return warp_tree(v);
}

template <typename V>
V add(V a, V b) {
  return a + b;
}

// The NaN-propagating max of NOTE: [norm check]: a NaN operand wins.
template <typename V>
V max_nan(V m, V x) {
  return (x > m || x != x) ? x : m;
}

// What one check block over the values x[0, n) adds to sumsq, in the
// kernel's order of additions (chunk_order, then block_tree). Also tells
// whether a (multiplied) element is not finite.
template <typename T>
struct BlockCheck {
  float sumsq;
  bool nonfinite;
};

template <typename T>
BlockCheck<T> check_block_reference(const T* x, int64_t n, int vector_bytes, opmath_t<T> mul,
                                    bool multiply) {
  using op_t = opmath_t<T>;
  std::vector<op_t> sum(fastaccum::cuda::kBlockSize, op_t(0));
  bool nonfinite = false;
  chunk_order<T>(n, vector_bytes, [&](int thread, int64_t i) {
    op_t v = static_cast<op_t>(x[i]);
    if (multiply) v = v * mul;
    if (fastaccum::is_nan(v * op_t(0))) nonfinite = true;
    sum[thread] = sum[thread] + v * v;
  });
  return {static_cast<float>(block_tree(sum, add<op_t>)), nonfinite};
}

// The partial one norm block writes for the values x[0, n): x = g * mul
// rounded to T (only when mul != 1), then per thread sum x^2 or max |x| in
// chunk_order, then block_tree, widened to double.
struct NormBlock {
  double partial;
  bool nonfinite;
};

template <typename T>
NormBlock norm_block_reference(const T* x, int64_t n, int vector_bytes, double mul,
                               bool inf_norm) {
  using op_t = opmath_t<T>;
  std::vector<op_t> acc(fastaccum::cuda::kBlockSize, op_t(0));
  bool nonfinite = false;
  chunk_order<T>(n, vector_bytes, [&](int thread, int64_t i) {
    op_t v = static_cast<op_t>(x[i]);
    if (mul != 1.0) v = static_cast<op_t>(static_cast<T>(v * static_cast<op_t>(mul)));
    if (fastaccum::is_nan(v * op_t(0))) nonfinite = true;
    acc[thread] = inf_norm ? max_nan(acc[thread], v < op_t(0) ? op_t(0) - v : v)
                           : acc[thread] + v * v;
  });
  const op_t total = inf_norm ? block_tree(acc, max_nan<op_t>) : block_tree(acc, add<op_t>);
  return {static_cast<double>(total), nonfinite};
}

// The finishing block's result over all partials: thread t combines
// partials t, t + kBlockSize, ... in order, in double, then block_tree.
inline double norm_finish_reference(const std::vector<double>& partials, bool inf_norm) {
  using fastaccum::cuda::kBlockSize;
  std::vector<double> acc(kBlockSize, 0.0);
  for (size_t i = 0; i < partials.size(); ++i) {
    double& a = acc[i % kBlockSize];
    a = inf_norm ? max_nan(a, partials[i]) : a + partials[i];
  }
  return inf_norm ? block_tree(acc, max_nan<double>) : block_tree(acc, add<double>);
}

}  // namespace emutest
