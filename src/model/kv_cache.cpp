#include "model/kv_cache.h"

#include "core/error.h"

namespace spear {

ContiguousKVCache::ContiguousKVCache(int64_t num_layers, int64_t capacity, int64_t kv_dim)
    : layers_(num_layers), cap_(capacity), kv_dim_(kv_dim) {
  SPEAR_CHECK(num_layers > 0 && capacity > 0 && kv_dim > 0, "KV cache: sizes must be positive");
  size_t n = static_cast<size_t>(num_layers * capacity * kv_dim);
  k_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
}

}  // namespace spear
