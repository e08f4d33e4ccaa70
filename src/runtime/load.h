#pragma once
// What a command loads from a path that is either a Hugging Face model directory or a
// .spear artifact: the model description, its tokenizer, and the artifact's metadata.
#include <string>

#include <nlohmann/json.hpp>

#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace spear {

struct LoadedModel {
  std::string path;
  LlamaWeights weights;
  bool is_artifact = false;
  nlohmann::json meta = nlohmann::json::object();  // .spear: the artifact's metadata
  std::string tokenizer_json_path;  // directory: DIR/tokenizer.json
  std::string tokenizer_json;       // .spear: the embedded text
  // tokenizer_config.json (the chat template) and generation_config.json: the
  // directory's files or the artifact's embedded copies; empty when there are none.
  std::string tokenizer_config_json;
  std::string generation_config_json;
};

// `adapter`: a PEFT LoRA adapter directory (`spear export` writes one) applied to a quantized
// base as ungated ECs (model/hf_export.h); "" for none. A full-precision model is refused.
LoadedModel load_model(const std::string& path, const std::string& adapter = "");
// The tokenizer of a loaded model (from the directory, or embedded in the .spear file).
Tokenizer load_tokenizer(const LoadedModel& m);

}  // namespace spear
