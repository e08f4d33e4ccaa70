#pragma once
// Next-token sampling on the device, one row of logits per sequence: greedy, or
// temperature, min-p, top-k and top-p (nucleus) in the order and with the meaning of the
// host sampler (engine/sampler.h), drawn from the same counter-based stream
// (core/philox.h: draw n of a seed), so both backends pick the same token for a seeded
// request up to float rounding at a boundary. Penalties and logprobs stay on the host
// (the engine copies logits for the steps that need them).
//
// How, per row (one block of 1024 threads, the row read from L2 a few dozen times):
//   1. max and argmax (greedy rows stop here);
//   2. e_i = exp(l_i / T - max / T), written over the logits (they are not needed after);
//   3. the cuts as thresholds on e (every cut keeps an upper set of e): min-p keeps
//      e >= min_p; top-k keeps e >= the largest t with #{e >= t} >= k; top-p keeps
//      e >= the largest t with sum{e >= t} >= top_p * sum{kept e}. t is found by bisection
//      over the float's bit pattern (positive floats order as their bits), 30 passes at
//      most, exact: no sort;
//   4. u = philox_uniform(seed, draw) * sum{kept e}; the token is the first in id order
//      whose cumulative kept mass exceeds u (per-thread contiguous chunks, a block scan).
// Ties at the top-k boundary are all kept (the host keeps exactly k, lowest ids first).
#include <cuda_runtime.h>

#include <cstdint>

namespace spear::cuda {

struct RowSampling {
  float temperature = 0.0f;  // 0: greedy (argmax, first maximum)
  float top_p = 1.0f;        // (0, 1]
  float min_p = 0.0f;        // [0, 1]
  int32_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;
  uint64_t draw = 0;         // which draw of the seed's stream (the sequence's output length)
};

// ids (T) from logits rows (T, ld), params (T) in device memory. Overwrites the logits of
// sampled (temperature > 0) rows with their unnormalized probabilities.
cudaError_t sample_rows(float* logits, int64_t ld, int T, int V, const RowSampling* params, int32_t* ids,
                        cudaStream_t stream);

}  // namespace spear::cuda
