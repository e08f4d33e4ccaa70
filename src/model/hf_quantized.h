#pragma once
// W4 checkpoints as users have them from Hugging Face, read as spear's quantized base:
// a directory with config.json whose `quantization_config` names one of
//   gptq                AutoGPTQ / GPTQModel (checkpoint_format gptq = v1, or gptq_v2)
//   awq                 AutoAWQ, version gemm
//   compressed-tensors  llm-compressor, format pack-quantized, int weights
// (or an older AutoGPTQ `quantize_config.json` / AutoAWQ `quant_config.json` beside it),
// converted exactly into QuantizedMatrix (core/quant_format.h): the same codes, the
// checkpoint's scales widened to float32 (exact) and its integer zero points, so that
// scale * (q - zero) is bit for bit what the checkpoint's own dequantization computes in
// float32. What spear's layout cannot hold is refused with an error naming the field:
// bits other than 4, a permuted g_idx (desc_act / actorder=group), a GPTQ v1 zero point of
// 16, unquantized decoder modules, a quantized lm_head, activation quantization, ...
//
// The packed layouts (k: input, n: output, g: group, words are int32 read as unsigned):
//   GPTQ  qweight (K/8, N)  code(n,k) = qweight[k/8][n] >> 4*(k%8) & 15
//         qzeros  (G, N/8)  z(n,g)    = qzeros[g][n/8] >> 4*(n%8) & 15, plus 1 in v1
//         scales  (G, N)    f16       g_idx (K) int32, group of input k
//   AWQ   qweight (K, N/8)  code(n,k) = qweight[k][n/8] >> 4*P[n%8] & 15, P = 0 4 1 5 2 6 3 7
//         qzeros  (G, N/8)  same order; scales (G, N) f16
//   compressed-tensors  weight_packed (N, ceil(K/8))  code(n,k) = packed[n][k/8] >> 4*(k%8) & 15
//         (the signed value q-8 stored with offset 8); weight_scale (N, G);
//         weight_zero_point (ceil(N/8), G) int32 packed along n the same way (asymmetric
//         only; symmetric has zero 0, i.e. spear's 8); weight_shape (2) = (N, K); weight_g_idx (K)
// Dequantized weight: scale(n, g(k)) * (code(n,k) - z(n, g(k))) in every format.
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/quant_format.h"
#include "model/spear_artifact.h"

namespace spear {

// The checkpoint's quantization settings as found (config.json `quantization_config`,
// else quantize_config.json / quant_config.json), with "quant_method" filled in; nullopt
// for a full-precision directory (or a path that is not a directory).
std::optional<nlohmann::json> hf_quantization_config(const std::string& dir);

// Reads a quantized checkpoint directory into an artifact (every module quantized, no ECs;
// the unquantized tensors are views of the mapped files). meta["imported"] records the
// source format and settings; there is no source_model_sha256 (the full-precision model is
// unknown). Throws spear::Error naming the directory, tensor and field on anything it
// cannot convert exactly.
SpearArtifact artifact_from_hf_quantized(const std::string& dir);

// A quantized base from any path that holds one: a .spear file or a quantized checkpoint
// directory. A full-precision directory is refused with a message saying what to run.
SpearArtifact load_quantized_base(const std::string& path);

// Checks that `quantized` was made from the full-precision model in `dir` (calibrate,
// diagnose): a .spear by its source_model_sha256; an imported checkpoint, whose source is
// unknown, by its architecture (every shape in the two configs), with a note on stderr.
// `who` prefixes the error ("calibrate").
void check_base_matches_model(const SpearArtifact& quantized, const std::string& dir, const std::string& who);

// ---- the layouts, one matrix at a time (also used by export and the tests) -------------
// Inputs are the raw tensors in the shapes above (int32 as stored, little-endian), scales
// as float32. `group` is the inputs per group (-1 or >= K: one group). label names the
// module in errors. Each returns the matrix in spear's layout with scheme.symmetric set
// when `symmetric` is declared and every zero is 2^(bits-1).
QuantizedMatrix unpack_gptq(const int32_t* qweight, const int32_t* qzeros, const float* scales,
                            const int32_t* g_idx, int64_t N, int64_t K, int64_t group, bool v1,
                            bool symmetric, const std::string& label);
QuantizedMatrix unpack_awq(const int32_t* qweight, const int32_t* qzeros, const float* scales,
                           int64_t N, int64_t K, int64_t group, const std::string& label);
// zero_packed: (ceil(N/8), G) int32 or nullptr (symmetric). g_idx may be nullptr.
QuantizedMatrix unpack_compressed_tensors(const int32_t* packed, const float* scales,
                                          const int32_t* zero_packed, const int32_t* g_idx,
                                          int64_t N, int64_t K, int64_t group, bool symmetric,
                                          const std::string& label);

// GPTQ packing of a 4-bit matrix (N and K multiples of 8): qweight (K/8, N), qzeros (G, N/8)
// holding zero-1 when v1 (every zero must then be >= 1) or zero when v2, g_idx (K) = k/group.
struct GptqPacked {
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<float> scales;  // (G, N)
  int64_t groups = 0;
};
GptqPacked pack_gptq(const QuantizedMatrix& q, bool v1, const std::string& label);

}  // namespace spear
