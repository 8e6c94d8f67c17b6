// Host-side planning of chunked multi-tensor launches: which tensors and
// which chunks of them each kernel launch covers. Plain C++ (no CUDA or torch
// headers), so the CPU build can compile it and a CPU test can check it
// through fastaccum::_launch_plan (csrc/launch_plan_debug.cpp).
//
// NOTE: [launch plan]
// A launch has at most `max_tensors` slots (tensor index, numel) and at most
// `max_blocks` blocks (slot, chunk); block b of the launch processes elements
// [chunk * chunk_size, min(numel, (chunk + 1) * chunk_size)) of the tensor in
// slot `slot`. The limits come from the by-value kernel argument (see note
// [by-value metadata] in multi_tensor_apply.cuh). Invariants:
// * every element of every non-empty tensor is covered by exactly one block;
//   tensors with numel 0 get neither a slot nor a block (apex's launcher does
//   not skip them, and a trailing empty tensor then drops the last launch);
// * a launch is emitted when its blocks are full, or when its slots are full
//   and the newest tensor has had its last chunk assigned; a tensor cut by
//   a full launch is carried into slot 0 of the next one, so a slot is never
//   reused for a different tensor within a launch;
// * the trailing partial launch is always emitted;
// * chunk indices fit in int32 (checked), offsets are chunk * chunk_size in
//   int64, so tensors of more than 2^31 elements work;
// * with `reverse`, tensors are visited last to first and the chunks of each
//   tensor last to first: the exact mirror of the forward order. The update
//   pass can run reversed, to start on the gradients the check pass read
//   last (still in L2); measured slower on the H200, so forward is the
//   default (csrc/cuda/fused_sgd_cuda.cu, update_order_reversed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastaccum::plan {

// Capacities of the 4 KB kernel-argument metadata, indexed by depth - 1
// (the number of tensor lists a kernel reads or writes), as PyTorch sizes its
// TensorListMetadata. CUDA 12.1+ on sm70+ allows 32 KB of kernel arguments,
// which would cut the launch count of long lists ~7x; not used yet.
inline constexpr int kMaxDepth = 5;
inline constexpr int kMaxTensorsByDepth[kMaxDepth] = {110, 64, 48, 36, 30};
inline constexpr int kMaxBlocks = 320;
inline constexpr int64_t kChunkSize = 65536;

constexpr int max_tensors_for_depth(int depth) {
  return (depth >= 1 && depth <= kMaxDepth) ? kMaxTensorsByDepth[depth - 1] : 0;
}

struct Capacity {
  int max_tensors;
  int max_blocks;
  int64_t chunk_size;
};

inline Capacity capacity_for_depth(int depth) {
  if (depth < 1 || depth > kMaxDepth)
    throw std::invalid_argument("launch plan: depth must be in [1, " +
                                std::to_string(kMaxDepth) + "], got " +
                                std::to_string(depth));
  return {max_tensors_for_depth(depth), kMaxBlocks, kChunkSize};
}

struct Slot {
  int64_t tensor;  // index into the caller's tensor list
  int64_t numel;
};

struct Block {
  int32_t slot;   // index into Launch::slots
  int32_t chunk;  // element offset is int64_t(chunk) * chunk_size
};

// One kernel launch. The vectors are reused from launch to launch (capacity
// reserved once), so planning allocates nothing per launch.
struct Launch {
  std::vector<Slot> slots;
  std::vector<Block> blocks;
};

// Calls emit(const Launch&) once per launch, in launch order. `numels` has
// one entry per tensor; negative entries are rejected.
template <typename Emit>
void for_each_launch(const int64_t* numels, size_t count, const Capacity& cap,
                     bool reverse, Emit&& emit) {
  if (cap.max_tensors < 1 || cap.max_blocks < 1 || cap.chunk_size < 1)
    throw std::invalid_argument("launch plan: capacities must be positive");
  Launch launch;
  launch.slots.reserve(static_cast<size_t>(cap.max_tensors));
  launch.blocks.reserve(static_cast<size_t>(cap.max_blocks));
  const auto max_tensors = static_cast<size_t>(cap.max_tensors);
  const auto max_blocks = static_cast<size_t>(cap.max_blocks);

  for (size_t k = 0; k < count; ++k) {
    const size_t t = reverse ? count - 1 - k : k;
    const int64_t numel = numels[t];
    if (numel < 0)
      throw std::invalid_argument("launch plan: negative numel for tensor " +
                                  std::to_string(t));
    if (numel == 0) continue;
    const int64_t chunks = (numel - 1) / cap.chunk_size + 1;
    if (chunks - 1 > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("launch plan: tensor " + std::to_string(t) +
                                  " has too many chunks");
    launch.slots.push_back({static_cast<int64_t>(t), numel});
    for (int64_t j = 0; j < chunks; ++j) {
      const int64_t chunk = reverse ? chunks - 1 - j : j;
      launch.blocks.push_back({static_cast<int32_t>(launch.slots.size() - 1),
                               static_cast<int32_t>(chunk)});
      const bool last_chunk = j == chunks - 1;
      const bool blocks_full = launch.blocks.size() == max_blocks;
      const bool slots_full = launch.slots.size() == max_tensors;
      if (blocks_full || (slots_full && last_chunk)) {
        emit(static_cast<const Launch&>(launch));
        launch.blocks.clear();
        if (last_chunk) {
          launch.slots.clear();
        } else {
          // The tensor being cut continues in slot 0 of the next launch.
          const Slot carried = launch.slots.back();
          launch.slots.clear();
          launch.slots.push_back(carried);
        }
      }
    }
  }
  if (!launch.blocks.empty()) emit(static_cast<const Launch&>(launch));
}

template <typename Emit>
void for_each_launch(const std::vector<int64_t>& numels, const Capacity& cap,
                     bool reverse, Emit&& emit) {
  for_each_launch(numels.data(), numels.size(), cap, reverse,
                  static_cast<Emit&&>(emit));
}

}  // namespace fastaccum::plan
