#include "runtime/kv_cache.h"

#include <algorithm>
#include <new>

#include "common/check.h"

namespace dgemma {

BlockPool::BlockPool(const ModelConfig& cfg, int block_size, int full_blocks, int sliding_blocks)
    : block_size_(block_size), window_(cfg.sliding_window) {
  DG_CHECK(block_size > 0, "block size");
  groups_[kFull].num_blocks = full_blocks;
  groups_[kSliding].num_blocks = sliding_blocks;
  layer_group_.resize(cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; ++l) {
    const int g = cfg.layers[l].sliding ? kSliding : kFull;
    layer_group_[l] = g;
    groups_[g].layers.push_back(l);
  }
  for (Group& G : groups_) {
    if (G.layers.empty()) G.num_blocks = 0;
    // Hand out low block ids first.
    for (int b = G.num_blocks - 1; b >= 0; --b) G.free_list.push_back(b);
  }
}

bool BlockPool::allocate(int group, int count, std::vector<int>& out, int* budget) {
  std::lock_guard<std::mutex> lock(mu_);
  Group& G = groups_[group];
  if (count <= 0) return true;
  if (G.layers.empty()) return true;  // no layers of this kind: nothing to store
  const int from_budget = budget ? std::min(count, *budget) : 0;
  if (static_cast<int>(G.free_list.size()) - G.reserved < count - from_budget) return false;
  G.reserved -= from_budget;
  if (budget) *budget -= from_budget;
  for (int i = 0; i < count; ++i) {
    out.push_back(G.free_list.back());
    G.free_list.pop_back();
  }
  return true;
}

void BlockPool::release(int group, const std::vector<int>& blocks, int* budget) {
  std::lock_guard<std::mutex> lock(mu_);
  Group& G = groups_[group];
  for (int b : blocks) G.free_list.push_back(b);
  if (budget && !G.layers.empty()) {
    G.reserved += static_cast<int>(blocks.size());
    *budget += static_cast<int>(blocks.size());
  }
}

bool BlockPool::reserve(int full, int sliding) {
  std::lock_guard<std::mutex> lock(mu_);
  const int want[2] = {groups_[0].layers.empty() ? 0 : full, groups_[1].layers.empty() ? 0 : sliding};
  for (int g = 0; g < 2; ++g)
    if (static_cast<int>(groups_[g].free_list.size()) - groups_[g].reserved < want[g]) return false;
  for (int g = 0; g < 2; ++g) groups_[g].reserved += want[g];
  return true;
}

void BlockPool::unreserve(int group, int count) {
  std::lock_guard<std::mutex> lock(mu_);
  Group& G = groups_[group];
  if (G.layers.empty()) return;
  DG_CHECK(count >= 0 && count <= G.reserved, "unreserving " << count << " of " << G.reserved << " blocks");
  G.reserved -= count;
}

int BlockPool::reserved_blocks(int group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return groups_[group].reserved;
}

BlockPool::Counts BlockPool::counts(int group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return {static_cast<int>(groups_[group].free_list.size()), groups_[group].reserved};
}

int BlockPool::available_blocks(int group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(groups_[group].free_list.size()) - groups_[group].reserved;
}

void BlockPool::release(int group, int block) {
  std::lock_guard<std::mutex> lock(mu_);
  groups_[group].free_list.push_back(block);
}

int BlockPool::free_blocks(int group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(groups_[group].free_list.size());
}

int BlockPool::total_blocks(int group) const { return groups_[group].num_blocks; }

// ---------------------------------------------------------------------------------------------

SeqCache::~SeqCache() {
  abort();
  release_reservation();
  clear();
}

void SeqCache::clear() {
  abort();
  pool_->release(0, full_, budget(0));
  pool_->release(1, std::vector<int>(sliding_.begin(), sliding_.end()), budget(1));
  full_.clear();
  sliding_.clear();
  sliding_first_ = 0;
  length_ = 0;
}

int SeqCache::sliding_start() const { return std::max(0, length_ - (pool_->sliding_window() - 1)); }

void SeqCache::table(int group, BlockTable& out) const {
  const bool sliding = group == BlockPool::kSliding;
  out.first_pos = sliding ? sliding_first_ : 0;
  out.start = sliding ? sliding_start() : 0;
  out.length = length_;
  out.blocks.clear();
  if (sliding)
    out.blocks.assign(sliding_.begin(), sliding_.end());
  else
    out.blocks.assign(full_.begin(), full_.end());
}

int32_t SeqCache::slot(int group, int pos) const {
  const int B = pool_->block_size();
  if (pos < 0 || pos >= length_) return -1;
  if (group == BlockPool::kFull) return full_[pos / B] * B + pos % B;
  if (pos < sliding_start()) return -1;
  const int rel = pos - sliding_first_;
  return sliding_[rel / B] * B + rel % B;
}

int SeqCache::full_blocks_needed(int new_length) const {
  const int B = pool_->block_size();
  return std::max(0, (new_length + B - 1) / B - static_cast<int>(full_.size()));
}

int SeqCache::sliding_blocks_peak(int first, int more, int chunk) const {
  // Between a write's prepare() and its commit() the row holds what it kept (after any commit at most
  // a window's blocks; before the first write, what it holds now) plus the blocks prepare() adds: the
  // new positions from the end of the kept blocks (block-aligned, at or past the old length), so at
  // most ceil(n / B) of them, and never more than a window's.
  const int B = pool_->block_size();
  const int window = sliding_window_blocks(pool_->sliding_window(), B);
  auto added = [&](int n) { return std::min(window, (n + B - 1) / B); };
  int peak = sliding_blocks_held() + added(first);
  if (more > 0) peak = std::max(peak, window + added(chunk));
  return peak;
}

void SeqCache::add_reservation(int full, int sliding) {
  DG_CHECK(full >= 0 && sliding >= 0, "negative reservation");
  budget_[0] += full;
  budget_[1] += sliding;
  reserving_ = true;
}

void SeqCache::release_reservation() {
  if (!reserving_) return;
  for (int g = 0; g < 2; ++g) {
    pool_->unreserve(g, budget_[g]);
    budget_[g] = 0;
  }
  reserving_ = false;
}

void SeqCache::prepare(int n) {
  DG_CHECK(pending_n_ == 0, "append already pending");
  DG_CHECK(n > 0, "append of " << n << " tokens");
  const int B = pool_->block_size();
  const int W = pool_->sliding_window();
  const int new_len = length_ + n;

  std::vector<int> full_new;
  if (!pool_->allocate(0, full_blocks_needed(new_len), full_new, budget(0)))
    DG_THROW(ResourceError, "KV cache pool is full (full-attention layers): " << pool_->available_blocks(0)
                                << " blocks free and not reserved by running requests; raise kv_cache_tokens");

  // Sliding layers: the new layout starts at the block holding new_start.
  const int new_start = std::max(0, new_len - (W - 1));
  const int new_first = (new_start / B) * B;
  std::deque<int> next;
  int drop = 0;
  const int old_end = sliding_first_ + static_cast<int>(sliding_.size()) * B;
  if (new_first >= old_end) {
    drop = static_cast<int>(sliding_.size());
  } else {
    drop = std::max(0, (new_first - sliding_first_) / B);
    for (size_t i = drop; i < sliding_.size(); ++i) next.push_back(sliding_[i]);
  }
  const int first = next.empty() ? new_first : sliding_first_ + drop * B;
  const int total = (new_len - first + B - 1) / B;
  const int extra = std::max(0, total - static_cast<int>(next.size()));
  std::vector<int> sliding_new;
  if (new_len > new_start && !pool_->allocate(1, extra, sliding_new, budget(1))) {
    pool_->release(0, full_new, budget(0));
    DG_THROW(ResourceError, "KV cache pool is full (sliding-window layers): " << pool_->available_blocks(1)
                                << " blocks free and not reserved by running requests; raise max_batch_size");
  }
  for (int b : sliding_new) next.push_back(b);

  pending_n_ = n;
  new_full_ = std::move(full_new);
  new_sliding_ = std::move(sliding_new);
  next_sliding_ = std::move(next);
  next_sliding_first_ = first;
  drop_sliding_ = drop;
}

int32_t SeqCache::write_slot(int group, int pos) const {
  const int B = pool_->block_size();
  const int new_len = length_ + pending_n_;
  DG_CHECK(pending_n_ > 0 && pos >= length_ && pos < new_len, "position " << pos << " is not pending");
  if (group == BlockPool::kFull) {
    const int idx = pos / B;
    const int blk = idx < static_cast<int>(full_.size()) ? full_[idx] : new_full_[idx - full_.size()];
    return blk * B + pos % B;
  }
  if (pos < new_len - (pool_->sliding_window() - 1)) return -1;
  const int rel = pos - next_sliding_first_;
  return next_sliding_[rel / B] * B + rel % B;
}

void SeqCache::commit() {
  if (pending_n_ == 0) return;
  for (int b : new_full_) full_.push_back(b);
  std::vector<int> dropped(sliding_.begin(), sliding_.begin() + drop_sliding_);
  pool_->release(1, dropped, budget(1));
  sliding_ = std::move(next_sliding_);
  sliding_first_ = next_sliding_first_;
  length_ += pending_n_;
  pending_n_ = 0;
  new_full_.clear();
  new_sliding_.clear();
  next_sliding_.clear();
  drop_sliding_ = 0;
}

void SeqCache::abort() {
  if (pending_n_ == 0) return;
  pool_->release(0, new_full_, budget(0));
  pool_->release(1, new_sliding_, budget(1));
  pending_n_ = 0;
  new_full_.clear();
  new_sliding_.clear();
  next_sliding_.clear();
  drop_sliding_ = 0;
}

}  // namespace dgemma
