// The .spear artifact: round trip, the model built from it, and refusal of corrupted or
// mismatched files with a clear error.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "compensate/calibrate.h"
#include "compensate/quantize_model.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/spear_artifact.h"
#include "model/kv_cache.h"
#include "quant/cpu_model.h"
#include "runtime/load.h"
#include "test_paths.h"

namespace spear {
namespace {

namespace fs = std::filesystem;

fs::path tmp_dir() {
  return fs::temp_directory_path() / ("spear_test_artifact_" + std::to_string(::getpid()));
}
std::string tmp_path(const std::string& name) {
  static const bool cleanup = [] {  // remove the scratch directory when the tests end
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(tmp_dir(), ec);
    });
    return true;
  }();
  (void)cleanup;
  fs::create_directories(tmp_dir());
  return (tmp_dir() / name).string();
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void spit(const std::string& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

// A quantized tiny model with two ECs (one gated).
SpearArtifact tiny_artifact() {
  QuantizeOptions q;
  q.verbose = false;
  SpearArtifact a = quantize_model(test::tiny_model_dir(), q);
  std::mt19937_64 g(1);
  std::normal_distribution<float> d(0.0f, 0.05f);
  auto ec = [&](int64_t in, int64_t out, int64_t r, bool gated) {
    ECParams p;
    p.in = in;
    p.out = out;
    p.rank = r;
    p.gated = gated;
    p.A.resize(r * in);
    p.B.resize(out * r);
    for (float& v : p.A) v = d(g);
    for (float& v : p.B) v = d(g);
    if (gated) {
      p.G.resize(r * r);
      p.c.resize(r);
      for (float& v : p.G) v = d(g);
      for (float& v : p.c) v = d(g);
    }
    p.round_to_fp16();
    return p;
  };
  const ModelConfig& c = a.config();
  a.at(1, Module::O).ec = ec(c.q_dim(), c.hidden_size, 3, true);
  a.at(4, Module::Down).ec = ec(c.intermediate_size, c.hidden_size, 2, false);
  return a;
}

TEST(Artifact, RoundTripAndModel) {
  SpearArtifact a = tiny_artifact();
  const std::string p = tmp_path("rt.spear");
  write_spear(p, a);
  SpearArtifact b = read_spear(p);
  ASSERT_EQ(a.weights.layers.size(), b.weights.layers.size());
  for (int64_t l = 0; l < a.config().num_layers; ++l)
    for (Module m : kAllModules) {
      const ModuleWeights &x = a.at(l, m), &y = b.at(l, m);
      ASSERT_TRUE(x.quant && y.quant);
      EXPECT_EQ(x.quant->codes, y.quant->codes);
      EXPECT_EQ(x.quant->scales, y.quant->scales);
      EXPECT_EQ(x.quant->zeros, y.quant->zeros);
      ASSERT_EQ(x.ec.has_value(), y.ec.has_value());
      if (x.ec) {
        EXPECT_EQ(x.ec->A, y.ec->A);  // fp16-exact values survive F16
        EXPECT_EQ(x.ec->B, y.ec->B);
        EXPECT_EQ(x.ec->G, y.ec->G);
        EXPECT_EQ(x.ec->c, y.ec->c);
      }
    }
  EXPECT_EQ(a.config_json, b.config_json);
  EXPECT_EQ(a.tokenizer_json, b.tokenizer_json);
  EXPECT_EQ(b.ec_count(), 2);
  EXPECT_EQ(a.quant_model_bytes(), b.quant_model_bytes());
  EXPECT_EQ(b.meta["source_model_sha256"], model_dir_hash(test::tiny_model_dir()));
  // The model from the file computes what the model from memory computes.
  auto m1 = build_cpu_model(a.weights);
  LoadedModel m2 = load_model(p);
  ASSERT_TRUE(m2.is_artifact);
  auto m2_model = build_cpu_model(m2.weights);
  const int32_t ids[] = {1, 400, 20, 300, 7, 99};
  const ModelConfig& c = a.config();
  ContiguousKVCache k1(c.num_layers, 8, c.kv_dim()), k2(c.num_layers, 8, c.kv_dim());
  std::vector<float> l1 = m1->forward(ids, 6, k1, 0, true), l2 = m2_model->forward(ids, 6, k2, 0, true);
  EXPECT_EQ(l1, l2);
  Tokenizer tok = load_tokenizer(m2);
  EXPECT_FALSE(tok.encode("Once upon a time").empty());
}

// tokenizer_config.json (the chat template) and generation_config.json travel with the
// artifact, verbatim; an artifact without them (as written before they were kept) loads.
TEST(Artifact, KeepsTokenizerAndGenerationConfigs) {
  SpearArtifact a = tiny_artifact();
  const std::string dir = test::tiny_model_dir();
  EXPECT_EQ(a.tokenizer_config_json, slurp(dir + "/tokenizer_config.json"));
  EXPECT_EQ(a.generation_config_json, slurp(dir + "/generation_config.json"));
  ASSERT_FALSE(a.tokenizer_config_json.empty());
  a.tokenizer_config_json = R"({"chat_template": "{{ messages[0]['content'] }}", "bos_token": "<s>"})";
  const std::string p = tmp_path("configs.spear");
  write_spear(p, a);
  SpearArtifact b = read_spear(p);
  EXPECT_EQ(b.tokenizer_config_json, a.tokenizer_config_json);
  EXPECT_EQ(b.generation_config_json, a.generation_config_json);
  LoadedModel m = load_model(p);
  EXPECT_EQ(m.tokenizer_config_json, a.tokenizer_config_json);
  EXPECT_EQ(m.generation_config_json, a.generation_config_json);
  // A model directory gives the same texts from its files.
  LoadedModel d = load_model(dir);
  EXPECT_EQ(d.tokenizer_config_json, slurp(dir + "/tokenizer_config.json"));
  EXPECT_EQ(d.generation_config_json, slurp(dir + "/generation_config.json"));
  // Without them (an older artifact): loads, and the texts are empty.
  a.tokenizer_config_json.clear();
  a.generation_config_json.clear();
  const std::string old = tmp_path("old.spear");
  write_spear(old, a);
  std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open(old);
  EXPECT_EQ(f->find("spear.tokenizer_config_json"), nullptr);
  EXPECT_EQ(f->find("spear.generation_config_json"), nullptr);
  LoadedModel o = load_model(old);
  EXPECT_TRUE(o.tokenizer_config_json.empty());
  EXPECT_TRUE(o.generation_config_json.empty());
  EXPECT_FALSE(load_tokenizer(o).encode("Once").empty());
}

TEST(Artifact, RefusesCorruptedFiles) {
  SpearArtifact a = tiny_artifact();
  const std::string p = tmp_path("good.spear");
  write_spear(p, a);
  const std::string good = slurp(p);
  const std::string bad = tmp_path("bad.spear");
  // A flipped byte in the tensor data (near the end: EC or code bytes).
  std::string s = good;
  s[s.size() - 100] ^= 0x5a;
  spit(bad, s);
  try {
    read_spear(bad);
    FAIL() << "a corrupted tensor was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SHA-256"), std::string::npos) << e.what();
  }
  // Truncated.
  spit(bad, good.substr(0, good.size() / 2));
  EXPECT_THROW(read_spear(bad), Error);
  // Another format version in the header (same length, so offsets stay valid).
  s = good;
  const size_t at = s.find("\"format_version\":\"1\"");
  ASSERT_NE(at, std::string::npos);
  s[at + std::string("\"format_version\":\"").size()] = '9';
  spit(bad, s);
  EXPECT_THROW(read_spear(bad), Error);
  // Not a file at all, and a plain safetensors checkpoint that is not a .spear.
  EXPECT_THROW(read_spear(tmp_path("missing.spear")), Error);
  EXPECT_THROW(read_spear(test::tiny_model_dir() + "/model.safetensors"), Error);
  EXPECT_THROW(load_model(tmp_path("nowhere")), Error);
}

