// The CPU kernel table: the chunk kernels of every op, compiled once per CPU
// capability (kernels_default.cpp, kernels_avx2.cpp) and picked at run time,
// as torch's DispatchStub does. The ops (csrc/cpu/*_cpu.cpp) stay baseline C++
// and only call through this table.
#pragma once

#include <cstdint>

namespace fastaccum::cpu {

// Result of one chunk of a check pass.
struct ChunkResult {
  bool nonfinite = false;
  double sumsq = 0.0;
};

// Result of one chunk of a norm pass: the inf/NaN flag, and the sum of x^2
// (norm_type 2) or the largest |x| (inf, NaN if any x is NaN).
struct NormChunk {
  bool nonfinite = false;
  double value = 0.0;
};

// Hyper-parameters of a fused SGD call in double; each kernel converts them
// to its math type once.
struct SgdArgs {
  double lr, weight_decay, momentum, one_minus_dampening, grad_mul;
  bool nesterov, maximize, has_momentum, scale_grad;
  bool write_grad;  // store the unscaled grad back into g
  double clip = 1.0;  // clip coefficient, applied after grad_mul
  bool clip_grad = false;
};

// Storage dtypes, in table order.
enum DtypeIndex { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kNumDtypes = 4 };

struct KernelTable {
  const char* name;
  // Flags/sums n elements of g; with `write`, first multiplies them by `mul`.
  ChunkResult (*check[kNumDtypes])(void* g, int64_t n, double mul, bool write,
                                   bool want_sumsq);
  // The norm partial of n elements of x = g * mul (mul == 1: g itself),
  // x rounded to the storage type first (what .grad would hold); read-only.
  NormChunk (*norm[kNumDtypes])(const void* g, int64_t n, double mul,
                                bool inf_norm);
  // The grad a skipped update leaves (unscaled_grad of SgdArgs), in place.
  void (*grad[kNumDtypes])(void* g, int64_t n, const SgdArgs& a);
  // One fused SGD update of n elements; b may be null without momentum. g is
  // written only with SgdArgs::write_grad.
  void (*sgd[kNumDtypes])(void* p, void* g, void* b, int64_t n,
                          bool first, const SgdArgs& a);
};

const KernelTable& default_kernels();
const KernelTable* avx2_kernels();  // null where not compiled (non-x86)

// The best table this CPU runs, or the one FASTACCUM_CPU_CAPABILITY names
// ("default" or "avx2"), chosen once per process.
const KernelTable& kernels();

}  // namespace fastaccum::cpu
