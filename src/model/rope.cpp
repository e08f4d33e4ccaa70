#include "model/rope.h"

#include <cmath>
#include <algorithm>

namespace spear {

std::vector<float> rope_inv_freq(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32.
    float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(rope.theta), expo);
  }
  if (rope.type == RopeConfig::Type::Linear) {
    for (float& f : inv) f = f / static_cast<float>(rope.factor);
  } else if (rope.type == RopeConfig::Type::Llama3) {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the
    // band between interpolated smoothly.
    const double old_ctx = static_cast<double>(rope.original_max_position_embeddings);
    const double low_wavelen = old_ctx / rope.low_freq_factor;
    const double high_wavelen = old_ctx / rope.high_freq_factor;
    for (float& f : inv) {
      double wavelen = 2.0 * M_PI / f;
      double scaled = wavelen > low_wavelen ? f / rope.factor : f;
      bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) {
        double smooth = (old_ctx / wavelen - rope.low_freq_factor) /
                        (rope.high_freq_factor - rope.low_freq_factor);
        scaled = (1.0 - smooth) * scaled / rope.factor + smooth * scaled;
      }
      f = static_cast<float>(scaled);
    }
  }
  return inv;
}

void rope_cos_sin(const std::vector<float>& inv_freq, int64_t from, int64_t to, float* cos, float* sin) {
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  for (int64_t p = from; p < to; ++p)
    for (int64_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(p) * inv_freq[i];  // float32 product, as the reference
      cos[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
}

Rope::Rope(const RopeConfig& rope, int64_t head_dim)
    : head_dim_(head_dim), inv_freq_(rope_inv_freq(rope, head_dim)) {}

void Rope::reserve(int64_t n) {
  if (n <= cached_) return;
  const int64_t half = head_dim_ / 2;
  int64_t want = std::max<int64_t>(n, std::max<int64_t>(2 * cached_, 256));
  std::vector<float> c(want * half), s(want * half);
  std::copy(cos_.begin(), cos_.end(), c.begin());
  std::copy(sin_.begin(), sin_.end(), s.begin());
  rope_cos_sin(inv_freq_, cached_, want, c.data(), s.data());
  cos_.swap(c);
  sin_.swap(s);
  cached_ = want;
}

void Rope::apply(float* x, int64_t n_heads, int64_t pos) const {
  const int64_t half = head_dim_ / 2;
  const float* c = &cos_[pos * half];
  const float* s = &sin_[pos * half];
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim_;
    for (int64_t i = 0; i < half; ++i) {
      float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }
}

}  // namespace spear
