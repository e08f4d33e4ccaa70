#pragma once
// Paged KV cache: one pool of fixed-size blocks shared by every sequence, and a
// per-sequence block table mapping logical positions to blocks. Sequences of very
// different lengths then share memory without fragmentation: a sequence holds
// ceil(len / block_size) blocks, never a worst-case contiguous buffer, and a
// finished or preempted sequence returns its blocks at once.
//
// Prefix caching (automatic, as vLLM's): a full block whose K/V are written is
// registered under the hash chain of its tokens (h_i = H(h_{i-1}, tokens of block i),
// h_{-1} = the pool's seed, which is where anything else that changes K/V would go).
// Blocks are reference counted; a sequence whose prompt starts with cached blocks takes
// them (one more reference each) instead of computing them again. A cached block whose
// count drops to 0 stays cached and is evictable: allocate() takes a free block first,
// then evicts the least recently released cached block. Blocks are never written after
// they are full, so sharing them is safe; a sequence's partial last block is never
// registered. The hash is only the table's key: a hit is verified exactly (the block's
// tokens, and its parent being the very registration the lookup matched one block
// earlier), so a hash collision costs a miss, never wrong K/V.
//
// Threading: the pool is owned by the engine thread (allocation and freeing happen
// only there); the counts (free_blocks(), used_blocks(), cached_blocks(), ...) may be
// read from any thread for metrics.
#include <atomic>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "model/kv_cache.h"

namespace spear {

class BlockPool {
 public:
  // num_blocks blocks of block_size positions; each block holds K and V rows for all
  // layers: storage (num_blocks, layers, block_size, kv_dim) for K and again for V.
  // storage = false: ids only (a backend keeps K/V in its own memory, e.g. the GPU);
  // key()/value() must not be called then. prefix_caching = false: register() and
  // lookup() do nothing, every released block is free at once (the pool as before).
  BlockPool(int64_t num_blocks, int64_t block_size, int64_t num_layers, int64_t kv_dim, bool storage = true,
            bool prefix_caching = false);

  // A block with one reference: a free block, else the least recently used cached block
  // (dropped from the cache), else -1 when every block is referenced.
  int32_t allocate();
  // Drops one reference (a block without references throws: the double-free guard). At
  // zero a cached block stays cached (evictable); any other block is free.
  void release(int32_t block);
  // One more reference to a block that is referenced or cached (a prefix-cache hit).
  void acquire(int32_t block);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  // Blocks allocate() can hand out: free ones and evictable cached ones.
  int64_t free_blocks() const { return free_count_.load(std::memory_order_relaxed); }
  // Blocks some sequence holds (reference count > 0).
  int64_t used_blocks() const { return num_blocks_ - free_blocks(); }
  // Blocks in the prefix cache (referenced or not), and those of them without references.
  int64_t cached_blocks() const { return cached_count_.load(std::memory_order_relaxed); }
  int64_t evictable_blocks() const { return evictable_count_.load(std::memory_order_relaxed); }
  int64_t evictions() const { return evictions_.load(std::memory_order_relaxed); }
  int64_t bytes() const { return static_cast<int64_t>(k_.size() + v_.size()) * 4; }
  // Blocks needed to hold n positions.
  int64_t blocks_for(int64_t n) const { return (n + block_size_ - 1) / block_size_; }

  float* key(int32_t block, int64_t layer, int64_t offset) {
    return &k_[((static_cast<int64_t>(block) * layers_ + layer) * block_size_ + offset) * kv_dim_];
  }
  float* value(int32_t block, int64_t layer, int64_t offset) {
    return &v_[((static_cast<int64_t>(block) * layers_ + layer) * block_size_ + offset) * kv_dim_];
  }

