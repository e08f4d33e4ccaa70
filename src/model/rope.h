#pragma once
// Rotary position embeddings in Hugging Face's half-split layout: dimension i of a
// head pairs with i + head_dim/2 (not llama2.c's interleaved pairs).
#include <cstdint>
#include <vector>

#include "io/model_config.h"

namespace spear {

// inv_freq[i], i < head_dim/2, after default / linear / llama3 scaling. Computed in
// float32 exactly as transformers does, so angles match its reference to the bit
// pattern of the product pos * inv_freq.
std::vector<float> rope_inv_freq(const RopeConfig& rope, int64_t head_dim);

// cos/sin rows (pos, head_dim/2) for positions [from, to): the angle is the float32 product
// pos * inv_freq[i], as the reference; cos and sin are taken in double. cos and sin must
// hold to * head_dim/2 floats. Shared by the CPU cache below and the GPU engine's tables.
void rope_cos_sin(const std::vector<float>& inv_freq, int64_t from, int64_t to, float* cos, float* sin);

class Rope {
 public:
  Rope(const RopeConfig& rope, int64_t head_dim);
  // Makes positions [0, n) available. Not thread-safe: call before parallel work.
  void reserve(int64_t n);
  // Rotates `n_heads` consecutive heads of `head_dim` floats in place at position pos
  // (pos < the reserved count). Thread-safe.
  void apply(float* x, int64_t n_heads, int64_t pos) const;
  int64_t head_dim() const { return head_dim_; }

 private:
  int64_t head_dim_;
  std::vector<float> inv_freq_;
  // Cached cos/sin rows per position (pos, head_dim/2), grown on demand.
  std::vector<float> cos_, sin_;
  int64_t cached_ = 0;
};

}  // namespace spear
