#include "engine/paged_kv.h"

#include "core/error.h"

namespace spear {

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, int64_t num_layers, int64_t kv_dim, bool storage)
    : num_blocks_(num_blocks), block_size_(block_size), layers_(num_layers), kv_dim_(kv_dim),
      free_count_(num_blocks) {
  SPEAR_CHECK(num_blocks > 0 && num_blocks < (int64_t{1} << 31),
              "KV pool: the number of blocks must be in [1, 2^31)");
  SPEAR_CHECK(block_size > 0 && num_layers > 0 && kv_dim > 0, "KV pool: sizes must be positive");
  const size_t n = storage ? static_cast<size_t>(num_blocks * num_layers * block_size * kv_dim) : 0;
  k_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  free_list_.reserve(num_blocks);
  // Hand out low ids first (pop from the back).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
  in_use_.assign(num_blocks, 0);
}

int32_t BlockPool::allocate() {
  if (free_list_.empty()) return -1;
  int32_t b = free_list_.back();
  free_list_.pop_back();
  in_use_[b] = 1;
  free_count_.store(static_cast<int64_t>(free_list_.size()), std::memory_order_relaxed);
  return b;
}

void BlockPool::release(int32_t block) {
  SPEAR_CHECK(block >= 0 && block < num_blocks_ && in_use_[block],
              "KV pool: releasing a block that is not in use");
  in_use_[block] = 0;
  free_list_.push_back(block);
  free_count_.store(static_cast<int64_t>(free_list_.size()), std::memory_order_relaxed);
}

int64_t PagedSequence::blocks_needed(int64_t n) const {
  const int64_t want = pool_->blocks_for(n);
  return want > num_blocks() ? want - num_blocks() : 0;
}

bool PagedSequence::reserve(int64_t n) {
  const int64_t need = blocks_needed(n);
  if (need == 0) return true;
  if (need > pool_->free_blocks()) return false;
  for (int64_t i = 0; i < need; ++i) table_.push_back(pool_->allocate());
  return true;
}

void PagedSequence::release() {
  for (int32_t b : table_) pool_->release(b);
  table_.clear();
}

}  // namespace spear
