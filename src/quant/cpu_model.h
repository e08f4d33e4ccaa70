#pragma once
// The CPU engine (model/llama.h) for a model description: full-precision modules as
// DenseLinear (16-bit weights kept 16-bit, read straight from the mapped checkpoint),
// quantized ones as QuantizedLinearLayer (the packed CPU kernel), and an Error
// Compensator as ECLinear around its quantized module.
#include <memory>

#include "model/llama.h"
#include "model/weights.h"

namespace spear {

std::unique_ptr<LlamaModel> build_cpu_model(const LlamaWeights& w);
// The CPU Linear for one module of the description (what build_cpu_model makes).
std::unique_ptr<Linear> make_cpu_linear(const ModuleWeights& mw);

}  // namespace spear
