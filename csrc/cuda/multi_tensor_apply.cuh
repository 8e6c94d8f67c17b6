// The multi-tensor launcher of the fastaccum CUDA kernels: runs a functor
// over every chunk of every tensor of a few parallel lists, whatever their
// sizes. Device code for nvcc and the host emulator alike; it works on plain
// addresses and element counts (TensorLists, launch_table.h), not on
// at::Tensor, so the emulator programs (tests/emulator) drive this very code.
//
// NOTE: [launch modes]
// * Table (eager calls): the whole pass is ONE launch of one block per
//   chunk; block b reads its (tensor, chunk) and the tensor's row from a
//   device table (NOTE: [launch table] in launch_table.h) that the host
//   uploads only when its contents change (NOTE: [table cache]). A step is
//   then two launches per (device, dtype) group (check or norm, update) at
//   any tensor count; step counters and the norm's final reduction happen
//   inside those launches (tickets: the last block of a tensor, or of the
//   call, does the finishing work), so nothing else is launched.
// * By value (under CUDA graph capture, or FASTACCUM_CUDA_LAUNCH=by_value):
//   the per-launch metadata is the kernel argument itself (NOTE: [by-value
//   metadata]), split by the plan of launch_plan.h. Used while capturing
//   because a captured upload would replay from host memory that later
//   eager calls rewrite, and a captured kernel would read a table that
//   later calls overwrite; a replayed graph's launches cost little host
//   time anyway. Step counters then take separate launches (NOTE: [step
//   counters] in fused_sgd_kernel.cuh), the norm a finishing block.
// Both modes give every block the same Chunk, so a functor is one code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_or_emulator.h"
#include "kernel_launch.h"
#include "launch_table.h"
#include "../launch_plan.h"

namespace fastaccum::cuda {

inline constexpr int kBlockSize = 512;

// Which by-value budgets this build has kernels for: CUDA 13 requires a
// driver and a GPU (sm75+) that take 32 KB of kernel arguments; 12.1-12.x
// choose at run time (large_args_supported in launch_mode.h); older CUDA
// only has 4 KB. The emulator builds both, so both are tested.
#if defined(__CUDACC__) && CUDART_VERSION >= 13000
inline constexpr bool kSmallArgsBuilt = false;
inline constexpr bool kLargeArgsBuilt = true;
#elif defined(__CUDACC__) && CUDART_VERSION < 12010
inline constexpr bool kSmallArgsBuilt = true;
inline constexpr bool kLargeArgsBuilt = false;
#else
inline constexpr bool kSmallArgsBuilt = true;
inline constexpr bool kLargeArgsBuilt = true;
#endif

// What a functor gets for one block: elements [start, start + n) of the
// tensor at addresses[d] (list d; 0 <= n <= kChunkSize, start =
// chunk * kChunkSize in int64), its step counter (nullptr without), and in
// table mode its ticket and block count; `block` numbers the blocks of the
// whole call 0, 1, ... in plan order (per-block outputs).
template <int kDepth>
struct Chunk {
  void* addresses[kDepth];
  float* step;
  unsigned* ticket;  // nullptr in by-value mode
  int32_t chunks;
  int64_t start;
  int64_t n;
  int64_t block;
};

// NOTE: [by-value metadata]
// The per-launch table (tensor addresses, numels, block -> (slot, chunk)) is
// the kernel argument itself: no device allocation, no host-to-device copy,
// nothing that must outlive the launch, so launches can be captured in a CUDA
// graph and replayed. The CUDA driver copies kernel arguments at launch time,
// so the launcher reuses one host struct for all its launches.
// * Sizes come from launch_plan.h (NOTE: [kernel-argument budgets]); the
//   static_assert in multi_tensor_apply checks the struct plus the functor.
// * `steps` (only with kWithSteps) is one float pointer per slot: the
//   per-tensor step counter of fused SGD, read (never written) by the kernel.
// * block_to_slot is a uint8_t for up to 256 slots, else a uint16_t.
// * block_base numbers blocks across the launches of one call.
// * Entries past the launch's slot/block counts are stale; blocks only index
//   the slots the plan gave them.
// * The kernel takes the table as a __grid_constant__ parameter: it is
//   indexed with run-time slots, and this keeps it in the constant bank
//   instead of a per-thread local copy.
template <int kDepth, bool kWithSteps, size_t kArgBytes>
struct TensorListMeta {
  static constexpr int kMaxTensors = plan::max_tensors_for_depth(kDepth, kArgBytes);
  static constexpr int kMaxBlocks = plan::max_blocks_for(kArgBytes);
  static_assert(kMaxTensors > 0, "depth must be in [1, plan::kMaxDepth]");
  static_assert(kMaxTensors <= 65536, "block_to_slot is at most a uint16_t");
  static constexpr bool kSteps = kWithSteps;
  using slot_t = std::conditional_t<(kMaxTensors <= 256), uint8_t, uint16_t>;

  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  float* steps[kWithSteps ? kMaxTensors : 1];
  int32_t block_to_chunk[kMaxBlocks];
  slot_t block_to_slot[kMaxBlocks];
  int64_t block_base;
};

// NOTE: [one wave per launch]
// A 320-block by-value launch of 512 threads fits at once on an H100 (132
// SMs) or an A100 (108 SMs) at 3 resident blocks per SM (<= 40 registers),
// hence the minimum of 3 blocks per SM in the launch bounds. A table pass is
// one grid of many waves, where occupancy matters more than the tail of a
// wave; at this bound ptxas (CUDA 13, sm_90) keeps the check and norm
// kernels free of spills but spills in the momentum update (ptxas -v, fp32
// table kernel: 60 B of spill stores, 168 B of spill loads). Whether 2
// blocks per SM without spills is faster is for a GPU to say.
inline constexpr int kMinBlocksPerSm = 3;

template <typename Meta, int kDepth, typename Functor>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    multi_tensor_kernel(FASTACCUM_GRID_PARAM(Meta) meta, const Functor functor) {
  const int slot = meta.block_to_slot[blockIdx.x];
  Chunk<kDepth> c;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) c.addresses[d] = meta.addresses[d][slot];
  if constexpr (Meta::kSteps) {
    c.step = meta.steps[slot];
  } else {
    c.step = nullptr;
  }
  c.ticket = nullptr;
  c.chunks = 0;
  c.start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * plan::kChunkSize;
  const int64_t rest = meta.numel[slot] - c.start;
  c.n = rest < plan::kChunkSize ? rest : plan::kChunkSize;
  c.block = meta.block_base + blockIdx.x;
  functor(c);
}

