#include "model/hf_export.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/hf_quantized.h"

namespace fs = std::filesystem;

namespace spear {

namespace {

std::string module_prefix(int64_t l, Module m) {
  return "model.layers." + std::to_string(l) + "." + std::string(module_name(m));
}

// Written to a temporary name, then renamed: a failed export leaves no half file.
void write_text_atomic(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream o(tmp, std::ios::binary | std::ios::trunc);
    SPEAR_CHECK(o.good(), "cannot write " + tmp.string());
    o << text;
    o.flush();
    SPEAR_CHECK(o.good(), "cannot write " + tmp.string());
  }
  fs::rename(tmp, p);
}

constexpr const char* kPeftPrefix = "base_model.model.";

// An EC a LoRA adapter can carry: γ ≡ 1.
bool gate_is_identity(const ECParams& e) {
  if (!e.gated) return true;
  return std::all_of(e.G.begin(), e.G.end(), [](float v) { return v == 0.0f; }) &&
         std::all_of(e.c.begin(), e.c.end(), [](float v) { return v == 0.0f; });
}

std::vector<uint16_t> to_f16(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_f16(v[i]);
  return r;
}

}  // namespace

PeftExportResult export_gptq_peft(const SpearArtifact& a, const std::string& out_dir, const PeftExportOptions& o) {
  validate_artifact(a, "export");
  const ModelConfig& cfg = a.config();
  PeftExportResult res;
  const fs::path out(out_dir);
  res.base_dir = out.string();

  // ---- what can be written: one 4-bit scheme, ECs with γ ≡ 1 ----
  // The one group_size: the first module's group, where it is smaller than the module's input.
  int64_t group_size = -1;
  for (int64_t l = 0; l < cfg.num_layers && group_size < 0; ++l)
    for (Module m : kAllModules) {
      const QuantizedMatrix& q = a.quant(l, m);
      if (q.scheme.group > 0 && q.scheme.group < q.K) {
        group_size = q.scheme.group;
        break;
      }
    }
  bool all_sym = true, any_zero0 = false;
  std::vector<std::pair<int64_t, Module>> ec_modules;
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (Module m : kAllModules) {
      const ModuleWeights& mw = a.at(l, m);
      const QuantizedMatrix& q = *mw.quant;
      const std::string p = module_prefix(l, m);
      if (q.scheme.bits != 4)
        throw Error("export: " + p + " has " + std::to_string(q.scheme.bits) + " bits; a GPTQ export needs 4-bit modules");
      const int64_t want_gs = (group_size <= 0 || group_size >= q.K) ? q.K : group_size;
      if (q.scheme.group_size(q.K) != want_gs)
        throw Error("export: " + p + " uses " + q.scheme.name() + " but other modules use groups of " +
                    std::to_string(group_size) + "; a GPTQ checkpoint has one group_size");
      if (q.N % 8 || q.K % 8)
        throw Error("export: " + p + " has shape (" + std::to_string(q.N) + ", " + std::to_string(q.K) +
                    "); GPTQ packing needs multiples of 8");
      all_sym = all_sym && q.scheme.symmetric;
      any_zero0 = any_zero0 || std::any_of(q.zeros.begin(), q.zeros.end(), [](float z) { return z == 0.0f; });
      if (mw.ec && o.adapter) {
        if (!gate_is_identity(*mw.ec))
          throw Error("export: " + p + " has a gated EC (γ = 1 + tanh(G z + c) with G, c not zero), which a LoRA "
                      "adapter cannot express; export an ungated calibration (`spear calibrate --no-gate`, or "
                      "`--objective static`), or the base alone with --no-adapter");
        ec_modules.push_back({l, m});
      }
    }
  const bool v1 = !any_zero0;  // v1 stores zero - 1: a zero point of 0 needs gptq_v2
  res.checkpoint_format = v1 ? "gptq" : "gptq_v2";

  // ---- the directory ----
  std::error_code ec;
  if (fs::exists(out) && !fs::is_directory(out)) throw Error("export: " + out.string() + " exists and is not a directory");
  if (fs::is_directory(out) && !fs::is_empty(out)) {
    if (!o.overwrite) throw Error("export: " + out.string() + " is not empty (--force replaces an earlier export)");
    for (const auto& e : fs::directory_iterator(out)) {
      const std::string n = e.path().filename().string();
      if (n == "model.safetensors.index.json" || (n.rfind("model", 0) == 0 && e.path().extension() == ".safetensors"))
        fs::remove(e.path());
    }
    fs::remove_all(out / "adapter", ec);
  }
  fs::create_directories(out);

  // ---- model.safetensors ----
  std::vector<TensorToWrite> tensors;
  for (const auto& t : unquantized_tensors(a.weights))
    tensors.push_back({t.name, t.tensor->dtype, t.tensor->shape, t.tensor->data});
  std::vector<GptqPacked> packed;
  std::vector<std::vector<uint16_t>> f16;
  packed.reserve(static_cast<size_t>(cfg.num_layers) * kNumModules);
  f16.reserve(static_cast<size_t>(cfg.num_layers) * kNumModules);
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (Module m : kAllModules) {
      const QuantizedMatrix& q = a.quant(l, m);
      const std::string p = module_prefix(l, m);
      packed.push_back(pack_gptq(q, v1, "export: " + p));
      GptqPacked& g = packed.back();
      const int64_t G = g.groups, N = q.N, K = q.K;
      tensors.push_back({p + ".qweight", DType::I32, {K / 8, N}, g.qweight.data()});
      tensors.push_back({p + ".qzeros", DType::I32, {G, N / 8}, g.qzeros.data()});
      if (o.scales_f32) {
        tensors.push_back({p + ".scales", DType::F32, {G, N}, g.scales.data()});
      } else {
        f16.push_back(to_f16(g.scales));
        for (size_t i = 0; i < g.scales.size(); ++i) {
          const float r = f16_to_f32(f16.back()[i]);
          if (!std::isfinite(r) || r <= 0)
            throw Error("export: " + p + ": scale " + std::to_string(g.scales[i]) +
                        " does not fit F16 (use --scales f32)");
          res.max_scale_rel_change = std::max(res.max_scale_rel_change,
                                              std::fabs(static_cast<double>(r) - g.scales[i]) / g.scales[i]);
        }
        tensors.push_back({p + ".scales", DType::F16, {G, N}, f16.back().data()});
      }
      tensors.push_back({p + ".g_idx", DType::I32, {K}, g.g_idx.data()});
    }
  write_safetensors((out / "model.safetensors").string(), tensors, {{"format", "pt"}});
  res.files.push_back("model.safetensors");
  packed.clear();
  f16.clear();

  // ---- configs and tokenizer ----
  nlohmann::json qc{{"quant_method", "gptq"},
                    {"bits", 4},
                    {"group_size", group_size},
                    {"desc_act", false},
                    {"sym", all_sym},
                    {"static_groups", false},
                    {"true_sequential", true},
                    {"damp_percent", a.meta.contains("quantizer") ? a.meta["quantizer"].value("damp", 0.01) : 0.01},
                    {"checkpoint_format", res.checkpoint_format}};
  write_text_atomic(out / "quantize_config.json", qc.dump(2) + "\n");
  res.files.push_back("quantize_config.json");
  for (const auto& [name, text] : {std::pair<const char*, const std::string*>{"tokenizer.json", &a.tokenizer_json},
                                   {"tokenizer_config.json", &a.tokenizer_config_json},
                                   {"generation_config.json", &a.generation_config_json}})
    if (!text->empty()) {
      write_text_atomic(out / name, *text);
      res.files.push_back(name);
    }

  // ---- the adapter ----
  if (!ec_modules.empty()) {
    const fs::path ad = out / "adapter";
    fs::create_directories(ad);
    res.adapter_dir = ad.string();
    res.ec_modules = static_cast<int64_t>(ec_modules.size());
    std::vector<TensorToWrite> lt;
    std::vector<std::vector<uint16_t>> store;
    store.reserve(ec_modules.size() * 2);
    nlohmann::json targets = nlohmann::json::array(), rank_pattern = nlohmann::json::object(),
                   alpha_pattern = nlohmann::json::object();
    for (const auto& [l, m] : ec_modules) res.max_rank = std::max(res.max_rank, a.at(l, m).ec->rank);
    for (const auto& [l, m] : ec_modules) {
      const ECParams& e = *a.at(l, m).ec;
      const std::string p = module_prefix(l, m);
      targets.push_back(p);
      // Pattern keys without the leading "model.": PEFT matches them as `(.*\.)?KEY$` (older
      // releases as `.*\.KEY$`, which needs a dot before the key); both find layers.L.MOD.
      const std::string key = p.substr(std::string("model.").size());
      rank_pattern[key] = e.rank;
      alpha_pattern[key] = e.rank;
      store.push_back(to_f16(e.A));
      lt.push_back({kPeftPrefix + p + ".lora_A.weight", DType::F16, {e.rank, e.in}, store.back().data()});
      store.push_back(to_f16(e.B));
      lt.push_back({kPeftPrefix + p + ".lora_B.weight", DType::F16, {e.out, e.rank}, store.back().data()});
    }
    write_safetensors((ad / "adapter_model.safetensors").string(), lt, {{"format", "pt"}});
    nlohmann::json acfg{{"peft_type", "LORA"},
                        {"task_type", "CAUSAL_LM"},
                        {"base_model_name_or_path", fs::absolute(out).lexically_normal().string()},
                        {"r", res.max_rank},
                        {"lora_alpha", res.max_rank},
                        {"lora_dropout", 0.0},
                        {"bias", "none"},
                        {"fan_in_fan_out", false},
                        {"use_rslora", false},
                        {"use_dora", false},
                        {"init_lora_weights", true},
                        {"inference_mode", true},
                        {"target_modules", targets},
                        {"rank_pattern", rank_pattern},
                        {"alpha_pattern", alpha_pattern},
                        {"modules_to_save", nullptr},
                        {"layers_to_transform", nullptr},
                        {"revision", nullptr}};
    write_text_atomic(ad / "adapter_config.json", acfg.dump(2) + "\n");
    res.files.push_back("adapter/adapter_model.safetensors");
    res.files.push_back("adapter/adapter_config.json");
  }

  // config.json last: a directory with it is complete.
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(a.config_json);
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("export: the artifact's config.json is not JSON: ") + e.what());
  }
  config["quantization_config"] = qc;
  write_text_atomic(out / "config.json", config.dump(2) + "\n");
  res.files.push_back("config.json");
  return res;
}

