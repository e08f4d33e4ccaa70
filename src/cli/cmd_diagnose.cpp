// spear diagnose --model DIR --quantized m.spear --calib FILE: which modules quantization
// hurts, how unevenly across tokens; a ranked table and two SVG pictures.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "compensate/diagnostic.h"
#include "core/error.h"
#include "model/hf_quantized.h"
#include "model/spear_artifact.h"
#include "runtime/calib_device.h"

namespace spear::cli {

void register_diagnose(CLI::App& app) {
  auto* cmd = app.add_subcommand("diagnose", "Rank modules by quantization damage (weighted CKA), "
                                             "per-token error statistics, heatmap and histogram");
  struct Opts {
    std::string model, quantized, out_dir = ".", json, weighting, device = "cpu";
    CalibOptions calib;
    DiagnoseOptions d;
    bool no_validate = false, quiet = false;
    int64_t top = 20;
  };
  auto o = std::make_shared<Opts>();
  o->calib.windows = 4;
  cmd->add_option("--model", o->model, "Full-precision model directory")->required();
  cmd->add_option("--quantized", o->quantized, ".spear from `spear quantize`, or a GPTQ/AWQ/compressed-tensors W4 checkpoint directory")->required();
  add_calib_options(cmd, o->calib);
  auto parse_targets = add_target_options(cmd, o->d.targets, "diagnose");
  cmd->add_option("--out-dir", o->out_dir, "Where spear-heatmap.svg and spear-token-error.svg go")
      ->capture_default_str();
  cmd->add_option("--json", o->json, "Write the full diagnosis as JSON here");
  cmd->add_option("--weighting", o->weighting,
                  "Rank by uniform | entropy | error (default: whichever correlates best with the "
                  "measured restoration gain; entropy without validation)");
  cmd->add_option("--top", o->top, "Rows of the ranked table (0 = all)")->capture_default_str();
  cmd->add_option("--probe-windows", o->d.probe_windows, "Windows for the restoration gains")
      ->capture_default_str();
  cmd->add_flag("--no-validate", o->no_validate, "Skip measuring restoration gains");
  cmd->add_option("--device", o->device,
                  "cpu, or cuda: the quantized model's KL and the restoration gains run on the GPU "
                  "in fp32; the statistics stay on the CPU")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--quiet,-q", o->quiet, "No progress on stderr");
  cmd->callback([o, parse_targets] {
    parse_targets();
    o->d.forward = calib_forward_factory(parse_device(o->device));
    SpearArtifact q = load_quantized_base(o->quantized);
    Tokenizer tok = Tokenizer::from_file((std::filesystem::path(o->model) / "tokenizer.json").string());
    CalibData data = load_calib(tok, o->calib);
    o->d.validate = !o->no_validate;
    o->d.verbose = !o->quiet;
    Diagnosis d = diagnose(o->model, q, data, o->d);
    int w = 1;
    const std::string pick = o->weighting.empty() ? d.best_weighting : o->weighting;
    for (int k = 0; k < 3; ++k)
      if (pick == kWeightings[k]) w = k;
    SPEAR_CHECK(pick == kWeightings[w], "diagnose: --weighting must be uniform, entropy or error");
    std::vector<size_t> order(d.modules.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return d.modules[a].damage[w] > d.modules[b].damage[w]; });
    std::printf("%lld calibration tokens (%s), quantized model mean KL to FP %.5f\n",
                (long long)d.tokens, o->calib.file.c_str(), d.kl_w4);
    if (o->d.validate)
      std::printf("Spearman(damage, measured restoration gain): uniform %.3f, entropy %.3f, error %.3f "
                  "-> ranking by %s\n",
                  d.spearman[0], d.spearman[1], d.spearman[2], pick.c_str());
    std::printf("\n| rank | layer | module | damage (%s) | uniform | entropy | error | err mean | "
                "err cv | p90/p50 | p99/p50 | restore dKL |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
                pick.c_str());
    const size_t n = o->top > 0 ? std::min<size_t>(o->top, order.size()) : order.size();
    for (size_t r = 0; r < n; ++r) {
      const ModuleDiagnosis& m = d.modules[order[r]];
      std::printf("| %zu | %lld | %s | %.5f | %.5f | %.5f | %.5f | %.2e | %.2f | %.1f | %.1f | %s |\n",
                  r + 1, (long long)m.layer, std::string(module_name(m.module)).c_str(), m.damage[w],
                  m.damage[0], m.damage[1], m.damage[2], m.err_mean, m.err_cv,
                  m.err_p50 > 0 ? m.err_p90 / m.err_p50 : 0.0, m.err_p50 > 0 ? m.err_p99 / m.err_p50 : 0.0,
                  m.restore_gain >= 0 ? (std::to_string(m.restore_gain).substr(0, 8)).c_str() : "–");
    }
    std::filesystem::create_directories(o->out_dir);
    const std::string hm = (std::filesystem::path(o->out_dir) / "spear-heatmap.svg").string();
    const std::string hi = (std::filesystem::path(o->out_dir) / "spear-token-error.svg").string();
    write_text_file(hm, heatmap_svg(d, w, q.config().num_layers));
    std::vector<size_t> top5(order.begin(), order.begin() + std::min<size_t>(5, order.size()));
    write_text_file(hi, histogram_svg(d, top5));
    std::printf("\nwrote %s and %s (%.0f s)\n", hm.c_str(), hi.c_str(), d.seconds);
    if (!o->json.empty()) write_text_file(o->json, diagnosis_json(d).dump(1) + "\n");
  });
}

}  // namespace spear::cli
