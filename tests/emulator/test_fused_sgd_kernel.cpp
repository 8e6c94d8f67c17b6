// The fused SGD CUDA kernels (csrc/cuda/fused_sgd_kernel.cuh), run by the
// host emulator through the real launcher, against the sequential reference
// of tests/emulator/reference.h, bit for bit. Built and run by
// tests/test_cuda_kernels_emulated.py.
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../../csrc/cuda/fused_sgd_kernel.cuh"
#include "harness.h"
#include "launch_modes.h"
#include "plan_map.h"
#include "reference.h"

namespace {

using namespace emutest;
using fastaccum::cuda::SgdArgsDevice;
using fastaccum::cuda::SgdLists;

constexpr int64_t kChunk = fastaccum::plan::kChunkSize;

struct TensorSpec {
  int64_t n;
  int misalign[3] = {0, 0, 0};  // params, grads, momentum buffers, in elements
  float step = 3.f;             // 0: first real update, buffer NaN-filled
  // Sparse tensors: only these chunks are filled, run and checked.
  std::vector<int64_t> run_chunks = {};
  bool sparse() const { return !run_chunks.empty(); }
};

struct Config {
  const char* name;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

const Config kConfigs[] = {
    {"plain", 0.0, 0.0, 0.0, false, false},
    {"wd_maximize", 0.0, 0.0, 0.1, false, true},
    {"momentum", 0.9, 0.0, 0.0, false, false},
    {"momentum_dampening_wd", 0.9, 0.2, 1e-2, false, false},
    {"nesterov_wd_maximize", 0.8, 0.0, 1e-2, true, true},
};

enum class Lr { kScalar, kF32, kF64 };

// Where the call's scalars come from. found_inf: -1 none, else its value.
struct Scalars {
  const char* name;
  bool scale_on_device;
  float scale;
  double factor;  // 1/K times a host-folded scale reciprocal
  Lr lr;
  int found_inf;
};

const Scalars kScalars[] = {
    {"none", false, 1.f, 1.0, Lr::kScalar, -1},
    {"scale_lr32_found0", true, 3000.f, 0.25, Lr::kF32, 0},
    {"lr64_factor", false, 1.f, 1.0 / 3.0, Lr::kF64, -1},
    {"scale_factor_lr64", true, 65536.f, 0.125, Lr::kF64, 0},
};
const Scalars kSkip = {"found_inf", true, 1024.f, 0.25, Lr::kF32, 1};

// The clip coefficient of a fused clip_grad_norm_: a float on the device, or
// the host's double. Exactly 1 must change nothing: no multiply, no grad
// write-back, the same bits as no clip (the reference then is no clip's).
struct Clip {
  const char* name;
  bool on_device;
  double value;
};

const Clip kClips[] = {
    {"clip_device", true, 0.37},
    {"clip_host", false, 0.37},
    {"clip_device_one", true, 1.0},
    {"clip_host_one", false, 1.0},
};

std::vector<std::pair<int64_t, int64_t>> ranges(const TensorSpec& s) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (!s.sparse()) {
    if (s.n > 0) out.push_back({0, s.n});
    return out;
  }
  for (const int64_t c : s.run_chunks) out.push_back({c * kChunk, std::min(s.n, (c + 1) * kChunk)});
  return out;
}

bool runs(const TensorSpec& s, int64_t chunk) {
  if (!s.sparse()) return true;
  for (const int64_t c : s.run_chunks)
    if (c == chunk) return true;
  return false;
}

template <typename T>
void run_sgd(const std::string& label, const std::vector<TensorSpec>& specs, const Config& c,
             const Scalars& s, uint64_t seed, bool write_grad, bool flat = false,
             const Clip* clip = nullptr, const ModeSpec& mode = kTableMode) {
  const bool momentum = c.momentum != 0.0;
  const size_t count = specs.size();
  Rng rng(seed);
  using Memory = TensorMemory<T>;
  std::vector<typename Memory::Spec> list_specs[3];
  std::vector<Scalar<float>> steps;
  std::vector<int64_t> numels;
  for (const TensorSpec& t : specs) {
    for (int d = 0; d < 3; ++d) list_specs[d].push_back({t.n, t.misalign[d], t.sparse()});
    steps.emplace_back(t.step);
    numels.push_back(t.n);
  }
  const Memory P(list_specs[0], flat), G(list_specs[1], flat);
  const Memory B(momentum ? list_specs[2] : std::vector<typename Memory::Spec>{}, flat);

  // Fill what runs, and keep a copy: the copy becomes the expected values.
  struct Snapshot {
    size_t tensor;
    int64_t lo;
    std::vector<T> p, g, b;
  };
  std::vector<Snapshot> snaps;
  const T nan = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  for (size_t t = 0; t < count; ++t)
    for (const auto& [lo, hi] : ranges(specs[t])) {
      Snapshot snap{t, lo, {}, {}, {}};
      snap.p.reserve(hi - lo);
      snap.g.reserve(hi - lo);
      snap.b.reserve(momentum ? hi - lo : 0);
      for (int64_t i = lo; i < hi; ++i) {
        P[t][i] = static_cast<T>(rng.value());
        G[t][i] = static_cast<T>(rng.value(64.0));
        snap.p.push_back(P[t][i]);
        snap.g.push_back(G[t][i]);
        if (momentum) {
          // A buffer that was never written must not be read: NaN shows it.
          B[t][i] = specs[t].step == 0.f ? nan : static_cast<T>(rng.value());
          snap.b.push_back(B[t][i]);
        }
      }
      snaps.push_back(std::move(snap));
    }

  const double lr = 0.05;
  Scalar<float> scale(s.scale), found(s.found_inf > 0 ? 1.f : 0.f);
  Scalar<float> lr32(static_cast<float>(lr));
  Scalar<double> lr64(lr);
  Scalar<float> clip32(clip != nullptr ? static_cast<float>(clip->value) : 1.f);
  SgdArgsDevice a{lr,       nullptr, nullptr,  c.weight_decay, c.momentum, 1.0 - c.dampening,
                  s.factor, nullptr, nullptr,  c.nesterov,     c.maximize, write_grad,
                  false};
  if (s.lr == Lr::kF32) a.lr_f32 = lr32.ptr();
  if (s.lr == Lr::kF64) a.lr_f64 = lr64.ptr();
  if (s.scale_on_device) a.grad_scale = scale.ptr();
  if (s.found_inf >= 0) a.found_inf = found.ptr();
  if (clip != nullptr) {
    a.clip_grad = true;
    if (clip->on_device) {
      a.clip_coef = clip32.ptr();
    } else {
      a.clip = clip->value;
    }
  }

  std::vector<void*> pa(count), ga(count), ba(count, nullptr);
  std::vector<float*> sa(count);
  for (size_t t = 0; t < count; ++t) {
    pa[t] = P[t];
    ga[t] = G[t];
    if (momentum) ba[t] = B[t];
    sa[t] = steps[t].ptr();
  }
  SgdLists lists;
  lists.count = count;
  lists.params = pa.data();
  lists.grads = ga.data();
  lists.momentum = momentum ? ba.data() : nullptr;
  lists.numels = numels.data();
  lists.steps = momentum ? sa.data() : nullptr;

  bool any_sparse = false;
  for (const TensorSpec& t : specs) any_sparse |= t.sparse();
  {
    std::optional<ChunkFilter> filter;
    if (any_sparse)
      filter.emplace(numels, momentum ? 3 : 2,
                     [&](int64_t t, int64_t chunk) { return runs(specs[t], chunk); }, mode.table,
                     mode.arg_bytes, momentum);
    const size_t before = fastaccum::emu::launch_count();
    fastaccum::cuda::fused_sgd_launch<T>(lists, a, launch_mode(mode), nullptr);
    const auto want = expected_launches(numels, momentum, mode);
    const int64_t want_launches = want.update + (momentum ? want.steps : 0);
    const auto made = static_cast<int64_t>(fastaccum::emu::launch_count() - before);
    check(made == want_launches, label + " [" + mode.name + "]: " + std::to_string(made) +
                                     " launches, count_launches says " +
                                     std::to_string(want_launches));
  }
  // Blocks the filter left out never took their tensors' tickets: drop the
  // tables rather than let a later call reuse them.
  if (any_sparse && mode.table) table_source().cache.clear();

  const bool skipped = s.found_inf > 0;
  const double lr_used = s.lr == Lr::kF32 ? static_cast<double>(static_cast<float>(lr)) : lr;
  const double clip_used = clip == nullptr ? 1.0 : clip->on_device ? clip32.value() : clip->value;
  const auto h = sgd_hyper<T>(lr_used, c.weight_decay, c.momentum, c.dampening, c.nesterov,
                              c.maximize, s.factor, s.scale_on_device ? scale.ptr() : nullptr,
                              clip != nullptr, clip_used);
  for (Snapshot& snap : snaps) {
    const size_t t = snap.tensor;
    sgd_reference(snap.p.data(), snap.g.data(), momentum ? snap.b.data() : nullptr, 0,
                  static_cast<int64_t>(snap.p.size()), specs[t].step == 0.f, h, write_grad, skipped);
    const std::string where = label + " [" + mode.name + "] tensor " + std::to_string(t) + " (numel " +
                              std::to_string(specs[t].n) + ")";
    compare_bits(where + " params", P[t] + snap.lo, snap.p, snap.lo);
    compare_bits(where + (write_grad ? " grads (written back)" : " grads (read-only)"),
                 G[t] + snap.lo, snap.g, snap.lo);
    if (momentum) compare_bits(where + " momentum", B[t] + snap.lo, snap.b, snap.lo);
  }
  for (size_t t = 0; t < count; ++t) {
    // In table mode the last block of a tensor advances its counter: a
    // tensor whose blocks did not all run keeps its old count.
    if (mode.table && specs[t].sparse()) continue;
    const float want = (momentum && !skipped) ? specs[t].step + 1.f : specs[t].step;
    check(steps[t].value() == want, label + " [" + mode.name + "] step counter " + std::to_string(t) + ": got " +
                                        std::to_string(steps[t].value()) + ", want " +
                                        std::to_string(want));
  }
}

// Sizes around every boundary of the chunk loop: empty and one-element
// tensors, vector packs and their tails, one and several chunks, and each
// list misaligned by 1-3 elements on its own and all together.
std::vector<TensorSpec> boundary_sizes() {
  std::vector<TensorSpec> s = {
      {0},          {1},          {7},
      {8},          {3000},       {kChunk + 1},
      {2 * kChunk + 5},
      {1000, {1, 0, 0}},          {kChunk + 100, {0, 2, 0}},
      {4099, {0, 0, 3}},          {2 * kChunk + 17, {3, 1, 2}},
      {33, {2, 2, 2}},            {0},
  };
  for (size_t i = 0; i < s.size(); ++i) s[i].step = i % 3 == 0 ? 0.f : 3.f;
  return s;
}

// More tensors than one launch holds at any depth, empties inside and at the
// end, multi-chunk tensors that a launch boundary cuts, and more step
// counters than one advance_steps launch takes.
std::vector<TensorSpec> many_sizes(uint64_t seed, size_t n, float step) {
  Rng rng(seed);
  std::vector<TensorSpec> s;
  for (size_t i = 0; i < n; ++i) {
    TensorSpec t{1 + rng.below(300)};
    t.misalign[0] = static_cast<int>(i % 4);
    t.step = step < 0 ? (i % 2 ? 0.f : 5.f) : step;
    s.push_back(t);
  }
  for (const size_t i : {3u, 50u, 111u}) s[i].n = 0;
  s[20].n = 2 * kChunk + 3;
  s[47].n = 3 * kChunk + 1;  // cut by the 48-slot limit of depth 3
  s[115].n = kChunk + 1;
  s.push_back({0});
  return s;
}

template <typename T>
void add_cases() {
  const std::string dt = type_name<T>();
  uint64_t seed = 100;
  for (const Config& c : kConfigs)
    for (const Scalars& s : kScalars) {
      // Grad write-back alternates with a period other than the mode's, so
      // each launch mode meets both values.
      const bool write_grad = (seed / 2) % 2 == 0;
      // Table mode for two cases in three; each by-value budget for the rest.
      const ModeSpec& mode = seed % 3 != 2 ? kTableMode : (seed / 3) % 2 ? kByValue4k : kByValue32k;
      ++seed;
      const std::string name = "options/" + dt + "/" + c.name + "/" + s.name +
                               (write_grad ? "/write_grads" : "") + "/" + mode.name;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, boundary_sizes(), c, s, seed, write_grad, false, nullptr, mode);
      });
    }
  for (const ModeSpec& mode : kModes) {
    const std::string suffix = std::string("/") + mode.name;
    {
      const std::string name = "first_update_nan_buffers/" + dt + suffix;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, many_sizes(7, 130, 0.f), kConfigs[4], kScalars[1], 11, true, false, nullptr, mode);
      });
    }
    {
      const std::string name = "flat_buffer_views/" + dt + suffix;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, boundary_sizes(), kConfigs[3], kScalars[1], 17, true, /*flat=*/true, nullptr, mode);
        run_sgd<T>(name + "/no_momentum", boundary_sizes(), kConfigs[1], kScalars[2], 18, false, true, nullptr, mode);
      });
    }
    {
      const std::string name = "found_inf_skips_everything/" + dt + suffix;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, boundary_sizes(), kConfigs[3], kSkip, 12, false, false, nullptr, mode);
        run_sgd<T>(name + "/no_momentum", boundary_sizes(), kConfigs[1], kSkip, 13, false, false, nullptr, mode);
      });
    }
    {
      // The only writes of a skipped step: the grads, unscaled.
      const std::string name = "found_inf_unscales_grads_only/" + dt + suffix;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, boundary_sizes(), kConfigs[3], kSkip, 19, true, false, nullptr, mode);
        run_sgd<T>(name + "/no_momentum", boundary_sizes(), kConfigs[1], kSkip, 20, true, false, nullptr, mode);
      });
    }
    {
      const std::string name = "many_tensors/" + dt + suffix;
      add_case(name, [=, &mode] {
        run_sgd<T>(name, many_sizes(8, 500, -1.f), kConfigs[3], kScalars[3], 14, true, false, nullptr, mode);
      });
    }
    {
      // One tensor of 322 chunks: the 320-block limit cuts it, and its
      // first and last chunks run on both sides of the cut.
      const std::string name = "block_limit_cut/" + dt + suffix;
      add_case(name, [=, &mode] {
        std::vector<TensorSpec> s = {{5}, {322 * kChunk - 9, {1, 0, 0}, 0.f, {0, 1, 2, 3, 316, 317, 318, 319, 320, 321}}, {77}};
        run_sgd<T>(name, s, kConfigs[2], kScalars[1], 15, true, false, nullptr, mode);
      });
    }
  }
}

