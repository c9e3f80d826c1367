// Block KV cache. Committed K/V live in fixed-size blocks taken from a pool that is allocated once.
// Full-attention layers and sliding-window layers form two groups with their own pools: a row's
// full-layer blocks cover every committed token, its sliding-layer blocks only the last
// sliding_window - 1 tokens (what the reference's sliding cache keeps), and blocks that fall out of
// the window go straight back to the pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "model/config.h"

namespace dgemma {

// Pool storage from calloc: the kernel hands out zero pages on first touch, so the pool costs
// address space at load and resident memory only as blocks are used (a vector would write all of it).
class ZeroedFloats {
 public:
  explicit ZeroedFloats(size_t n);
  float* data() const { return p_.get(); }

 private:
  std::unique_ptr<float, decltype(&std::free)> p_{nullptr, &std::free};
};

class BlockPool {
 public:
  struct Group {
    int num_blocks = 0;
    std::vector<int> layers;        // model layers in this group
    std::vector<size_t> token_floats;  // per group layer: kv_heads * head_dim
    // Per group layer: K and V storage [num_blocks, block_size, kv_heads, head_dim].
    std::vector<ZeroedFloats> k, v;
    std::vector<int> free_list;
    int reserved = 0;
  };

  BlockPool(const ModelConfig& cfg, int block_size, int full_blocks, int sliding_blocks);

  int block_size() const { return block_size_; }
  int sliding_window() const { return window_; }
  int num_layers() const { return static_cast<int>(layer_group_.size()); }
  // Which group a layer is in (0 full, 1 sliding) and its index inside the group.
  int group_of(int layer) const { return layer_group_[layer]; }
  int slot_of(int layer) const { return layer_slot_[layer]; }

  // Pointer to token `offset` (0..block_size) of `block` for `layer`.
  float* k_at(int layer, int block, int offset);
  float* v_at(int layer, int block, int offset);
  size_t token_floats(int layer) const;

  // All-or-nothing allocation; returns false (and takes nothing) when too few blocks are free.
  // With a budget (a row's reservation, see reserve()), blocks come out of it first; only the rest
  // must fit in what is free and not reserved by anyone.
  bool allocate(int group, int count, std::vector<int>& out, int* budget = nullptr);
  // Returned blocks go back to the budget (still reserved for that row) when one is given.
  void release(int group, const std::vector<int>& blocks, int* budget = nullptr);
  void release(int group, int block);
  // Reservations: blocks that stay in the free list but only rows holding the reservation may take.
  // All-or-nothing over both groups; false when the unreserved free blocks are too few.
  bool reserve(int full, int sliding);
  void unreserve(int group, int count);
  int free_blocks(int group) const;       // in the free list (reserved ones included)
  int reserved_blocks(int group) const;   // promised to admitted rows, not yet taken
  int available_blocks(int group) const;  // free and not reserved
  int total_blocks(int group) const;

 private:
  int block_size_;
  int window_;
  std::vector<int> layer_group_, layer_slot_;
  Group groups_[2];
  mutable std::mutex mu_;
};

// One row's cache. Returns its blocks to the pool when destroyed.
class SeqCache {
 public:
  explicit SeqCache(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {}
  ~SeqCache();
  SeqCache(const SeqCache&) = delete;
  SeqCache& operator=(const SeqCache&) = delete;

  int length() const { return length_; }
  // First position kept for sliding layers.
  int sliding_start() const;
  const BlockPool& pool() const { return *pool_; }

  // A contiguous run of cached tokens inside one block: K/V pointers for a layer, token count, first position.
  struct Span {
    const float* k;
    const float* v;
    int count;
    int pos;
  };
  // Spans covering what `layer` sees of the cache: [0, length) on full layers,
  // [sliding_start, length) on sliding layers.
  void spans(int layer, std::vector<Span>& out) const;

  // Appending n tokens happens in two phases around the encoder forward: prepare() takes the
  // blocks the new tokens need (throws ResourceError if the pool is short, changing nothing);
  // the forward writes K/V through write_k/write_v while reading the old spans; commit() makes the
  // new tokens visible and frees the sliding blocks that fell out of the window. abort() undoes prepare().
  void prepare(int n);
  bool written(int layer, int pos) const;  // does position pos get stored for this layer in the pending append
  float* write_k(int layer, int pos);
  float* write_v(int layer, int pos);
  void commit();
  void abort();

  // Blocks this row needs, per group, to grow to `new_length` (for admission checks).
  int full_blocks_needed(int new_length) const;
  int sliding_blocks_peak() const;
  int sliding_blocks_held() const { return static_cast<int>(sliding_.size()); }

  // A reservation already taken from the pool (BlockPool::reserve) that this row draws from:
  // while it is held, sliding blocks that leave the window go back into it rather than to others.
  void add_reservation(int full, int sliding);
  void release_reservation();  // what is left goes back to the pool

  // Gives every block back to the pool and starts over at length 0.
  void clear();

  // A running request owns its rows: a second request (or a direct encode) on them is refused.
  bool try_claim() { return !claimed_.exchange(true); }
  void unclaim() { claimed_.store(false); }
  bool claimed() const { return claimed_.load(); }

 private:
  std::pair<int, int> write_slot(int layer, int pos) const;  // (block, offset) in the pending layout

  std::shared_ptr<BlockPool> pool_;
  int length_ = 0;
  std::vector<int> full_;    // covers [0, length)
  std::deque<int> sliding_;  // covers [sliding_first_, ...)
  int sliding_first_ = 0;
  // pending append
  int pending_n_ = 0;
  std::vector<int> new_full_, new_sliding_;
  std::deque<int> next_sliding_;
  int next_sliding_first_ = 0;
  int drop_sliding_ = 0;  // old sliding blocks freed at commit
  int budget_[2] = {0, 0};
  bool reserving_ = false;
  std::atomic<bool> claimed_{false};
  int* budget(int group) { return reserving_ ? &budget_[group] : nullptr; }
};

}  // namespace dgemma