void attach_peft_adapter(LlamaWeights& w, const std::string& adapter_dir) {
  const fs::path d(adapter_dir);
  const std::string cfg_path = (d / "adapter_config.json").string();
  auto fail = [&](const std::string& why) -> void { throw Error(adapter_dir + ": " + why); };
  SPEAR_CHECK(fs::is_regular_file(cfg_path), adapter_dir + ": no adapter_config.json");
  nlohmann::json c;
  {
    std::ifstream in(cfg_path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    try {
      c = nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("adapter_config.json is not JSON: ") + e.what());
    }
  }
  if (!c.is_object() || c.value("peft_type", std::string()) != "LORA") fail("adapter_config.json: peft_type is not LORA");
  for (const char* k : {"use_dora", "use_rslora", "fan_in_fan_out"})
    if (c.contains(k) && c[k].is_boolean() && c[k].get<bool>()) fail(std::string("adapter_config.json: ") + k + " is not supported");
  if (!c.contains("r") || !c["r"].is_number() || !c.contains("lora_alpha") || !c["lora_alpha"].is_number())
    fail("adapter_config.json: r and lora_alpha must be numbers");
  const double r0 = c["r"].get<double>(), alpha0 = c["lora_alpha"].get<double>();
  // Per-module r / alpha: PEFT matches a pattern key against the module's name by suffix.
  auto pattern_value = [&](const char* field, const std::string& name, double dflt) {
    if (!c.contains(field) || !c[field].is_object()) return dflt;
    for (auto it = c[field].begin(); it != c[field].end(); ++it) {
      const std::string& key = it.key();
      if ((name == key || (name.size() > key.size() && name.compare(name.size() - key.size(), key.size(), key) == 0 &&
                           name[name.size() - key.size() - 1] == '.')) &&
          it.value().is_number())
        return it.value().get<double>();
    }
    return dflt;
  };
  std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open((d / "adapter_model.safetensors").string());
  const ModelConfig& cfg = w.config;
  static const std::regex re(R"(^(?:base_model\.model\.)?model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight$)");
  std::map<std::pair<int64_t, Module>, std::pair<const TensorView*, const TensorView*>> found;
  for (const TensorView& t : f->tensors()) {
    std::smatch mt;
    if (!std::regex_match(t.name, mt, re)) fail("unexpected tensor '" + t.name + "' (only decoder-layer LoRA A/B)");
    const int64_t l = std::stoll(mt[1].str());
    Module m;
    if (l < 0 || l >= cfg.num_layers || !parse_module_name(mt[2].str(), &m)) fail("tensor '" + t.name + "' names no module of this model");
    auto& slot = found[{l, m}];
    (mt[3].str() == "A" ? slot.first : slot.second) = &t;
  }
  for (auto& [key, ab] : found) {
    const auto [l, m] = key;
    const std::string p = module_prefix(l, m);
    if (!ab.first || !ab.second) fail(p + ": lora_A and lora_B must both be present");
    const ModuleShape s = module_shape(cfg, m);
    const TensorView& A = *ab.first;
    const TensorView& B = *ab.second;
    if (A.shape.size() != 2 || A.shape[1] != s.in || B.shape.size() != 2 || B.shape[0] != s.out || B.shape[1] != A.shape[0])
      fail(p + ": lora_A " + A.shape_str() + " / lora_B " + B.shape_str() + " do not fit the module (" +
           std::to_string(s.out) + ", " + std::to_string(s.in) + ")");
    for (const TensorView* t : {&A, &B})
      if (t->dtype != DType::F16 && t->dtype != DType::BF16 && t->dtype != DType::F32)
        fail("tensor '" + t->name + "' has dtype " + std::string(dtype_name(t->dtype)));
    ModuleWeights& mw = w.at(l, m);
    if (!mw.quant) fail(p + " is not quantized (an adapter is applied to a quantized base)");
    if (mw.ec) fail(p + " already has an EC");
    const double r = pattern_value("rank_pattern", p, r0), alpha = pattern_value("alpha_pattern", p, alpha0);
    if (r != static_cast<double>(A.shape[0])) fail(p + ": lora_A has rank " + std::to_string(A.shape[0]) + ", the config says " + std::to_string(r));
    ECParams e;
    e.in = s.in;
    e.out = s.out;
    e.rank = A.shape[0];
    e.gated = false;
    e.A = to_f32(A);
    e.B = to_f32(B);
    const double scaling = alpha / r;
    if (scaling != 1.0)
      for (float& v : e.B) v = static_cast<float>(v * scaling);
    try {
      e.check();
    } catch (const Error& err) {
      fail(p + ": " + err.what());
    }
    mw.ec = std::move(e);
  }
}

}  // namespace spear