// NOTE: [table cache] at work: one set of tensors stepped five times in
// table mode. The second call finds its table (no upload) with every ticket
// back at 0, so its step counters advance again; new grad addresses upload
// the table into the same buffer; another stream gets a table of its own;
// other params of the same count (a second optimizer) get one too, and the
// first set's table is still found afterwards.
template <typename T>
void run_table_reuse(const std::string& label) {
  const Config& c = kConfigs[3];
  const std::vector<TensorSpec> specs = boundary_sizes();
  const size_t count = specs.size();
  Rng rng(41);
  std::vector<typename TensorMemory<T>::Spec> ls[3];
  std::vector<int64_t> numels;
  std::vector<Scalar<float>> steps;
  for (const TensorSpec& t : specs) {
    for (int d = 0; d < 3; ++d) ls[d].push_back({t.n, t.misalign[d], false});
    numels.push_back(t.n);
    steps.emplace_back(t.step);
  }
  const TensorMemory<T> P(ls[0], false), G(ls[1], false), G2(ls[1], false), B(ls[2], false);
  const TensorMemory<T> P2(ls[0], false), B2(ls[2], false);  // the second optimizer's
  // G2: other grads at other addresses, for calls 3 and 4.
  std::vector<std::vector<T>> p(count), g(count), g2(count), b(count);
  const T nan = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  for (size_t t = 0; t < count; ++t)
    for (int64_t i = 0; i < specs[t].n; ++i) {
      P[t][i] = static_cast<T>(rng.value());
      G[t][i] = static_cast<T>(rng.value(64.0));
      G2[t][i] = static_cast<T>(rng.value(64.0));
      B[t][i] = specs[t].step == 0.f ? nan : static_cast<T>(rng.value());
      p[t].push_back(P[t][i]);
      g[t].push_back(G[t][i]);
      g2[t].push_back(G2[t][i]);
      b[t].push_back(B[t][i]);
    }
  SgdArgsDevice a{0.05,       nullptr, nullptr,  c.weight_decay, c.momentum, 1.0 - c.dampening,
                  0.5,        nullptr, nullptr,  c.nesterov,     c.maximize, false,
                  false};
  std::vector<void*> pa(count), ga(count), ga2(count), ba(count), pa2(count), ba2(count);
  std::vector<float*> sa(count), sa2(count);
  std::vector<Scalar<float>> steps2;
  for (size_t t = 0; t < count; ++t) {
    steps2.emplace_back(1.f);
    for (int64_t i = 0; i < specs[t].n; ++i) P2[t][i] = B2[t][i] = static_cast<T>(rng.value());
    pa2[t] = P2[t];
    ba2[t] = B2[t];
    sa2[t] = steps2[t].ptr();
    pa[t] = P[t];
    ga[t] = G[t];
    ga2[t] = G2[t];
    ba[t] = B[t];
    sa[t] = steps[t].ptr();
  }
  SgdLists lists;
  lists.count = count;
  lists.params = pa.data();
  lists.grads = ga.data();
  lists.momentum = ba.data();
  lists.numels = numels.data();
  lists.steps = sa.data();
  const auto h = sgd_hyper<T>(0.05, c.weight_decay, c.momentum, c.dampening, c.nesterov,
                              c.maximize, 0.5, nullptr, false, 1.0);

  HostTableSource& src = table_source();
  src.cache.clear();
  src.stream = 1;
  struct Want {
    int64_t uploads, hits, allocations;
  };
  const Want wants[6] = {{1, 0, 1}, {1, 1, 1}, {2, 1, 1}, {3, 1, 2}, {4, 1, 3}, {4, 2, 3}};
  SgdLists other = lists;
  other.params = pa2.data();
  other.grads = ga2.data();
  other.momentum = ba2.data();
  other.steps = sa2.data();
  const auto base = src.cache.stats();
  int updates = 0;  // of P
  for (int call = 0; call < 6; ++call) {
    if (call == 2) lists.grads = ga2.data();
    src.stream = call == 3 ? 2 : 1;
    const bool second_optimizer = call == 4;
    const size_t before = fastaccum::emu::launch_count();
    fastaccum::cuda::fused_sgd_launch<T>(second_optimizer ? other : lists, a,
                                         launch_mode(kTableMode), nullptr);
    const std::string at = label + " call " + std::to_string(call + 1);
    check(fastaccum::emu::launch_count() - before == 1, at + ": one launch");
    const auto st = src.cache.stats();
    check(st.uploads - base.uploads == wants[call].uploads &&
              st.hits - base.hits == wants[call].hits &&
              st.allocations - base.allocations == wants[call].allocations,
          at + ": uploads/hits/allocations " + std::to_string(st.uploads - base.uploads) + "/" +
              std::to_string(st.hits - base.hits) + "/" +
              std::to_string(st.allocations - base.allocations));
    for (size_t t = 0; t < count; ++t) {
      const bool first = specs[t].step + static_cast<float>(updates) == 0.f;
      if (!second_optimizer)
        sgd_reference(p[t].data(), (call < 2 ? g : g2)[t].data(), b[t].data(), 0, specs[t].n, first,
                      h, false, false);
      const std::string where = at + " tensor " + std::to_string(t);
      compare_bits(where + " params", P[t], p[t], 0);
      compare_bits(where + " momentum", B[t], b[t], 0);
      const float want = specs[t].step + static_cast<float>(updates + (second_optimizer ? 0 : 1));
      check(steps[t].value() == want, where + " step counter " + std::to_string(steps[t].value()));
      if (second_optimizer)
        check(steps2[t].value() == 2.f, where + " second optimizer's step counter");
    }
    updates += second_optimizer ? 0 : 1;
  }
  src.stream = 1;
}