TEST(Artifact, RefusesInvalidContent) {
  SpearArtifact a = tiny_artifact();
  SpearArtifact b = a;
  b.quant(0, Module::Q).zeros[0] = 99;  // outside [0, 15]
  EXPECT_THROW(write_spear(tmp_path("x.spear"), b), Error);
  b = a;
  b.quant(0, Module::Q).scales[3] = -1;
  EXPECT_THROW(write_spear(tmp_path("x.spear"), b), Error);
  b = a;
  b.at(1, Module::O).ec->A.pop_back();
  EXPECT_THROW(write_spear(tmp_path("x.spear"), b), Error);
  b = a;
  b.weights.final_norm = WeightTensor{};  // a missing unquantized tensor
  EXPECT_THROW(write_spear(tmp_path("x.spear"), b), Error);
  b = a;
  b.at(2, Module::Up).quant.reset();  // a module neither dense nor quantized
  EXPECT_THROW(write_spear(tmp_path("x.spear"), b), Error);
}

// Calibrating against a different model than the one quantized is refused.
TEST(Artifact, RefusesMismatchedModel) {
  SpearArtifact a = tiny_artifact();
  for (auto& layer : a.weights.layers)
    for (ModuleWeights& m : layer.modules) m.ec.reset();
  const fs::path other = tmp_path("other-model");
  fs::create_directories(other);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    fs::copy_file(fs::path(test::tiny_model_dir()) / f, other / f, fs::copy_options::overwrite_existing);
  spit((other / "config.json").string(), slurp((other / "config.json").string()) + "\n");
  CalibData d;
  d.windows = 1;
  d.ctx = 16;
  d.tokens.assign(16, 5);
  try {
    calibrate(other.string(), a, d, CalibrateOptions{});
    FAIL() << "a mismatched model was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not the model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace spear
