// The device launch table of a one-launch pass (NOTE: [launch modes] in
// multi_tensor_apply.cuh): its layout, built on the host as bytes, and the
// cache that uploads it only when its contents change. Plain C++ (no CUDA, no
// torch), so the emulator programs test the layout and the cache; the torch
// side that allocates and uploads is launch_mode.{h,cu}.
//
// NOTE: [launch table]
// One contiguous buffer:
//   Header                  call_ticket (the norm pass's last-block ticket)
//   TableRow<depth>[tensors]  addresses, step counter, numel, chunks, ticket
//   TableBlock[blocks]      (tensor, chunk) of block b, in launch order
//   double[blocks]          scratch: one partial per block (norm pass only)
// The host builds everything but the scratch; the tickets are 0 in what it
// builds, and every complete launch leaves them 0 again (the last block of
// a tensor, or of the call, resets its ticket), so the device copy equals
// the host's between calls and the cache may compare against its mirror.
// Only the scratch is not uploaded.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../launch_plan.h"

namespace fastaccum::cuda {

struct alignas(8) TableHeader {
  unsigned call_ticket;
  unsigned pad;
};

template <int kDepth>
struct alignas(8) TableRow {
  void* addresses[kDepth];
  float* step;  // nullptr without step counters
  int64_t numel;
  int32_t chunks;   // blocks of this tensor in the launch
  unsigned ticket;  // blocks of this tensor that have read *step
};

struct TableBlock {
  int32_t tensor;
  int32_t chunk;
};

// Byte offsets of the parts of one table.
struct TableLayout {
  size_t rows = 0, blocks = 0;
  size_t content = 0;  // header + rows + blocks: what is uploaded; the scratch follows
  size_t total = 0;    // content + scratch
  int64_t block_count = 0;
};

// What a pass is given: kDepth parallel lists of `count` device addresses
// (list d, tensor t at addresses[d][t]), the element count of each tensor
// (list 0's; the caller has checked that the lists match), and optionally
// one float step counter per tensor.
template <int kDepth>
struct TensorLists {
  size_t count = 0;
  void* const* addresses[kDepth] = {};
  const int64_t* numels = nullptr;
  float* const* steps = nullptr;
};

inline size_t round8(size_t n) { return (n + 7) / 8 * 8; }

// Builds the table of `lists` into `out` (resized; reused across calls, so
// steady state allocates nothing). Empty tensors get a block when the pass
// has step counters (see NOTE: [table blocks] in launch_plan.h).
template <int kDepth>
TableLayout build_table(const TensorLists<kDepth>& lists, bool with_partials,
                        std::vector<uint8_t>& out) {
  const bool with_steps = lists.steps != nullptr;
  TableLayout l;
  l.block_count = plan::for_each_block(lists.numels, lists.count, with_steps,
                                       [](size_t, int32_t) {});
  l.rows = round8(sizeof(TableHeader));
  l.blocks = l.rows + lists.count * sizeof(TableRow<kDepth>);
  l.content = round8(l.blocks + static_cast<size_t>(l.block_count) * sizeof(TableBlock));
  l.total = l.content +
            (with_partials ? static_cast<size_t>(l.block_count) * sizeof(double) : 0);
  out.assign(l.content, 0);  // zero tickets and padding: bytes compare exactly

  auto* rows = reinterpret_cast<TableRow<kDepth>*>(out.data() + l.rows);
  for (size_t t = 0; t < lists.count; ++t) {
    TableRow<kDepth> r{};
    for (int d = 0; d < kDepth; ++d) r.addresses[d] = lists.addresses[d][t];
    r.step = with_steps ? lists.steps[t] : nullptr;
    r.numel = lists.numels[t];
    r.chunks = 0;  // counted with the blocks below
    std::memcpy(&rows[t], &r, sizeof r);
  }
  auto* blocks = reinterpret_cast<TableBlock*>(out.data() + l.blocks);
  int64_t b = 0;
  plan::for_each_block(lists.numels, lists.count, with_steps,
                       [&](size_t t, int32_t chunk) {
                         blocks[b++] = {static_cast<int32_t>(t), chunk};
                         ++rows[t].chunks;
                       });
  return l;
}

// NOTE: [table cache]
// Tables live in device buffers kept from call to call, one per (device,
// stream, pass kind, tensor count, anchor): the role a table plays in a
// training loop. The anchor is the first param address for the update
// passes (params do not move, so two optimizers of the same size keep a
// table each), 0 for the passes over grads alone. A call builds its table on the host (it walks the tensors anyway)
// and compares it with the mirror of that buffer's contents: equal, nothing
// is uploaded; different (grads reallocated by zero_grad(set_to_none=True)
// and handed back at other addresses, a new param list), the new table is
// uploaded into the same buffer, on the same stream, so it lands after
// every launch that read the old one; a larger table reallocates. Per
// stream, because a buffer written on one stream while another stream's
// kernel reads it would race. At most kMaxEntries buffers; the least
// recently used one goes first.
//
// Backend: Buffer alloc(size_t bytes) (a device buffer of at least that
// size, with data() and bytes()), void upload(Buffer&, const uint8_t*,
// size_t) (stream-ordered copy of the content to the buffer's start).
struct TableKey {
  int device = 0;
  uint64_t stream = 0;
  int kind = 0;
  size_t count = 0;
  uint64_t anchor = 0;
  bool operator==(const TableKey& o) const {
    return device == o.device && stream == o.stream && kind == o.kind && count == o.count &&
           anchor == o.anchor;
  }
};

struct TableStats {
  int64_t hits = 0;
  int64_t uploads = 0;
  int64_t upload_bytes = 0;
  int64_t allocations = 0;
  int64_t entries = 0;
};

template <typename Buffer>
class TableCache {
 public:
  static constexpr size_t kMaxEntries = 32;

