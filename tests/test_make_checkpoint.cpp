// Named architectures, the streaming safetensors writer, and random checkpoints
// (model/random_checkpoint.h); the command end to end is in test_cli.cpp.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/load_hf.h"
#include "model/random_checkpoint.h"
#include "test_paths.h"

namespace fs = std::filesystem;

namespace spear {
namespace {

// The checkpoint directory itself is left for make-checkpoint to create.
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("mk", /*create=*/false) {}
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> listing(const fs::path& d) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(d)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

RandomCheckpointOptions tiny_options() {
  RandomCheckpointOptions o;
  o.tokenizer_json = "{\"model\": {}}";
  return o;
}

TEST(NamedConfig, KnownArchitecturesRoundTripThroughConfigJson) {
  for (const std::string& n : named_config_names()) {
    const ModelConfig c = named_config(n);
    const ModelConfig back = ModelConfig::from_json(c.to_json());
    EXPECT_EQ(back.to_json(), c.to_json()) << n;
  }
  // Parameter counts of the published checkpoints.
  EXPECT_EQ(named_config("llama-3.2-1b").num_parameters(), 1235814400);
  EXPECT_EQ(named_config("llama-3.2-3b").num_parameters(), 3212749824);
  EXPECT_EQ(named_config("llama-3-8b").num_parameters(), 8030261248);
  EXPECT_EQ(named_config("llama-2-7b").num_parameters(), 6738415616);
  const ModelConfig l3 = named_config("llama-3-8b");
  EXPECT_EQ(l3.rope.type, RopeConfig::Type::Default);
  EXPECT_EQ(l3.rope.theta, 500000.0);
  EXPECT_FALSE(l3.tie_word_embeddings);
  EXPECT_EQ(l3.bos_token_id, 128000);
  try {
    named_config("llama-9-huge");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown config 'llama-9-huge' (known: llama-3.2-1b"), std::string::npos)
        << e.what();
  }
}

TEST(SafetensorsWriter, StreamedInAnySplitEqualsTheOneShotWriter) {
  TempDir d;
  fs::create_directories(d.path);
  std::vector<float> a(37), b(5);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.5f * i;
  for (size_t i = 0; i < b.size(); ++i) b[i] = -1.0f * i;
  const std::map<std::string, std::string> meta{{"format", "pt"}};
  write_safetensors((d.path / "one.safetensors").string(),
                    {{"a", DType::F32, {37}, a.data()}, {"b", DType::F32, {5}, b.data()}}, meta);
  {
    SafetensorsWriter w((d.path / "two.safetensors").string(),
                        {{"a", DType::F32, {37}}, {"b", DType::F32, {5}}}, meta);
    EXPECT_EQ(w.data_bytes(), 42u * 4);
    std::vector<float> all(a);
    all.insert(all.end(), b.begin(), b.end());
    const char* p = reinterpret_cast<const char*>(all.data());
    w.write(p, 3);
    w.write(p + 3, 100);
    w.write(p + 103, 42 * 4 - 103);
    EXPECT_THROW(w.write(p, 1), Error);  // past the declared bytes
    w.commit();
  }
  EXPECT_EQ(slurp(d.path / "one.safetensors"), slurp(d.path / "two.safetensors"));
  EXPECT_EQ(SafetensorsFile::open((d.path / "two.safetensors").string())->find("b")->shape,
            std::vector<int64_t>{5});
}

TEST(SafetensorsWriter, ShortOrAbandonedLeavesNothing) {
  TempDir d;
  fs::create_directories(d.path);
  const std::string path = (d.path / "x.safetensors").string();
  {
    SafetensorsWriter w(path, {{"a", DType::BF16, {4, 4}}}, {});
    std::vector<uint16_t> half(8);
    w.write(half.data(), 16);
    EXPECT_THROW(w.commit(), Error);  // 16 of 32 bytes
  }
  { SafetensorsWriter w(path, {{"a", DType::BF16, {4, 4}}}, {}); }  // destroyed unwritten
  EXPECT_TRUE(listing(d.path).empty());
  EXPECT_THROW(SafetensorsWriter(path, {{"a", DType::F32, {1}}, {"a", DType::F32, {1}}}, {}), Error);
}

TEST(RandomCheckpoint, WeightsAreDeterministicNearNormalWithTheGivenStd) {
  const int n = 200000;
  double s = 0, s2 = 0, m4 = 0, mx = 0;
  for (int i = 0; i < n; ++i) {
    const double v = random_weight(3, 5, i, 0.02);
    s += v;
    s2 += v * v;
    m4 += v * v * v * v;
    mx = std::max(mx, std::abs(v));
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 2e-4);
  EXPECT_NEAR(std::sqrt(var), 0.02, 3e-4);
  EXPECT_NEAR(m4 / n / (var * var), 2.7, 0.1);  // Irwin-Hall n=4: kurtosis 3 - 1.2/4
  EXPECT_LT(mx, 0.02 * 3.47);
  EXPECT_EQ(random_weight(3, 5, 77, 0.02), random_weight(3, 5, 77, 0.02));
  EXPECT_NE(random_weight(3, 5, 77, 0.02), random_weight(4, 5, 77, 0.02));
  EXPECT_NE(random_weight(3, 5, 77, 0.02), random_weight(3, 6, 77, 0.02));
}

TEST(RandomCheckpoint, TinyLoadsBackWithTheNamedConfigAndHfTensors) {
  TempDir d;
  const ModelConfig want = named_config("tiny");
  RandomCheckpointOptions o = tiny_options();
  o.seed = 11;
  o.shard_bytes = 300000;  // several shards
  const RandomCheckpointResult r = write_random_checkpoint(want, d.path.string(), o);
  EXPECT_GT(r.shards, 2);
  const ModelConfig got = ModelConfig::load((d.path / "config.json").string());
  ModelConfig want_bf16 = want;
  want_bf16.dtype = "bfloat16";
  EXPECT_EQ(got.to_json(), want_bf16.to_json());
  // transformers-4 spellings beside the transformers-5 ones.
  const nlohmann::json cj = nlohmann::json::parse(slurp(d.path / "config.json"));
  EXPECT_EQ(cj["torch_dtype"], "bfloat16");
  EXPECT_EQ(cj["hidden_act"], "silu");

  const TensorStore store = TensorStore::open(d.path.string());
  const std::vector<TensorDecl> decls = hf_llama_tensors(got, DType::BF16);
  ASSERT_EQ(store.names().size(), decls.size());
  EXPECT_TRUE(store.has("lm_head.weight"));
  EXPECT_TRUE(store.has("model.layers.1.mlp.down_proj.weight"));
  for (size_t i = 0; i < decls.size(); ++i) {
    const TensorView& t = store.get(decls[i].name);
    EXPECT_EQ(t.shape, decls[i].shape) << decls[i].name;
    ASSERT_EQ(t.dtype, DType::BF16);
    const auto* v = reinterpret_cast<const uint16_t*>(t.data);
    const bool norm = decls[i].name.find("norm") != std::string::npos;
    for (uint64_t k : {uint64_t{0}, uint64_t(t.numel() / 2), uint64_t(t.numel() - 1)})
      EXPECT_EQ(v[k], f32_to_bf16(norm ? 1.0f : random_weight(11, int64_t(i), k, 0.02))) << decls[i].name;
  }
  // The model description loads (every shape checked against the config).
  const LlamaWeights w = load_hf_weights(d.path.string());
  EXPECT_EQ(w.config.num_layers, 2);
  EXPECT_EQ(listing(d.path).size(), size_t(r.shards) + 4);  // + index, config, tokenizer, generation
}

TEST(RandomCheckpoint, ANonEmptyDirNeedsOverwriteAndThenHoldsOnlyTheNewCheckpoint) {
  TempDir d;
  const ModelConfig c = named_config("tiny");
  RandomCheckpointOptions o = tiny_options();
  o.shard_bytes = 300000;
  write_random_checkpoint(c, d.path.string(), o);
  const std::vector<std::string> before = listing(d.path);
  const std::string shard1 = slurp(d.path / "model-00001-of-00004.safetensors");
  o.seed = 1;
  EXPECT_THROW(write_random_checkpoint(c, d.path.string(), o), Error);
  EXPECT_EQ(listing(d.path), before);
  EXPECT_EQ(slurp(d.path / "model-00001-of-00004.safetensors"), shard1);

  // A dead run's staging folder (a pid that cannot exist) is cleared; stale shards go.
  fs::create_directories(d.path / ".make-checkpoint.tmp.999999999");
  std::ofstream(d.path / ".make-checkpoint.tmp.999999999" / "model.safetensors") << "partial";
  std::ofstream(d.path / "notes.txt") << "mine";
  o.overwrite = true;
  o.shard_bytes = 100000000;
  write_random_checkpoint(c, d.path.string(), o);
  EXPECT_EQ(listing(d.path), (std::vector<std::string>{"config.json", "generation_config.json",
                                                       "model.safetensors", "notes.txt", "tokenizer.json"}));
  EXPECT_NO_THROW(load_hf_weights(d.path.string()));

  // A failure on the way (here: a config spear refuses) leaves the directory as it was.
  ModelConfig bad = c;
  bad.num_kv_heads = 3;
  const std::vector<std::string> now = listing(d.path);
  EXPECT_THROW(write_random_checkpoint(bad, d.path.string(), o), Error);
  EXPECT_EQ(listing(d.path), now);
}

}  // namespace
}  // namespace spear
