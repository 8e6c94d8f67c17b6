// The norm pass of a fused clip_grad_norm_ (csrc/cuda/norm_check_kernel.cuh):
// the chunk launches and the finishing block, run by the host emulator
// through the real launcher, against tests/emulator/reference.h bit for bit:
// every block's partial, the norm, found_inf, the grads (read only), and the
// same bits on a second run (NOTE: [deterministic norm]; the emulator runs
// the blocks in a different order each time).
// Built and run by tests/test_cuda_kernels_emulated.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../csrc/cuda/norm_check_kernel.cuh"
#include "check_specs.h"
#include "harness.h"
#include "launch_modes.h"
#include "plan_map.h"
#include "reference.h"

namespace {

using namespace emutest;
using fastaccum::cuda::NormArgs;

constexpr int64_t kChunk = fastaccum::plan::kChunkSize;

struct Mode {
  const char* name;
  bool scale_on_device;  // else the factor alone (host-folded scale)
  float scale;
  double factor;
};

const Mode kPlain = {"plain", false, 1.f, 1.0};
const Mode kScaled = {"scale_factor", true, 3000.f, 0.25};
const Mode kFactor = {"factor", false, 1.f, 1.0 / 3.0};
// |g| * 128 passes fp16's 65504 for |g| > 511.75: inf in .grad after an
// unscale, so inf here too, though finite in float.
const Mode kOverflowFp16 = {"factor_overflows_fp16", false, 1.f, 128.0};

template <typename T>
using out_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The outputs of one call; out starts as -7, so that a missing write shows.
template <typename T>
struct Result {
  Buffer<double> partials;
  Scalar<float> found{0.f};
  Scalar<out_t<T>> out{out_t<T>(-7)};
  size_t launches = 0;
};

// One call in `mode`. By value, the partials are r.partials (from `init`);
// in table mode they are the table's scratch: blocks that do not run
// (`runs` false) get their `init` value there and count as done on the
// call's ticket, and r.partials receives a copy afterwards.
template <typename T>
void run_once(Result<T>& r, const std::vector<void*>& ptrs, const std::vector<int64_t>& numels,
              const Mode& m, bool inf_norm, const Scalar<float>& scale,
              const std::vector<double>& init, const std::vector<bool>& block_runs,
              const ModeSpec& mode) {
  r.partials = Buffer<double>(static_cast<int64_t>(init.size()), 0);
  std::copy(init.begin(), init.end(), r.partials.data());
  NormArgs a;
  a.found_inf = r.found.ptr();
  a.partials = mode.table ? nullptr : r.partials.data();
  a.grad_scale = m.scale_on_device ? scale.ptr() : nullptr;
  a.factor = m.factor;
  a.inf_norm = inf_norm;
  HostTableSource& src = table_source();
  src.last_base = nullptr;
  src.prepare = [&](uint8_t* base, size_t content) {
    auto* partials = reinterpret_cast<double*>(base + content);
    unsigned skipped = 0;
    for (size_t b = 0; b < init.size(); ++b)
      if (!block_runs[b]) {
        partials[b] = init[b];
        ++skipped;
      }
    reinterpret_cast<fastaccum::cuda::TableHeader*>(base)->call_ticket = skipped;
  };
  const size_t before = fastaccum::emu::launch_count();
  fastaccum::cuda::norm_check_launch<T, out_t<T>>(ptrs.size(), ptrs.data(), numels.data(), a,
                                                  r.out.ptr(), launch_mode(mode), nullptr);
  r.launches = fastaccum::emu::launch_count() - before;
  src.prepare = nullptr;
  if (mode.table && src.last_base != nullptr) {
    const auto* partials = reinterpret_cast<const double*>(src.last_base + src.last_content);
    std::copy(partials, partials + init.size(), r.partials.data());
    check(reinterpret_cast<const fastaccum::cuda::TableHeader*>(src.last_base)->call_ticket == 0,
          "the call's ticket is back at 0");
  }
}

// Returns whether found_inf was set.
template <typename T>
bool run_norm(const std::string& label, const std::vector<TensorSpec>& specs, const Mode& m,
              bool inf_norm, const std::vector<Plant>& plants, uint64_t seed, bool flat = false,
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
  for (size_t t = 0; t < count; ++t)
    for (int64_t c = 0; c * kChunk < specs[t].n; ++c)
      if (runs(specs[t], c))
        for (int64_t i = c * kChunk; i < std::min(specs[t].n, (c + 1) * kChunk); ++i)
          G[t][i] = static_cast<T>(rng.value(1024.0));
  for (const Plant& p : plants) G[p.tensor][p.index] = static_cast<T>(p.value);

  // Blocks in the order of the call's partials: the plan's, launch by launch.
  struct Block {
    int64_t tensor, chunk;
    bool runs;
    std::vector<T> before;
  };
  std::vector<Block> blocks;
  size_t planned_launches = 0;
  // The table's one launch covers the blocks of the by-value launches, in
  // their order (NOTE: [table blocks]).
  for (const auto& launch : plan_blocks(numels, 1, mode.table, mode.arg_bytes)) {
    ++planned_launches;
    for (const BlockTarget& b : launch) {
      Block blk{b.tensor, b.chunk, runs(specs[b.tensor], b.chunk), {}};
      const int64_t lo = b.chunk * kChunk, hi = std::min(numels[b.tensor], lo + kChunk);
      if (blk.runs) blk.before.assign(G[b.tensor] + lo, G[b.tensor] + hi);
      blocks.push_back(std::move(blk));
    }
  }
  check(static_cast<int64_t>(blocks.size()) ==
            fastaccum::cuda::norm_partials_count(numels.data(), count),
        label + ": norm_partials_count disagrees with the plan's " + std::to_string(blocks.size()) +
            " blocks");
  // The partials start as NaN, or, for blocks that do not run, as distinct
  // values that the finishing block must still take in its order.
  std::vector<double> init(blocks.size());
  for (size_t b = 0; b < blocks.size(); ++b)
    init[b] = blocks[b].runs ? std::numeric_limits<double>::quiet_NaN() : std::abs(rng.value(1e6));

  Scalar<float> scale(m.scale);
  std::vector<void*> ptrs(count);
  for (size_t t = 0; t < count; ++t) ptrs[t] = G[t];
  std::vector<bool> block_runs(blocks.size());
  for (size_t b = 0; b < blocks.size(); ++b) block_runs[b] = blocks[b].runs;
  Result<T> first, second;
  {
    std::optional<ChunkFilter> filter;
    const auto sparse = [](const TensorSpec& t) { return t.sparse(); };
    for (Result<T>* r : {&first, &second}) {
      if (std::any_of(specs.begin(), specs.end(), sparse))
        filter.emplace(numels, 1, [&](int64_t t, int64_t c) { return runs(specs[t], c); },
                       mode.table, mode.arg_bytes);
      run_once<T>(*r, ptrs, numels, m, inf_norm, scale, init, block_runs, mode);
      filter.reset();
    }
  }

  const double mul = unscale_mul(m.factor, m.scale_on_device ? scale.ptr() : nullptr);
  std::vector<double> want_partials = init;
  bool any_nonfinite = false;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Block& blk = blocks[b];
    if (!blk.runs) continue;
    const int64_t lo = blk.chunk * kChunk;
    const T* now = G[blk.tensor] + lo;
    const std::string where = label + " [" + mode.name + "] block " + std::to_string(b) + " (tensor " +
                              std::to_string(blk.tensor) + " chunk " + std::to_string(blk.chunk) + ")";
    // The device address's alignment decides the kernel's order of operations.
    const T* const at[1] = {now};
    const int vector_bytes = fastaccum::cuda::vector_bytes(at, 1u);
    const NormBlock exact = norm_block_reference<T>(blk.before.data(), static_cast<int64_t>(blk.before.size()),
                                                    vector_bytes, mul, inf_norm);
    want_partials[b] = exact.partial;
    any_nonfinite |= exact.nonfinite;
    check(same_bits(first.partials[b], exact.partial),
          where + " partial: got " + std::to_string(first.partials[b]) + ", want " +
              std::to_string(exact.partial));
    compare_bits(where + " grads (read-only)", now, blk.before, lo);
  }
  const auto want_out = static_cast<out_t<T>>(norm_finish_reference(want_partials, inf_norm));
  check(same_bits(first.out.value(), want_out),
        label + " norm: got " + std::to_string(first.out.value()) + ", want " + std::to_string(want_out));
  check(first.found.value() == (any_nonfinite ? 1.f : 0.f),
        label + " found_inf: got " + std::to_string(first.found.value()) + ", want " +
            (any_nonfinite ? "1" : "0"));
  // By value: the plan's chunk launches and the finishing block; table mode:
  // one launch (the finishing block alone without elements).
  const int64_t want_launches = expected_launches(numels, false, mode).norm;
  check(static_cast<int64_t>(first.launches) == want_launches &&
            want_launches == static_cast<int64_t>(mode.table ? 1 : planned_launches + 1),
        label + ": " + std::to_string(first.launches) + " launches, count_launches says " +
            std::to_string(want_launches));

