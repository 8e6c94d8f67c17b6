// kernel<<<blocks, threads, 0, stream>>>(args...) for the kernel headers: a
// real launch plus torch's launch check under nvcc, the emulator's launch on
// a host compiler, so the launcher above it is the same code in both.
#pragma once

#include <utility>

#include "cuda_or_emulator.h"

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#endif

namespace fastaccum::cuda {

template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), unsigned blocks,
                          unsigned threads, cudaStream_t stream,
                          Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  ::fastaccum::emu::launch(dim3(blocks), dim3(threads), stream, kernel,
                           std::forward<Args>(args)...);
#endif
}

}  // namespace fastaccum::cuda
