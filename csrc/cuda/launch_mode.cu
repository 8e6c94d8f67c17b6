// Launch-mode choice and the device-table cache of the CUDA ops (see
// launch_mode.h). Host code only.
#include "launch_mode.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "../launch_table_stats.h"

namespace fastaccum::cuda {
namespace {

struct DeviceBuffer {
  at::Tensor t;
  void* data() const { return t.data_ptr(); }
  size_t bytes() const { return static_cast<size_t>(t.numel()); }
};

// Allocates on the current stream of the call (the caching allocator ties
// the block to it) and uploads through a pinned staging block: torch's
// non-blocking copy records an event on it, so the host allocator reuses it
// only after the copy ran, with no sync here. Outside inference mode, even
// when a step runs in it: a buffer made there would be an inference tensor,
// which a later step outside could not copy into.
struct TorchBackend {
  c10::Device device;
  DeviceBuffer alloc(size_t bytes) const {
    const c10::InferenceMode not_inference(false);
    return {at::empty({static_cast<int64_t>(bytes)},
                      at::TensorOptions().dtype(at::kByte).device(device))};
  }
  void upload(DeviceBuffer& buf, const uint8_t* bytes, size_t n) const {
    const c10::InferenceMode not_inference(false);
    const at::Tensor host = at::empty(
        {static_cast<int64_t>(n)},
        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes, n);
    buf.t.narrow(0, 0, static_cast<int64_t>(n)).copy_(host, /*non_blocking=*/true);
  }
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

TableCache<DeviceBuffer>& cache() {
  // Never destroyed: its buffers must not be freed after the CUDA runtime
  // has shut down at exit.
  static auto* c = new TableCache<DeviceBuffer>();
  return *c;
}

TableStats stats_and_maybe_clear(bool clear) {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  const TableStats s = cache().stats();
  if (clear) cache().clear();
  return s;
}

const bool registered = [] {
  set_table_stats_source(&stats_and_maybe_clear);
  return true;
}();

bool by_value_requested() {
  const char* env = std::getenv("FASTACCUM_CUDA_LAUNCH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "table") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "by_value") == 0,
              "FASTACCUM_CUDA_LAUNCH must be 'table' or 'by_value', got '", env, "'");
  return true;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// 32 KB of kernel arguments: CUDA 12.1+ runtime and driver, and sm70+.
bool large_args_supported(c10::Device device) {
  if constexpr (!kSmallArgsBuilt) return true;
  if constexpr (!kLargeArgsBuilt) return false;
  int driver = 0;
  C10_CUDA_CHECK(cudaDriverGetVersion(&driver));
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        device.index()));
  return driver >= 12010 && major >= 7;
}

}  // namespace

void* TorchTableSource::table(int kind, size_t count, uint64_t anchor,
                              const std::vector<uint8_t>& content, size_t total) {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  TableKey key;
  key.device = device_.index();
  key.stream = reinterpret_cast<uint64_t>(stream_);
  key.kind = kind;
  key.count = count;
  key.anchor = anchor;
  TorchBackend backend{device_};
  return cache().get(key, content, total, backend);
}

LaunchMode TorchTableSource::launch_mode() {
  (void)registered;
  LaunchMode mode;
  mode.arg_bytes = large_args_supported(device_) ? plan::kLargeArgBytes : plan::kSmallArgBytes;
  if (!by_value_requested() && !capturing(stream_)) mode.tables = this;
  return mode;
}

}  // namespace fastaccum::cuda
