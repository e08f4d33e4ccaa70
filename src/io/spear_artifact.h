#pragma once
// The .spear artifact: one safetensors container with everything needed to run a
// quantized (and possibly compensated) model without its source directory:
//   spear.config_json, spear.tokenizer_json   U8  the source's config.json / tokenizer.json, verbatim
//   model.embed_tokens.weight, *.input_layernorm.weight, ...   the unquantized tensors, in the
//                                              source's dtype (bytes copied, so nothing is rounded)
//   model.layers.L.MOD.qweight  U8  (out, packed_row_bytes(in, bits))  codes (quant_format.h)
//   model.layers.L.MOD.scales   F32 (out, groups)
//   model.layers.L.MOD.zeros    F32 (out, groups)   integral
//   model.layers.L.MOD.ec.{A,B,G,c}  F16  (r, in), (out, r), (r, r), (r)   only where an EC is placed
// and string metadata: format = "spear", format_version = "1", spear = a JSON document
// (source model, its config hash, quantizer settings, per-module scheme and EC rank,
// placement, calibration data hash, spear version), tensors_sha256 = SHA-256 of every
// tensor's bytes (by sorted name), so that a flipped byte anywhere is refused.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "compensate/ec_layer.h"
#include "core/dtype.h"
#include "io/model_config.h"
#include "model/llama.h"
#include "quant/quant_format.h"
#include "tokenizer/tokenizer.h"

namespace spear {

inline constexpr const char* kSpearFormatVersion = "1";

struct SpearModule {
  int64_t layer = 0;
  Module module = Module::Q;
  QuantizedMatrix q;
  std::optional<ECParams> ec;
};

struct DenseTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

struct SpearArtifact {
  std::string config_json;     // the source's config.json, verbatim
  std::string tokenizer_json;  // the source's tokenizer.json, verbatim; may be empty
  ModelConfig config;          // parsed from config_json
  std::vector<DenseTensor> dense;    // embeddings, norms, head
  std::vector<SpearModule> modules;  // num_layers * 7, layer-major, Module order
  nlohmann::json meta = nlohmann::json::object();

  SpearModule& at(int64_t layer, Module m) { return modules[layer * 7 + static_cast<int>(m)]; }
  const SpearModule& at(int64_t layer, Module m) const {
    return modules[layer * 7 + static_cast<int>(m)];
  }
  // Served bytes of the quantized model: packed codes + fp16 scales/zeros of every
  // quantized module, and the unquantized tensors at 2 bytes per parameter (fp16). This
  // is the denominator of the EC memory budget.
  int64_t quant_model_bytes() const;
  int64_t ec_bytes() const;  // fp16 bytes of all ECs
  int64_t ec_count() const;
};

// Starts an artifact from a Hugging Face model directory: config, tokenizer and the
// unquantized tensors; modules are left empty for a quantizer to fill.
SpearArtifact artifact_from_model_dir(const std::string& dir);

// Writes atomically (temp file + rename). Validates before writing.
void write_spear(const std::string& path, const SpearArtifact& a);
// Reads and validates everything (format, version, hash, config, every tensor's name,
// dtype, shape and value range, EC shapes); throws spear::Error naming the problem.
SpearArtifact read_spear(const std::string& path);
// Checks an in-memory artifact as read_spear would (shapes, ranges, completeness).
void validate_artifact(const SpearArtifact& a, const std::string& label);

// True when `path` names a .spear file (by extension) rather than a model directory.
bool is_spear_path(const std::string& path);

// SHA-256, hex. Used for the source model, calibration data and tensor hashes.
std::string sha256_hex(const void* data, size_t n);
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();  // finishes; the object must not be updated afterwards

 private:
  void block(const uint8_t* p);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_;
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};
// Hash of a model directory: config.json, then every *.safetensors file by name.
std::string model_dir_hash(const std::string& dir);

// Builds the runnable model: quantized modules as QuantizedLinearLayer, ECs as ECLinear.
std::unique_ptr<LlamaModel> build_model(const SpearArtifact& a);

}  // namespace spear

namespace spear {

// What `ppl`, `generate`, `info` and friends load from a path that is either a model
// directory or a .spear file.
struct LoadedModel {
  std::unique_ptr<LlamaModel> model;
  std::string tokenizer_json_path;  // directory: DIR/tokenizer.json; empty for .spear
  std::string tokenizer_json;       // .spear: the embedded text
  std::optional<SpearArtifact> artifact;  // set for .spear (tensors kept for `info`)
};
LoadedModel load_model_any(const std::string& path);
// The tokenizer of a loaded model (from the directory, or embedded in the .spear file).
Tokenizer load_tokenizer(const LoadedModel& m);

}  // namespace spear
