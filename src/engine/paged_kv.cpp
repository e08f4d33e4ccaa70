#include "engine/paged_kv.h"

#include <algorithm>

#include "core/error.h"

namespace spear {

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, int64_t num_layers, int64_t kv_dim, bool storage,
                     bool prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), layers_(num_layers), kv_dim_(kv_dim),
      caching_(prefix_caching), free_count_(num_blocks) {
  SPEAR_CHECK(num_blocks > 0 && num_blocks < (int64_t{1} << 31),
              "KV pool: the number of blocks must be in [1, 2^31)");
  SPEAR_CHECK(block_size > 0 && num_layers > 0 && kv_dim > 0, "KV pool: sizes must be positive");
  const size_t n = storage ? static_cast<size_t>(num_blocks * num_layers * block_size * kv_dim) : 0;
  k_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  free_list_.reserve(num_blocks);
  // Hand out low ids first (pop from the back).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
  ref_.assign(num_blocks, 0);
  gen_.assign(num_blocks, 0);
  if (caching_) {
    parent_gen_.assign(num_blocks, 0);
    hash_.assign(num_blocks, 0);
    tokens_.assign(static_cast<size_t>(num_blocks * block_size), 0);
    prev_.assign(num_blocks, -1);
    next_.assign(num_blocks, -1);
  }
}

void BlockPool::publish() {
  free_count_.store(static_cast<int64_t>(free_list_.size()) + n_evictable_, std::memory_order_relaxed);
  cached_count_.store(n_cached_, std::memory_order_relaxed);
  evictable_count_.store(n_evictable_, std::memory_order_relaxed);
}

void BlockPool::lru_push(int32_t b) {  // at the most recently used end
  prev_[b] = lru_tail_;
  next_[b] = -1;
  if (lru_tail_ >= 0) next_[lru_tail_] = b;
  else lru_head_ = b;
  lru_tail_ = b;
  ++n_evictable_;
}

void BlockPool::lru_remove(int32_t b) {
  if (prev_[b] >= 0) next_[prev_[b]] = next_[b];
  else lru_head_ = next_[b];
  if (next_[b] >= 0) prev_[next_[b]] = prev_[b];
  else lru_tail_ = prev_[b];
  prev_[b] = next_[b] = -1;
  --n_evictable_;
}

void BlockPool::uncache(int32_t b) {
  auto it = table_.find(hash_[b]);
  if (it != table_.end() && it->second == b) table_.erase(it);
  gen_[b] = 0;
  --n_cached_;
  if (ref_[b] == 0) {  // it was evictable: now simply free
    lru_remove(b);
    free_list_.push_back(b);
  }
}

int32_t BlockPool::allocate() {
  int32_t b;
  if (!free_list_.empty()) {
    b = free_list_.back();
    free_list_.pop_back();
  } else if (lru_head_ >= 0) {
    b = lru_head_;  // evict the least recently used cached block
    lru_remove(b);
    auto it = table_.find(hash_[b]);
    if (it != table_.end() && it->second == b) table_.erase(it);
    gen_[b] = 0;
    --n_cached_;
    evictions_.fetch_add(1, std::memory_order_relaxed);
  } else {
    return -1;
  }
  ref_[b] = 1;
  publish();
  return b;
}

void BlockPool::release(int32_t block) {
  SPEAR_CHECK(block >= 0 && block < num_blocks_ && ref_[block] > 0,
              "KV pool: releasing a block that is not in use");
  if (--ref_[block] == 0) {
    if (gen_[block] != 0) lru_push(block);
    else free_list_.push_back(block);
  }
  publish();
}

void BlockPool::acquire(int32_t block) {
  SPEAR_CHECK(block >= 0 && block < num_blocks_ && (ref_[block] > 0 || gen_[block] != 0),
              "KV pool: taking a block that is neither in use nor cached");
  if (ref_[block]++ == 0) lru_remove(block);
  publish();
}

uint64_t BlockPool::hash_block(uint64_t parent_hash, std::span<const int32_t> tokens) {
  // splitmix64's finalizer over (parent, tokens...): a table key only (hits are verified).
  auto mix = [](uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
  };
  uint64_t h = mix(parent_hash + 0x9e3779b97f4a7c15ull);
  for (int32_t t : tokens) h = mix(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ull));
  return h;
}

bool BlockPool::matches(int32_t b, uint64_t parent_reg, std::span<const int32_t> tokens) const {
  if (gen_[b] == 0 || parent_gen_[b] != parent_reg || static_cast<int64_t>(tokens.size()) != block_size_)
    return false;
  return std::equal(tokens.begin(), tokens.end(), tokens_.begin() + static_cast<int64_t>(b) * block_size_);
}

