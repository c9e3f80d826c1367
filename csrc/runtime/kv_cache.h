// Block KV cache accounting. Committed K/V live in fixed-size blocks of a pool whose storage the
// backend owns (model/forward.h, KvStorage: per layer [num_blocks, block_size, kv_heads, head_dim]
// in the backend's memory and dtype); this file only hands out block ids. Full-attention layers and
// sliding-window layers form two groups with their own pools: a row's full-layer blocks cover every
// committed token, its sliding-layer blocks only the last sliding_window - 1 tokens (what the
// reference's sliding cache keeps), and blocks that fall out of the window go straight back to the
// pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "model/config.h"

namespace dgemma {

class BlockPool {
 public:
  static constexpr int kFull = 0, kSliding = 1;
  struct Group {
    int num_blocks = 0;
    std::vector<int> layers;  // model layers in this group
    std::vector<int> free_list;
    int reserved = 0;
  };

  BlockPool(const ModelConfig& cfg, int block_size, int full_blocks, int sliding_blocks);

  int block_size() const { return block_size_; }
  int sliding_window() const { return window_; }
  int num_layers() const { return static_cast<int>(layer_group_.size()); }
  // Which group a layer is in (kFull or kSliding).
  int group_of(int layer) const { return layer_group_[layer]; }

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
  struct Counts {
    int free = 0, reserved = 0;
  };
  Counts counts(int group) const;  // free and reserved, read together
  int total_blocks(int group) const;

 private:
  int block_size_;
  int window_;
  std::vector<int> layer_group_;
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

  // Readable from any thread (a KVCache's length while a request extends it).
  int length() const { return length_.load(std::memory_order_relaxed); }
  // First position kept for sliding layers.
  int sliding_start() const;
  const BlockPool& pool() const { return *pool_; }

  // What a group's layers see of the cache: positions [start, length), position p in block
  // blocks[(p - first_pos) / block_size] at offset (p - first_pos) % block_size. Full layers see
  // [0, length), sliding layers [sliding_start, length).
  struct BlockTable {
    int first_pos = 0;
    int start = 0;
    int length = 0;
    std::vector<int32_t> blocks;
  };
  void table(int group, BlockTable& out) const;
  // Flat slot (block * block_size + offset) of committed position pos in a group, or -1 where the
  // cache does not hold it.
  int32_t slot(int group, int pos) const;

  // Appending n tokens happens in two phases around the encoder forward: prepare() takes the
  // blocks the new tokens need (throws ResourceError if the pool is short, changing nothing);
  // the forward writes K/V to write_slot() while reading the old table; commit() makes the new
  // tokens visible and frees the sliding blocks that fell out of the window. abort() undoes prepare().
  void prepare(int n);
  // Flat slot that pending position pos is written to in a group, or -1 where it is not kept.
  int32_t write_slot(int group, int pos) const;
  void commit();
  void abort();

  // Blocks this row needs, per group, to grow to `new_length` (for admission checks).
  int full_blocks_needed(int new_length) const;
  // The most sliding-window blocks this row holds at once while a request writes `first` tokens and
  // then `more` chunks of `chunk` tokens (a prompt, then committed canvases).
  int sliding_blocks_peak(int first, int more, int chunk) const;
  // Blocks one window of `window - 1` tokens can straddle: what a row keeps between writes.
  static int sliding_window_blocks(int window, int block_size) { return (window - 1 + block_size - 1) / block_size + 1; }
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
  std::shared_ptr<BlockPool> pool_;
  std::atomic<int> length_{0};  // written by the one thread that owns the row
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
