// The torch side of NOTE: [launch modes] (multi_tensor_apply.cuh): which
// mode a call launches in, and where its device tables live. Host code of
// the *_cuda.cu files only.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace fastaccum::cuda {

// How a call on `device` and `stream` launches (NOTE: [launch modes]): with
// tables from the process-wide cache (NOTE: [table cache]) of this device and
// stream, in caching-allocator memory, uploaded from pinned host memory
// without a host sync; by value while `stream` captures a CUDA graph or with
// FASTACCUM_CUDA_LAUNCH=by_value, with the largest budget this build and the
// device support. The object must outlive the call's launches.
class TorchTableSource final : public TableSource {
 public:
  TorchTableSource(c10::Device device, cudaStream_t stream)
      : device_(device), stream_(stream) {}
  void* table(int kind, size_t count, uint64_t anchor,
              const std::vector<uint8_t>& content, size_t total) override;
  LaunchMode launch_mode();

 private:
  c10::Device device_;
  cudaStream_t stream_;
};

}  // namespace fastaccum::cuda
