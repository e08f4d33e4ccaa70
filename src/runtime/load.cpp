#include "runtime/load.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"
#include "model/hf_export.h"
#include "model/hf_quantized.h"
#include "model/load_hf.h"
#include "model/spear_artifact.h"

namespace spear {

namespace {
LoadedModel load_base(const std::string& path);
}

LoadedModel load_model(const std::string& path, const std::string& adapter) {
  LoadedModel r = load_base(path);
  if (!adapter.empty()) {
    SPEAR_CHECK(r.is_artifact, "--adapter: " + path + " is a full-precision model; an adapter is applied to a "
                               "quantized base (.spear or a GPTQ/AWQ/compressed-tensors directory)");
    SPEAR_CHECK(r.weights.ec_count() == 0, "--adapter: " + path + " already has Error Compensators");
    attach_peft_adapter(r.weights, adapter);
    r.meta["adapter"] = adapter;
  }
  return r;
}

namespace {

// A .spear file or an imported quantized checkpoint: weights, metadata and embedded configs.
void take_artifact(SpearArtifact&& a, LoadedModel& r) {
  r.weights = std::move(a.weights);
  r.is_artifact = true;
  r.meta = std::move(a.meta);
  r.tokenizer_json = std::move(a.tokenizer_json);
  r.tokenizer_config_json = std::move(a.tokenizer_config_json);
  r.generation_config_json = std::move(a.generation_config_json);
}

LoadedModel load_base(const std::string& path) {
  namespace fs = std::filesystem;
  LoadedModel r;
  r.path = path;
  if (is_spear_path(path)) {
    take_artifact(read_spear(path), r);
    return r;
  }
  SPEAR_CHECK(fs::is_directory(path),
              "model not found: " + path + " (expected a model directory or a .spear file)");
  if (hf_quantization_config(path)) {
    // A GPTQ / AWQ / compressed-tensors checkpoint: converted into spear's W4 layout.
    take_artifact(artifact_from_hf_quantized(path), r);
    return r;
  }
  r.weights = load_hf_weights(path);
  r.tokenizer_json_path = (fs::path(path) / "tokenizer.json").string();
  auto text = [&](const char* name) {
    const fs::path p = fs::path(path) / name;
    if (!fs::is_regular_file(p)) return std::string();
    std::ifstream in(p, std::ios::binary);
    SPEAR_CHECK(in.good(), "cannot open " + p.string());
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  r.tokenizer_config_json = text("tokenizer_config.json");
  r.generation_config_json = text("generation_config.json");
  return r;
}

}  // namespace

Tokenizer load_tokenizer(const LoadedModel& m) {
  if (!m.tokenizer_json_path.empty()) return Tokenizer::from_file(m.tokenizer_json_path);
  SPEAR_CHECK(!m.tokenizer_json.empty(), "this .spear file embeds no tokenizer.json");
  return Tokenizer::from_json(m.tokenizer_json);
}

}  // namespace spear
