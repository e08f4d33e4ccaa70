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
#include "model/module.h"
#include "model/rope.h"
#include "model/weights.h"

namespace spear {

// A decoder layer as the CPU engine runs it.
struct LayerWeights {
  std::vector<float> attn_norm;     // (dim)
  std::vector<float> ffn_norm;      // (dim)
  PerModule<std::unique_ptr<Linear>> modules;  // shapes: model/module.h module_shape
  Linear& at(Module m) const { return *modules[m]; }
};

// Makes the engine's Linear for one module of the model description.
using LinearMaker = std::function<std::unique_ptr<Linear>(const ModuleWeights&)>;
// Full-precision modules only: DenseLinear over the tensor (16-bit stays 16-bit, a view of
// the mapped file); throws for a quantized module (quant/cpu_model.h builds those).
std::unique_ptr<Linear> make_dense_linear(const ModuleWeights& m);

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
  // The CPU engine for a model description, each module made by `make`.
  static std::unique_ptr<LlamaModel> build(const LlamaWeights& w, const LinearMaker& make = make_dense_linear);
  // Loads a Hugging Face directory (model/load_hf.h) and builds it (full precision).
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
