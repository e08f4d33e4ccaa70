#include "model/spear_artifact.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/load_hf.h"

namespace fs = std::filesystem;

namespace spear {

// ---- the artifact ---------------------------------------------------------------

bool is_spear_path(const std::string& path) {
  return fs::path(path).extension() == ".spear" && !fs::is_directory(path);
}

QuantizedMatrix& SpearArtifact::quant(int64_t layer, Module m) {
  ModuleWeights& mw = at(layer, m);
  SPEAR_CHECK(mw.quant.has_value(), "spear artifact: model.layers." + std::to_string(layer) + "." +
                                        std::string(module_name(m)) + " is not quantized");
  return *mw.quant;
}

const QuantizedMatrix& SpearArtifact::quant(int64_t layer, Module m) const {
  return const_cast<SpearArtifact*>(this)->quant(layer, m);
}

int64_t SpearArtifact::quant_model_bytes() const {
  const LlamaWeights& w = weights;
  int64_t b = 2 * (w.embed.numel() + w.final_norm.numel() + (w.lm_head.empty() ? 0 : w.lm_head.numel()));
  for (const LlamaLayerWeights& L : w.layers) {
    b += 2 * (L.attn_norm.numel() + L.ffn_norm.numel());
    for (const ModuleWeights& m : L.modules)
      if (m.quant) b += m.quant->serving_bytes();
  }
  return b;
}

int64_t SpearArtifact::ec_bytes() const {
  int64_t b = 0;
  for (const LlamaLayerWeights& L : weights.layers)
    for (const ModuleWeights& m : L.modules)
      if (m.ec) b += m.ec->bytes();
  return b;
}

namespace {

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string module_prefix(int64_t l, Module m) {
  return "model.layers." + std::to_string(l) + "." + std::string(module_name(m));
}

std::vector<uint16_t> to_f16(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_f16(v[i]);
  return r;
}

}  // namespace

SpearArtifact artifact_from_model_dir(const std::string& dir) {
  SPEAR_CHECK(fs::is_directory(dir), "model directory not found: " + dir);
  SpearArtifact a;
  a.config_json = read_file_bytes((fs::path(dir) / "config.json").string());
  if (fs::exists(fs::path(dir) / "tokenizer.json"))
    a.tokenizer_json = read_file_bytes((fs::path(dir) / "tokenizer.json").string());
  if (fs::exists(fs::path(dir) / "tokenizer_config.json"))
    a.tokenizer_config_json = read_file_bytes((fs::path(dir) / "tokenizer_config.json").string());
  if (fs::exists(fs::path(dir) / "generation_config.json"))
    a.generation_config_json = read_file_bytes((fs::path(dir) / "generation_config.json").string());
  a.weights = load_hf_weights(dir);
  a.meta["source_model"] = fs::absolute(dir).lexically_normal().string();
  a.meta["source_model_sha256"] = model_dir_hash(dir);
  a.meta["spear_version"] = SPEAR_VERSION;
  return a;
}

void validate_artifact(const SpearArtifact& a, const std::string& label) {
  const LlamaWeights& w = a.weights;
  const ModelConfig& c = w.config;
  auto fail = [&](const std::string& why) { throw Error("spear artifact '" + label + "': " + why); };
  w.validate("spear artifact '" + label + "'");  // structure: every tensor and module's shape
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (Module m : kAllModules) {
      const ModuleWeights& mw = w.at(l, m);
      const std::string p = module_prefix(l, m);
      if (!mw.quant) fail(p + " is not quantized");
      const QuantizedMatrix& q = *mw.quant;
      const int64_t K = q.K, N = q.N;
      const int b = q.scheme.bits;
      if (b < 2 || b > 8) fail(p + ": bits " + std::to_string(b) + " outside 2..8");
      if (q.scheme.group > 0 && (q.scheme.group > K))
        fail(p + ": group " + std::to_string(q.scheme.group) + " larger than the input size");
      const int64_t G = q.scheme.num_groups(K);
      if (static_cast<int64_t>(q.codes.size()) != N * q.row_bytes() ||
          static_cast<int64_t>(q.scales.size()) != N * G ||
          static_cast<int64_t>(q.zeros.size()) != N * G)
        fail(p + ": codes/scales/zeros sizes do not match the shape");
      const float qmax = static_cast<float>((1 << b) - 1);
      for (int64_t i = 0; i < N * G; ++i) {
        if (!std::isfinite(q.scales[i]) || q.scales[i] <= 0)
          fail(p + ".scales: entry " + std::to_string(i) + " is not a positive finite number");
        const float z = q.zeros[i];
        if (!(z >= 0 && z <= qmax) || z != std::floor(z))
          fail(p + ".zeros: entry " + std::to_string(i) + " is not an integer in [0, " +
               std::to_string((1 << b) - 1) + "]");
        if (q.scheme.symmetric && z != static_cast<float>(1 << (b - 1)))
          fail(p + ".zeros: a symmetric scheme needs zero = 2^(bits-1)");
      }
      if (mw.ec) {
        try {
          mw.ec->check();
        } catch (const Error& err) {
          fail(p + ": " + err.what());
        }
      }
    }
}

void write_spear(const std::string& path, const SpearArtifact& a) {
  validate_artifact(a, path);
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"spear.config_json", DType::U8, {static_cast<int64_t>(a.config_json.size())},
                     a.config_json.data()});
  for (const auto& [name, text] : {std::pair<const char*, const std::string*>{"spear.tokenizer_json", &a.tokenizer_json},
                                   {"spear.tokenizer_config_json", &a.tokenizer_config_json},
                                   {"spear.generation_config_json", &a.generation_config_json}})
    if (!text->empty())
      tensors.push_back({name, DType::U8, {static_cast<int64_t>(text->size())}, text->data()});
  for (const auto& t : unquantized_tensors(a.weights))
    tensors.push_back({t.name, t.tensor->dtype, t.tensor->shape, t.tensor->data});
  std::vector<std::vector<uint16_t>> f16_store;  // keeps EC fp16 buffers alive
  f16_store.reserve(static_cast<size_t>(a.config().num_layers) * kNumModules * 4);
  nlohmann::json mods = nlohmann::json::array();
  for (int64_t l = 0; l < a.config().num_layers; ++l)
    for (Module mod : kAllModules) {
      const ModuleWeights& m = a.at(l, mod);
      const std::string p = module_prefix(l, mod);
      const QuantizedMatrix& q = *m.quant;
      const int64_t G = q.scheme.num_groups(q.K);
      tensors.push_back({p + ".qweight", DType::U8, {q.N, q.row_bytes()}, q.codes.data()});
      tensors.push_back({p + ".scales", DType::F32, {q.N, G}, q.scales.data()});
      tensors.push_back({p + ".zeros", DType::F32, {q.N, G}, q.zeros.data()});
      nlohmann::json mj{{"layer", l},
                        {"module", std::string(module_name(mod))},
                        {"bits", q.scheme.bits},
                        {"group", q.scheme.group},
                        {"symmetric", q.scheme.symmetric},
                        {"ec_rank", m.ec ? m.ec->rank : 0},
                        {"ec_gated", m.ec ? m.ec->gated : false}};
      mods.push_back(mj);
      if (!m.ec) continue;
      const ECParams& e = *m.ec;
      f16_store.push_back(to_f16(e.A));
      tensors.push_back({p + ".ec.A", DType::F16, {e.rank, e.in}, f16_store.back().data()});
      f16_store.push_back(to_f16(e.B));
      tensors.push_back({p + ".ec.B", DType::F16, {e.out, e.rank}, f16_store.back().data()});
      if (e.gated) {
        f16_store.push_back(to_f16(e.G));
        tensors.push_back({p + ".ec.G", DType::F16, {e.rank, e.rank}, f16_store.back().data()});
        f16_store.push_back(to_f16(e.c));
        tensors.push_back({p + ".ec.c", DType::F16, {e.rank}, f16_store.back().data()});
      }
    }
  // Hash of every tensor's bytes in sorted-name order (what read_spear recomputes).
  std::vector<const TensorToWrite*> sorted;
  for (const TensorToWrite& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorToWrite* x, const TensorToWrite* y) { return x->name < y->name; });
  Sha256 h;
  for (const TensorToWrite* t : sorted) {
    int64_t n = 1;
    for (int64_t s : t->shape) n *= s;
    h.update(t->data, static_cast<size_t>(n) * dtype_size(t->dtype));
  }
  nlohmann::json meta = a.meta;
  meta["modules"] = mods;
  meta["quant_model_bytes"] = a.quant_model_bytes();
  meta["ec_bytes"] = a.ec_bytes();
  std::map<std::string, std::string> md{{"format", "spear"},
                                        {"format_version", kSpearFormatVersion},
                                        {"spear", meta.dump()},
                                        {"tensors_sha256", h.hex()}};
  write_safetensors(path, tensors, md);
}

