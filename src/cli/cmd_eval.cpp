// spear eval --model DIR --data FILE --calib FILE --ctx 512 --methods fp,w4,static,spear
//            --budgets 0.01,0.02,0.05: the SPEAR report.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "compensate/calibrate.h"
#include "compensate/quantize_model.h"
#include "core/error.h"
#include "eval/report.h"
#include "model/spear_artifact.h"
#include "quant/cpu_model.h"

namespace spear::cli {

void register_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "eval", "Quantize, calibrate and compare methods: perplexity, gap recovered, memory, KL");
  struct Opts {
    std::string model, data, methods = "fp,w4,static,spear", budgets = "0.01,0.02,0.05",
                                 json, markdown, workdir;
    int64_t ctx = 512, max_windows = -1;
    int bits = 4;
    int64_t group = -1;
    CalibOptions calib;
    CalibrateOptions c;
    // The flags' spellings, parsed into enums in the callback; defaults from the options.
    std::string base{quant_method_name(QuantizeOptions{}.method)};
    std::string objective{calib_objective_name(c.objective)};
    std::string static_mode, static_refit;  // empty: by objective (CalibrateOptions)
    std::string gate{gate_kind_name(c.gate)};
    GptqOptions gptq;
    bool quiet = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Full-precision model directory")->required();
  cmd->add_option("--data", o->data, "Evaluation text")->required();
  add_calib_options(cmd, o->calib);
  auto parse_targets = add_target_options(cmd, o->c.targets, "eval");
  cmd->add_option("--ctx", o->ctx, "Evaluation window")->capture_default_str();
  cmd->add_option("--max-windows", o->max_windows, "Score only the first N windows");
  cmd->add_option("--methods", o->methods, "fp,w4,static,spear[,ungated]")->capture_default_str();
  cmd->add_option("--budgets", o->budgets, "EC budgets, fractions of the quantized model's bytes")
      ->capture_default_str();
  cmd->add_option("--base", o->base, "Quantizer of the base: rtn | gptq")->capture_default_str();
  cmd->add_option("--bits", o->bits, "Bits of the base")->capture_default_str();
  cmd->add_option("--group", o->group, "Group size of the base (-1 per channel)")->capture_default_str();
  cmd->add_option("--objective", o->objective, "SPEAR objective: e2e | block")->capture_default_str();
  cmd->add_option("--epochs", o->c.epochs, "Training passes")->capture_default_str();
  cmd->add_option("--batch", o->c.batch, "Windows per Adam step")->capture_default_str();
  cmd->add_option("--lr", o->c.lr, "Relative Adam step of A and B")->capture_default_str();
  cmd->add_option("--lr-gate", o->c.lr_gate, "Adam step of the gate")->capture_default_str();
  cmd->add_option("--max-rank", o->c.max_rank, "Largest rank per module")->capture_default_str();
  cmd->add_option("--stat-windows", o->c.stat_windows, "Windows for the static control's statistics")
      ->capture_default_str();
  cmd->add_option("--guard-windows", o->c.guard_windows, "Held-out windows of the static guard (0: off)")
      ->capture_default_str();
  cmd->add_option("--report-windows", o->c.report_windows, "Windows for the calibration KLs reported")
      ->capture_default_str();
  cmd->add_option("--damp", o->c.damp, "Whitening damping of the static control")->capture_default_str();
  cmd->add_option("--static-mode", o->static_mode, "qera | rrr (default: rrr for e2e/block, qera for static)");
  cmd->add_option("--static-refit", o->static_refit, "site | layer (default: layer for e2e/block, site for static)");
  cmd->add_option("--gate", o->gate, "Gate of the spear rows: full | diag | none")->capture_default_str();
  cmd->add_option("--probe-windows", o->c.probe_windows, "Windows for restoration gains")->capture_default_str();
  cmd->add_option("--json", o->json, "Write the report as JSON here");
  cmd->add_option("--markdown", o->markdown, "Write the markdown table here");
  cmd->add_option("--workdir", o->workdir, "Keep the .spear artifacts in this directory");
  cmd->add_flag("--quiet,-q", o->quiet, "No progress on stderr");
  cmd->callback([o, parse_targets] {
    parse_targets();
    namespace fs = std::filesystem;
    const QuantMethod base_method = parse_flag("eval: --base", o->base, parse_quant_method);
    o->c.objective = parse_flag("eval: --objective", o->objective, parse_calib_objective);
    if (!o->static_mode.empty())
      o->c.static_mode = parse_flag("eval: --static-mode", o->static_mode, parse_static_mode);
    if (!o->static_refit.empty())
      o->c.static_refit = parse_flag("eval: --static-refit", o->static_refit, parse_static_refit);
    o->c.gate = parse_flag("eval: --gate", o->gate, parse_gate_kind);
    const std::vector<std::string> methods = split_list(o->methods);
    std::vector<double> budgets;
    for (const std::string& b : split_list(o->budgets)) {
      double v = 0;
      try {
        v = std::stod(b);
      } catch (...) {
        throw Error("eval: bad budget '" + b + "'");
      }
      SPEAR_CHECK(v > 0 && v < 1, "eval: budgets must be in (0, 1), got " + b);
      budgets.push_back(v);
    }
    auto has = [&](const std::string& m) {
      return std::find(methods.begin(), methods.end(), m) != methods.end();
    };
    for (const std::string& m : methods)
      SPEAR_CHECK(m == "fp" || m == "w4" || m == "static" || m == "spear" || m == "ungated",
                  "eval: unknown method '" + m + "' (fp, w4, static, spear, ungated)");
    if (!o->workdir.empty()) fs::create_directories(o->workdir);
    Tokenizer tok = Tokenizer::from_file((fs::path(o->model) / "tokenizer.json").string());
    std::vector<int32_t> ids = tok.encode(read_text_file(o->data), true);
    CalibData calib = load_calib(tok, o->calib);
    auto fp = LlamaModel::load(o->model);

    QuantizeOptions qo;
    qo.method = base_method;
    qo.scheme.bits = o->bits;
    qo.scheme.group = o->group <= 0 ? -1 : o->group;
    qo.gptq = o->gptq;
    qo.calib_tokens = calib.tokens;
    qo.calib_ctx = calib.ctx;
    qo.calib_meta = calib.meta;
    qo.verbose = !o->quiet;
    SpearArtifact base = quantize_model(o->model, qo);
    const std::string base_name = o->base + " " + qo.scheme.name();
    if (!o->workdir.empty()) write_spear((fs::path(o->workdir) / "base.spear").string(), base);

    std::vector<ReportRow> rows;
    std::vector<std::unique_ptr<LlamaModel>> owned;
    std::vector<const LlamaModel*> models;
    auto add = [&](ReportRow r, std::unique_ptr<LlamaModel> m) {
      rows.push_back(std::move(r));
      models.push_back(m ? m.get() : fp.get());
      if (m) owned.push_back(std::move(m));
    };
    if (has("fp")) add({"fp", "", 0, {}, 0, 0, 0, 0}, nullptr);
    // The base is always scored: the gap column is measured against it.
    add({"w4", base_name, 0, {}, base.quant_model_bytes(), 0, 0,
         base.meta["quantizer"].value("seconds", 0.0)},
        build_cpu_model(base.weights));
    nlohmann::json calib_reports = nlohmann::json::array();
    if (has("static") || has("spear") || has("ungated"))
      for (double b : budgets) {
        CalibrateOptions co = o->c;
        co.budget = b;
        co.verbose = !o->quiet;
        if (!has("spear")) co.objective = CalibObjective::Static;
        CalibrateResult r = calibrate(o->model, base, calib, co);
        calib_reports.push_back(r.report);
        auto row_for = [&](const std::string& m, const std::vector<std::optional<ECParams>>& ecs,
                           double secs) {
          SpearArtifact a = with_ecs(base, ecs, r.report);
          if (!o->workdir.empty()) {
            char name[64];
            std::snprintf(name, sizeof name, "%s-b%g.spear", m.c_str(), b);
            write_spear((fs::path(o->workdir) / name).string(), a);
          }
          add({m, base_name, b, {}, a.quant_model_bytes(), a.ec_bytes(), a.ec_count(), secs},
              build_cpu_model(a.weights));
        };
        const double static_secs = r.report.value("seconds_static", 0.0);
        if (has("static")) row_for("static", r.static_ecs, static_secs);
        if (has("spear")) row_for("spear", r.trained_ecs, r.report.value("seconds", 0.0));
        if (has("ungated")) {
          CalibrateOptions cu = co;
          cu.gate = GateKind::None;
          cu.objective = o->c.objective;
          cu.fixed_placement = r.placement;
          CalibrateResult ru = calibrate(o->model, base, calib, cu);
          calib_reports.push_back(ru.report);
          std::vector<std::optional<ECParams>> e = ru.trained_ecs;
          SpearArtifact a = with_ecs(base, e, ru.report);
          add({"ungated", base_name, b, {}, a.quant_model_bytes(), a.ec_bytes(), a.ec_count(),
               ru.report.value("seconds", 0.0)},
              build_cpu_model(a.weights));
        }
      }
    Progress progress("eval");
    int64_t windows = 0, predicted = 0;
    std::vector<ModelScore> scores =
        score_models(*fp, models, ids, o->ctx, o->max_windows, &windows, &predicted,
                     [&](int64_t d, int64_t t) {
                       if (!o->quiet) progress.update(d, t, "windows");
                     });
    progress.finish();
    for (size_t i = 0; i < rows.size(); ++i) rows[i].score = scores[i];
    // Drop the base row when only other methods were asked for? No: it is the gap's anchor.
    const std::string md = report_markdown(rows);
    std::printf("model %s, data %s, ctx %lld, %lld windows (%lld predicted tokens), calibration %s "
                "(%lld windows of %lld)\n\n%s",
                o->model.c_str(), o->data.c_str(), (long long)o->ctx, (long long)windows,
                (long long)predicted, o->calib.file.c_str(), (long long)calib.windows,
                (long long)calib.ctx, md.c_str());
    nlohmann::json j{{"model", o->model},
                     {"data", o->data},
                     {"ctx", o->ctx},
                     {"windows", windows},
                     {"predicted_tokens", predicted},
                     {"calibration", calib.meta},
                     {"base", base.meta["quantizer"]},
                     {"rows", report_json(rows)},
                     {"calibration_reports", calib_reports}};
    if (!o->json.empty()) write_text_file(o->json, j.dump(1) + "\n");
    if (!o->markdown.empty()) write_text_file(o->markdown, md);
  });
}

}  // namespace spear::cli
