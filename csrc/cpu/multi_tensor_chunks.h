// The CPU twin of the CUDA multi-tensor launcher: one flat table of
// (tensor, [begin, end)) chunks over a whole tensor list, so at::parallel_for
// balances work across all tensors at once instead of one tensor at a time.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastaccum {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// 16K elements: 64 KiB of fp32 per operand, large enough to amortise the
// per-chunk setup, small enough that a few hundred chunks balance 2-64 cores.
constexpr int64_t kCpuChunk = 16384;

inline std::vector<Chunk> make_chunks(at::TensorList tensors,
                                      int64_t chunk = kCpuChunk) {
  std::vector<Chunk> out;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += chunk)
      out.push_back({static_cast<int64_t>(t), b, std::min(n, b + chunk)});
  }
  return out;
}

// Runs f(chunk_index, chunk) over the table in parallel. Lists of fewer than
// 64K elements in all stay on the calling thread: waking a thread pool costs
// more than the work, however many tiny tensors the list has.
template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  int64_t elements = 0;
  for (const auto& c : chunks) elements += c.end - c.begin;
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, chunks[c]);
  };
  if (elements < 65536) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}

}  // namespace fastaccum
