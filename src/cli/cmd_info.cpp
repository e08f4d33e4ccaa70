// spear info MODEL: parameters, dtypes and bytes of a checkpoint.
#include <cstdio>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/hf_quantized.h"
#include "model/spear_artifact.h"

namespace spear::cli {

namespace {

// A .spear artifact: the source config, what was quantized how, where ECs sit, and the
// bytes the budget is measured in (quant_model_bytes, ec_bytes).
void print_spear_info(const std::string& path, bool as_json) {
  SpearArtifact a = read_spear(path);
  const ModelConfig& cfg = a.config();
  std::map<std::string, int64_t> schemes;
  nlohmann::json placement = nlohmann::json::array();
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (Module mod : kAllModules) {
      const ModuleWeights& m = a.at(l, mod);
      schemes[m.quant->scheme.name()]++;
      if (m.ec)
        placement.push_back({{"layer", l},
                             {"module", std::string(module_name(mod))},
                             {"rank", m.ec->rank},
                             {"gated", m.ec->gated},
                             {"bytes", m.ec->bytes()}});
    }
  nlohmann::json j;
  j["path"] = path;
  j["format"] = "spear";
  j["architecture"] = cfg.architecture;
  j["config"] = cfg.to_json();
  j["parameters_by_config"] = cfg.num_parameters();
  j["mapped_bytes"] = std::filesystem::file_size(path);
  j["quant_model_bytes"] = a.quant_model_bytes();
  j["ec_bytes"] = a.ec_bytes();
  j["ec_count"] = a.ec_count();
  j["ec_overhead"] = static_cast<double>(a.ec_bytes()) / static_cast<double>(a.quant_model_bytes());
  j["schemes"] = schemes;
  j["placement"] = placement;
  j["metadata"] = a.meta;
  if (as_json) {
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("spear artifact    %s\n", path.c_str());
  std::printf("architecture      %s: %lld layers, dim %lld, %lld heads (%lld kv), ffn %lld, vocab %lld\n",
              cfg.architecture.c_str(), (long long)cfg.num_layers, (long long)cfg.hidden_size,
              (long long)cfg.num_heads, (long long)cfg.num_kv_heads,
              (long long)cfg.intermediate_size, (long long)cfg.vocab_size);
  std::printf("source model      %s\n", a.meta.value("source_model", std::string("?")).c_str());
  if (a.meta.contains("quantizer")) std::printf("quantizer         %s\n", a.meta["quantizer"].dump().c_str());
  for (auto& [s, n] : schemes) std::printf("scheme            %s on %lld modules\n", s.c_str(), (long long)n);
  std::printf("quant_model_bytes %lld\n", (long long)a.quant_model_bytes());
  std::printf("ec_bytes          %lld (%.3f%% of the quantized model, %lld ECs)\n",
              (long long)a.ec_bytes(), 100.0 * j["ec_overhead"].get<double>(), (long long)a.ec_count());
  for (const auto& p : placement)
    std::printf("  EC layer %2lld %-18s rank %3lld%s\n", (long long)p["layer"].get<int64_t>(),
                p["module"].get<std::string>().c_str(), (long long)p["rank"].get<int64_t>(),
                p["gated"].get<bool>() ? " gated" : "");
}

}  // namespace

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Show a model's architecture, parameters, dtypes and bytes");
  auto model = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  cmd->add_option("model,--model", *model, "Model directory (Hugging Face format) or .spear file")->required();
  cmd->add_flag("--json", *as_json, "Print one JSON object");
  cmd->callback([=] {
    namespace fs = std::filesystem;
    if (is_spear_path(*model)) {
      print_spear_info(*model, *as_json);
      return;
    }
    ModelConfig cfg = ModelConfig::load((fs::path(*model) / "config.json").string());
    TensorStore store = TensorStore::open(*model);
    std::map<std::string, int64_t> params_by_dtype, bytes_by_dtype;
    int64_t params = 0, bytes = 0;
    for (const std::string& n : store.names()) {
      const TensorView& t = store.get(n);
      std::string d(dtype_name(t.dtype));
      params_by_dtype[d] += t.numel();
      bytes_by_dtype[d] += static_cast<int64_t>(t.nbytes);
      params += t.numel();
      bytes += static_cast<int64_t>(t.nbytes);
    }
    nlohmann::json j;
    j["path"] = *model;
    j["architecture"] = cfg.architecture;
    j["config"] = cfg.to_json();
    j["parameters"] = params;
    j["parameters_by_config"] = cfg.num_parameters();
    j["tensor_count"] = store.names().size();
    j["tensor_bytes"] = bytes;
    j["mapped_bytes"] = store.mapped_bytes();
    j["shards"] = store.files().size();
    j["dtypes"] = nlohmann::json::object();
    for (auto& [d, n] : params_by_dtype)
      j["dtypes"][d] = {{"parameters", n}, {"bytes", bytes_by_dtype[d]}};
    j["f32_resident_bytes"] = cfg.num_parameters() * 4;
    const std::optional<nlohmann::json> qc = hf_quantization_config(*model);
    if (qc) j["quantization_config"] = *qc;
    if (*as_json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("model         %s\n", model->c_str());
    std::printf("architecture  %s: %lld layers, dim %lld, %lld heads (%lld kv) of %lld, ffn %lld, "
                "vocab %lld%s\n",
                cfg.architecture.c_str(), (long long)cfg.num_layers, (long long)cfg.hidden_size,
                (long long)cfg.num_heads, (long long)cfg.num_kv_heads, (long long)cfg.head_dim,
                (long long)cfg.intermediate_size, (long long)cfg.vocab_size,
                cfg.tie_word_embeddings ? ", tied head" : "");
    std::printf("parameters    %lld (%.2fM)\n", (long long)params, params / 1e6);
    for (auto& [d, n] : params_by_dtype)
      std::printf("  %-5s       %lld parameters, %lld bytes\n", d.c_str(), (long long)n,
                  (long long)bytes_by_dtype[d]);
    std::printf("files         %zu, %zu bytes mapped\n", store.files().size(), store.mapped_bytes());
    if (qc)
      std::printf("quantized     %s checkpoint (loads as a W4 base: ppl, generate, serve, calibrate --quantized)\n",
                  qc->value("quant_method", std::string("?")).c_str());
  });
}

}  // namespace spear::cli
