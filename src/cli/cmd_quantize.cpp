// spear quantize --model DIR --method rtn|gptq --bits 4 --group -1|128 --out m.spear
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "compensate/calib_data.h"
#include "compensate/quantize_model.h"
#include "core/error.h"
#include "model/spear_artifact.h"

namespace spear::cli {

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "quantize", "Quantize the decoder's linear layers (RTN or GPTQ) into a .spear artifact");
  struct Opts {
    std::string model, out, method{quant_method_name(QuantizeOptions{}.method)};
    int bits = 4;
    int64_t group = -1;
    bool sym = false;
    CalibOptions calib;
    GptqOptions gptq;
  };
  auto o = std::make_shared<Opts>();
  o->calib.windows = 32;
  cmd->add_option("--model", o->model, "Model directory (Hugging Face format)")->required();
  cmd->add_option("--out,-o", o->out, "Output .spear file")->required();
  cmd->add_option("--method", o->method, "rtn | gptq")->capture_default_str();
  cmd->add_option("--bits", o->bits, "Bits per weight, 2..8")->capture_default_str();
  cmd->add_option("--group", o->group, "Inputs per group; -1 = per output channel")->capture_default_str();
  cmd->add_flag("--sym", o->sym, "Symmetric (absmax) grid instead of asymmetric min-max");
  cmd->add_option("--calib", o->calib.file, "Calibration text (gptq)");
  cmd->add_option("--calib-windows", o->calib.windows, "Calibration windows")->capture_default_str();
  cmd->add_option("--calib-ctx", o->calib.ctx, "Tokens per calibration window")->capture_default_str();
  cmd->add_option("--calib-offset", o->calib.offset, "Tokens to skip at the start of --calib")->capture_default_str();
  cmd->add_option("--damp", o->gptq.damp, "GPTQ dampening, fraction of mean diag(H)")->capture_default_str();
  cmd->add_flag("--act-order", o->gptq.act_order, "GPTQ: quantize columns by decreasing H_ii");
  cmd->callback([o] {
    SPEAR_CHECK(!is_spear_path(o->model), "quantize: --model must be a full-precision model directory");
    SPEAR_CHECK(o->out.size() > 6 && o->out.substr(o->out.size() - 6) == ".spear",
                "quantize: --out must end in .spear");
    QuantizeOptions q;
    q.method = parse_flag("quantize: --method", o->method, parse_quant_method);
    q.scheme.bits = o->bits;
    q.scheme.group = o->group <= 0 ? -1 : o->group;
    q.scheme.symmetric = o->sym;
    q.gptq = o->gptq;
    if (q.method == QuantMethod::Gptq) {
      SPEAR_CHECK(!o->calib.file.empty(), "quantize: --method gptq needs --calib FILE");
      Tokenizer tok = Tokenizer::from_file((std::filesystem::path(o->model) / "tokenizer.json").string());
      CalibData cd = load_calib(tok, o->calib);
      q.calib_tokens = cd.tokens;
      q.calib_ctx = cd.ctx;
      q.calib_meta = cd.meta;
    }
    SpearArtifact a = quantize_model(o->model, q);
    write_spear(o->out, a);
    std::printf("wrote %s: %s %s, quant_model_bytes %lld (%.1f s)\n", o->out.c_str(),
                std::string(quant_method_name(q.method)).c_str(),
                q.scheme.name().c_str(), (long long)a.quant_model_bytes(),
                a.meta["quantizer"]["seconds"].get<double>());
  });
}

}  // namespace spear::cli
