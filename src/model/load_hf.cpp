#include "model/load_hf.h"

#include <cstdio>
#include <filesystem>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/hf_quantized.h"

namespace spear {

LlamaWeights load_hf_weights(const std::string& dir) {
  namespace fs = std::filesystem;
  SPEAR_CHECK(fs::is_directory(dir), "model directory not found: " + dir);
  if (auto qc = hf_quantization_config(dir))
    throw Error(dir + " is a quantized checkpoint (quant_method " + qc->value("quant_method", std::string("?")) +
                "), not a full-precision one: give it where a quantized base is taken (--quantized of calibrate "
                "and diagnose, --model of ppl, generate, serve, info)");
  LlamaWeights w;
  w.config = ModelConfig::load((fs::path(dir) / "config.json").string());
  const ModelConfig& cfg = w.config;
  // One owner for all shards: the mappings live as long as any tensor viewing them.
  auto store = std::make_shared<TensorStore>(TensorStore::open(dir));
  std::set<std::string> used;
  auto get = [&](const std::string& name) {
    SPEAR_CHECK(store->has(name), dir + ": missing tensor '" + name + "'");
    const TensorView& t = store->get(name);
    used.insert(name);
    WeightTensor v = WeightTensor::view(t.dtype, t.shape, t.data, store);
    v.mapping = store.get();
    return v;
  };
  w.layers.resize(cfg.num_layers);
  for (const auto& t : unquantized_tensors(w)) *t.tensor = get(t.name);
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (Module m : kAllModules)
      w.at(l, m).dense = get("model.layers." + std::to_string(l) + "." + std::string(module_name(m)) + ".weight");
  // A tied checkpoint may still carry lm_head.weight (a copy of the embeddings): ignored.
  if (cfg.tie_word_embeddings) used.insert("lm_head.weight");
  w.validate(dir);
  for (const std::string& n : store->names())
    if (!used.count(n) && n.find("rotary_emb") == std::string::npos)
      std::fprintf(stderr, "spear: warning: ignoring unexpected tensor '%s'\n", n.c_str());
  return w;
}

}  // namespace spear