  // What the plants must do, whatever the reference says.
  bool nan_planted = false, inf_planted = false;
  for (const Plant& p : plants) (std::isnan(p.value) ? nan_planted : inf_planted) = true;
  const double got = static_cast<double>(first.out.value());
  if (nan_planted) check(std::isnan(got), label + ": a NaN grad gives a norm of " + std::to_string(got));
  if (inf_planted && !nan_planted)
    check(got == std::numeric_limits<double>::infinity(),
          label + ": an inf grad gives a norm of " + std::to_string(got));
  if (!plants.empty()) check(first.found.value() == 1.f, label + ": found_inf not set by a planted value");

  size_t differ = 0;
  for (size_t b = 0; b < blocks.size(); ++b) differ += !same_bits(first.partials[b], second.partials[b]);
  check(differ == 0 && same_bits(first.out.value(), second.out.value()) &&
            first.found.value() == second.found.value(),
        label + ": a second run differs (" + std::to_string(differ) + " partials, norm " +
            std::to_string(first.out.value()) + " then " + std::to_string(second.out.value()) + ")");
  return first.found.value() != 0.f;
}

std::vector<TensorSpec> boundary_sizes() {
  return {{0},        {1},           {7},           {8},         {3000},     {kChunk},
          {kChunk + 1}, {2 * kChunk + 5}, {1000, 1}, {kChunk + 100, 2}, {4099, 3}, {33, 2},
          {0}};
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

// Over 1000 partials (four launches), so each thread of the finishing block
// takes two or three; only the chunks on either side of each launch boundary
// (after 319, 639 and 959 of them) and the ends run.
std::vector<TensorSpec> many_chunks() {
  const int64_t chunks = 1100;
  return {{5}, {chunks * kChunk - 3, 0, {0, 318, 319, 638, 639, 958, 959, 1099}}, {9, 1}};
}

// Each case runs in table mode and in one by-value budget (add_in_modes).
template <typename T>
void add_cases() {
  const std::string dt = type_name<T>();
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const bool inf_norm : {false, true}) {
    const std::string norm = inf_norm ? "inf" : "l2";
    for (const Mode* m : {&kPlain, &kScaled, &kFactor}) {
      const std::string base = norm + "/" + m->name + "/" + dt;
      add_in_modes(base + "/clean", m == &kScaled, [=](const std::string& l, const ModeSpec& mode) {
        run_norm<T>(l, boundary_sizes(), *m, inf_norm, {}, 31, false, mode);
      });
      add_in_modes(base + "/flat_buffer_views", false, [=](const std::string& l, const ModeSpec& mode) {
        run_norm<T>(l, boundary_sizes(), *m, inf_norm, {}, 32, /*flat=*/true, mode);
      });
    }
    add_in_modes(norm + "/many_tensors/" + dt, true, [=](const std::string& l, const ModeSpec& mode) {
      run_norm<T>(l, many_sizes(6), kFactor, inf_norm, {}, 33, false, mode);
    });
    // Non-finite values in the vector path, in a chunk's strided tail, in a
    // misaligned tensor's scalar path, as a tensor's last element, in a
    // later launch; a NaN wins over an inf in the same call.
    const std::string base = norm + "/" + kScaled.name + "/" + dt;
    const std::vector<std::pair<std::string, std::vector<Plant>>> where = {
        {"inf_vector_path", {{4, 1024, inf}}},
        {"-inf_chunk_tail", {{6, kChunk, -inf}}},
        {"nan_misaligned", {{9, kChunk + 99, nan}}},
        {"nan_last_element", {{7, 2 * kChunk + 4, nan}}},
        {"nan_after_inf", {{1, 0, inf}, {7, 3, nan}}},
    };
    for (const auto& [name, plants] : where) {
      add_in_modes(base + "/" + name, false, [=](const std::string& l, const ModeSpec& mode) {
        run_norm<T>(l, boundary_sizes(), kScaled, inf_norm, plants, 34, false, mode);
      });
    }
    add_in_modes(base + "/many_tensors_inf_later_launch", false, [=](const std::string& l, const ModeSpec& mode) {
      run_norm<T>(l, many_sizes(7), kScaled, inf_norm, {{125, 0, -inf}}, 35, false, mode);
    });
    add_in_modes(norm + "/" + kOverflowFp16.name + "/" + dt, false, [=](const std::string& l, const ModeSpec& mode) {
      const bool found = run_norm<T>(l, boundary_sizes(), kOverflowFp16, inf_norm, {}, 36, false, mode);
      check(found == std::is_same_v<T, c10::Half>, l + ": found_inf " + std::to_string(found));
    });
    add_in_modes(norm + "/over_1000_partials/" + dt, true, [=](const std::string& l, const ModeSpec& mode) {
      run_norm<T>(l, many_chunks(), kFactor, inf_norm, {}, 37, false, mode);
    });
    // Nothing to launch but the finishing block, which writes 0.
    add_in_modes(norm + "/all_empty/" + dt, true, [=](const std::string& l, const ModeSpec& mode) {
      run_norm<T>(l, {}, kScaled, inf_norm, {}, 38, false, mode);
      run_norm<T>(l + "/three_empty", {{0}, {0, 1}, {0}}, kScaled, inf_norm, {}, 38, false, mode);
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  emutest::for_each_dtype([](auto v) { add_cases<decltype(v)>(); });
  return emutest::run_all(argc, argv);
}
