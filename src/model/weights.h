#pragma once
// The model description every backend builds from: the config and every weight of a
// Llama model, on the host, in the form the file holds it. Loaders produce it (a Hugging
// Face directory: model/load_hf.h; a .spear artifact: model/spear_artifact.h); the CPU
// engine (quant/cpu_model.h), the calibration network (compensate/network.h) and the GPU
// engine (gpu/gpu_model.h) construct themselves from it. Nothing else reads checkpoints.
//
// Tensors loaded from a Hugging Face directory are views into the memory-mapped shards
// (no copy; the mapping lives as long as any tensor that points into it), so the host
// holds a checkpoint once however many backends are built from it.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/model_config.h"
#include "model/ec_params.h"
#include "model/module.h"
#include "core/quant_format.h"

namespace spear {

class TensorStore;  // io/safetensors.h

// A host tensor: dtype, shape and bytes, either owned or a view into memory that `owner`
// keeps alive (a mapped checkpoint). Copies share the bytes.
struct WeightTensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // row-major
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::shared_ptr<const void> owner;
  // The mapped checkpoint `data` views, when it is one (kept alive by `owner`), for release().
  const TensorStore* mapping = nullptr;

  static WeightTensor owned(DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  static WeightTensor from_f32(std::vector<int64_t> shape, std::vector<float> values);
  // A view of `bytes` (nbytes = numel * dtype size) kept valid by `owner`.
  static WeightTensor view(DType dtype, std::vector<int64_t> shape, const uint8_t* bytes,
                           std::shared_ptr<const void> owner);

  bool empty() const { return data == nullptr; }
  int64_t numel() const;
  // Widens F32/F16/BF16 to float32 (exact); throws for other dtypes.
  std::vector<float> to_f32() const;
  void to_f32(float* out) const;  // out has numel() floats
  // A view of a mapped checkpoint: drops its whole pages from this process's memory (read
  // again, they fault back in from the file), for bytes read once and not needed again
  // soon. Nothing for owned bytes.
  void release() const;
};

// One linear module: full precision (`dense`), or packed quantized codes (`quant`) with
// optionally an Error Compensator (`ec`).
struct ModuleWeights {
  WeightTensor dense;                    // (out, in) F32/F16/BF16; empty when quantized
  std::optional<QuantizedMatrix> quant;  // (out, in) packed codes, scales, zeros
  std::optional<ECParams> ec;            // only on a quantized module

  bool quantized() const { return quant.has_value(); }
  int64_t ec_rank() const { return ec ? ec->rank : 0; }
};

struct LlamaLayerWeights {
  WeightTensor attn_norm;  // (dim)
  WeightTensor ffn_norm;   // (dim)
  PerModule<ModuleWeights> modules;
};

struct LlamaWeights {
  ModelConfig config;
  WeightTensor embed;       // (vocab, dim)
  std::vector<LlamaLayerWeights> layers;  // num_layers
  WeightTensor final_norm;  // (dim)
  WeightTensor lm_head;     // (vocab, dim); empty when tied to the embeddings

  const WeightTensor& head() const { return lm_head.empty() ? embed : lm_head; }
  ModuleWeights& at(int64_t layer, Module m) { return layers[layer].modules[m]; }
  const ModuleWeights& at(int64_t layer, Module m) const { return layers[layer].modules[m]; }

  // Structure against the config: every tensor present with the shape the config implies
  // and a float dtype, each module dense or quantized with its shape, ECs only on
  // quantized modules and of their module's shape. Throws spear::Error naming `label` and
  // the tensor.
  void validate(const std::string& label) const;
  int64_t ec_count() const;
};

// The unquantized tensors (all but the linear modules) by their Hugging Face names, with the
// shape the config implies, in the order checkpoints and .spear files list them: embeddings,
// each layer's two norms, the final norm, and the head unless tied. The one table of those
// names: loaders fill through it, validate() and write_spear() read through it. `w.layers`
// must have num_layers entries.
template <class T>
struct NamedTensor {
  std::string name;
  T* tensor = nullptr;
  std::vector<int64_t> shape;
};
std::vector<NamedTensor<WeightTensor>> unquantized_tensors(LlamaWeights& w);
std::vector<NamedTensor<const WeightTensor>> unquantized_tensors(const LlamaWeights& w);

// Modules of a layer that read the same input (Q, K, V; Gate, Up) as one module whose output
// is theirs side by side: weights stacked by rows, and their ECs (if any) stacked into one
// EC with A = [A_1; A_2; ...] (sum r, in), B block-diagonal (sum out, sum r) and, when any is
// gated, G block-diagonal and c concatenated; an ungated member gets G = 0, c = 0 there
// (γ ≡ 1: the same function). Exactly the members' outputs, concatenated. Empty (and `why`
// set) when the members read different inputs, are stored differently (dense dtypes or quantization schemes
// differ) or the stacked rank would exceed max_rank.
std::optional<ModuleWeights> stack_modules(const LlamaWeights& w, int64_t layer, const std::vector<Module>& ms,
                                           int64_t max_rank, std::string* why = nullptr);

}  // namespace spear