  // The device address of a buffer that holds `content` (what build_table
  // made) followed by `total - content.size()` bytes of scratch.
  template <typename Backend>
  void* get(const TableKey& key, const std::vector<uint8_t>& content,
            size_t total, Backend& backend) {
    ++tick_;
    Entry* e = find(key);
    if (e == nullptr) e = make_room(key);
    e->last_use = tick_;
    if (e->has_buffer && e->buffer.bytes() >= total && e->mirror == content) {
      ++stats_.hits;
      return e->buffer.data();
    }
    if (!e->has_buffer || e->buffer.bytes() < total) {
      e->buffer = backend.alloc(std::max<size_t>(total, 8));
      e->has_buffer = true;
      ++stats_.allocations;
    }
    backend.upload(e->buffer, content.data(), content.size());
    e->mirror = content;
    ++stats_.uploads;
    stats_.upload_bytes += static_cast<int64_t>(content.size());
    return e->buffer.data();
  }

  TableStats stats() const {
    TableStats s = stats_;
    s.entries = static_cast<int64_t>(entries_.size());
    return s;
  }
  void clear() { entries_.clear(); }

 private:
  struct Entry {
    TableKey key;
    std::vector<uint8_t> mirror;
    Buffer buffer{};
    bool has_buffer = false;
    uint64_t last_use = 0;
  };

  Entry* find(const TableKey& key) {
    for (Entry& e : entries_)
      if (e.key == key) return &e;
    return nullptr;
  }

  Entry* make_room(const TableKey& key) {
    if (entries_.size() >= kMaxEntries) {
      auto lru = std::min_element(entries_.begin(), entries_.end(),
                                  [](const Entry& a, const Entry& b) {
                                    return a.last_use < b.last_use;
                                  });
      entries_.erase(lru);
    }
    entries_.push_back(Entry{});
    entries_.back().key = key;
    return &entries_.back();
  }

  std::vector<Entry> entries_;
  uint64_t tick_ = 0;
  TableStats stats_;
};

}  // namespace fastaccum::cuda