  // ---- prefix cache ----
  bool prefix_caching() const { return caching_; }
  // h_{-1} of every chain (0 by default). Whatever else changes a block's K/V (an adapter,
  // a model revision) belongs here or in the chain.
  uint64_t hash_seed() const { return seed_; }
  void set_hash_seed(uint64_t s) { seed_ = s; }
  // The chain hash of a block: its parent's hash and its block_size token ids.
  static uint64_t hash_block(uint64_t parent_hash, std::span<const int32_t> tokens);
  // A cached block's registration: a number unique over the pool's life (0: not cached).
  uint64_t registration(int32_t block) const { return gen_[block]; }
  // The cached block holding `tokens` after the block whose registration is parent_reg
  // (the block this lookup matched one position earlier; 0 for a chain's first block),
  // or -1.
  int32_t lookup(uint64_t hash, uint64_t parent_reg, std::span<const int32_t> tokens) const;
  // Registers a referenced, full, written block whose previous block in the chain the
  // cache knows as registration parent_reg (0 for the first block). Returns the block the
  // cache now holds for this content: `block`, or an identical block cached before (then
  // `block` stays private). A different entry under the same hash is dropped.
  int32_t register_block(int32_t block, uint64_t hash, uint64_t parent_reg, std::span<const int32_t> tokens);
  int32_t ref_count(int32_t block) const { return ref_[block]; }
  bool is_cached(int32_t block) const { return gen_[block] != 0; }

 private:
  bool matches(int32_t b, uint64_t parent_reg, std::span<const int32_t> tokens) const;
  void uncache(int32_t b);  // drops b from the table (its references stay)
  void lru_push(int32_t b);
  void lru_remove(int32_t b);
  void publish();

  int64_t num_blocks_, block_size_, layers_, kv_dim_;
  bool caching_;
  uint64_t seed_ = 0;
  std::vector<float> k_, v_;
  std::vector<int32_t> free_list_;   // LIFO: a just-freed block is still warm in cache
  std::vector<int32_t> ref_;         // references per block (the double-free guard)
  // Prefix cache, per block: the registration it holds (0 = not cached; unique over the
  // pool's life), its parent's registration, its hash and its tokens.
  std::vector<uint64_t> gen_, parent_gen_, hash_;
  std::vector<int32_t> tokens_;
  uint64_t next_gen_ = 1;
  std::unordered_map<uint64_t, int32_t> table_;
  // Evictable cached blocks, least recently released first (intrusive list).
  std::vector<int32_t> prev_, next_;
  int32_t lru_head_ = -1, lru_tail_ = -1;
  int64_t n_evictable_ = 0, n_cached_ = 0;
  std::atomic<int64_t> free_count_, cached_count_{0}, evictable_count_{0}, evictions_{0};
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
  // Returns every block to the pool (the last first, so that a cached chain is evicted
  // from its tail).
  void release();
  int64_t num_blocks() const { return static_cast<int64_t>(table_.size()); }
  const std::vector<int32_t>& blocks() const { return table_; }  // logical block i -> pool id

  // ---- prefix cache (no-ops when the pool does not cache) ----
  // `tokens` is the sequence's tokens so far; they may only grow between calls.
  // Leading full blocks of tokens the pool has cached, at most max_blocks, without taking
  // them; *evictable (optional) gets how many of those have no references (taking them
  // uses up blocks the pool could otherwise allocate).
  int64_t cached_prefix(std::span<const int32_t> tokens, int64_t max_blocks, int64_t* evictable = nullptr) const;
  // Takes those blocks as this sequence's first blocks (it must hold none); returns how
  // many. Positions [0, returned * block_size) then need no computing.
  int64_t adopt_prefix(std::span<const int32_t> tokens, int64_t max_blocks);
  // Registers the full blocks among positions [0, n_written) whose K/V are written.
  void register_written(std::span<const int32_t> tokens, int64_t n_written);
  int64_t registered_blocks() const { return registered_; }

 private:
  int64_t bs() const { return pool_->block_size(); }
  uint64_t chain_hash(std::span<const int32_t> tokens, int64_t i) const;  // hash of block i
  BlockPool* pool_;
  std::vector<int32_t> table_;  // logical block i -> pool block id
  mutable std::vector<uint64_t> hashes_;  // chain hashes of the full blocks seen so far
  int64_t registered_ = 0;      // leading blocks registered (or adopted)
  uint64_t chain_reg_ = 0;      // the cache's registration of block registered_ - 1
};

}  // namespace spear
