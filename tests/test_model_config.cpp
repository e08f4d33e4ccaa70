// config.json in both transformers styles, and the refusals.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"
#include "test_paths.h"

namespace spear {
namespace {

TEST(ModelConfig, TransformersFourStyleWithLlama3Rope) {
  // As Llama-3.2-1B's config.json: rope_theta at top level, rope_scaling llama3,
  // torch_dtype, eos as a list, no head_dim.
  const char* text = R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": true,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})";
  ModelConfig c = ModelConfig::from_json_text(text);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.kv_dim(), 512);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::Llama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_parameters(), 1235814400);  // Llama-3.2-1B
  // Round trip through the transformers-5 spelling.
  ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.rope.type, RopeConfig::Type::Llama3);
  EXPECT_EQ(back.num_parameters(), c.num_parameters());
}

TEST(ModelConfig, TransformersFiveStyleShippedModel) {
  ModelConfig c = ModelConfig::load(test::tiny_model_dir() + "/config.json");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::Default);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
  EXPECT_EQ(c.dtype, "float32");
}

TEST(ModelConfig, LinearRopeAndExplicitHeadDim) {
  ModelConfig c = ModelConfig::from_json_text(R"({"hidden_size": 96, "intermediate_size": 10,
    "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "head_dim": 32,
    "rope_scaling": {"type": "linear", "factor": 2.0}})");
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::Linear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 2.0);
}

TEST(ModelConfig, RefusesBadConfigs) {
  const std::string base = R"("hidden_size": 64, "intermediate_size": 10, "num_hidden_layers": 1,
    "num_attention_heads": 4, "vocab_size": 10)";
  auto bad = [&](const std::string& extra) {
    return "{" + base + (extra.empty() ? "" : ", " + extra) + "}";
  };
  EXPECT_NO_THROW(ModelConfig::from_json_text(bad("")));
  for (const std::string& s :
       {std::string("{"), std::string("[]"), std::string("{\"hidden_size\": 64}"),
        bad("\"architectures\": [\"MistralForCausalLM\"]"), bad("\"num_key_value_heads\": 3"),
        bad("\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}"),
        bad("\"eos_token_id\": 99"), bad("\"eos_token_id\": \"x\""), bad("\"rms_norm_eps\": -1"),
        bad("\"attention_bias\": true"), bad("\"hidden_act\": \"gelu\""), bad("\"head_dim\": 7"),
        std::string("{\"hidden_size\": -64, \"intermediate_size\": 10, \"num_hidden_layers\": 1, "
                    "\"num_attention_heads\": 4, \"vocab_size\": 10}"),
        std::string("{\"hidden_size\": 1e30, \"intermediate_size\": 10, \"num_hidden_layers\": 1, "
                    "\"num_attention_heads\": 4, \"vocab_size\": 10}")})
    EXPECT_THROW(ModelConfig::from_json_text(s), Error) << s;
  EXPECT_THROW(ModelConfig::load("/nonexistent/config.json"), Error);
}

}  // namespace
}  // namespace spear