// Clipping on its own (grad_mul 1: only the clip decides the grad write-back),
// after an unscale, with each source of lr, and on a skipped step, where the
// grads written back are the clipped ones.
template <typename T>
void add_clip_cases() {
  const std::string dt = type_name<T>();
  struct Run {
    const Config& config;
    const Scalars& scalars;
    bool write_grad;
  };
  const Run runs[] = {
      {kConfigs[0], kScalars[0], true},  {kConfigs[3], kScalars[1], false},
      {kConfigs[4], kScalars[2], true},  {kConfigs[2], kScalars[3], true},
      {kConfigs[3], kSkip, true},        {kConfigs[1], kSkip, false},
  };
  uint64_t seed = 300;
  for (const Clip& clip : kClips)
    for (const Run& r : runs) {
      const std::string name = "clip/" + dt + "/" + clip.name + "/" + r.config.name + "/" +
                               r.scalars.name + (r.write_grad ? "/write_grads" : "");
      add_case(name, [=, &clip] {
        run_sgd<T>(name, boundary_sizes(), r.config, r.scalars, seed, r.write_grad, false, &clip);
      });
      ++seed;
    }
}

// A tensor of more than 2^31 elements: chunk offsets in int64, the last
// (partial) chunks run, the untouched rest costs no memory.
template <typename T>
void add_huge_cases() {
  const std::string dt = type_name<T>();
  const int64_t n = (int64_t{1} << 31) + 777;
  const int64_t last = (n - 1) / kChunk;
  for (const ModeSpec& mode : kModes) {
    const std::string name = std::string("over_2^31_elements/") + dt + "/" + mode.name;
    add_case(name, [=, &mode] {
      std::vector<TensorSpec> s = {{3}, {n, {0, 0, 0}, 0.f, {0, last - 2, last - 1, last}}, {11}};
      run_sgd<T>(name, s, kConfigs[4], kScalars[1], 16, true, false, nullptr, mode);
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  emutest::for_each_dtype([](auto v) {
    add_cases<decltype(v)>();
    add_clip_cases<decltype(v)>();
    using T = decltype(v);
    const std::string name = std::string("table_reuse/") + type_name<T>();
    emutest::add_case(name, [name] { run_table_reuse<T>(name); });
  });
  add_huge_cases<float>();
  add_huge_cases<c10::Half>();
  return emutest::run_all(argc, argv);
}
