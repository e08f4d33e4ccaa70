#pragma once
// Paged KV cache: one pool of fixed-size blocks shared by every sequence, and a
// per-sequence block table mapping logical positions to blocks. Sequences of very
// different lengths then share memory without fragmentation: a sequence holds
// ceil(len / block_size) blocks, never a worst-case contiguous buffer, and a
// finished or preempted sequence returns its blocks to the free list at once.
//
// Threading: the pool is owned by the engine thread (allocation and freeing happen
// only there); used()/free() may be read from any thread for metrics.
#include <atomic>
#include <cstdint>
#include <vector>

#include "model/kv_cache.h"

namespace spear {

class BlockPool {
 public:
  // num_blocks blocks of block_size positions; each block holds K and V rows for all
  // layers: storage (num_blocks, layers, block_size, kv_dim) for K and again for V.
  // storage = false: ids only (a backend keeps K/V in its own memory, e.g. the GPU);
  // key()/value() must not be called then.
  BlockPool(int64_t num_blocks, int64_t block_size, int64_t num_layers, int64_t kv_dim, bool storage = true);

  // A free block id, or -1 when the pool is exhausted.
  int32_t allocate();
  void release(int32_t block);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return free_count_.load(std::memory_order_relaxed); }
  int64_t used_blocks() const { return num_blocks_ - free_blocks(); }
  int64_t bytes() const { return static_cast<int64_t>(k_.size() + v_.size()) * 4; }
  // Blocks needed to hold n positions.
  int64_t blocks_for(int64_t n) const { return (n + block_size_ - 1) / block_size_; }

  float* key(int32_t block, int64_t layer, int64_t offset) {
    return &k_[((static_cast<int64_t>(block) * layers_ + layer) * block_size_ + offset) * kv_dim_];
  }
  float* value(int32_t block, int64_t layer, int64_t offset) {
    return &v_[((static_cast<int64_t>(block) * layers_ + layer) * block_size_ + offset) * kv_dim_];
  }

 private:
  int64_t num_blocks_, block_size_, layers_, kv_dim_;
  std::vector<float> k_, v_;
  std::vector<int32_t> free_list_;   // LIFO: a just-freed block is still warm in cache
  std::vector<uint8_t> in_use_;      // double-free guard
  std::atomic<int64_t> free_count_;  // mirrors free_list_.size() for other threads
};

// One sequence's view of the pool. capacity() is the positions its blocks cover;
// the engine grows it with reserve() before each step that writes new positions.
class PagedSequence final : public KVStore {
 public:
  explicit PagedSequence(BlockPool& pool) : pool_(&pool) {}
  ~PagedSequence() override { release(); }
  PagedSequence(const PagedSequence&) = delete;
  PagedSequence& operator=(const PagedSequence&) = delete;

  float* key(int64_t layer, int64_t pos) override {
    return pool_->key(table_[pos / bs()], layer, pos % bs());
  }
  float* value(int64_t layer, int64_t pos) override {
    return pool_->value(table_[pos / bs()], layer, pos % bs());
  }
  int64_t capacity() const override { return static_cast<int64_t>(table_.size()) * bs(); }

  // Makes room for positions [0, n). All-or-nothing: on false (pool exhausted) the
  // sequence keeps exactly the blocks it had.
  bool reserve(int64_t n);
  // Blocks reserve(n) would still need.
  int64_t blocks_needed(int64_t n) const;
  // Returns every block to the pool.
  void release();
  int64_t num_blocks() const { return static_cast<int64_t>(table_.size()); }
  const std::vector<int32_t>& blocks() const { return table_; }  // logical block i -> pool id

 private:
  int64_t bs() const { return pool_->block_size(); }
  BlockPool* pool_;
  std::vector<int32_t> table_;  // logical block i -> pool block id
};

}  // namespace spear
