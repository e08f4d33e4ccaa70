#include "io/spear_artifact.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "quant/quantized_linear_layer.h"

namespace fs = std::filesystem;

namespace spear {

// ---- SHA-256 (FIPS 180-4) -------------------------------------------------------

namespace {
constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
}  // namespace

Sha256::Sha256()
    : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
         0x5be0cd19} {}

void Sha256::block(const uint8_t* p) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) |
           (uint32_t(p[4 * i + 2]) << 8) | uint32_t(p[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
  for (int i = 0; i < 64; ++i) {
    uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
    uint32_t ch = (e & f) ^ (~e & g);
    uint32_t t1 = h + S1 + ch + kK[i] + w[i];
    uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
    uint32_t mj = (a & b) ^ (a & c) ^ (b & c);
    uint32_t t2 = S0 + mj;
    h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += h;
}

void Sha256::update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buf_len_) {
    size_t take = std::min(n, 64 - buf_len_);
    std::memcpy(buf_.data() + buf_len_, p, take);
    buf_len_ += take;
    p += take;
    n -= take;
    if (buf_len_ == 64) {
      block(buf_.data());
      buf_len_ = 0;
    }
  }
  for (; n >= 64; n -= 64, p += 64) block(p);
  if (n) {
    std::memcpy(buf_.data(), p, n);
    buf_len_ = n;
  }
}

std::string Sha256::hex() {
  const uint64_t bits = total_ * 8;
  const uint8_t one = 0x80, zero = 0;
  update(&one, 1);
  while (buf_len_ != 56) update(&zero, 1);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  update(len, 8);
  static const char* hx = "0123456789abcdef";
  std::string s;
  for (uint32_t v : h_)
    for (int i = 28; i >= 0; i -= 4) s += hx[(v >> i) & 15];
  return s;
}

std::string sha256_hex(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.hex();
}

std::string model_dir_hash(const std::string& dir) {
  SPEAR_CHECK(fs::is_directory(dir), "model directory not found: " + dir);
  std::vector<std::string> files{(fs::path(dir) / "config.json").string()};
  std::vector<std::string> st;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors")
      st.push_back(e.path().string());
  std::sort(st.begin(), st.end());
  files.insert(files.end(), st.begin(), st.end());
  Sha256 h;
  for (const std::string& f : files) {
    MappedFile m(f);
    h.update(m.data(), m.size());
  }
  return h.hex();
}

// ---- the artifact ---------------------------------------------------------------

bool is_spear_path(const std::string& path) {
  return fs::path(path).extension() == ".spear" && !fs::is_directory(path);
}

int64_t SpearArtifact::quant_model_bytes() const {
  int64_t b = 0;
  for (const DenseTensor& t : dense) {
    int64_t n = 1;
    for (int64_t s : t.shape) n *= s;
    b += 2 * n;
  }
  for (const SpearModule& m : modules) b += m.q.serving_bytes();
  return b;
}

int64_t SpearArtifact::ec_bytes() const {
  int64_t b = 0;
  for (const SpearModule& m : modules)
    if (m.ec) b += m.ec->bytes();
  return b;
}

int64_t SpearArtifact::ec_count() const {
  int64_t n = 0;
  for (const SpearModule& m : modules) n += m.ec.has_value();
  return n;
}

