// The paged KV cache: block accounting, all-or-nothing growth, and a forward pass
// over paged memory that matches the contiguous cache exactly.
#include <gtest/gtest.h>

#include "engine/paged_kv.h"
#include "model/llama.h"
#include "test_paths.h"

using namespace spear;

TEST(EnginePagedKV, AllocatesAndFreesBlocks) {
  BlockPool pool(8, 4, 2, 3);
  EXPECT_EQ(pool.free_blocks(), 8);
  PagedSequence a(pool), b(pool);
  EXPECT_TRUE(a.reserve(9));  // 3 blocks
  EXPECT_EQ(a.capacity(), 12);
  EXPECT_EQ(pool.used_blocks(), 3);
  EXPECT_TRUE(a.reserve(12));  // no growth needed
  EXPECT_EQ(pool.used_blocks(), 3);
  EXPECT_TRUE(b.reserve(20));  // 5 blocks: the pool is full
  EXPECT_EQ(pool.free_blocks(), 0);
  EXPECT_FALSE(a.reserve(13));  // all-or-nothing: a keeps its 3 blocks
  EXPECT_EQ(a.num_blocks(), 3);
  b.release();
  EXPECT_EQ(pool.free_blocks(), 5);
  EXPECT_TRUE(a.reserve(13));
  EXPECT_EQ(a.blocks_needed(100), 25 - 4);
}

TEST(EnginePagedKV, RowsOfDifferentSequencesDoNotAlias) {
  BlockPool pool(4, 2, 2, 3);
  PagedSequence a(pool), b(pool);
  ASSERT_TRUE(a.reserve(4));
  ASSERT_TRUE(b.reserve(4));
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t p = 0; p < 4; ++p) {
      a.key(l, p)[0] = 1000 + l * 10 + p;
      b.key(l, p)[0] = 2000 + l * 10 + p;
      a.value(l, p)[2] = -1;
    }
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t p = 0; p < 4; ++p) {
      EXPECT_EQ(a.key(l, p)[0], 1000 + l * 10 + p);
      EXPECT_EQ(b.key(l, p)[0], 2000 + l * 10 + p);
    }
}

TEST(EnginePagedKV, ForwardMatchesContiguousCache) {
  auto model = LlamaModel::load(test::tiny_model_dir());
  const ModelConfig& c = model->config();
  std::vector<int32_t> toks = {1, 403, 407, 261, 378, 292, 354, 425, 287, 267, 359, 66, 300};
  const int64_t n = static_cast<int64_t>(toks.size());
  ContiguousKVCache ref_kv(c.num_layers, 64, c.kv_dim());
  std::vector<float> ref = model->forward(toks.data(), n, ref_kv, 0, true);
  // Paged, with a block size that splits the prompt unevenly, in two chunks.
  BlockPool pool(16, 3, c.num_layers, c.kv_dim());
  PagedSequence kv(pool);
  ASSERT_TRUE(kv.reserve(n));
  std::vector<float> a = model->forward(toks.data(), 5, kv, 0, true);
  std::vector<float> b = model->forward(toks.data() + 5, n - 5, kv, 5, true);
  a.insert(a.end(), b.begin(), b.end());
  ASSERT_EQ(a.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(a[i], ref[i], 1e-4f) << i;
}
