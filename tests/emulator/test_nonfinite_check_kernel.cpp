// The gradient-check CUDA kernels (csrc/cuda/nonfinite_check_kernel.cuh):
// read-only check and unscale variant, run by the host emulator through the
// real launcher, against tests/emulator/reference.h bit for bit: found_inf,
// the grads (untouched, or unscaled), and every block's sum of squares.
// Built and run by tests/test_cuda_kernels_emulated.py.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../../csrc/cuda/nonfinite_check_kernel.cuh"
#include "check_specs.h"
#include "harness.h"
#include "launch_modes.h"
#include "plan_map.h"
#include "reference.h"

namespace {

using namespace emutest;
using fastaccum::cuda::CheckArgs;

constexpr int64_t kChunk = fastaccum::plan::kChunkSize;

struct Mode {
  const char* name;
  bool write;            // unscale variant
  bool scale_on_device;  // else the factor alone (host-folded scale)
  float scale;
  double factor;
};

const Mode kReadOnly = {"read_only", false, false, 1.f, 1.0};
const Mode kUnscale = {"unscale", true, true, 3000.f, 0.25};
const Mode kUnscaleFactor = {"unscale_factor", true, false, 1.f, 1.0 / 3.0};

template <typename T>
void run_check(const std::string& label, const std::vector<TensorSpec>& specs, const Mode& m,
               const std::vector<Plant>& plants, bool want_sumsq, uint64_t seed, bool flat = false,
               const ModeSpec& mode = kTableMode) {
  const size_t count = specs.size();
  Rng rng(seed);
  std::vector<typename TensorMemory<T>::Spec> list_spec;
  std::vector<int64_t> numels;
  for (const TensorSpec& t : specs) {
    list_spec.push_back({t.n, t.misalign, t.sparse()});
    numels.push_back(t.n);
  }
  const TensorMemory<T> G(list_spec, flat);
  // Values of every chunk that runs, by (tensor, chunk).
  struct ChunkData {
    size_t tensor;
    int64_t chunk, lo;
    std::vector<T> before;
  };
  std::vector<ChunkData> chunks;
  for (size_t t = 0; t < count; ++t) {
    for (int64_t c = 0; c * kChunk < specs[t].n; ++c) {
      if (!runs(specs[t], c)) continue;
      const int64_t lo = c * kChunk, hi = std::min(specs[t].n, lo + kChunk);
      for (int64_t i = lo; i < hi; ++i) G[t][i] = static_cast<T>(rng.value(1024.0));
      chunks.push_back({t, c, lo, {}});
    }
  }
  for (const Plant& p : plants) G[p.tensor][p.index] = static_cast<T>(p.value);
  for (ChunkData& c : chunks) {
    const int64_t hi = std::min(specs[c.tensor].n, c.lo + kChunk);
    c.before.assign(G[c.tensor] + c.lo, G[c.tensor] + hi);
  }

  Scalar<float> found(0.f), sumsq(0.5f), scale(m.scale);  // sumsq adds to what is there
  CheckArgs a;
  a.found_inf = found.ptr();
  a.sumsq = want_sumsq ? sumsq.ptr() : nullptr;
  a.grad_scale = m.scale_on_device ? scale.ptr() : nullptr;
  a.factor = m.factor;
  std::vector<void*> ptrs(count);
  for (size_t t = 0; t < count; ++t) ptrs[t] = G[t];

  fastaccum::emu::clear_atomic_log();
  fastaccum::emu::set_atomic_logging(true);
  {
    std::optional<ChunkFilter> filter;
    if (std::any_of(specs.begin(), specs.end(), [](const TensorSpec& t) { return t.sparse(); }))
      filter.emplace(numels, 1, [&](int64_t t, int64_t c) { return runs(specs[t], c); },
                     mode.table, mode.arg_bytes);
    const size_t before = fastaccum::emu::launch_count();
    fastaccum::cuda::nonfinite_check_launch<T>(count, ptrs.data(), numels.data(), a, m.write,
                                               launch_mode(mode), nullptr);
    const auto made = static_cast<int64_t>(fastaccum::emu::launch_count() - before);
    const int64_t want = expected_launches(numels, false, mode).check;
    check(made == want, label + " [" + mode.name + "]: " + std::to_string(made) +
                            " launches, count_launches says " + std::to_string(want));
  }
  fastaccum::emu::set_atomic_logging(false);

  // Expected: per chunk, the unscaled values, the block's sum, any non-finite.
  const auto mul = check_mul<T>(m.factor, m.scale_on_device ? scale.ptr() : nullptr);
  bool any_nonfinite = false;
  std::vector<float> want_partials;
  for (const ChunkData& c : chunks) {
    const T* now = G[c.tensor] + c.lo;
    // The device address's alignment decides the kernel's order of additions.
    const T* const at[1] = {now};
    const int vector_bytes = fastaccum::cuda::vector_bytes(at, 1u);
    const auto exact = check_block_reference<T>(c.before.data(), static_cast<int64_t>(c.before.size()),
                                                vector_bytes, mul, m.write);
    any_nonfinite |= exact.nonfinite;
    want_partials.push_back(exact.sumsq);

    const std::string where = label + " tensor " + std::to_string(c.tensor) + " chunk " +
                              std::to_string(c.chunk);
    // Unscaled in opmath and rounded once, or untouched.
    std::vector<T> want = c.before;
    if (m.write)
      for (T& v : want) v = static_cast<T>(static_cast<opmath_t<T>>(v) * mul);
    compare_bits(where + (m.write ? " unscaled grads" : " grads (read-only)"), now, want, c.lo);
  }
  check(found.value() == (any_nonfinite ? 1.f : 0.f),
        label + " found_inf: got " + std::to_string(found.value()) + ", want " +
            (any_nonfinite ? "1" : "0"));
  check(!plants.empty() == any_nonfinite || m.write,
        label + ": the planted values and the reference disagree about non-finite elements");

  if (!want_sumsq) return;
  // Each block adds its sum once, in whatever order the blocks ran: the
  // logged operands must be exactly the blocks' sums, and sumsq their
  // running float total from 0.5.
  std::vector<float> got_partials;
  float total = 0.5f;
  for (const auto& add : fastaccum::emu::atomic_log()) {
    if (add.address != sumsq.ptr()) continue;
    got_partials.push_back(static_cast<float>(add.value));
    total += static_cast<float>(add.value);
  }
  auto bits = [](std::vector<float> v) {
    std::vector<uint32_t> out;
    for (const float f : v) {
      uint32_t b;
      std::memcpy(&b, &f, 4);
      out.push_back(b);
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  if (check(got_partials.size() == want_partials.size(),
            label + " sumsq: " + std::to_string(got_partials.size()) + " block sums added, want " +
                std::to_string(want_partials.size()))) {
    const auto g = bits(got_partials), w = bits(want_partials);
    size_t bad = 0;
    for (size_t i = 0; i < g.size(); ++i) bad += g[i] != w[i];
    check(bad == 0, label + " sumsq: " + std::to_string(bad) + " of " + std::to_string(g.size()) +
                        " block sums differ from the reference's order of additions");
  }
  check(same_bits(sumsq.value(), total),
        label + " sumsq: " + std::to_string(sumsq.value()) + " is not the total of the block sums (" +
            std::to_string(total) + ")");
}

std::vector<TensorSpec> boundary_sizes() {
  return {{0},         {1},         {7},          {8},        {3000},
          {kChunk + 1}, {2 * kChunk + 5}, {1000, 1}, {kChunk + 100, 2}, {4099, 3},
          {33, 2},     {0}};
}

// More tensors than one depth-1 launch holds (110), empties inside and at
// the end, multi-chunk tensors cut by launch boundaries.
std::vector<TensorSpec> many_sizes(uint64_t seed) {
  Rng rng(seed);
  std::vector<TensorSpec> s;
  for (int i = 0; i < 130; ++i) s.push_back({1 + rng.below(3000), i % 4});
  for (const int i : {3, 50, 111}) s[i].n = 0;
  s[109].n = 2 * kChunk + 3;
  s[120].n = kChunk + 1;
  s.push_back({0});
  return s;
}

// Each case runs in table mode and in one by-value budget (add_in_modes).
template <typename T>
void add_cases() {
  const std::string dt = type_name<T>();
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const Mode* m : {&kReadOnly, &kUnscale, &kUnscaleFactor}) {
    const std::string base = std::string(m->name) + "/" + dt;
    add_in_modes(base + "/clean", m == &kUnscale, [=](const std::string& l, const ModeSpec& mode) {
      run_check<T>(l, boundary_sizes(), *m, {}, true, 21, false, mode);
    });
    add_in_modes(base + "/clean_no_sumsq", false, [=](const std::string& l, const ModeSpec& mode) {
      run_check<T>(l, boundary_sizes(), *m, {}, false, 22, false, mode);
    });
    // Non-finite values in the vector path, in the strided tail of a chunk,
    // in a misaligned tensor's scalar path, as the last element of a tail
    // chunk, and in a tensor of a later launch.
    const std::vector<std::pair<std::string, Plant>> where = {
        {"vector_path", {4, 1024, inf}},
        {"chunk_tail", {5, kChunk, -inf}},
        {"misaligned", {8, kChunk + 99, nan}},
        {"last_element", {6, 2 * kChunk + 4, nan}},
    };
    for (const auto& [name, plant] : where) {
      add_in_modes(base + "/" + name, false, [=](const std::string& l, const ModeSpec& mode) {
        run_check<T>(l, boundary_sizes(), *m, {plant}, true, 23, false, mode);
      });
    }
    add_in_modes(base + "/flat_buffer_views", false, [=](const std::string& l, const ModeSpec& mode) {
      run_check<T>(l, boundary_sizes(), *m, {}, true, 29, /*flat=*/true, mode);
    });
    add_in_modes(base + "/many_tensors_later_launch", true, [=](const std::string& l, const ModeSpec& mode) {
      run_check<T>(l, many_sizes(5), *m, {{125, 0, -inf}}, true, 24, false, mode);
    });
  }
  // Unscaling itself overflows: float(1/1e-40) is inf, so every element is.
  const Mode overflow = {"unscale_overflow", true, true, 1e-40f, 1.0};
  add_in_modes("unscale_overflow/" + dt, false, [=](const std::string& l, const ModeSpec& mode) {
    run_check<T>(l, {{7}, {70000, 1}}, overflow, {}, true, 26, false, mode);
  });
}

// A gradient of more than 2^31 elements, its last chunks run.
template <typename T>
void add_huge_cases() {
  const std::string dt = type_name<T>();
  const int64_t n = (int64_t{1} << 31) + 4097;
  const int64_t last = (n - 1) / kChunk;
  add_in_modes("over_2^31_elements/" + dt, true, [=](const std::string& l, const ModeSpec& mode) {
    std::vector<TensorSpec> s = {{5}, {n, 0, {0, last - 2, last - 1, last}}, {9, 1}};
    run_check<T>(l, s, kUnscale, {}, true, 27, false, mode);
    run_check<T>(l + "/inf_last", s, kReadOnly,
                 {{1, n - 1, std::numeric_limits<double>::infinity()}}, true, 28, false, mode);
  });
}

}  // namespace

int main(int argc, char** argv) {
  emutest::for_each_dtype([](auto v) { add_cases<decltype(v)>(); });
  add_huge_cases<float>();
  add_huge_cases<c10::Half>();
  return emutest::run_all(argc, argv);
}