namespace {

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

std::string module_prefix(int64_t l, Module m) {
  return "model.layers." + std::to_string(l) + "." + std::string(module_name(m));
}

// The unquantized tensors a Llama model needs, with their shapes.
std::vector<std::pair<std::string, std::vector<int64_t>>> dense_layout(const ModelConfig& c) {
  const int64_t D = c.hidden_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> r;
  r.push_back({"model.embed_tokens.weight", {c.vocab_size, D}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    r.push_back({p + "input_layernorm.weight", {D}});
    r.push_back({p + "post_attention_layernorm.weight", {D}});
  }
  r.push_back({"model.norm.weight", {D}});
  if (!c.tie_word_embeddings) r.push_back({"lm_head.weight", {c.vocab_size, D}});
  return r;
}

// (out, in) of module m.
std::pair<int64_t, int64_t> module_shape(const ModelConfig& c, Module m) {
  const int64_t D = c.hidden_size, H = c.intermediate_size;
  switch (m) {
    case Module::Q: return {c.q_dim(), D};
    case Module::K: return {c.kv_dim(), D};
    case Module::V: return {c.kv_dim(), D};
    case Module::O: return {D, c.q_dim()};
    case Module::Gate: return {H, D};
    case Module::Up: return {H, D};
    case Module::Down: return {D, H};
  }
  return {0, 0};
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
  a.config = ModelConfig::from_json_text(a.config_json);
  if (fs::exists(fs::path(dir) / "tokenizer.json"))
    a.tokenizer_json = read_file_bytes((fs::path(dir) / "tokenizer.json").string());
  TensorStore store = TensorStore::open(dir);
  for (auto& [name, shape] : dense_layout(a.config)) {
    std::string src = name;
    // A tied head is absent; an untied one must be there (LlamaModel::load checks too).
    SPEAR_CHECK(store.has(src), dir + ": missing tensor '" + src + "'");
    const TensorView& t = store.get(src);
    SPEAR_CHECK(t.shape == shape, dir + ": tensor '" + src + "' has shape " + t.shape_str() +
                                      ", config.json implies " + shape_str(shape));
    SPEAR_CHECK(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16,
                dir + ": tensor '" + src + "' must be F32, F16 or BF16");
    a.dense.push_back({name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)});
  }
  a.modules.resize(a.config.num_layers * 7);
  for (int64_t l = 0; l < a.config.num_layers; ++l)
    for (Module m : kAllModules) {
      a.at(l, m).layer = l;
      a.at(l, m).module = m;
    }
  a.meta["source_model"] = fs::absolute(dir).lexically_normal().string();
  a.meta["source_model_sha256"] = model_dir_hash(dir);
  a.meta["spear_version"] = SPEAR_VERSION;
  return a;
}

void validate_artifact(const SpearArtifact& a, const std::string& label) {
  const ModelConfig& c = a.config;
  auto fail = [&](const std::string& why) { throw Error("spear artifact '" + label + "': " + why); };
  auto layout = dense_layout(c);
  if (a.dense.size() != layout.size())
    fail("expected " + std::to_string(layout.size()) + " unquantized tensors, found " +
         std::to_string(a.dense.size()));
  for (size_t i = 0; i < layout.size(); ++i) {
    const DenseTensor& t = a.dense[i];
    if (t.name != layout[i].first) fail("expected tensor '" + layout[i].first + "', found '" + t.name + "'");
    if (t.shape != layout[i].second)
      fail("tensor '" + t.name + "' has shape " + shape_str(t.shape) + ", config implies " +
           shape_str(layout[i].second));
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
      fail("tensor '" + t.name + "' must be F32, F16 or BF16");
    int64_t n = 1;
    for (int64_t s : t.shape) n *= s;
    if (static_cast<int64_t>(t.bytes.size()) != n * static_cast<int64_t>(dtype_size(t.dtype)))
      fail("tensor '" + t.name + "' has the wrong byte size");
  }
  if (static_cast<int64_t>(a.modules.size()) != c.num_layers * 7)
    fail("expected " + std::to_string(c.num_layers * 7) + " quantized modules, found " +
         std::to_string(a.modules.size()));
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (Module m : kAllModules) {
      const SpearModule& sm = a.at(l, m);
      const std::string p = module_prefix(l, m);
      if (sm.layer != l || sm.module != m) fail("modules out of order at " + p);
      auto [N, K] = module_shape(c, m);
      const QuantizedMatrix& q = sm.q;
      if (q.N != N || q.K != K)
        fail(p + ": quantized shape (" + std::to_string(q.N) + ", " + std::to_string(q.K) +
             ") does not match the config's (" + std::to_string(N) + ", " + std::to_string(K) + ")");
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
      if (sm.ec) {
        const ECParams& e = *sm.ec;
        if (e.in != K || e.out != N) fail(p + ".ec: shape does not match the module");
        try {
          e.check();
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
  if (!a.tokenizer_json.empty())
    tensors.push_back({"spear.tokenizer_json", DType::U8,
                       {static_cast<int64_t>(a.tokenizer_json.size())}, a.tokenizer_json.data()});
  for (const DenseTensor& t : a.dense) tensors.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  std::vector<std::vector<uint16_t>> f16_store;  // keeps EC fp16 buffers alive
  f16_store.reserve(a.modules.size() * 4);
  nlohmann::json mods = nlohmann::json::array();
  for (const SpearModule& m : a.modules) {
    const std::string p = module_prefix(m.layer, m.module);
    const QuantizedMatrix& q = m.q;
    const int64_t G = q.scheme.num_groups(q.K);
    tensors.push_back({p + ".qweight", DType::U8, {q.N, q.row_bytes()}, q.codes.data()});
    tensors.push_back({p + ".scales", DType::F32, {q.N, G}, q.scales.data()});
    tensors.push_back({p + ".zeros", DType::F32, {q.N, G}, q.zeros.data()});
    nlohmann::json mj{{"layer", m.layer},
                      {"module", std::string(module_name(m.module))},
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
  auto fail = [&](const std::string& why) { throw Error("spear artifact '" + path + "': " + why); };
  SPEAR_CHECK(fs::is_regular_file(path), "spear artifact not found: " + path);
  std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open(path);
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
  {
    std::vector<const TensorView*> sorted;
    for (const TensorView& t : f->tensors()) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(),
              [](const TensorView* x, const TensorView* y) { return x->name < y->name; });
    Sha256 h;
    for (const TensorView* t : sorted) h.update(t->data, t->nbytes);
    if (h.hex() != mget("tensors_sha256"))
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
  try {
    a.config = ModelConfig::from_json_text(a.config_json);
  } catch (const Error& e) {
    fail(std::string("embedded config.json: ") + e.what());
  }
  if (const TensorView* t = f->find("spear.tokenizer_json")) {
    if (t->dtype != DType::U8 || t->shape.size() != 1) fail("'spear.tokenizer_json' must be U8 (n)");
    used.insert(t->name);
    a.tokenizer_json.assign(reinterpret_cast<const char*>(t->data), t->nbytes);
  }
  for (auto& [name, shape] : dense_layout(a.config)) {
    const TensorView* t = f->find(name);
    if (!t) fail("missing tensor '" + name + "'");
    if (t->shape != shape)
      fail("tensor '" + name + "' has shape " + t->shape_str() + ", config implies " + shape_str(shape));
    used.insert(name);
    a.dense.push_back({name, t->dtype, t->shape, std::vector<uint8_t>(t->data, t->data + t->nbytes)});
  }
  // Per-module scheme and EC shape come from the metadata; the tensors must agree.
  if (!a.meta.contains("modules") || !a.meta["modules"].is_array() ||
      static_cast<int64_t>(a.meta["modules"].size()) != a.config.num_layers * 7)
    fail("metadata lists no module table of num_layers*7 entries");
  a.modules.resize(a.config.num_layers * 7);
  try {
    for (const auto& mj : a.meta["modules"]) {
      const int64_t l = mj.at("layer").get<int64_t>();
      Module m;
      if (!parse_module_name(mj.at("module").get<std::string>(), &m))
        fail("unknown module name '" + mj.at("module").get<std::string>() + "'");
      if (l < 0 || l >= a.config.num_layers) fail("module layer " + std::to_string(l) + " out of range");
      SpearModule& sm = a.at(l, m);
      if (!sm.q.codes.empty()) fail("module listed twice: " + module_prefix(l, m));
      sm.layer = l;
      sm.module = m;
      auto [N, K] = module_shape(a.config, m);
      QuantizedMatrix& q = sm.q;
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

std::unique_ptr<LlamaModel> build_model(const SpearArtifact& a) {
  validate_artifact(a, "(in memory)");
  auto dense_f32 = [&](size_t i) {
    const DenseTensor& t = a.dense[i];
    TensorView v;
    v.name = t.name;
    v.dtype = t.dtype;
    v.shape = t.shape;
    v.data = t.bytes.data();
    v.nbytes = t.bytes.size();
    return to_f32(v);
  };
  const ModelConfig& c = a.config;
  size_t k = 0;
  std::vector<float> embed = dense_f32(k++);
  std::vector<LayerWeights> layers(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    layers[l].attn_norm = dense_f32(k++);
    layers[l].ffn_norm = dense_f32(k++);
    for (Module m : kAllModules) {
      const SpearModule& sm = a.at(l, m);
      std::unique_ptr<Linear> lin = std::make_unique<QuantizedLinearLayer>(sm.q);
      if (sm.ec) lin = std::make_unique<ECLinear>(std::move(lin), *sm.ec);
      layers[l].modules[static_cast<int>(m)] = std::move(lin);
    }
  }
  std::vector<float> final_norm = dense_f32(k++);
  std::vector<float> head;
  if (!c.tie_word_embeddings) head = dense_f32(k++);
  return std::make_unique<LlamaModel>(c, std::move(embed), std::move(layers), std::move(final_norm),
                                      std::move(head));
}

LoadedModel load_model_any(const std::string& path) {
  LoadedModel r;
  if (is_spear_path(path)) {
    r.artifact = read_spear(path);
    r.model = build_model(*r.artifact);
    r.tokenizer_json = r.artifact->tokenizer_json;
    return r;
  }
  SPEAR_CHECK(fs::is_directory(path),
              "model not found: " + path + " (expected a model directory or a .spear file)");
  r.model = LlamaModel::load(path);
  r.tokenizer_json_path = (fs::path(path) / "tokenizer.json").string();
  return r;
}

Tokenizer load_tokenizer(const LoadedModel& m) {
  if (!m.tokenizer_json_path.empty()) return Tokenizer::from_file(m.tokenizer_json_path);
  SPEAR_CHECK(!m.tokenizer_json.empty(), "this .spear file embeds no tokenizer.json");
  return Tokenizer::from_json(m.tokenizer_json);
}

}  // namespace spear
