// Sequential references for the emulator tests, built from csrc/sgd_math.h:
// what every element of a fused SGD call and of a check call must end up as,
// and the exact float sum each check block must add to sumsq.
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
template <typename T>
SgdHyper<opmath_t<T>> sgd_hyper(double lr, double weight_decay, double momentum,
                                double dampening, bool nesterov, bool maximize,
                                double factor, const float* scale) {
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
          grad_mul != 1.0};
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
    const op_t gi = fastaccum::unscaled_grad<op_t, op_t>(static_cast<op_t>(g[i]), h);
    if (write_grad && h.scale_grad) g[i] = static_cast<T>(gi);
    if (skipped) continue;
    op_t buf = (h.has_momentum && !first) ? static_cast<op_t>(b[i]) : op_t(0);
    const op_t out = fastaccum::sgd_math<op_t, op_t>(static_cast<op_t>(p[i]), gi, buf, first, h);
    p[i] = static_cast<T>(out);
    if (h.has_momentum) b[i] = static_cast<T>(buf);
  }
}

// The unscale multiplier of a check call in the math type.
template <typename T>
opmath_t<T> check_mul(double factor, const float* scale) {
  double m = factor;
  if (scale != nullptr) m = fastaccum::inv_scale(*scale) * factor;
  return static_cast<opmath_t<T>>(m);
}

// What one check block over the values x[0, n) adds to sumsq, in the
// kernel's order of additions: each thread sums its elements in the order
// NOTE: [chunk loop] gives them (16-byte packs when the device address is
// 16-byte aligned, `vector_path`, then the strided tail), then the fixed tree
// of NOTE: [block sum]. Also tells whether a (multiplied) element is not
// finite.
template <typename T>
struct BlockCheck {
  float sumsq;
  bool nonfinite;
};

template <typename T>
BlockCheck<T> check_block_reference(const T* x, int64_t n, bool vector_path, opmath_t<T> mul,
                                    bool multiply) {
  using op_t = opmath_t<T>;
  using fastaccum::cuda::kBlockSize;
  constexpr int kVec = fastaccum::cuda::kVecBytes / static_cast<int>(sizeof(T));
  std::vector<op_t> sum(kBlockSize, op_t(0));
  bool nonfinite = false;
  auto add = [&](int thread, T stored) {
    op_t v = static_cast<op_t>(stored);
    if (multiply) v = v * mul;
    if (fastaccum::is_nan(v * op_t(0))) nonfinite = true;
    sum[thread] = sum[thread] + v * v;
  };
  int64_t done = 0;
  if (vector_path) {
    const int64_t packs = n / kVec;
    for (int64_t v = 0; v < packs; ++v)
      for (int e = 0; e < kVec; ++e) add(static_cast<int>(v % kBlockSize), x[v * kVec + e]);
    done = packs * kVec;
  }
  for (int64_t base = done; base < n; base += int64_t{kBlockSize} * fastaccum::cuda::kIlp)
    for (int k = 0; k < fastaccum::cuda::kIlp; ++k)
      for (int t = 0; t < kBlockSize; ++t) {
        const int64_t i = base + int64_t{k} * kBlockSize + t;
        if (i < n) add(t, x[i]);
      }
  // A warp's shuffle-down tree: lane l adds lane l + o, or itself past 31.
  auto warp_tree = [](op_t (&v)[32]) {
    for (int o = 16; o > 0; o >>= 1) {
      op_t next[32];
      for (int l = 0; l < 32; ++l) next[l] = v[l] + (l + o < 32 ? v[l + o] : v[l]);
      for (int l = 0; l < 32; ++l) v[l] = next[l];
    }
    return v[0];
  };
  constexpr int kWarps = kBlockSize / 32;
  op_t warp_sums[32];
  for (int w = 0; w < kWarps; ++w) {
    op_t v[32];
    for (int l = 0; l < 32; ++l) v[l] = sum[w * 32 + l];
    warp_sums[w] = warp_tree(v);
  }
  op_t v[32];
  for (int l = 0; l < 32; ++l) v[l] = l < kWarps ? warp_sums[l] : op_t(0);
  return {static_cast<float>(warp_tree(v)), nonfinite};
}

}  // namespace emutest
