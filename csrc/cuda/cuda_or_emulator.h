// The one include that gives the kernel headers (csrc/cuda/*.cuh) their CUDA
// vocabulary: the real runtime under nvcc, the host emulator otherwise (see
// NOTE: [emulator model] in csrc/emulator/cuda_emulator.h). Kernel headers
// include nothing else of CUDA or of torch, beyond c10's half types.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include "../emulator/cuda_emulator.h"
#endif

// A kernel parameter that every thread reads and none writes, such as a
// by-value metadata table: __grid_constant__ on the GPU (one copy in the
// constant bank); a reference to the one copy the emulator made at launch
// (a 32 KB table copied onto every fiber's stack would not fit it).
#if defined(__CUDACC__)
#define FASTACCUM_GRID_PARAM(T) const __grid_constant__ T
#else
#define FASTACCUM_GRID_PARAM(T) const T&
#endif
