// spear export --model m.spear --format peft --out DIR: the quantized base as a GPTQ
// checkpoint and its ungated ECs as a PEFT LoRA adapter (model/hf_export.h).
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "model/hf_export.h"
#include "model/hf_quantized.h"

namespace spear::cli {

void register_export(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "export", "Write a quantized base as a GPTQ checkpoint and its ungated ECs as a PEFT LoRA adapter");
  struct Opts {
    std::string model, out, format = "peft", scales = "f16";
    bool no_adapter = false, force = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, ".spear artifact (or a GPTQ/AWQ/compressed-tensors directory)")->required();
  cmd->add_option("--out,-o", o->out, "Output directory (GPTQ checkpoint; the adapter in OUT/adapter)")->required();
  cmd->add_option("--format", o->format, "peft (GPTQ base + PEFT LoRA adapter)")->capture_default_str();
  cmd->add_option("--scales", o->scales, "f16 (GPTQ's dtype) | f32 (exact for spear)")->capture_default_str();
  cmd->add_flag("--no-adapter", o->no_adapter, "Write the base alone, leaving any ECs out");
  cmd->add_flag("--force", o->force, "Replace an earlier export in a non-empty --out");
  cmd->add_flag("--json", o->json, "Print one JSON object");
  cmd->callback([o] {
    SPEAR_CHECK(o->format == "peft", "export: --format '" + o->format + "' is not supported (accepted: peft)");
    SPEAR_CHECK(o->scales == "f16" || o->scales == "f32", "export: --scales must be f16 or f32");
    SpearArtifact a = load_quantized_base(o->model);
    PeftExportOptions eo;
    eo.adapter = !o->no_adapter;
    eo.scales_f32 = o->scales == "f32";
    eo.overwrite = o->force;
    const PeftExportResult r = export_gptq_peft(a, o->out, eo);
    if (o->json) {
      nlohmann::json j{{"base_dir", r.base_dir},
                       {"adapter_dir", r.adapter_dir.empty() ? nlohmann::json() : nlohmann::json(r.adapter_dir)},
                       {"checkpoint_format", r.checkpoint_format},
                       {"ec_modules", r.ec_modules},
                       {"max_rank", r.max_rank},
                       {"max_scale_rel_change", r.max_scale_rel_change},
                       {"files", r.files}};
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("wrote %s: GPTQ checkpoint (%s)%s%s\n", r.base_dir.c_str(), r.checkpoint_format.c_str(),
                r.adapter_dir.empty() ? "" : ", LoRA adapter in ", r.adapter_dir.c_str());
    if (!r.adapter_dir.empty())
      std::printf("  %lld modules with ECs, ranks up to %lld (lora_alpha = r: scaling 1)\n", (long long)r.ec_modules,
                  (long long)r.max_rank);
    if (r.max_scale_rel_change > 0)
      std::printf("  scales rounded to F16: largest relative change %.3g (--scales f32 keeps them exact)\n",
                  r.max_scale_rel_change);
  });
}

}  // namespace spear::cli
