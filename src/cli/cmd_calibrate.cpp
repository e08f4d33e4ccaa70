// spear calibrate --model DIR --quantized m.spear --calib FILE --budget 0.01 --out m-ec.spear
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "compensate/calibrate.h"
#include "core/error.h"
#include "model/hf_quantized.h"
#include "model/spear_artifact.h"
#include "runtime/calib_device.h"

namespace spear::cli {


void register_calibrate(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "calibrate", "Place gated Error Compensators under a memory budget and train them");
  struct Opts {
    std::string model, quantized, out, static_out, report, placement, gains, init_from;
    CalibOptions calib;
    CalibrateOptions c;
    // The flags' spellings, parsed into c in the callback; defaults from CalibrateOptions.
    std::string objective{calib_objective_name(c.objective)};
    std::string static_mode, static_refit;  // empty: by objective (CalibrateOptions)
    std::string gate{gate_kind_name(c.gate)};
    std::string device = "cpu", static_device = "cpu";
    bool no_gate = false, quiet = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Full-precision model directory")->required();
  cmd->add_option("--quantized", o->quantized, ".spear from `spear quantize`, or a GPTQ/AWQ/compressed-tensors W4 checkpoint directory")->required();
  cmd->add_option("--out,-o", o->out, "Output .spear with ECs")->required();
  add_calib_options(cmd, o->calib);
  auto parse_targets = add_target_options(cmd, o->c.targets, "calibrate");
  cmd->add_option("--budget", o->c.budget, "EC bytes as a fraction of the quantized model's bytes")
      ->capture_default_str();
  cmd->add_option("--objective", o->objective, "static | block | e2e")->capture_default_str();
  cmd->add_option("--static-mode", o->static_mode,
                  "Static control: qera (QERA closed form, target dW x_q) | rrr (target W x_fp - Q x_q); "
                  "default rrr as the start of training (e2e, block), qera for --objective static");
  cmd->add_option("--static-refit", o->static_refit,
                  "Static refit at the placement: site (site after site in each layer) | layer; "
                  "default layer as the start of training, site for --objective static");
  cmd->add_option("--gate", o->gate,
                  "Gate of the trained ECs: full (r x r G) | diag (diagonal G) | none (gamma = 1)")
      ->capture_default_str();
  cmd->add_flag("--no-gate", o->no_gate, "Same as --gate none");
  cmd->add_option("--max-rank", o->c.max_rank, "Largest rank per module")->capture_default_str();
  cmd->add_option("--epochs", o->c.epochs, "Training passes over the calibration windows")->capture_default_str();
  cmd->add_option("--batch", o->c.batch, "Windows per Adam step")->capture_default_str();
  cmd->add_option("--lr", o->c.lr, "Adam step of A and B, relative to their initial RMS")->capture_default_str();
  cmd->add_option("--lr-gate", o->c.lr_gate, "Adam step of the gate parameters")->capture_default_str();
  cmd->add_option("--stat-windows", o->c.stat_windows, "Windows for the static control's statistics")
      ->capture_default_str();
  cmd->add_option("--guard-windows", o->c.guard_windows,
                  "Held-out windows (after --stat-windows) on which the static control's scale is "
                  "chosen by NLL; 0: no guard")
      ->capture_default_str();
  cmd->add_option("--report-windows", o->c.report_windows, "Windows for the calibration KLs reported")
      ->capture_default_str();
  cmd->add_option("--probe-windows", o->c.probe_windows, "Windows for the placement's restoration gains")
      ->capture_default_str();
  cmd->add_option("--damp", o->c.damp, "Whitening damping (fraction of the mean eigenvalue)")->capture_default_str();
  cmd->add_option("--placement", o->placement, "JSON placement to use instead of searching one");
  cmd->add_option("--gains", o->gains,
                  "Reuse the restoration gains of an earlier --report-json (same model and probe windows)");
  cmd->add_option("--init-from", o->init_from,
                  "Start training from the ECs of this .spear (e.g. a --static-out of the same base) "
                  "instead of fitting the static control");
  cmd->add_option("--static-out", o->static_out, "Also write the static control (same placement) here");
  cmd->add_option("--report-json", o->report, "Write the calibration report (timings, losses) here");
  cmd->add_option("--device", o->device,
                  "cpu, or cuda: the restoration gains, calibration KLs, --targets recompute's "
                  "teacher targets and the e2e training's forward and backward run on the GPU in "
                  "fp32 (Adam on the host); the static control as --static-device says; "
                  "--objective block stays on the CPU")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--static-device", o->static_device,
                  "cpu, or cuda (with --device cuda): the static control's statistics, float64 "
                  "fits and guard on the GPU (new: not yet run on a GPU, hence not the default)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--quiet,-q", o->quiet, "No progress on stderr");
  cmd->callback([o, parse_targets] {
    parse_targets();
    // First, so that a missing GPU is said before anything is loaded.
    o->c.forward = calib_forward_factory(parse_device(o->device));
    SPEAR_CHECK(o->static_device == "cpu" || o->device == "cuda",
                "calibrate: --static-device cuda needs --device cuda");
    o->c.static_on_device = o->static_device == "cuda";
    o->c.objective = parse_flag("calibrate: --objective", o->objective, parse_calib_objective);
    if (!o->static_mode.empty())
      o->c.static_mode = parse_flag("calibrate: --static-mode", o->static_mode, parse_static_mode);
    if (!o->static_refit.empty())
      o->c.static_refit = parse_flag("calibrate: --static-refit", o->static_refit, parse_static_refit);
    o->c.gate = parse_flag("calibrate: --gate", o->gate, parse_gate_kind);
    SPEAR_CHECK(!o->no_gate || o->c.gate == GateKind::None || o->gate == gate_kind_name(GateKind::Full),
                "calibrate: --no-gate contradicts --gate " + o->gate);
    if (o->no_gate) o->c.gate = GateKind::None;
    SPEAR_CHECK(!is_spear_path(o->model), "calibrate: --model must be the full-precision model directory");
    SPEAR_CHECK(o->out.size() > 6 && o->out.substr(o->out.size() - 6) == ".spear",
                "calibrate: --out must end in .spear");
    SpearArtifact q = load_quantized_base(o->quantized);
    Tokenizer tok = Tokenizer::from_file((std::filesystem::path(o->model) / "tokenizer.json").string());
    CalibData data = load_calib(tok, o->calib);
    o->c.verbose = !o->quiet;
    if (!o->placement.empty())
      o->c.fixed_placement = placement_from_json(nlohmann::json::parse(read_text_file(o->placement)));
    if (!o->gains.empty())
      o->c.restore_gains = restore_gains_from_report(nlohmann::json::parse(read_text_file(o->gains)),
                                                     q.config().num_layers);
    if (!o->init_from.empty()) {
      SpearArtifact init = read_spear(o->init_from);
      const int64_t L = q.config().num_layers;
      SPEAR_CHECK(init.config().num_layers == L, "calibrate: --init-from is another model");
      o->c.init_ecs.assign(L * kNumModules, std::nullopt);
      for (int64_t l = 0; l < L; ++l)
        for (Module m : kAllModules) o->c.init_ecs[module_index(l, m)] = init.at(l, m).ec;
    }
    CalibrateResult r = calibrate(o->model, q, data, o->c);
    nlohmann::json meta = r.report;
    meta.erase("module_gains");
    const bool untrained = o->c.objective == CalibObjective::Static;
    write_spear(o->out, with_ecs(q, untrained ? r.static_ecs : r.trained_ecs, meta));
    if (!o->static_out.empty()) {
      nlohmann::json sm = meta;
      sm["settings"]["objective"] = std::string(calib_objective_name(CalibObjective::Static));
      write_spear(o->static_out, with_ecs(q, r.static_ecs, sm));
    }
    if (!o->report.empty()) write_text_file(o->report, r.report.dump(1) + "\n");
    std::printf("wrote %s: %zu ECs, %lld EC bytes = %.3f%% of %lld quantized bytes; calibration KL "
                "w4 %.5f, static %.5f, %s %.5f; %.0f s\n",
                o->out.c_str(), r.placement.size(), (long long)r.report["ec_bytes"].get<int64_t>(),
                100.0 * r.report["ec_bytes"].get<double>() / r.report["quant_model_bytes"].get<double>(),
                (long long)r.report["quant_model_bytes"].get<int64_t>(),
                r.report["calib_kl_w4"].get<double>(), r.report["calib_kl_static"].get<double>(),
                o->objective.c_str(), r.report["calib_kl_trained"].get<double>(),
                r.report["seconds"].get<double>());
  });
}

