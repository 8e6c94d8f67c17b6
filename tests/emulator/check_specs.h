// The tensor lists of the read-pass programs (test_nonfinite_check_kernel,
// test_norm_check_kernel): tensor sizes, misalignment, chunks that run, and
// values planted in them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace emutest {

struct TensorSpec {
  int64_t n;
  int misalign = 0;
  std::vector<int64_t> run_chunks = {};  // sparse: only these chunks run
  bool sparse() const { return !run_chunks.empty(); }
};

// A non-finite value planted at element `index` of tensor `tensor`.
struct Plant {
  size_t tensor;
  int64_t index;
  double value;
};

inline bool runs(const TensorSpec& s, int64_t chunk) {
  return !s.sparse() || std::find(s.run_chunks.begin(), s.run_chunks.end(), chunk) != s.run_chunks.end();
}

}  // namespace emutest
