// Chunk kernels, included once per CPU capability. The including file sets
// CPU_CAPABILITY (and the target ISA) before including this, so everything
// below lands in fastaccum::cpu::<CPU_CAPABILITY> and at::vec::<CPU_CAPABILITY>
// and no symbol is shared between capability builds.
//
// NOTE: [capability builds]
// Include only baseline-safe headers before the target pragma of the
// including file: ATen's vec headers must be seen first under that pragma, or
// their include guards would freeze the generic (slow) Vectorized in place.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

#include "../sgd_math.h"
#include "kernels.h"

namespace fastaccum::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, c10::Half> ||
                              std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t>
using opmath_t = std::conditional_t<is_reduced_v<scalar_t>, float, scalar_t>;

// One SIMD tile in the math type: float/double as stored, half/bfloat16
// widened to two float vectors (float32 math for half types).
template <typename scalar_t>
struct Tile {
  using Vec = at::vec::Vectorized<opmath_t<scalar_t>>;
  static constexpr int64_t size() {
    return at::vec::Vectorized<scalar_t>::size();
  }
  static constexpr int kParts = is_reduced_v<scalar_t> ? 2 : 1;
  Vec v[kParts];

  static Tile zeros() {
    Tile t;
    for (int k = 0; k < kParts; ++k) t.v[k] = Vec(opmath_t<scalar_t>(0));
    return t;
  }

  static Tile load(const scalar_t* p) {
    Tile t;
    if constexpr (is_reduced_v<scalar_t>) {
      auto w = at::vec::convert_to_float<scalar_t>(
          at::vec::Vectorized<scalar_t>::loadu(p));
      t.v[0] = std::get<0>(w);
      t.v[1] = std::get<1>(w);
    } else {
      t.v[0] = Vec::loadu(p);
    }
    return t;
  }
  void store(scalar_t* p) const {
    if constexpr (is_reduced_v<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

// Probe and squares accumulate lane-wise and reduce once per chunk; the
// multiply (unscale) happens before both, as torch checks unscaled values.
template <typename scalar_t>
ChunkResult check_chunk(void* data, int64_t n, double mul_d, bool write,
                        bool want_sumsq) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using op_t = opmath_t<scalar_t>;
  auto* g = static_cast<scalar_t*>(data);
  const op_t mul = static_cast<op_t>(mul_d);
  Vec probe(op_t(0)), sq(op_t(0));
  int64_t i = 0;
  for (; i + T::size() <= n; i += T::size()) {
    T t = T::load(g + i);
    for (int k = 0; k < T::kParts; ++k) {
      if (write) t.v[k] = t.v[k] * Vec(mul);
      probe = probe + nonfinite_probe(t.v[k]);
      if (want_sumsq) sq = sq + t.v[k] * t.v[k];
    }
    if (write) t.store(g + i);
  }
  ChunkResult r;
  op_t lanes[Vec::size()];
  probe.store(lanes);
  op_t probe_s = op_t(0);
  for (int k = 0; k < Vec::size(); ++k) probe_s += lanes[k];
  sq.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) r.sumsq += static_cast<double>(lanes[k]);
  for (; i < n; ++i) {
    op_t x = static_cast<op_t>(g[i]);
    if (write) {
      x = x * mul;
      g[i] = static_cast<scalar_t>(x);
    }
    probe_s += nonfinite_probe(x);
    if (want_sumsq) r.sumsq += static_cast<double>(x) * static_cast<double>(x);
  }
  r.nonfinite = std::isnan(static_cast<double>(probe_s));
  return r;
}

// x = g * mul rounded to the storage type (what .grad would hold after an
// unscale), then the square sum or the max |x| of the chunk. Lanes reduce in
// a fixed order, so a chunk's result depends only on its data: the norm is
// the same on every run and at any thread count.
template <typename scalar_t>
NormChunk norm_chunk(const void* data, int64_t n, double mul_d, bool inf_norm) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using op_t = opmath_t<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(data);
  const bool scale = mul_d != 1.0;
  const op_t mul = static_cast<op_t>(mul_d);
  Vec probe(op_t(0)), acc(op_t(0));
  const Vec vmul(mul);
  NormChunk r;
  op_t lanes[Vec::size()];
  // Squares gather in opmath lanes for at most kFlush vectors, then move to
  // a double: long float sums of squares (all of one sign) lose bits.
  constexpr int kFlush = 64;
  int pending = 0;
  auto flush = [&] {
    acc.store(lanes);
    for (int k = 0; k < Vec::size(); ++k) {
      const double v = static_cast<double>(lanes[k]);
      r.value = inf_norm ? max_nan(r.value, v) : r.value + v;
    }
    acc = Vec(op_t(0));
    pending = 0;
  };
  auto add = [&](const Vec& x) {
    probe = probe + nonfinite_probe(x);
    acc = inf_norm ? at::vec::maximum(acc, x.abs()) : acc + x * x;
    if (++pending == kFlush) flush();
  };
  int64_t i = 0;
  if constexpr (!is_reduced_v<scalar_t>) {
    // Plain vectors, not the Tile aggregate: with the multiply in the loop
    // GCC 12 kept the Tile in memory and ran at half the bandwidth.
    if (scale) {
      for (; i + Vec::size() <= n; i += Vec::size()) add(Vec::loadu(g + i) * vmul);
    } else {
      for (; i + Vec::size() <= n; i += Vec::size()) add(Vec::loadu(g + i));
    }
  } else {
    for (; i + T::size() <= n; i += T::size()) {
      T t = T::load(g + i);
      if (scale) {
        for (int k = 0; k < T::kParts; ++k) t.v[k] = t.v[k] * vmul;
        scalar_t rounded[T::size()];
        t.store(rounded);
        t = T::load(rounded);
      }
      for (int k = 0; k < T::kParts; ++k) add(t.v[k]);
    }
  }
  flush();
  probe.store(lanes);
  op_t probe_s = op_t(0);
  for (int k = 0; k < Vec::size(); ++k) probe_s += lanes[k];
  for (; i < n; ++i) {
    op_t x = static_cast<op_t>(g[i]);
    if (scale) x = static_cast<op_t>(static_cast<scalar_t>(x * mul));
    probe_s += nonfinite_probe(x);
    const double v = static_cast<double>(x);
    r.value = inf_norm ? max_nan(r.value, std::fabs(v)) : r.value + v * v;
  }
  r.nonfinite = std::isnan(static_cast<double>(probe_s));
  return r;
}