// By value: runs `functor` over the lists, launching on `stream` as the plan
// splits them; nothing is launched for a list of empty tensors.
template <int kDepth, bool kWithSteps, size_t kArgBytes, typename Functor>
void multi_tensor_apply(const TensorLists<kDepth>& lists, cudaStream_t stream,
                        const Functor& functor) {
  using Meta = TensorListMeta<kDepth, kWithSteps, kArgBytes>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= kArgBytes,
                "kernel arguments exceed their budget");
  if (lists.count == 0) return;

  // Static: 32 KB is too much for some callers' stacks (the emulator's
  // fibers); one call at a time per thread.
  thread_local Meta meta{};
  int64_t block_base = 0;
  plan::for_each_launch(
      lists.numels, lists.count, plan::capacity_for_depth(kDepth, kArgBytes),
      [&](const plan::Launch& launch) {
        for (size_t s = 0; s < launch.slots.size(); ++s) {
          const auto t = static_cast<size_t>(launch.slots[s].tensor);
          for (int d = 0; d < kDepth; ++d)
            meta.addresses[d][s] = lists.addresses[d][t];
          meta.numel[s] = launch.slots[s].numel;
          if constexpr (kWithSteps) meta.steps[s] = lists.steps[t];
        }
        for (size_t b = 0; b < launch.blocks.size(); ++b) {
          meta.block_to_slot[b] =
              static_cast<typename Meta::slot_t>(launch.blocks[b].slot);
          meta.block_to_chunk[b] = launch.blocks[b].chunk;
        }
        meta.block_base = block_base;
        block_base += static_cast<int64_t>(launch.blocks.size());
        launch_kernel(&multi_tensor_kernel<Meta, kDepth, Functor>,
                      static_cast<unsigned>(launch.blocks.size()), kBlockSize,
                      stream, meta, functor);
      });
}

// Calls f(std::integral_constant<size_t, budget>{}) for the by-value budget
// `arg_bytes` (plan::kSmallArgBytes or plan::kLargeArgBytes), among the
// budgets this build has kernels for.
template <typename F>
void with_arg_budget(size_t arg_bytes, F&& f) {
  if (arg_bytes >= plan::kLargeArgBytes) {
    if constexpr (kLargeArgsBuilt) {
      f(std::integral_constant<size_t, plan::kLargeArgBytes>{});
      return;
    }
  } else {
    if constexpr (kSmallArgsBuilt) {
      f(std::integral_constant<size_t, plan::kSmallArgBytes>{});
      return;
    }
  }
  throw std::invalid_argument("fastaccum: no by-value kernels for a " +
                              std::to_string(arg_bytes) +
                              "-byte kernel-argument budget in this build");
}