// Shared by calibrate, diagnose and eval.
void add_calib_options(CLI::App* cmd, CalibOptions& c) {
  cmd->add_option("--calib", c.file, "Calibration text file")->required();
  cmd->add_option("--calib-windows", c.windows, "Calibration windows")->capture_default_str();
  cmd->add_option("--calib-ctx", c.ctx, "Tokens per calibration window")->capture_default_str();
  cmd->add_option("--calib-offset", c.offset, "Tokens to skip at the start of --calib")
      ->capture_default_str();
}

std::function<void()> add_target_options(CLI::App* cmd, TargetOptions& t, const std::string& where) {
  struct Flags {
    std::string mode;
    int64_t top_k = 0;
    CLI::Option* top_k_opt = nullptr;
  };
  auto f = std::make_shared<Flags>();
  f->mode = target_mode_name(t.mode);
  f->top_k = t.top_k;
  cmd->add_option("--targets", f->mode,
                  "Full-precision targets: dense (windows x ctx x vocab floats) | topk (top-K "
                  "log-probs + tail mass per token) | recompute (FP forward re-run when needed)")
      ->capture_default_str();
  f->top_k_opt = cmd->add_option("--target-top-k", f->top_k, "Ids kept per token with --targets topk")
                     ->capture_default_str();
  return [f, &t, where] {
    t.mode = parse_flag(where + ": --targets", f->mode, parse_target_mode);
    SPEAR_CHECK(f->top_k_opt->count() == 0 || t.mode == TargetMode::TopK,
                where + ": --target-top-k applies only to --targets topk (given --targets " + f->mode + ")");
    SPEAR_CHECK(f->top_k >= 1, where + ": --target-top-k must be at least 1 (got " +
                                   std::to_string(f->top_k) + ")");
    t.top_k = f->top_k;
  };
}

}  // namespace spear::cli
