#pragma once
// The .spear artifact: one safetensors container with everything needed to run a
// quantized (and possibly compensated) model without its source directory:
//   spear.config_json, spear.tokenizer_json   U8  the source's config.json / tokenizer.json, verbatim
//   spear.tokenizer_config_json, spear.generation_config_json   U8  the source's
//                                              tokenizer_config.json (the chat template) and
//                                              generation_config.json, verbatim, when it has them
//                                              (optional: artifacts written before they were kept
//                                              load without them)
//   model.embed_tokens.weight, *.input_layernorm.weight, ...   the unquantized tensors, in the
//                                              source's dtype (bytes copied, so nothing is rounded)
//   model.layers.L.MOD.qweight  U8  (out, packed_row_bytes(in, bits))  codes (core/quant_format.h)
//   model.layers.L.MOD.scales   F32 (out, groups)
//   model.layers.L.MOD.zeros    F32 (out, groups)   integral
//   model.layers.L.MOD.ec.{A,B,G,c}  F16  (r, in), (out, r), (r, r), (r)   only where an EC is placed
// and string metadata: format = "spear", format_version = "1", spear = a JSON document
// (source model, its config hash, quantizer settings, per-module scheme and EC rank,
// placement, calibration data hash, spear version), tensors_sha256 = SHA-256 of every
// tensor's bytes (by sorted name), so that a flipped byte anywhere is refused.
//
// In memory an artifact is the model description (model/weights.h) with every module
// quantized, plus the source's config and tokenizer text and the metadata.
#include <cstdint>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "io/sha256.h"
#include "model/weights.h"

namespace spear {

inline constexpr const char* kSpearFormatVersion = "1";

struct SpearArtifact {
  std::string config_json;     // the source's config.json, verbatim
  std::string tokenizer_json;  // the source's tokenizer.json, verbatim; may be empty
  std::string tokenizer_config_json;   // the source's tokenizer_config.json; may be empty
  std::string generation_config_json;  // the source's generation_config.json; may be empty
  LlamaWeights weights;        // weights.config is parsed from config_json
  nlohmann::json meta = nlohmann::json::object();

  const ModelConfig& config() const { return weights.config; }
  ModuleWeights& at(int64_t layer, Module m) { return weights.at(layer, m); }
  const ModuleWeights& at(int64_t layer, Module m) const { return weights.at(layer, m); }
  // The quantized matrix of a module (throws when the module is not quantized).
  QuantizedMatrix& quant(int64_t layer, Module m);
  const QuantizedMatrix& quant(int64_t layer, Module m) const;
  // Served bytes of the quantized model: packed codes + fp16 scales/zeros of every
  // quantized module, and the unquantized tensors at 2 bytes per parameter (fp16). This
  // is the denominator of the EC memory budget.
  int64_t quant_model_bytes() const;
  int64_t ec_bytes() const;  // fp16 bytes of all ECs
  int64_t ec_count() const { return weights.ec_count(); }
};

// Starts an artifact from a Hugging Face model directory: config, tokenizer and the
// unquantized tensors (views of the mapped files); every module still holds its dense
// weight, for a quantizer to replace.
SpearArtifact artifact_from_model_dir(const std::string& dir);

// Writes atomically (temp file + rename). Validates before writing.
void write_spear(const std::string& path, const SpearArtifact& a);
// Reads and validates everything (format, version, hash, config, every tensor's name,
// dtype, shape and value range, EC shapes); throws spear::Error naming the problem.
SpearArtifact read_spear(const std::string& path);
// The same checks on a parsed container (`label` names it in errors). verify_hash =
// false skips only the tensors_sha256 comparison (the key must still be there): for
// the fuzzer (fuzz/fuzz_spear.cpp), which cannot forge a SHA-256 and would otherwise
// never get past it; every loader of a real file goes through read_spear(path).
SpearArtifact read_spear(std::shared_ptr<SafetensorsFile> f, const std::string& label, bool verify_hash);
// Checks an in-memory artifact as read_spear would (shapes, ranges, completeness).
void validate_artifact(const SpearArtifact& a, const std::string& label);

// True when `path` names a .spear file (by extension) rather than a model directory.
bool is_spear_path(const std::string& path);

}  // namespace spear
