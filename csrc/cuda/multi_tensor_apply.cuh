// The chunked multi-tensor launcher of the fastaccum CUDA kernels: one launch
// covers up to plan::kMaxBlocks chunks of up to max_tensors_for_depth(depth)
// tensors, whatever their sizes, so a step costs O(list length / capacity)
// launches instead of one per tensor.
//
// It works on plain addresses and element counts (TensorLists), not on
// at::Tensor: the *_cuda.cu files turn tensors into addresses, and the host
// emulator test (tests/emulator) drives this same planning, metadata fill and
// launch with buffers of its own.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_or_emulator.h"
#include "kernel_launch.h"
#include "../launch_plan.h"

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
// * block_base numbers blocks across the launches of one call, for kernels
//   that write one partial per block (the norm pass).
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
  // Blocks of the call's earlier launches: block_base + blockIdx.x numbers
  // the blocks of a whole call 0, 1, ... in plan order (per-block outputs).
  int64_t block_base;
};

// What the launcher is given: kDepth parallel lists of `count` device
// addresses (list d, tensor t at addresses[d][t]), the element count of each
// tensor (list 0's; the caller has checked that the lists match), and with
// kWithSteps one float step counter per tensor.
template <int kDepth>
struct TensorLists {
  size_t count = 0;
  void* const* addresses[kDepth] = {};
  const int64_t* numels = nullptr;
  const float* const* steps = nullptr;
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

// Runs `functor` over the lists, launching on `stream`; nothing is launched
// for a list of empty tensors.
template <int kDepth, bool kWithSteps, typename Functor>
void multi_tensor_apply(const TensorLists<kDepth>& lists, bool reverse,
                        cudaStream_t stream, const Functor& functor) {
  using Meta = TensorListMeta<kDepth, kWithSteps>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= kMaxKernelArgBytes,
                "kernel arguments exceed the 4 KB limit");
  if (lists.count == 0) return;

  Meta meta{};
  int64_t block_base = 0;
  plan::for_each_launch(
      lists.numels, lists.count, plan::capacity_for_depth(kDepth), reverse,
      [&](const plan::Launch& launch) {
        for (size_t s = 0; s < launch.slots.size(); ++s) {
          const auto t = static_cast<size_t>(launch.slots[s].tensor);
          for (int d = 0; d < kDepth; ++d)
            meta.addresses[d][s] = lists.addresses[d][t];
          meta.numel[s] = launch.slots[s].numel;
          if constexpr (kWithSteps) meta.steps[s] = lists.steps[t];
        }
        for (size_t b = 0; b < launch.blocks.size(); ++b) {
          meta.block_to_slot[b] = static_cast<uint8_t>(launch.blocks[b].slot);
          meta.block_to_chunk[b] = launch.blocks[b].chunk;
        }
        meta.block_base = block_base;
        block_base += static_cast<int64_t>(launch.blocks.size());
        launch_kernel(&multi_tensor_kernel<Meta, Functor>,
                      static_cast<unsigned>(launch.blocks.size()), kBlockSize,
                      stream, meta, functor);
      });
}

}  // namespace fastaccum::cuda
