// fastaccum::_launch_plan: the CUDA launch plan (csrc/launch_plan.h) of
// a list of numels, so a CPU-only test can check the chunking that the CUDA
// launcher uses. It is compiled in every build; it touches no tensor.
//
// Flat encoding of the result:
//   [num_launches,
//    then per launch: num_slots, (tensor, numel) * num_slots,
//                     num_blocks, (slot, chunk) * num_blocks]
// chunk_size / max_blocks / max_tensors of 0 mean the production capacity for
// `depth` within the kernel-argument budget `arg_bytes` (4096 or 32764);
// other values let tests use tiny capacities.
#include <torch/library.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "launch_plan.h"

namespace fastaccum {
namespace {

std::vector<int64_t> launch_plan_debug(c10::IntArrayRef numels, int64_t depth,
                                       int64_t chunk_size, int64_t max_blocks,
                                       int64_t max_tensors, int64_t arg_bytes) {
  TORCH_CHECK(depth >= 1 && depth <= plan::kMaxDepth, "depth must be in [1, ",
              plan::kMaxDepth, "], got ", depth);
  TORCH_CHECK(chunk_size >= 0 && max_blocks >= 0 && max_tensors >= 0,
              "capacity overrides must be >= 0 (0 = default)");
  plan::Capacity cap{};
  try {
    cap = plan::capacity_for_depth(static_cast<int>(depth), static_cast<size_t>(arg_bytes));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  if (chunk_size > 0) cap.chunk_size = chunk_size;
  if (max_blocks > 0) cap.max_blocks = static_cast<int>(max_blocks);
  if (max_tensors > 0) cap.max_tensors = static_cast<int>(max_tensors);

  std::vector<int64_t> out{0};
  try {
    plan::for_each_launch(
        numels.data(), numels.size(), cap, [&](const plan::Launch& l) {
          ++out[0];
          out.push_back(static_cast<int64_t>(l.slots.size()));
          for (const auto& s : l.slots) {
            out.push_back(s.tensor);
            out.push_back(s.numel);
          }
          out.push_back(static_cast<int64_t>(l.blocks.size()));
          for (const auto& b : l.blocks) {
            out.push_back(b.slot);
            out.push_back(b.chunk);
          }
        });
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

}  // namespace

// No tensor arguments, so no backend key: CompositeExplicitAutograd also
// serves the dispatcher's Undefined key that such ops resolve to.
TORCH_LIBRARY_IMPL(fastaccum, CompositeExplicitAutograd, m) {
  m.impl("_launch_plan", &launch_plan_debug);
}

}  // namespace fastaccum
