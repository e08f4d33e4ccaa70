#pragma once
// Loads a Hugging Face Llama directory (config.json + safetensors, sharded or not) into
// the model description. Every tensor's presence, shape and dtype is checked against the
// config before anything else happens; tensors are views into the mapped shards (no copy).
#include <string>

#include "model/weights.h"

namespace spear {

LlamaWeights load_hf_weights(const std::string& dir);

}  // namespace spear
