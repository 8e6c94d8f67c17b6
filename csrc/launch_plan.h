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
// * tensors are visited first to last and the chunks of each tensor first to
//   last, in every pass. (A reverse walk of the update pass, meant to start
//   on the grads the check pass read last, still in L2, took 9-15% more time
//   on the H200, benchmarks/results/nvidia-h200-2026-11-30.md, and was
//   removed.)
//
// This plan serves the by-value launches (CUDA graph capture, see NOTE:
// [launch modes] in csrc/cuda/multi_tensor_apply.cuh). The eager launches
// take the whole list in one launch through a device table, whose blocks
// for_each_block below enumerates in the same order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastaccum::plan {

// NOTE: [kernel-argument budgets]
// By-value metadata (multi_tensor_apply.cuh) must fit the kernel-argument
// limit: 4 KB everywhere, 32,764 bytes with CUDA >= 12.1 on sm70+ and a
// driver of that age (CUDA 13 requires both). Capacities by depth - 1 (the
// number of tensor lists a kernel reads or writes): the 4 KB table is
// PyTorch's; the 32 KB one is ours, sized so that the depth-3 metadata with
// step counters (40 B per tensor, 6 B per block) plus a functor fits, as the
// static_assert in multi_tensor_apply checks.
inline constexpr int kMaxDepth = 5;
inline constexpr size_t kSmallArgBytes = 4096;
inline constexpr size_t kLargeArgBytes = 32764;
inline constexpr int kMaxTensorsByDepth[kMaxDepth] = {110, 64, 48, 36, 30};
inline constexpr int kMaxBlocks = 320;
inline constexpr int kLargeMaxTensorsByDepth[kMaxDepth] = {1200, 800, 448, 384, 320};
inline constexpr int kLargeMaxBlocks = 2048;
inline constexpr int64_t kChunkSize = 65536;

constexpr int max_tensors_for_depth(int depth, size_t arg_bytes = kSmallArgBytes) {
  if (depth < 1 || depth > kMaxDepth) return 0;
  return arg_bytes >= kLargeArgBytes ? kLargeMaxTensorsByDepth[depth - 1]
                                     : kMaxTensorsByDepth[depth - 1];
}

constexpr int max_blocks_for(size_t arg_bytes) {
  return arg_bytes >= kLargeArgBytes ? kLargeMaxBlocks : kMaxBlocks;
}

struct Capacity {
  int max_tensors;
  int max_blocks;
  int64_t chunk_size;
};

