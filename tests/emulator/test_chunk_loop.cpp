// The device-side chunk loop (csrc/cuda/chunk_loop.cuh, NOTE: [chunk loop])
// on its own: a probe kernel hands for_each_element lists whose every element
// encodes its own index, and its op checks what it is given and records it.
// Afterwards every element must have been seen exactly once, by the thread
// the path named by vector_bytes gives it, the stored lists must hold what
// the op stored on [0, n) and nothing else may have changed, before or after.
// Built and run by tests/test_cuda_kernels_emulated.py.
#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../../csrc/cuda/chunk_loop.cuh"
#include "harness.h"

namespace {

using namespace emutest;
using fastaccum::cuda::for_each_element;
using fastaccum::cuda::is_half_type_v;
using fastaccum::cuda::kPacksInFlight;
using fastaccum::cuda::opmath_t;
using fastaccum::cuda::vector_bytes;

constexpr int kBlock = 512;        // the kernels' block size (multi_tensor_apply.cuh)
constexpr int64_t kChunk = 65536;  // plan::kChunkSize: the largest n a kernel passes

// ---- values that name their element -------------------------------------------
//
// Element j of list d holds code 1 + (j + d * kListShift) mod kCodes: a
// positive value exact in T and in opmath, so the op can tell which element
// (mod kCodes) of which list it was handed. Half types have fewer than 2^15
// positive finite values, so their codes repeat past kCodes elements.

template <typename T>
constexpr int64_t kCodes = is_half_type_v<T> ? 30000 : int64_t{1} << 22;
constexpr int64_t kListShift = 7919;
constexpr int64_t kStoreShift = 12345;

int64_t wrap(int64_t j, int64_t m) { return ((j % m) + m) % m; }

template <typename T>
T encode(int64_t code) {
  if constexpr (is_half_type_v<T>) {
    T v;
    v.x = static_cast<uint16_t>(code);  // a positive finite half or bfloat16
    return v;
  } else {
    return static_cast<T>(code);
  }
}

// The code an opmath value stands for, or -1 if it is none.
template <typename T>
int64_t decode(opmath_t<T> x) {
  if constexpr (is_half_type_v<T>) {
    if (!(x > 0 && std::isfinite(x))) return -1;
    const T v = static_cast<T>(x);
    if (static_cast<opmath_t<T>>(v) != x) return -1;
    return v.x;
  } else {
    if (!(x >= 1 && x <= static_cast<opmath_t<T>>(kCodes<T> + 1)) || x != std::floor(x)) return -1;
    return static_cast<int64_t>(x);
  }
}

template <typename T>
int64_t loaded_code(int64_t j, int d) {
  return 1 + wrap(j + d * kListShift, kCodes<T>);
}
// What the op stores to list d for the element of key k (k = j mod kCodes);
// with no list loaded it cannot know the element and stores kCodes + 1.
template <typename T>
int64_t stored_code(int64_t key, int d, bool any_loaded) {
  return any_loaded ? 1 + wrap(key + d * kListShift + kStoreShift, kCodes<T>) : kCodes<T> + 1;
}

// ---- the probe kernel -----------------------------------------------------------------

enum Total { kCalls, kBadCode, kKeysDisagree, kUnloadedNotZero, kOutOfOrder, kTotals };

template <int kLists, typename T>
struct ProbeOp {
  using op_t = opmath_t<T>;
  unsigned load, store;
  int64_t limit;     // keys run over [0, limit)
  unsigned* seen;    // per key: op calls
  int* owner;        // per key: the thread, when keys are unique (else nullptr)
  int totals[kTotals] = {};
  int64_t last = -1;  // a thread sees its elements in increasing order

