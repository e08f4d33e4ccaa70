#pragma once
// config.json of a Hugging Face Llama checkpoint, in both the transformers-4 style
// (rope_theta, rope_scaling, torch_dtype) and the transformers-5 style
// (rope_parameters, dtype).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear {

struct RopeConfig {
  enum class Type { Default, Linear, Llama3 };
  Type type = Type::Default;
  double theta = 10000.0;
  double factor = 1.0;            // linear, llama3
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  std::string architecture = "LlamaForCausalLM";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // dim
  int64_t intermediate_size = 0;  // SwiGLU hidden
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;           // defaults to hidden_size / num_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;
  std::string dtype = "float32";  // torch_dtype / dtype as written

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t num_parameters() const;  // embeddings + layers + norm + head (if untied)

  // Throws spear::Error with a clear message for malformed JSON, a missing or
  // out-of-range field, an unsupported architecture or rope type, or sizes that
  // do not fit together (heads not dividing, absurd dimensions).
  static ModelConfig from_json_text(std::string_view text);
  static ModelConfig from_json(const nlohmann::json& j);
  static ModelConfig load(const std::string& path);  // path to config.json
  nlohmann::json to_json() const;
};

// Architectures by name, exact Hugging Face configs: llama-3.2-1b, llama-3.2-3b, llama-3-8b,
// llama-2-7b; and "tiny" (a few MB: 2 layers, dim 128, GQA, untied head, vocab 512) for
// tests. Throws spear::Error naming the known ones for any other name.
ModelConfig named_config(const std::string& name);
std::vector<std::string> named_config_names();

}  // namespace spear
