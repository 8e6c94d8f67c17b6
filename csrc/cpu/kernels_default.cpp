// Baseline-ISA build of the CPU chunk kernels (see NOTE: [capability builds]),
// and the run-time choice between capability builds.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace fastaccum::cpu {

const KernelTable& default_kernels() {
  static const KernelTable table = DEFAULT::make_table("default");
  return table;
}

namespace {
bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable& choose() {
  const char* env = std::getenv("FASTACCUM_CPU_CAPABILITY");
  const std::string want = env ? env : "";
  const KernelTable* avx2 = avx2_kernels();
  if (want == "default") return default_kernels();
  if (want == "avx2") {
    if (avx2 == nullptr || !cpu_has_avx2())
      throw std::runtime_error(
          "FASTACCUM_CPU_CAPABILITY=avx2 but this build or CPU has no AVX2");
    return *avx2;
  }
  if (!want.empty())
    throw std::runtime_error("FASTACCUM_CPU_CAPABILITY must be 'default' or "
                             "'avx2', got '" + want + "'");
  return (avx2 != nullptr && cpu_has_avx2()) ? *avx2 : default_kernels();
}
}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace fastaccum::cpu
