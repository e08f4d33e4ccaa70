#pragma once
// Small CPU kernels of the forward pass. float32 in and out, float32 accumulation.
#include <cstdint>

namespace spear {

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for rows t < rows of `dim` floats.
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps);
// g[i] = silu(g[i]) * u[i]
void silu_mul(float* g, const float* u, int64_t n);
float dot(const float* a, const float* b, int64_t n);
// y += a * x
void axpy(float a, const float* x, float* y, int64_t n);
// In-place softmax over n values; returns nothing, result sums to 1.
void softmax(float* x, int64_t n);
// log-softmax of logits[target] over n values, in double for a stable sum.
double log_softmax_at(const float* logits, int64_t n, int64_t target);

}  // namespace spear
