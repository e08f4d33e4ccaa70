#pragma once
// The Llama forward pass (RMSNorm, RoPE, grouped-query attention with a KV cache,
// SwiGLU, tied or untied head) in float32 on the CPU, over a batch of sequence
// chunks so that prefill, decode and continuous batching share one code path.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/model_config.h"
#include "model/kv_cache.h"
#include "model/linear.h"
#include "model/rope.h"

namespace spear {

// The seven linear modules of a decoder layer, named as in Hugging Face checkpoints.
enum class Module { Q, K, V, O, Gate, Up, Down };
inline constexpr Module kAllModules[] = {Module::Q,    Module::K,  Module::V,   Module::O,
                                         Module::Gate, Module::Up, Module::Down};
std::string_view module_name(Module m);  // "self_attn.q_proj", ..., "mlp.down_proj"
bool parse_module_name(std::string_view s, Module* out);

struct LayerWeights {
  std::vector<float> attn_norm;     // (dim)
  std::vector<float> ffn_norm;      // (dim)
  std::unique_ptr<Linear> modules[7];  // indexed by Module:
  // q (n_heads*head_dim, dim), k (n_kv_heads*head_dim, dim), v (n_kv_heads*head_dim, dim),
  // o (dim, n_heads*head_dim), gate (hidden, dim), up (hidden, dim), down (dim, hidden)
  Linear& at(Module m) const { return *modules[static_cast<int>(m)]; }
};

// Named intermediate tensors, for diffing a layer against a reference: called with
// e.g. "hidden.0" (embeddings), "layers.3.attn_norm", "layers.3.q" (after RoPE),
// "layers.3.attn_out", "layers.3.ffn_norm", "layers.3.mlp.down_proj.in", "hidden.4"
// (after layer 3), "final_norm"; rows = tokens of the batch.
using TraceFn = std::function<void(std::string_view name, const float* data, int64_t rows,
                                   int64_t cols)>;

// A run of new tokens of one sequence: positions [start_pos, start_pos + n_tokens).
struct SeqChunk {
  KVStore* kv = nullptr;
  const int32_t* tokens = nullptr;
  int64_t n_tokens = 0;
  int64_t start_pos = 0;
  bool all_logits = false;  // logits for every token, else only for the last one
};

class LlamaModel {
 public:
  // Loads a Hugging Face directory (config.json + safetensors). Every tensor's shape
  // and dtype is checked against the config before anything is allocated.
  static std::unique_ptr<LlamaModel> load(const std::string& dir);
  // A model from explicit weights (tests, synthetic configs).
  LlamaModel(ModelConfig cfg, std::vector<float> embed, std::vector<LayerWeights> layers,
             std::vector<float> final_norm, std::vector<float> lm_head);

  const ModelConfig& config() const { return cfg_; }
  int64_t vocab_size() const { return cfg_.vocab_size; }

  // Runs all chunks as one batch: token rows of every chunk are concatenated for the
  // linear layers; attention reads each chunk's own KV store. Writes K/V of the new
  // positions. `logits` receives, chunk after chunk, n_tokens rows (all_logits) or
  // one row, each of vocab_size floats.
  void forward(std::span<const SeqChunk> chunks, float* logits) const;
  // Convenience: one sequence.
  std::vector<float> forward(const int32_t* tokens, int64_t n, KVStore& kv, int64_t start_pos,
                             bool all_logits) const;

  void set_trace(TraceFn fn) { trace_ = std::move(fn); }

  LayerWeights& layer(int64_t i) { return layers_[i]; }
  const LayerWeights& layer(int64_t i) const { return layers_[i]; }
  const std::vector<float>& embeddings() const { return embed_; }  // (vocab, dim)
  const std::vector<float>& final_norm() const { return final_norm_; }  // (dim)
  // (vocab, dim): the untied head, or the embeddings when tied.
  const std::vector<float>& head() const { return lm_head_.empty() ? embed_ : lm_head_; }
  int64_t weight_bytes() const;  // resident weights, all layers + embeddings + head

 private:
  void trace(std::string_view name, const float* d, int64_t r, int64_t c) const {
    if (trace_) trace_(name, d, r, c);
  }
  ModelConfig cfg_;
  std::vector<float> embed_;       // (vocab, dim)
  std::vector<LayerWeights> layers_;
  std::vector<float> final_norm_;  // (dim)
  std::vector<float> lm_head_;     // (vocab, dim); empty when tied to embed_
  mutable Rope rope_;
  TraceFn trace_;
};

}  // namespace spear
