// The launch modes of NOTE: [launch modes] (csrc/cuda/multi_tensor_apply.cuh)
// for the emulator programs: the device-table mode with a table source of
// "device" memory (the real TableCache over exactly-sized host buffers, so
// ASan sees an access past a table), and the two by-value budgets. Programs
// run their cases in each and check that a call made exactly the launches
// plan::count_launches says (NOTE: [launch counts]).
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../../csrc/cuda/multi_tensor_apply.cuh"
#include "harness.h"

namespace emutest {

// Tables in host memory, through the same cache as the torch side.
class HostTableSource final : public fastaccum::cuda::TableSource {
 public:
  struct Buffer {
    Buffer() = default;
    explicit Buffer(size_t n) : mem(std::make_shared<emutest::Buffer<uint8_t>>(static_cast<int64_t>(n), 0)) {}
    std::shared_ptr<emutest::Buffer<uint8_t>> mem;
    void* data() const { return mem->data(); }
    size_t bytes() const { return static_cast<size_t>(mem->size()); }
  };
  struct Backend {
    Buffer alloc(size_t n) const { return Buffer(n); }
    void upload(Buffer& b, const uint8_t* bytes, size_t n) const { std::memcpy(b.data(), bytes, n); }
  };

  // `stream` stands for the stream in the cache key.
  void* table(int kind, size_t count, uint64_t anchor, const std::vector<uint8_t>& content,
              size_t total) override {
    fastaccum::cuda::TableKey key;
    key.stream = stream;
    key.kind = kind;
    key.count = count;
    key.anchor = anchor;
    Backend backend;
    auto* base = static_cast<uint8_t*>(cache.get(key, content, total, backend));
    last_base = base;
    last_content = content.size();
    if (prepare) prepare(base, content.size());
    return base;
  }

  uint64_t stream = 1;
  // The table of the latest call: base, and the bytes before its scratch.
  uint8_t* last_base = nullptr;
  size_t last_content = 0;
  // Called with each table before its launch: a test that runs only some
  // blocks (emu::set_block_filter) sets up what the others would have done.
  std::function<void(uint8_t* base, size_t content_bytes)> prepare;
  fastaccum::cuda::TableCache<Buffer> cache;
};

struct ModeSpec {
  const char* name;
  bool table;
  size_t arg_bytes;
};

inline const ModeSpec kTableMode = {"table", true, fastaccum::plan::kLargeArgBytes};
inline const ModeSpec kByValue4k = {"by_value_4k", false, fastaccum::plan::kSmallArgBytes};
inline const ModeSpec kByValue32k = {"by_value_32k", false, fastaccum::plan::kLargeArgBytes};
inline const ModeSpec kModes[] = {kTableMode, kByValue4k, kByValue32k};

// One source for the whole program, as the process-wide cache on the GPU.
inline HostTableSource& table_source() {
  static HostTableSource s;
  return s;
}

inline fastaccum::cuda::LaunchMode launch_mode(const ModeSpec& m) {
  fastaccum::cuda::LaunchMode mode;
  mode.arg_bytes = m.arg_bytes;
  if (m.table) mode.tables = &table_source();
  return mode;
}

// Registers `label` + "/" + mode name for table mode and one by-value
// budget, alternating from call to call; for all three modes with
// `all_modes` (the cases about the launch structure).
inline void add_in_modes(const std::string& label, bool all_modes,
                         std::function<void(const std::string&, const ModeSpec&)> run) {
  static int turn = 0;
  const ModeSpec& by_value = (turn++ % 2) ? kByValue4k : kByValue32k;
  std::vector<const ModeSpec*> modes = {&kTableMode, &by_value};
  if (all_modes) modes = {&kTableMode, &kByValue4k, &kByValue32k};
  for (const ModeSpec* mode : modes) {
    const std::string name = label + "/" + mode->name;
    add_case(name, [=] { run(name, *mode); });
  }
}

inline fastaccum::plan::LaunchCounts expected_launches(const std::vector<int64_t>& numels,
                                                       bool momentum, const ModeSpec& m) {
  return fastaccum::plan::count_launches(numels.data(), numels.size(), momentum, m.table,
                                         m.arg_bytes);
}

}  // namespace emutest
