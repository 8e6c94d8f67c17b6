// The chunked multi-tensor launcher of the fastaccum CUDA kernels: one launch
// covers up to plan::kMaxBlocks chunks of up to max_tensors_for_depth(depth)
// tensors, whatever their sizes, so a step costs O(list length / capacity)
// launches instead of one per tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "launch_plan.h"

namespace fastaccum::cuda {

inline constexpr int kBlockSize = 512;
// Kernel-argument space that every CUDA version and architecture accepts.
inline constexpr size_t kMaxKernelArgBytes = 4096;

// NOTE: [by-value metadata]
// The per-launch table (tensor addresses, numels, block -> (slot, chunk)) is
// the kernel argument itself: no device allocation, no host-to-device copy,
// nothing that must outlive the launch, so launches can be captured in a CUDA
// graph and replayed. The CUDA driver copies kernel arguments at launch time,
// so the launcher reuses one host struct for all its launches.
// * Sizes come from launch_plan.h (110/64/48/36/30 tensors for depth 1..5,
//   320 blocks), which fit the 4 KB kernel-argument limit; the static_assert
//   in multi_tensor_apply checks the struct plus the functor.
// * `steps` (only with kWithSteps) is one extra float pointer per slot: the
//   per-tensor step counter of fused SGD, read (never written) by the kernel.
//   48 slots at depth 3 still fit.
// * block_to_slot is a uint8_t: slots are < 256 at every depth.
// * Entries past the launch's slot/block counts are stale; blocks only index
//   the slots the plan gave them.
// * The kernel takes the table as a __grid_constant__ parameter: it is
//   indexed with run-time slots, and this keeps it in the constant bank
//   instead of a per-thread local copy.
template <int kDepth, bool kWithSteps>
struct TensorListMeta {
  static constexpr int kMaxTensors = plan::max_tensors_for_depth(kDepth);
  static_assert(kMaxTensors > 0, "depth must be in [1, plan::kMaxDepth]");
  static_assert(kMaxTensors <= 256, "block_to_slot is a uint8_t");

  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  const float* steps[kWithSteps ? kMaxTensors : 1];
  int32_t block_to_chunk[plan::kMaxBlocks];
  uint8_t block_to_slot[plan::kMaxBlocks];
};

// NOTE: [one wave per launch]
// A full launch is 320 blocks of 512 threads. At 2 resident blocks per SM
// (what ~54 registers/thread allows) an H100 (132 SMs) runs 264 of them and
// the other 56 form a second, mostly idle wave; at 3 per SM (<= 42
// registers) all 320 fit at once on an H100 or an A100 (108 SMs). Hence the
// minimum of 3 blocks per SM in the launch bounds: ptxas then keeps the fp32
// and half kernels at <= 40 registers without spills (fp64 with momentum
// spills a few bytes). Not measured yet: benchmarks can check it.
//
// One block = one chunk of one tensor; the functor does the per-chunk work:
//   functor(meta, slot, start, n): elements [start, start + n) of the tensor
//   in `slot`, 0 < n <= kChunkSize, start = chunk * kChunkSize in int64.
inline constexpr int kMinBlocksPerSm = 3;

template <typename Meta, typename Functor>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ Meta meta,
                        const Functor functor) {
  const int slot = meta.block_to_slot[blockIdx.x];
  const int64_t start =
      static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * plan::kChunkSize;
  const int64_t rest = meta.numel[slot] - start;
  const int64_t n = rest < plan::kChunkSize ? rest : plan::kChunkSize;
  functor(meta, slot, start, n);
}

// Whether the update pass walks the lists last-to-first (see NOTE: [launch
// plan]); the check pass always walks them first-to-last.
// FASTACCUM_CUDA_UPDATE_ORDER=forward|reverse (default reverse) lets
// benchmarks measure both without a rebuild; it is read on every call (tens
// of ns), so a process can switch between runs.
inline bool update_order_reversed() {
  const char* env = std::getenv("FASTACCUM_CUDA_UPDATE_ORDER");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "reverse") == 0)
    return true;
  TORCH_CHECK(std::strcmp(env, "forward") == 0,
              "FASTACCUM_CUDA_UPDATE_ORDER must be 'forward' or 'reverse', "
              "got '", env, "'");
  return false;
}

// Runs `functor` over kDepth parallel tensor lists (equal lengths, list 0
// gives the numels; the caller has checked devices, dtypes and shapes).
// Bit d of `written` says the kernel writes list d (its pointer is taken with
// mutable_data_ptr, the others with const_data_ptr). `steps` is used only
// with kWithSteps and then has the lists' length. Launches on the current
// stream of the lists' device; nothing is launched for a list of empty
// tensors.
template <int kDepth, bool kWithSteps, typename Functor>
void multi_tensor_apply(const std::array<at::TensorList, kDepth>& lists,
                        at::TensorList steps, unsigned written, bool reverse,
                        const Functor& functor) {
  using Meta = TensorListMeta<kDepth, kWithSteps>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= kMaxKernelArgBytes,
                "kernel arguments exceed the 4 KB limit");
  const at::TensorList first = lists[0];
  if (first.empty()) return;
  for (int d = 1; d < kDepth; ++d)
    TORCH_INTERNAL_ASSERT(lists[d].size() == first.size());
  if constexpr (kWithSteps) TORCH_INTERNAL_ASSERT(steps.size() == first.size());

  const c10::Device device = first[0].device();
  TORCH_INTERNAL_ASSERT(device.is_cuda());
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<int64_t> numels(first.size());
  for (size_t t = 0; t < first.size(); ++t) numels[t] = first[t].numel();

  Meta meta{};
  plan::for_each_launch(
      numels, plan::capacity_for_depth(kDepth), reverse,
      [&](const plan::Launch& launch) {
        for (size_t s = 0; s < launch.slots.size(); ++s) {
          const auto t = static_cast<size_t>(launch.slots[s].tensor);
          for (int d = 0; d < kDepth; ++d) {
            const at::Tensor& x = lists[d][t];
            meta.addresses[d][s] =
                ((written >> d) & 1u)
                    ? x.mutable_data_ptr()
                    : const_cast<void*>(x.const_data_ptr());
          }
          meta.numel[s] = launch.slots[s].numel;
          if constexpr (kWithSteps)
            meta.steps[s] = steps[t].const_data_ptr<float>();
        }
        for (size_t b = 0; b < launch.blocks.size(); ++b) {
          meta.block_to_slot[b] = static_cast<uint8_t>(launch.blocks[b].slot);
          meta.block_to_chunk[b] = launch.blocks[b].chunk;
        }
        multi_tensor_kernel<Meta, Functor>
            <<<static_cast<unsigned>(launch.blocks.size()), kBlockSize, 0,
               stream>>>(meta, functor);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace fastaccum::cuda