  __device__ void operator()(op_t (&r)[kLists]) {
    ++totals[kCalls];
    int64_t key = -1;
    bool bad = false;
    for (int d = 0; d < kLists; ++d) {
      if (!((load >> d) & 1u)) {
        totals[kUnloadedNotZero] += !(r[d] == op_t(0) && !std::signbit(r[d]));
        continue;
      }
      const int64_t code = decode<T>(r[d]);
      if (code < 1 || code > kCodes<T>) {
        bad = true;
        continue;
      }
      const int64_t k = wrap(code - 1 - d * kListShift, kCodes<T>);
      if (key >= 0 && k != key) ++totals[kKeysDisagree];
      if (key < 0) key = k;
    }
    if (load != 0u) {
      if (bad || key < 0 || key >= limit) {
        ++totals[kBadCode];
        key = -1;
      } else {
        // Not atomic: the emulator switches threads only at barriers and
        // atomics, so the counts are exact (and the run much faster).
        ++seen[key];
        if (owner != nullptr) {
          owner[key] = static_cast<int>(threadIdx.x);
          totals[kOutOfOrder] += key <= last;
          last = key;
        }
      }
    }
    for (int d = 0; d < kLists; ++d)
      if ((store >> d) & 1u)
        r[d] = static_cast<op_t>(encode<T>(stored_code<T>(key < 0 ? 0 : key, d, load != 0u)));
  }
};

template <int kLists, typename T>
struct ProbeArgs {
  T* ptrs[kLists];
  int64_t n;
  unsigned load, store;
  int64_t limit;
  unsigned* seen;
  int* owner;
  int* totals;
};

template <int kLists, int kPacks, typename T>
__global__ void probe_kernel(ProbeArgs<kLists, T> a) {
  ProbeOp<kLists, T> op{a.load, a.store, a.limit, a.seen, a.owner};
  for_each_element<kLists, kPacks>(a.ptrs, a.n, a.load, a.store, op);
  // Every thread gets here (NOTE: [chunk loop]), or the emulator aborts.
  __syncthreads();
  for (int t = 0; t < kTotals; ++t) atomicAdd(&a.totals[t], op.totals[t]);
}

// ---- one run ----------------------------------------------------------------------------

// Byte offsets of the lists' starts past a 64-byte boundary.
template <int kLists>
using Offsets = std::array<int, kLists>;

// The pack width the chunk loop must pick for these offsets.
template <typename T, int kLists>
int want_vector_bytes(const Offsets<kLists>& off, unsigned touched) {
  int common = 64;
  for (int d = 0; d < kLists; ++d)
    if ((touched >> d) & 1u)
      while (off[d] % common != 0) common /= 2;
  if (common >= 16) return 16;
  if (common >= 8 && sizeof(T) < 8) return 8;
  return 0;
}

// The thread NOTE: [chunk loop] gives element i: packs of `width` bytes dealt
// round-robin, then the scalar loop's strided elements.
template <typename T>
int want_owner(int64_t i, int64_t n, int width) {
  const int64_t vec = width / static_cast<int64_t>(sizeof(T));
  const int64_t done = width == 0 ? 0 : n - n % vec;
  return static_cast<int>(i < done ? (i / vec) % kBlock : (i - done) % kBlock);
}

template <int kLists, int kPacks, typename T>
void run_one(const std::string& label, int64_t n, const Offsets<kLists>& off, unsigned load,
             unsigned store, int64_t guard) {
  const std::string where = label + " n=" + std::to_string(n) + " guard=" + std::to_string(guard) +
                            " offsets(bytes)=" + [&] {
                              std::string s;
                              for (const int o : off) s += std::to_string(o) + ",";
                              return s;
                            }();
  // Each list its own allocation: `mis` elements before the start, `guard`
  // after element n; with no guard an overrun is an ASan error.
  std::vector<Buffer<T>> bufs;
  std::vector<int64_t> mis;
  ProbeArgs<kLists, T> a{};
  for (int d = 0; d < kLists; ++d) {
    mis.push_back(off[d] / static_cast<int>(sizeof(T)));
    bufs.emplace_back(n + guard, static_cast<int>(mis[d]));
    a.ptrs[d] = bufs[d].data();
    for (int64_t j = -mis[d]; j < n + guard; ++j) bufs[d][j] = encode<T>(loaded_code<T>(j, d));
  }
  const bool unique = n <= kCodes<T>;
  const int64_t limit = std::min(n, kCodes<T>);
  std::vector<unsigned> seen(static_cast<size_t>(limit) + 1, 0u);
  std::vector<int> owner(static_cast<size_t>(limit) + 1, -1);
  std::vector<int> totals(kTotals, 0);
  a.n = n;
  a.load = load;
  a.store = store;
  a.limit = limit;
  a.seen = seen.data();
  a.owner = unique ? owner.data() : nullptr;
  a.totals = totals.data();

  const int width = want_vector_bytes<T, kLists>(off, load | store);
  check(vector_bytes(a.ptrs, load | store) == width,
        where + ": vector_bytes " + std::to_string(vector_bytes(a.ptrs, load | store)) +
            ", want " + std::to_string(width));

  fastaccum::emu::launch(dim3(1), dim3(kBlock), nullptr, &probe_kernel<kLists, kPacks, T>, a);

  check(totals[kCalls] == n, where + ": op called " + std::to_string(totals[kCalls]) + " times");
  check(totals[kBadCode] == 0, where + ": " + std::to_string(totals[kBadCode]) +
                                   " op calls with a value that is no element of [0, n)");
  check(totals[kKeysDisagree] == 0, where + ": " + std::to_string(totals[kKeysDisagree]) +
                                        " op calls with elements of different indices");
  check(totals[kUnloadedNotZero] == 0, where + ": " + std::to_string(totals[kUnloadedNotZero]) +
                                           " unloaded values not 0");
  if (load != 0u) {
    int64_t bad = 0, first = -1;
    for (int64_t k = 0; k < limit; ++k) {
      // Keys repeat every kCodes elements.
      const int64_t want = (n - 1 - k) / kCodes<T> + 1;
      if (seen[k] != want) {
        if (first < 0) first = k;
        ++bad;
      }
    }
    if (bad > 0)
      check(false, where + ": " + std::to_string(bad) + " element(s) not seen exactly once, first " +
                       std::to_string(first) + " (" + std::to_string(seen[first]) + " times)");
    if (unique) {
      check(totals[kOutOfOrder] == 0, where + ": a thread saw its elements out of order");
      int64_t wrong = 0, at = -1;
      for (int64_t i = 0; i < n; ++i)
        if (owner[i] != want_owner<T>(i, n, width)) {
          if (at < 0) at = i;
          ++wrong;
        }
      if (wrong > 0)
        check(false, where + ": " + std::to_string(wrong) + " element(s) not on the thread of the " +
                         std::to_string(width) + "-byte path, first " + std::to_string(at) +
                         " on thread " + std::to_string(owner[at]) + ", want " +
                         std::to_string(want_owner<T>(at, n, width)));
    }
  }
  for (int d = 0; d < kLists; ++d) {
    const std::string list = where + " list " + std::to_string(d);
    const bool stored = (store >> d) & 1u;
    std::vector<T> before, inside, after;
    for (int64_t j = -mis[d]; j < 0; ++j) before.push_back(encode<T>(loaded_code<T>(j, d)));
    for (int64_t j = 0; j < n; ++j)
      inside.push_back(encode<T>(stored ? stored_code<T>(j % kCodes<T>, d, load != 0u)
                                        : loaded_code<T>(j, d)));
    for (int64_t j = n; j < n + guard; ++j) after.push_back(encode<T>(loaded_code<T>(j, d)));
    compare_bits(list + " before the start", bufs[d].data() - mis[d], before, -mis[d]);
    compare_bits(list + (stored ? " stored [0, n)" : " untouched [0, n)"), bufs[d].data(), inside, 0);
    compare_bits(list + " after n", bufs[d].data() + n, after, n);
  }
}

// ---- what runs ----------------------------------------------------------------------------

// Start offsets giving 16-, 8-, 4- and 2-byte alignment, alike and mixed.
template <typename T, int kLists>
std::vector<Offsets<kLists>> offset_sets() {
  constexpr int s = sizeof(T);
  auto all = [](int o) {
    Offsets<kLists> a;
    a.fill(o);
    return a;
  };
  auto last = [&](int rest, int o) {
    Offsets<kLists> a = all(rest);
    a[kLists - 1] = o;
    return a;
  };
  std::vector<Offsets<kLists>> out = {all(0), all(48), all(8)};
  if (kLists > 1) out.push_back(last(16, 8));
  if (s <= 4) {
    out.push_back(all(12));
    out.push_back(last(0, 4));
  }
  if (s == 2) {
    out.push_back(all(2));
    out.push_back(last(8, 6));
  }
  return out;
}

// n at every boundary of the loops for these packs: a pack of either width,
// a round of the block, a trip of packs, and whole chunks.
template <typename T, int kLists, int kPacks>
std::vector<int64_t> sizes() {
  constexpr int64_t v16 = 16 / sizeof(T), v8 = 8 / sizeof(T);
  constexpr int64_t p16 = kPacks > 0 ? kPacks : kPacksInFlight<kLists, static_cast<int>(v16)>;
  constexpr int64_t p8 = kPacks > 0 ? kPacks : kPacksInFlight<kLists, static_cast<int>(v8)>;
  const int64_t trip16 = p16 * kBlock * v16, trip8 = p8 * kBlock * v8;
  std::vector<int64_t> n = {0,  1,  2,  3,  v8 - 1, v8, v8 + 1, v16 - 1, v16, v16 + 1, 2 * v16 + 3,
                            kBlock * v16 - 1, kBlock * v16, kBlock * v16 + 1,
                            trip16 - 1, trip16, trip16 + v16, trip16 + kBlock * v16 + 3, 2 * trip16 + 5,
                            trip8 - 1, trip8, trip8 + 1, trip8 + kBlock * v8 + 1,
                            4099, 12345, kChunk - 3, kChunk};
  std::sort(n.begin(), n.end());
  n.erase(std::unique(n.begin(), n.end()), n.end());
  n.erase(std::remove_if(n.begin(), n.end(), [](int64_t x) { return x < 0 || x > kChunk; }), n.end());
  return n;
}

template <typename T, int kLists, int kPacks = 0>
void add_mask_case(const std::string& what, unsigned load, unsigned store) {
  std::string name = std::string(type_name<T>()) + "/lists" + std::to_string(kLists) + "/" + what;
  if (kPacks > 0) name += "/packs" + std::to_string(kPacks);
  add_case(name, [=] {
    // Every other size with elements after n (an overrun then shows in the
    // values, not only to ASan), so each boundary's neighbours get both.
    for (const Offsets<kLists>& off : offset_sets<T, kLists>()) {
      const std::vector<int64_t> ns = sizes<T, kLists, kPacks>();
      for (size_t i = 0; i < ns.size(); ++i)
        run_one<kLists, kPacks, T>(name, ns[i], off, load, store, i % 2 == 0 ? 0 : 37);
    }
  });
}

// vector_bytes alone, on addresses that are never dereferenced: only the
// lists of the mask count.
template <typename T>
void add_vector_bytes_case() {
  const std::string name = std::string(type_name<T>()) + "/vector_bytes";
  add_case(name, [=] {
    constexpr bool narrow = sizeof(T) < 8;
    auto at = [](uintptr_t a) { return reinterpret_cast<T*>(a); };
    struct Row {
      uintptr_t a, b, c;
      unsigned mask;
      int want;
    };
    const uintptr_t base = 0x7f0000001000u;
    const std::vector<Row> rows = {
        {base, base + 64, base + 4096, 0b111u, 16},
        {base + 16, base + 48, base + 32, 0b111u, 16},
        {base + 8, base, base, 0b111u, narrow ? 8 : 0},
        {base, base + 24, base + 40, 0b111u, narrow ? 8 : 0},
        {base, base + 24, base + 4, 0b111u, 0},
        {base, base + 24, base + 4, 0b011u, narrow ? 8 : 0},
        {base, base + 16, base + 4, 0b011u, 16},
        {base + 4, base, base, 0b110u, 16},
        {base + 2, base + 8, base + 16, 0b001u, 0},
        {base + 2, base + 8, base + 16, 0b110u, narrow ? 8 : 0},
        {base + 12, base + 8, base + 16, 0b100u, 16},
        {base + 12, base + 6, base + 16, 0b000u, 16},
    };
    for (const Row& r : rows) {
      if ((r.a | r.b | r.c) % sizeof(T) != 0) continue;  // not a T address
      T* const ptrs[3] = {at(r.a), at(r.b), at(r.c)};
      const int got = vector_bytes(ptrs, r.mask);
      check(got == r.want, name + ": offsets " + std::to_string(r.a - base) + "," +
                               std::to_string(r.b - base) + "," + std::to_string(r.c - base) +
                               " mask " + std::to_string(r.mask) + ": " + std::to_string(got) +
                               ", want " + std::to_string(r.want));
      T* const one[1] = {at(r.a)};
      const int want_one = (r.a % 16 == 0) ? 16 : (narrow && r.a % 8 == 0) ? 8 : 0;
      check(vector_bytes(one, 1u) == want_one, name + ": one list at offset " + std::to_string(r.a - base));
    }
  });
}

template <typename T>
void add_cases() {
  add_vector_bytes_case<T>();
  add_mask_case<T, 1>("read_only", 0b1u, 0b0u);
  add_mask_case<T, 1>("in_place", 0b1u, 0b1u);
  add_mask_case<T, 1>("store_only", 0b0u, 0b1u);
  add_mask_case<T, 2>("load_both_store_first", 0b11u, 0b01u);
  add_mask_case<T, 2>("load_both_store_both", 0b11u, 0b11u);
  add_mask_case<T, 2>("load_only_and_store_only", 0b01u, 0b10u);
  add_mask_case<T, 2>("second_untouched", 0b01u, 0b01u);
  add_mask_case<T, 3>("update_first_step", 0b011u, 0b101u);
  add_mask_case<T, 3>("update", 0b111u, 0b101u);
  add_mask_case<T, 3>("load_all_store_all", 0b111u, 0b111u);
}

// Pack counts other than the defaults: one (no full-trip loop) and three
// (trips that never divide a chunk).
template <typename T>
void add_packs_cases() {
  add_mask_case<T, 1, 1>("in_place", 0b1u, 0b1u);
  add_mask_case<T, 1, 3>("in_place", 0b1u, 0b1u);
  add_mask_case<T, 3, 3>("update", 0b111u, 0b101u);
}

}  // namespace

int main(int argc, char** argv) {
  emutest::for_each_dtype([](auto v) { add_cases<decltype(v)>(); });
  add_packs_cases<float>();
  add_packs_cases<c10::Half>();
  return emutest::run_all(argc, argv);
}