int32_t BlockPool::lookup(uint64_t hash, uint64_t parent_reg, std::span<const int32_t> tokens) const {
  if (!caching_) return -1;
  auto it = table_.find(hash);
  if (it == table_.end() || !matches(it->second, parent_reg, tokens)) return -1;
  return it->second;
}

int32_t BlockPool::register_block(int32_t block, uint64_t hash, uint64_t parent_reg,
                                  std::span<const int32_t> tokens) {
  if (!caching_) return block;
  SPEAR_CHECK(block >= 0 && block < num_blocks_ && ref_[block] > 0,
              "KV pool: registering a block that is not in use");
  SPEAR_CHECK(static_cast<int64_t>(tokens.size()) == block_size_, "KV pool: registering a partial block");
  if (gen_[block] != 0) return block;  // already cached (an adopted block)
  auto it = table_.find(hash);
  if (it != table_.end()) {
    if (matches(it->second, parent_reg, tokens)) return it->second;  // computed twice: keep the first
    uncache(it->second);  // a stale chain (its parent was dropped) or a hash collision
  }
  gen_[block] = next_gen_++;
  parent_gen_[block] = parent_reg;
  hash_[block] = hash;
  std::copy(tokens.begin(), tokens.end(), tokens_.begin() + static_cast<int64_t>(block) * block_size_);
  table_[hash] = block;
  ++n_cached_;
  publish();
  return block;
}

int64_t PagedSequence::blocks_needed(int64_t n) const {
  const int64_t want = pool_->blocks_for(n);
  return want > num_blocks() ? want - num_blocks() : 0;
}

bool PagedSequence::reserve(int64_t n) {
  const int64_t need = blocks_needed(n);
  if (need == 0) return true;
  if (need > pool_->free_blocks()) return false;
  for (int64_t i = 0; i < need; ++i) {
    const int32_t b = pool_->allocate();
    SPEAR_CHECK(b >= 0, "KV pool: no block although free_blocks() said so");
    table_.push_back(b);
  }
  return true;
}

void PagedSequence::release() {
  for (auto it = table_.rbegin(); it != table_.rend(); ++it) pool_->release(*it);
  table_.clear();
  registered_ = 0;
  chain_reg_ = 0;
}

uint64_t PagedSequence::chain_hash(std::span<const int32_t> tokens, int64_t i) const {
  const int64_t B = bs();
  while (static_cast<int64_t>(hashes_.size()) <= i) {
    const int64_t j = static_cast<int64_t>(hashes_.size());
    const uint64_t parent = j == 0 ? pool_->hash_seed() : hashes_[j - 1];
    hashes_.push_back(BlockPool::hash_block(parent, tokens.subspan(j * B, B)));
  }
  return hashes_[i];
}

int64_t PagedSequence::cached_prefix(std::span<const int32_t> tokens, int64_t max_blocks, int64_t* evictable) const {
  if (evictable) *evictable = 0;
  if (!pool_->prefix_caching()) return 0;
  const int64_t B = bs();
  max_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / B);
  uint64_t parent = 0;
  int64_t i = 0;
  for (; i < max_blocks; ++i) {
    const int32_t b = pool_->lookup(chain_hash(tokens, i), parent, tokens.subspan(i * B, B));
    if (b < 0) break;
    if (evictable && pool_->ref_count(b) == 0) ++*evictable;
    parent = pool_->registration(b);
  }
  return i;
}

int64_t PagedSequence::adopt_prefix(std::span<const int32_t> tokens, int64_t max_blocks) {
  SPEAR_CHECK(table_.empty(), "KV: adopting a cached prefix into a sequence that holds blocks");
  if (!pool_->prefix_caching()) return 0;
  const int64_t B = bs();
  max_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / B);
  uint64_t parent = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int32_t b = pool_->lookup(chain_hash(tokens, i), parent, tokens.subspan(i * B, B));
    if (b < 0) break;
    pool_->acquire(b);
    table_.push_back(b);
    parent = pool_->registration(b);
  }
  registered_ = num_blocks();
  chain_reg_ = parent;
  return registered_;
}

void PagedSequence::register_written(std::span<const int32_t> tokens, int64_t n_written) {
  if (!pool_->prefix_caching()) return;
  const int64_t B = bs();
  const int64_t full = std::min<int64_t>({n_written, static_cast<int64_t>(tokens.size()), capacity()}) / B;
  for (; registered_ < full; ++registered_) {
    const int32_t b = table_[registered_];
    const int32_t held = pool_->register_block(b, chain_hash(tokens, registered_), chain_reg_,
                                               tokens.subspan(registered_ * B, B));
    chain_reg_ = pool_->registration(held);
  }
}

}  // namespace spear
