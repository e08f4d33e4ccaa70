#pragma once
// Round-to-nearest (RTN) quantization of a weight matrix W (N out, K in) into the
// canonical QuantizedMatrix format (quant_format.h), and its inverse.
//
// Rules (per row n and group of g consecutive inputs; g = K per output channel),
// computed in float64, the scale stored as float32 and used as stored:
//   asymmetric (GPTQ's reference quantizer):
//     lo = min(0, min w), hi = max(0, max w)        (range widened to include 0)
//     scale = float((hi - lo) / (2^b - 1)); if scale == 0: scale = 1
//     zero  = rint(-lo / scale)                       (an integer in [0, 2^b - 1])
//     q     = clamp(rint(w / scale) + zero, 0, 2^b - 1)
//   symmetric (absmax rule, zero fixed at the middle code):
//     scale = float(max|w| / (2^(b-1) - 1)); if scale == 0: scale = 1
//     zero  = 2^(b-1)
//     q     = clamp(rint(w / scale) + zero, 0, 2^b - 1)   (code 0 is never produced
//                                                           for finite w)
//   rint rounds half to even (as torch.round). Dequantized: w' = scale * (q - zero).
#include <cstdint>
#include <vector>

#include "core/quant_format.h"

namespace spear {

// w: (N, K) row-major float32. Throws spear::Error on bad bits/group/shape or a
// non-finite weight.
QuantizedMatrix quantize_rtn(const float* w, int64_t N, int64_t K, const QuantScheme& scheme);

// scale * (q - zero) as float32, (N, K) row-major.
std::vector<float> dequantize(const QuantizedMatrix& q);

}  // namespace spear