inline Capacity capacity_for_depth(int depth, size_t arg_bytes = kSmallArgBytes) {
  if (depth < 1 || depth > kMaxDepth)
    throw std::invalid_argument("launch plan: depth must be in [1, " +
                                std::to_string(kMaxDepth) + "], got " +
                                std::to_string(depth));
  if (arg_bytes != kSmallArgBytes && arg_bytes != kLargeArgBytes)
    throw std::invalid_argument("launch plan: kernel-argument budget must be " +
                                std::to_string(kSmallArgBytes) + " or " +
                                std::to_string(kLargeArgBytes) + " bytes, got " +
                                std::to_string(arg_bytes));
  return {max_tensors_for_depth(depth, arg_bytes), max_blocks_for(arg_bytes),
          kChunkSize};
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

// Chunks of tensor t of `numels` (0 for an empty one), after the checks
// every plan makes: no negative numel, chunk indices that fit in int32.
inline int64_t checked_chunks(const int64_t* numels, size_t t, int64_t chunk_size) {
  const int64_t numel = numels[t];
  if (numel < 0)
    throw std::invalid_argument("launch plan: negative numel for tensor " +
                                std::to_string(t));
  const int64_t chunks = numel == 0 ? 0 : (numel - 1) / chunk_size + 1;
  if (chunks - 1 > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("launch plan: tensor " + std::to_string(t) +
                                " has too many chunks");
  return chunks;
}

// Calls emit(const Launch&) once per launch, in launch order. `numels` has
// one entry per tensor; negative entries are rejected.
template <typename Emit>
void for_each_launch(const int64_t* numels, size_t count, const Capacity& cap,
                     Emit&& emit) {
  if (cap.max_tensors < 1 || cap.max_blocks < 1 || cap.chunk_size < 1)
    throw std::invalid_argument("launch plan: capacities must be positive");
  Launch launch;
  launch.slots.reserve(static_cast<size_t>(cap.max_tensors));
  launch.blocks.reserve(static_cast<size_t>(cap.max_blocks));
  const auto max_tensors = static_cast<size_t>(cap.max_tensors);
  const auto max_blocks = static_cast<size_t>(cap.max_blocks);

  for (size_t t = 0; t < count; ++t) {
    const int64_t chunks = checked_chunks(numels, t, cap.chunk_size);
    if (chunks == 0) continue;
    launch.slots.push_back({static_cast<int64_t>(t), numels[t]});
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      launch.blocks.push_back({static_cast<int32_t>(launch.slots.size() - 1),
                               static_cast<int32_t>(chunk)});
      const bool last_chunk = chunk == chunks - 1;
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
                     Emit&& emit) {
  for_each_launch(numels.data(), numels.size(), cap, static_cast<Emit&&>(emit));
}

// NOTE: [table blocks]
// The blocks of a one-launch (device table) pass, in launch order: emit(t,
// chunk) for every chunk of every tensor, tensors and chunks in the order of
// for_each_launch. A tensor with numel 0 gets one block of no elements when
// `empty_gets_block` (the update with momentum: that block advances the
// tensor's step counter, as the by-value step launch does), none otherwise.
// Returns the block count; throws when it exceeds the grid's x limit
// (2^31 - 1) or a tensor has more than 2^31 chunks.
template <typename Emit>
int64_t for_each_block(const int64_t* numels, size_t count,
                       bool empty_gets_block, Emit&& emit) {
  int64_t blocks = 0;
  for (size_t t = 0; t < count; ++t) {
    int64_t chunks = checked_chunks(numels, t, kChunkSize);
    if (chunks == 0 && empty_gets_block) chunks = 1;
    if (blocks + chunks > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument(
          "launch plan: more than 2^31 - 1 chunks in one list");
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      emit(t, static_cast<int32_t>(chunk));
    blocks += chunks;
  }
  return blocks;
}

// NOTE: [launch counts]
// The kernel launches of one call of each pass, for tensors of these sizes:
// what the launchers do, computed by the same planning functions (tested on
// the CPU through fastaccum::_cuda_launch_count; the emulator programs check
// that the launchers make exactly these launches).
// * table (eager): one launch per pass that has a block; the norm pass of an
//   all-empty list still launches one block to write its 0. The step
//   counters advance inside the update, so `steps` is 0.
// * by value (`arg_bytes` budget, used under CUDA graph capture): the plan's
//   launches per pass, the norm's finishing block, and with momentum the
//   step-counter launches (steps_per_launch counters each).
struct LaunchCounts {
  int64_t check = 0;   // nonfinite_check_ / unscale_check_
  int64_t norm = 0;    // norm_check_
  int64_t update = 0;  // fused_sgd_
  int64_t steps = 0;   // fused_sgd_ with momentum: step counters
};

// Step counters per by-value step launch: one pointer each, plus a count and
// found_inf, within the budget (checked by static_asserts in
// csrc/cuda/fused_sgd_kernel.cuh).
constexpr int64_t steps_per_launch(size_t arg_bytes) {
  return arg_bytes >= kLargeArgBytes ? 4000 : 480;
}

inline LaunchCounts count_launches(const int64_t* numels, size_t count,
                                   bool momentum, bool table, size_t arg_bytes) {
  LaunchCounts c;
  if (table) {
    const auto noop = [](size_t, int32_t) {};
    const int64_t blocks = for_each_block(numels, count, false, noop);
    c.check = blocks > 0 ? 1 : 0;
    c.norm = 1;
    c.update = for_each_block(numels, count, momentum, noop) > 0 ? 1 : 0;
    return c;
  }
  auto launches = [&](int depth) {
    int64_t n = 0;
    for_each_launch(numels, count, capacity_for_depth(depth, arg_bytes),
                    [&](const Launch&) { ++n; });
    return n;
  };
  c.check = launches(1);
  c.norm = c.check + 1;
  c.update = launches(momentum ? 3 : 2);
  if (momentum && count > 0) {
    const auto per = steps_per_launch(arg_bytes);
    c.steps = (static_cast<int64_t>(count) + per - 1) / per;
  }
  return c;
}

}  // namespace fastaccum::plan
