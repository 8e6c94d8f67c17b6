// AVX2+FMA+F16C build of the CPU chunk kernels (see NOTE: [capability
// builds]). The ISA is enabled for this file only, by pragma, so the wheel
// stays runnable on any x86-64 CPU: kernels() picks this table only where
// the CPU reports the features.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "kernels.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the ISA but not the feature macros that headers test
// (sleef.h declares its 8-wide functions only under __AVX2__). Nothing above
// this line includes such a header, so defining them here is consistent.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#pragma GCC pop_options

namespace fastaccum::cpu {
const KernelTable* avx2_kernels() {
  static const KernelTable table = AVX2::make_table("avx2");
  return &table;
}
}  // namespace fastaccum::cpu
#else
namespace fastaccum::cpu {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace fastaccum::cpu
#endif
