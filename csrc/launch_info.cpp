// fastaccum::_cuda_launch_count and fastaccum::_cuda_table_stats: what the
// CUDA launchers do, readable in every build (no tensor arguments, so
// CompositeExplicitAutograd; see csrc/launch_plan_debug.cpp).
// * _cuda_launch_count(numels, momentum, by_value, arg_bytes) -> [check,
//   norm, update, steps]: the kernel launches of one call of each pass, from
//   plan::count_launches (NOTE: [launch counts] in csrc/launch_plan.h), the
//   function whose planning the launchers run.
// * _cuda_table_stats(clear) -> [hits, uploads, upload_bytes, allocations,
//   entries] of the device-table cache (NOTE: [table cache]); all 0 in a
//   build without CUDA. `clear` empties the cache after reading.
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "launch_plan.h"
#include "launch_table_stats.h"

namespace fastaccum {
namespace {

std::atomic<TableStatsSource> stats_source{nullptr};

std::vector<int64_t> cuda_launch_count(c10::IntArrayRef numels, bool momentum,
                                       bool by_value, int64_t arg_bytes) {
  TORCH_CHECK(arg_bytes == static_cast<int64_t>(plan::kSmallArgBytes) ||
                  arg_bytes == static_cast<int64_t>(plan::kLargeArgBytes),
              "arg_bytes must be ", plan::kSmallArgBytes, " or ",
              plan::kLargeArgBytes, ", got ", arg_bytes);
  try {
    const plan::LaunchCounts c =
        plan::count_launches(numels.data(), numels.size(), momentum, !by_value,
                             static_cast<size_t>(arg_bytes));
    return {c.check, c.norm, c.update, c.steps};
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::vector<int64_t> cuda_table_stats(bool clear) {
  const TableStatsSource source = stats_source.load();
  if (source == nullptr) return {0, 0, 0, 0, 0};
  const cuda::TableStats s = source(clear);
  return {s.hits, s.uploads, s.upload_bytes, s.allocations, s.entries};
}

}  // namespace

void set_table_stats_source(TableStatsSource source) { stats_source.store(source); }

TORCH_LIBRARY_IMPL(fastaccum, CompositeExplicitAutograd, m) {
  m.impl("_cuda_launch_count", &cuda_launch_count);
  m.impl("_cuda_table_stats", &cuda_table_stats);
}

}  // namespace fastaccum
