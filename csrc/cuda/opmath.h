// Element types of the CUDA kernels and the type their math runs in: float
// for half and bfloat16 (as at::opmath_type), the type itself otherwise.
// c10's half types are header-only, so the emulator build uses the very same
// conversions as the extension's host code.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace fastaccum::cuda {

template <typename scalar_t>
inline constexpr bool is_half_type_v = std::is_same_v<scalar_t, c10::Half> ||
                                       std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t>
using opmath_t = std::conditional_t<is_half_type_v<scalar_t>, float, scalar_t>;

}  // namespace fastaccum::cuda
