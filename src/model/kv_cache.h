#pragma once
// Key/value storage for attention. The model writes K and V rows of each new
// position and reads back all earlier ones; how rows are laid out (one contiguous
// buffer per sequence, or fixed-size pages shared by many sequences) is the
// store's business.
#include <cstdint>
#include <vector>

namespace spear {

class KVStore {
 public:
  virtual ~KVStore() = default;
  // Row of kv_dim floats for (layer, position): num_kv_heads × head_dim.
  virtual float* key(int64_t layer, int64_t pos) = 0;
  virtual float* value(int64_t layer, int64_t pos) = 0;
  virtual int64_t capacity() const = 0;  // positions that fit
};

// One sequence, positions [0, capacity), all layers in one allocation.
class ContiguousKVCache final : public KVStore {
 public:
  ContiguousKVCache(int64_t num_layers, int64_t capacity, int64_t kv_dim);
  float* key(int64_t layer, int64_t pos) override { return &k_[(layer * cap_ + pos) * kv_dim_]; }
  float* value(int64_t layer, int64_t pos) override { return &v_[(layer * cap_ + pos) * kv_dim_]; }
  int64_t capacity() const override { return cap_; }
  int64_t bytes() const { return static_cast<int64_t>(k_.size() + v_.size()) * 4; }

 private:
  int64_t layers_, cap_, kv_dim_;
  std::vector<float> k_, v_;  // (layers, capacity, kv_dim)
};

}  // namespace spear