// The .grad a skipped step leaves: what the update would have used,
// unscaled_grad (grad_mul, then the clip, in opmath, one rounding), as the
// CUDA update's skip path and the taken step store it.
template <typename scalar_t>
void grad_chunk(void* g_, int64_t n, const SgdArgs& a) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using op_t = opmath_t<scalar_t>;
  auto* g = static_cast<scalar_t*>(g_);
  SgdHyper<op_t> h{};
  h.grad_mul = static_cast<op_t>(a.grad_mul);
  h.scale_grad = a.scale_grad;
  h.clip = static_cast<op_t>(a.clip);
  h.clip_grad = a.clip_grad;
  int64_t i = 0;
  for (; i + T::size() <= n; i += T::size()) {
    T t = T::load(g + i);
    for (int k = 0; k < T::kParts; ++k) t.v[k] = unscaled_grad<Vec, op_t>(t.v[k], h);
    t.store(g + i);
  }
  for (; i < n; ++i)
    g[i] = static_cast<scalar_t>(unscaled_grad<op_t, op_t>(static_cast<op_t>(g[i]), h));
}

template <typename scalar_t>
void sgd_chunk(void* p_, void* g_, void* b_, int64_t n, bool first,
               const SgdArgs& a) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using op_t = opmath_t<scalar_t>;
  auto* p = static_cast<scalar_t*>(p_);
  auto* g = static_cast<scalar_t*>(g_);
  auto* b = static_cast<scalar_t*>(b_);
  const SgdHyper<op_t> h{static_cast<op_t>(a.lr),
                         static_cast<op_t>(a.weight_decay),
                         static_cast<op_t>(a.momentum),
                         static_cast<op_t>(a.one_minus_dampening),
                         static_cast<op_t>(a.grad_mul),
                         a.nesterov,
                         a.maximize,
                         a.has_momentum,
                         a.scale_grad,
                         static_cast<op_t>(a.clip),
                         a.clip_grad};
  const bool read_b = h.has_momentum && !first;
  const bool write_g = a.write_grad;
  int64_t i = 0;
  if constexpr (!is_reduced_v<scalar_t>) {
    // Plain vectors, no Tile aggregate: GCC 12 crashes in early SRA on the
    // Tile form of this loop for float once it holds explicit FMAs.
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec vb = read_b ? Vec::loadu(b + i) : Vec(op_t(0));
      const Vec vg = unscaled_grad<Vec, op_t>(Vec::loadu(g + i), h);
      const Vec vp = sgd_math<Vec, op_t>(Vec::loadu(p + i), vg, vb, first, h);
      vp.store(p + i);
      if (h.has_momentum) vb.store(b + i);
      if (write_g) vg.store(g + i);
    }
  } else {
    for (; i + T::size() <= n; i += T::size()) {
      T tp = T::load(p + i);
      T tg = T::load(g + i);
      T tb = read_b ? T::load(b + i) : T::zeros();
      for (int k = 0; k < T::kParts; ++k) {
        tg.v[k] = unscaled_grad<Vec, op_t>(tg.v[k], h);
        tp.v[k] = sgd_math<Vec, op_t>(tp.v[k], tg.v[k], tb.v[k], first, h);
      }
      tp.store(p + i);
      if (h.has_momentum) tb.store(b + i);
      if (write_g) tg.store(g + i);
    }
  }
  for (; i < n; ++i) {
    op_t bi = read_b ? static_cast<op_t>(b[i]) : op_t(0);
    const op_t gi = unscaled_grad<op_t, op_t>(static_cast<op_t>(g[i]), h);
    const op_t pi =
        sgd_math<op_t, op_t>(static_cast<op_t>(p[i]), gi, bi, first, h);
    p[i] = static_cast<scalar_t>(pi);
    if (h.has_momentum) b[i] = static_cast<scalar_t>(bi);
    if (write_g) g[i] = static_cast<scalar_t>(gi);
  }
}

}  // namespace

inline KernelTable make_table(const char* name) {
  return KernelTable{
      name,
      {&check_chunk<float>, &check_chunk<double>, &check_chunk<c10::Half>,
       &check_chunk<c10::BFloat16>},
      {&norm_chunk<float>, &norm_chunk<double>, &norm_chunk<c10::Half>,
       &norm_chunk<c10::BFloat16>},
      {&grad_chunk<float>, &grad_chunk<double>, &grad_chunk<c10::Half>,
       &grad_chunk<c10::BFloat16>},
      {&sgd_chunk<float>, &sgd_chunk<double>, &sgd_chunk<c10::Half>,
       &sgd_chunk<c10::BFloat16>}};
}

}  // namespace CPU_CAPABILITY
}  // namespace fastaccum::cpu
