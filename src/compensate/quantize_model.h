#pragma once
// Quantizes every linear module inside the decoder layers of a model directory (not the
// embeddings or the head) into a SpearArtifact: RTN, or GPTQ layer after layer on the
// inputs of the already-quantized model.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/spear_artifact.h"
#include "quant/gptq.h"
#include "core/quant_format.h"

namespace spear {

enum class QuantMethod { Rtn, Gptq };

// The spelling on the command line and in the artifact's metadata ("rtn", "gptq").
std::string_view quant_method_name(QuantMethod m);
// The inverse of quant_method_name; throws spear::Error naming the accepted values.
QuantMethod parse_quant_method(std::string_view s);

struct QuantizeOptions {
  QuantMethod method = QuantMethod::Rtn;
  QuantScheme scheme;
  GptqOptions gptq;
  // GPTQ only: calibration windows (tokens, windows × ctx) and their description.
  std::vector<int32_t> calib_tokens;
  int64_t calib_ctx = 0;
  nlohmann::json calib_meta;
  bool verbose = true;
};

SpearArtifact quantize_model(const std::string& dir, const QuantizeOptions& opt);

}  // namespace spear