template <int kDepth, bool kWithSteps, typename Functor>
void multi_tensor_apply_by_value(const TensorLists<kDepth>& lists, size_t arg_bytes,
                                 cudaStream_t stream, const Functor& functor) {
  with_arg_budget(arg_bytes, [&](auto budget) {
    multi_tensor_apply<kDepth, kWithSteps, decltype(budget)::value>(lists, stream, functor);
  });
}

// ---- table mode -------------------------------------------------------------

template <int kDepth, typename Functor>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    multi_tensor_table_kernel(TableRow<kDepth>* rows, const TableBlock* blocks,
                              const Functor functor) {
  const TableBlock b = blocks[blockIdx.x];
  TableRow<kDepth>* const row = rows + b.tensor;
  Chunk<kDepth> c;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) c.addresses[d] = row->addresses[d];
  c.step = row->step;
  c.ticket = &row->ticket;
  c.chunks = row->chunks;
  c.start = static_cast<int64_t>(b.chunk) * plan::kChunkSize;
  const int64_t rest = row->numel - c.start;
  c.n = rest < plan::kChunkSize ? rest : plan::kChunkSize;
  c.block = blockIdx.x;
  functor(c);
}

// Pass kinds: part of a table's cache key (NOTE: [table cache]).
enum TableKind : int { kCheckTable = 1, kNormTable, kUpdateTable, kUpdateMomentumTable };

// Where tables come from: the torch side (launch_mode.h) or an emulator
// program. Returns the device address of a buffer holding `content` followed
// by `total - content.size()` bytes of scratch; kind, count and anchor key
// the cache (NOTE: [table cache]).
class TableSource {
 public:
  virtual void* table(int kind, size_t count, uint64_t anchor,
                      const std::vector<uint8_t>& content, size_t total) = 0;

 protected:
  ~TableSource() = default;
};

// How a call launches: through tables from `tables` when set, else by value
// within `arg_bytes`.
struct LaunchMode {
  TableSource* tables = nullptr;
  size_t arg_bytes = plan::kSmallArgBytes;
};

// One pass's table, uploaded; block_count 0 means there is nothing to launch.
struct TableRef {
  uint8_t* base = nullptr;
  TableLayout layout;

  template <int kDepth>
  TableRow<kDepth>* rows() const {
    return reinterpret_cast<TableRow<kDepth>*>(base + layout.rows);
  }
  const TableBlock* blocks() const {
    return reinterpret_cast<const TableBlock*>(base + layout.blocks);
  }
  TableHeader* header() const { return reinterpret_cast<TableHeader*>(base); }
  double* partials() const { return reinterpret_cast<double*>(base + layout.content); }
};

template <int kDepth>
TableRef upload_table(const TensorLists<kDepth>& lists, bool with_partials, int kind,
                      TableSource& source) {
  // Reused across calls: a steady-state call allocates nothing on the host.
  thread_local std::vector<uint8_t> bytes;
  TableRef t;
  t.layout = build_table(lists, with_partials, bytes);
  // The first param with an address (empty tensors may have none).
  uint64_t anchor = 0;
  if (kind == kUpdateTable || kind == kUpdateMomentumTable)
    for (size_t i = 0; i < lists.count && anchor == 0; ++i)
      anchor = reinterpret_cast<uintptr_t>(lists.addresses[0][i]);
  if (t.layout.block_count > 0)
    t.base = static_cast<uint8_t*>(
        source.table(kind, lists.count, anchor, bytes, t.layout.total));
  return t;
}

// Table mode: one launch over the table's blocks (none for no blocks).
template <int kDepth, typename Functor>
void multi_tensor_apply_table(const TableRef& t, cudaStream_t stream,
                              const Functor& functor) {
  if (t.layout.block_count == 0) return;
  launch_kernel(&multi_tensor_table_kernel<kDepth, Functor>,
                static_cast<unsigned>(t.layout.block_count), kBlockSize, stream,
                t.rows<kDepth>(), t.blocks(), functor);
}

// One pass in `mode`, for a functor that needs nothing of the table but its
// blocks: one table launch, or the by-value launches.
template <int kDepth, bool kWithSteps, typename Functor>
void multi_tensor_apply_in(const LaunchMode& mode, int kind,
                          const TensorLists<kDepth>& lists, cudaStream_t stream,
                          const Functor& functor) {
  if (mode.tables != nullptr) {
    const TableRef t = upload_table(lists, false, kind, *mode.tables);
    multi_tensor_apply_table<kDepth>(t, stream, functor);
  } else {
    multi_tensor_apply_by_value<kDepth, kWithSteps>(lists, mode.arg_bytes, stream, functor);
  }
}

}  // namespace fastaccum::cuda
