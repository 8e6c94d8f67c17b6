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