SpearArtifact read_spear(const std::string& path) {
  SPEAR_CHECK(fs::is_regular_file(path), "spear artifact not found: " + path);
  return read_spear(SafetensorsFile::open(path), path, /*verify_hash=*/true);
}

SpearArtifact read_spear(std::shared_ptr<SafetensorsFile> f, const std::string& path, bool verify_hash) {
  auto fail = [&](const std::string& why) { throw Error("spear artifact '" + path + "': " + why); };
  const auto& md = f->metadata();
  auto mget = [&](const std::string& k) -> const std::string& {
    auto it = md.find(k);
    if (it == md.end()) fail("metadata key '" + k + "' is missing (not a .spear file?)");
    return it->second;
  };
  if (mget("format") != "spear") fail("metadata format is '" + mget("format") + "', not 'spear'");
  if (mget("format_version") != kSpearFormatVersion)
    fail("format_version " + mget("format_version") + " is not supported (this spear reads " +
         kSpearFormatVersion + ")");
  // Integrity first: nothing below should ever look at a corrupted byte.
  const std::string& want_sha256 = mget("tensors_sha256");
  if (verify_hash) {
    std::vector<const TensorView*> sorted;
    for (const TensorView& t : f->tensors()) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(),
              [](const TensorView* x, const TensorView* y) { return x->name < y->name; });
    Sha256 h;
    for (const TensorView* t : sorted) {
      h.update(t->data, t->nbytes);
      f->release(*t);  // read once here; what is kept is faulted in again below
    }
    if (h.hex() != want_sha256)
      fail("tensor data does not match its SHA-256 (the file is corrupted or was modified)");
  }
  SpearArtifact a;
  try {
    a.meta = nlohmann::json::parse(mget("spear"));
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata 'spear' is not valid JSON: ") + e.what());
  }
  if (!a.meta.is_object()) fail("metadata 'spear' is not a JSON object");
  std::set<std::string> used;
  auto tensor = [&](const std::string& name, DType dt, const std::vector<int64_t>& shape)
      -> const TensorView& {
    const TensorView* t = f->find(name);
    if (!t) fail("missing tensor '" + name + "'");
    if (t->dtype != dt)
      fail("tensor '" + name + "' has dtype " + std::string(dtype_name(t->dtype)) + ", expected " +
           std::string(dtype_name(dt)));
    if (!shape.empty() && t->shape != shape)
      fail("tensor '" + name + "' has shape " + t->shape_str() + ", expected " + shape_str(shape));
    used.insert(name);
    return *t;
  };
  {
    const TensorView* t = f->find("spear.config_json");
    if (!t || t->dtype != DType::U8 || t->shape.size() != 1) fail("missing U8 tensor 'spear.config_json'");
    used.insert(t->name);
    a.config_json.assign(reinterpret_cast<const char*>(t->data), t->nbytes);
  }
  ModelConfig& cfg = a.weights.config;
  try {
    cfg = ModelConfig::from_json_text(a.config_json);
  } catch (const Error& e) {
    fail(std::string("embedded config.json: ") + e.what());
  }
  // The source's text files; each optional (older artifacts hold only the tokenizer).
  for (const auto& [name, text] : {std::pair<const char*, std::string*>{"spear.tokenizer_json", &a.tokenizer_json},
                                   {"spear.tokenizer_config_json", &a.tokenizer_config_json},
                                   {"spear.generation_config_json", &a.generation_config_json}})
    if (const TensorView* t = f->find(name)) {
      if (t->dtype != DType::U8 || t->shape.size() != 1) fail(std::string("'") + name + "' must be U8 (n)");
      used.insert(t->name);
      text->assign(reinterpret_cast<const char*>(t->data), t->nbytes);
    }
  // The unquantized tensors: views of the mapped file, checked against the config.
  LlamaWeights& w = a.weights;
  w.layers.resize(cfg.num_layers);
  auto dense = [&](const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView* t = f->find(name);
    if (!t) fail("missing tensor '" + name + "'");
    if (t->shape != shape)
      fail("tensor '" + name + "' has shape " + t->shape_str() + ", config implies " + shape_str(shape));
    used.insert(name);
    return WeightTensor::view(t->dtype, t->shape, t->data, f);
  };
  for (const auto& t : unquantized_tensors(w)) *t.tensor = dense(t.name, t.shape);
  // Per-module scheme and EC shape come from the metadata; the tensors must agree.
  if (!a.meta.contains("modules") || !a.meta["modules"].is_array() ||
      static_cast<int64_t>(a.meta["modules"].size()) != cfg.num_layers * kNumModules)
    fail("metadata lists no module table of num_layers*7 entries");
  try {
    for (const auto& mj : a.meta["modules"]) {
      const int64_t l = mj.at("layer").get<int64_t>();
      Module m;
      if (!parse_module_name(mj.at("module").get<std::string>(), &m))
        fail("unknown module name '" + mj.at("module").get<std::string>() + "'");
      if (l < 0 || l >= cfg.num_layers) fail("module layer " + std::to_string(l) + " out of range");
      ModuleWeights& sm = a.at(l, m);
      if (sm.quant) fail("module listed twice: " + module_prefix(l, m));
      const ModuleShape ms = module_shape(cfg, m);
      const int64_t N = ms.out, K = ms.in;
      QuantizedMatrix& q = sm.quant.emplace();
      q.N = N;
      q.K = K;
      q.scheme.bits = mj.at("bits").get<int>();
      q.scheme.group = mj.at("group").get<int64_t>();
      q.scheme.symmetric = mj.at("symmetric").get<bool>();
      if (q.scheme.bits < 2 || q.scheme.bits > 8) fail(module_prefix(l, m) + ": bits outside 2..8");
      if (q.scheme.group == 0 || q.scheme.group > K) fail(module_prefix(l, m) + ": bad group size");
      const int64_t G = q.scheme.num_groups(K);
      const std::string p = module_prefix(l, m);
      const TensorView& qw = tensor(p + ".qweight", DType::U8, {N, q.row_bytes()});
      q.codes.assign(qw.data, qw.data + qw.nbytes);
      f->release(qw);  // copied: the mapping need not hold it too
      q.scales = to_f32(tensor(p + ".scales", DType::F32, {N, G}));
      q.zeros = to_f32(tensor(p + ".zeros", DType::F32, {N, G}));
      const int64_t r = mj.at("ec_rank").get<int64_t>();
      if (r < 0 || r > std::min(N, K)) fail(p + ": EC rank " + std::to_string(r) + " out of range");
      if (r > 0) {
        ECParams e;
        e.in = K;
        e.out = N;
        e.rank = r;
        e.gated = mj.at("ec_gated").get<bool>();
        e.A = to_f32(tensor(p + ".ec.A", DType::F16, {r, K}));
        e.B = to_f32(tensor(p + ".ec.B", DType::F16, {N, r}));
        if (e.gated) {
          e.G = to_f32(tensor(p + ".ec.G", DType::F16, {r, r}));
          e.c = to_f32(tensor(p + ".ec.c", DType::F16, {r}));
        }
        sm.ec = std::move(e);
      }
    }
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("bad module table in metadata: ") + e.what());
  }
  for (const TensorView& t : f->tensors())
    if (!used.count(t.name)) fail("unexpected tensor '" + t.name + "'");
  validate_artifact(a, path);
  return a;
}

}  // namespace spear
