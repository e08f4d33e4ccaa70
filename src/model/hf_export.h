#pragma once
// `spear export --format peft`: a quantized base (a .spear, or an imported checkpoint) as
//   OUT/                 a GPTQ checkpoint (model/hf_quantized.h's layout): config.json with
//                        quantization_config {quant_method gptq, bits 4, group_size, sym,
//                        desc_act false, checkpoint_format gptq (v1: zero - 1 stored) or gptq_v2
//                        when some zero point is 0}, quantize_config.json, model.safetensors
//                        (qweight/qzeros/scales/g_idx per module, the unquantized tensors in their
//                        dtype), the tokenizer files and generation_config.json
//   OUT/adapter/         its ungated ECs as a PEFT LoRA adapter: adapter_config.json (LORA, r = the
//                        largest rank, lora_alpha = r, rank_pattern / alpha_pattern per module
//                        (keys layers.L.MOD) so that every module's scaling alpha / r is 1 (and 1
//                        too for a reader that ignores the patterns), target_modules = the modules'
//                        full names) and adapter_model.safetensors
//                        (base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r), F16)
// A LoRA adapter computes y += B A x: an EC with γ ≡ 1 (ungated, or gated with G = 0 and c = 0)
// exactly; a gated EC is refused.
#include <cstdint>
#include <string>
#include <vector>

#include "model/spear_artifact.h"

namespace spear {

struct PeftExportOptions {
  bool adapter = true;      // false: the base alone (ECs, gated or not, are left out)
  bool scales_f32 = false;  // scales as F32 instead of GPTQ's F16 (exact for spear, not for every GPTQ kernel)
  bool overwrite = false;   // replace what a previous export wrote in a non-empty OUT
};

struct PeftExportResult {
  std::string base_dir, adapter_dir;  // adapter_dir empty when no adapter was written
  std::string checkpoint_format;      // "gptq" or "gptq_v2"
  int64_t ec_modules = 0, max_rank = 0;
  double max_scale_rel_change = 0;    // from rounding the scales to F16 (0 when exact)
  std::vector<std::string> files;     // paths written, relative to OUT
};

PeftExportResult export_gptq_peft(const SpearArtifact& a, const std::string& out_dir, const PeftExportOptions& o);

// Reads a PEFT LoRA adapter (as export writes it, or any LoRA on the decoder's linear modules
// without DoRA / rsLoRA / fan_in_fan_out) into ungated ECs on the quantized modules: A = lora_A,
// B = lora_B * (alpha / r). Throws spear::Error naming the file and tensor on anything else.
void attach_peft_adapter(LlamaWeights& w, const std::string& adapter_dir);
inline void attach_peft_adapter(SpearArtifact& a, const std::string& adapter_dir) {
  attach_peft_adapter(a.weights, adapter_dir);
}

}  // namespace spear
