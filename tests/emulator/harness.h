// A small test harness for the emulator test programs: named cases, checks
// that report and count, a seeded RNG, and the "device" memory the kernels
// run on (each tensor its own allocation ending exactly at its last element,
// so ASan reports a read or write one past it; huge tensors mapped sparsely).
//
//   ./prog                 run every case
//   ./prog --list          list the cases
//   ./prog --only SUBSTR   run the cases whose name contains SUBSTR
//   ./prog --seed N        emulator seed (block order, thread interleaving)
//   ./prog --fail-fast     stop after the first failing case
//
// Exit status: 0 when every check passed, 1 otherwise. A sanitizer finding or
// an emulator abort (divergent barrier, deadlock) ends the program at once.
#pragma once

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../csrc/emulator/cuda_emulator.h"

namespace emutest {

// ---- cases and checks -------------------------------------------------------

struct Case {
  std::string name;
  std::function<void()> run;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

inline void add_case(std::string name, std::function<void()> run) {
  registry().push_back({std::move(name), std::move(run)});
}

// Reports a failed check with its context; the case goes on, so one run
// shows every mismatch (the first few per case).
inline bool check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures();
    if (failures() <= 40) std::printf("    FAIL: %s\n", what.c_str());
  }
  return ok;
}

inline int run_all(int argc, char** argv) {
  std::string only;
  uint64_t seed = 1;
  bool fail_fast = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--list") {
      for (const Case& c : registry()) std::printf("%s\n", c.name.c_str());
      return 0;
    } else if (a == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--fail-fast") {
      fail_fast = true;
    } else {
      std::fprintf(stderr, "usage: %s [--list] [--only SUBSTR] [--seed N] [--fail-fast]\n", argv[0]);
      return 2;
    }
  }
  fastaccum::emu::set_seed(seed);
  int ran = 0, failed_cases = 0;
  for (const Case& c : registry()) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const int before = failures();
    c.run();
    ++ran;
    const bool ok = failures() == before;
    failed_cases += !ok;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name.c_str());
    std::fflush(stdout);
    if (!ok && fail_fast) break;
  }
  std::printf("%d case(s), %d failed, %d failed check(s), seed %llu\n", ran,
              failed_cases, failures(), static_cast<unsigned long long>(seed));
  if (ran == 0) {
    std::printf("no case matched\n");
    return 1;
  }
  return failures() == 0 ? 0 : 1;
}

// ---- element types ------------------------------------------------------------

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, double>) return "fp64";
  if constexpr (std::is_same_v<T, c10::Half>) return "fp16";
  if constexpr (std::is_same_v<T, c10::BFloat16>) return "bf16";
}

// Calls f(T{}) for each element type the kernels are dispatched for.
template <typename F>
void for_each_dtype(F&& f) {
  f(float{});
  f(double{});
  f(c10::Half{});
  f(c10::BFloat16{});
}

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
double as_double(const T& v) {
  return static_cast<double>(static_cast<float>(v));
}
inline double as_double(const double& v) { return v; }

// Checks got[i] == want[i] bit for bit (element lo + i of a tensor), and
// reports how many differ and the first of them.
template <typename T>
void compare_bits(const std::string& what, const T* got, const std::vector<T>& want, int64_t lo) {
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < want.size(); ++i)
    if (!same_bits(got[i], want[i])) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  if (bad > 0)
    check(false, what + ": " + std::to_string(bad) + " element(s) differ, first at " +
                     std::to_string(lo + first) + ": got " + std::to_string(as_double(got[first])) +
                     ", want " + std::to_string(as_double(want[first])));
}

// ---- random data ----------------------------------------------------------------

// splitmix64: fast enough to fill millions of elements under the sanitizers.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in +-[scale/64, scale), random sign: never zero, since zeros
  // hide unwritten outputs, and spread over seven binades.
  double value(double scale = 1.0) {
    const double u = static_cast<double>(next() >> 11) * 0x1.0p-53;  // [0, 1)
    const double m = scale * (1.0 / 64.0 + u * (1.0 - 1.0 / 64.0));
    return (next() & 1u) ? m : -m;
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

// ---- device memory ----------------------------------------------------------------

// One tensor's memory: `n` elements starting `misalign` elements past a
// 64-byte boundary. Ordinary ones are heap allocations of exactly
// (misalign + n) elements, so ASan catches an access past the end; a sparse
// one is an anonymous MAP_NORESERVE mapping whose untouched pages cost
// nothing, for tensors of more than 2^31 elements.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(int64_t n, int misalign, bool sparse = false)
      : n_(n), sparse_(sparse) {
    bytes_ = static_cast<size_t>(n + misalign) * sizeof(T);
    if (sparse) {
      base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (base_ == MAP_FAILED) {
        std::perror("mmap of a sparse test tensor");
        std::abort();
      }
    } else if (bytes_ > 0 && posix_memalign(&base_, 64, bytes_) != 0) {
      std::abort();
    }
    data_ = static_cast<T*>(base_) + misalign;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(data_, o.data_);
    std::swap(n_, o.n_);
    std::swap(bytes_, o.bytes_);
    std::swap(sparse_, o.sparse_);
    return *this;
  }
  ~Buffer() {
    if (base_ == nullptr) return;
    if (sparse_) {
      munmap(base_, bytes_);
    } else {
      std::free(base_);
    }
  }
  T* data() const { return data_; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  void* base_ = nullptr;
  T* data_ = nullptr;
  int64_t n_ = 0;
  size_t bytes_ = 0;
  bool sparse_ = false;
};

// One list of tensors in "device" memory. Separate: each tensor its own
// Buffer (an overrun hits ASan's redzone). Flat: all of them views into one
// allocation, back to back, each `misalign` elements after the previous
// one's end, as in a flattened parameter buffer: alignments follow from the
// sizes, and an overrun lands in the next tensor, whose values then differ
// from the reference's.
template <typename T>
class TensorMemory {
 public:
  struct Spec {
    int64_t n;
    int misalign;
    bool sparse;
  };
  TensorMemory(const std::vector<Spec>& specs, bool flat) {
    if (flat) {
      int64_t total = 0;
      for (const Spec& s : specs) total += s.misalign + s.n;
      storage_.emplace_back(total, 0);
      int64_t offset = 0;
      for (const Spec& s : specs) {
        ptrs_.push_back(storage_[0].data() + offset + s.misalign);
        offset += s.misalign + s.n;
      }
    } else {
      for (const Spec& s : specs) {
        storage_.emplace_back(s.n, s.misalign, s.sparse);
        ptrs_.push_back(storage_.back().data());
      }
    }
  }
  T* operator[](size_t t) const { return ptrs_[t]; }

 private:
  std::vector<Buffer<T>> storage_;
  std::vector<T*> ptrs_;
};

// A device scalar (found_inf, grad_scale, a lr tensor, a step counter): its
// own allocation, so a stray neighbouring write is an ASan error too.
template <typename T>
class Scalar {
 public:
  explicit Scalar(T v) : p_(new T(v)) {}
  Scalar(const Scalar&) = delete;
  Scalar(Scalar&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  ~Scalar() { delete p_; }
  T* ptr() const { return p_; }
  T value() const { return *p_; }

 private:
  T* p_;
};

}  // namespace emutest
