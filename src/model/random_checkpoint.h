#pragma once
// A Hugging Face Llama directory with random weights, at any size, without a download:
// config.json, bf16 (or f16) safetensors shards with model.safetensors.index.json, and a
// tokenizer.json (tokenizer_config.json beside it). For running the whole pipeline
// (quantize, diagnose, calibrate, ppl, serve) on real shapes: quality there is meaningless,
// cost is real. `spear make-checkpoint` is the command.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/model_config.h"
#include "io/safetensors.h"

namespace spear {

struct RandomCheckpointOptions {
  uint64_t seed = 0;
  DType dtype = DType::BF16;                 // BF16 or F16
  uint64_t shard_bytes = 5000ull * 1000 * 1000;  // a shard's data, at most (one tensor may exceed it)
  double init_std = 0.02;                    // linear layers and embeddings; norms are 1
  std::string tokenizer_json;                // the text of tokenizer.json to write
  std::string tokenizer_config_json;         // the text of tokenizer_config.json ("" = none)
  bool overwrite = false;                    // replace a previous checkpoint in a non-empty dir
  // Called after each tensor: (bytes written so far, bytes in all).
  std::function<void(uint64_t, uint64_t)> progress;
};

struct RandomCheckpointResult {
  int shards = 0;
  int64_t tensors = 0;
  uint64_t bytes = 0;  // all shard files
  std::vector<std::string> files;  // names written in the directory
};

// The tensors of an HF Llama checkpoint of `c`, in the order transformers writes them
// (embeddings, then layer by layer, then the final norm and the head unless tied).
std::vector<TensorDecl> hf_llama_tensors(const ModelConfig& c, DType dtype);

// The value of element i of tensor t (its index in hf_llama_tensors) for a seed, before
// rounding to the dtype: a deterministic counter-based draw, so the result does not depend
// on how many threads make it. Approximately normal (a sum of four uniforms) with std
// init_std, bounded at ±3.46 std; norm weights are exactly 1.
float random_weight(uint64_t seed, int64_t tensor, uint64_t i, double init_std);

// Writes the directory. Every file goes to a staging folder inside `dir` first and is
// renamed into place when complete (config.json last, so a directory with a config.json is
// whole); an error removes the staging folder and leaves what was there. A `dir` that holds
// anything is refused unless `overwrite`; then stale shards of an earlier checkpoint
// (model*.safetensors not among the new ones) are removed once the new ones are in place.
// Host memory: one chunk of a tensor (tens of MB) per thread, never a whole tensor.
RandomCheckpointResult write_random_checkpoint(const ModelConfig& c, const std::string& dir,
                                               const RandomCheckpointOptions& o);

}  // namespace spear
