// Which (tensor, chunk) each block of each launch covers, from the same plan
// the launcher uses (csrc/launch_plan.h), so a test can run only some
// chunks of a huge, sparsely mapped tensor through emu::set_block_filter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "../../csrc/launch_plan.h"
#include "../../csrc/emulator/cuda_emulator.h"

namespace emutest {

struct BlockTarget {
  int64_t tensor;
  int64_t chunk;
};

// The blocks of each launch of one pass: in table mode one launch, whose
// blocks for_each_block enumerates (empty tensors get one with step
// counters); by value, the plan's launches within the budget `arg_bytes`.
inline std::vector<std::vector<BlockTarget>> plan_blocks(const std::vector<int64_t>& numels,
                                                         int depth, bool table = false,
                                                         size_t arg_bytes = fastaccum::plan::kSmallArgBytes,
                                                         bool with_steps = false) {
  std::vector<std::vector<BlockTarget>> launches;
  if (table) {
    std::vector<BlockTarget> blocks;
    fastaccum::plan::for_each_block(numels.data(), numels.size(), with_steps,
                                    [&](size_t t, int32_t chunk) {
                                      blocks.push_back({static_cast<int64_t>(t), chunk});
                                    });
    if (!blocks.empty()) launches.push_back(std::move(blocks));
    return launches;
  }
  fastaccum::plan::for_each_launch(
      numels, fastaccum::plan::capacity_for_depth(depth, arg_bytes),
      [&](const fastaccum::plan::Launch& l) {
        std::vector<BlockTarget> blocks;
        for (const auto& b : l.blocks) blocks.push_back({l.slots[b.slot].tensor, b.chunk});
        launches.push_back(std::move(blocks));
      });
  return launches;
}

// Until cleared, runs a block of the next planned launches only when
// active(tensor, chunk); later launches (e.g. the step counters') run whole.
class ChunkFilter {
 public:
  ChunkFilter(const std::vector<int64_t>& numels, int depth,
              std::function<bool(int64_t tensor, int64_t chunk)> active, bool table = false,
              size_t arg_bytes = fastaccum::plan::kSmallArgBytes, bool with_steps = false)
      : launches_(plan_blocks(numels, depth, table, arg_bytes, with_steps)),
        first_launch_(fastaccum::emu::launch_count()) {
    fastaccum::emu::set_block_filter([this, active](size_t launch, unsigned block) {
      const size_t l = launch - first_launch_;
      if (l >= launches_.size()) return true;
      const BlockTarget& t = launches_[l].at(block);
      return active(t.tensor, t.chunk);
    });
  }
  ChunkFilter(const ChunkFilter&) = delete;
  ~ChunkFilter() { fastaccum::emu::set_block_filter(nullptr); }
  size_t planned_launches() const { return launches_.size(); }

 private:
  std::vector<std::vector<BlockTarget>> launches_;
  size_t first_launch_;
};

}  // namespace emutest
