// spear ppl's statistics against hand-computed values: PPL and its standard error,
// quantiles, KL(ref || model) of full and top-k reference rows, top-1 agreement, and
// the saved reference file (round trip, mismatches and truncation refused).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "eval/ppl_stats.h"
#include "eval/ref_logits.h"

namespace fs = std::filesystem;
using namespace spear;

TEST(EvalPplStats, PerplexityAndStandardError) {
  // NLL 1, 2, 3, 4: mean 2.5; sample sd sqrt(5/3) = 1.2909944; se = sd / 2 = 0.6454972;
  // PPL = e^2.5 = 12.1824940; se(PPL) = PPL * 0.6454972 = 7.8637660.
  PplStats s = ppl_stats({1, 2, 3, 4});
  EXPECT_EQ(s.n, 4);
  EXPECT_DOUBLE_EQ(s.nll_mean, 2.5);
  EXPECT_NEAR(s.nll_stderr, 0.6454972244, 1e-9);
  EXPECT_NEAR(s.ppl, 12.1824939607, 1e-9);
  EXPECT_NEAR(s.ppl_stderr, 7.8637660, 1e-6);
  EXPECT_TRUE(std::isnan(ppl_stats({2.0}).ppl_stderr));  // one token: no spread to estimate
  EXPECT_NEAR(ppl_stats({0.7, 0.7, 0.7}).ppl_stderr, 0.0, 1e-12);
  EXPECT_THROW(ppl_stats({}), Error);
}

TEST(EvalPplStats, QuantilesAndSummary) {
  // Sorted 1 2 3 4 100: median 3; p99 at position 0.99 * 4 = 3.96: 4 + 0.96 * 96 = 96.16.
  Summary s = summarize({100, 3, 1, 4, 2});
  EXPECT_DOUBLE_EQ(s.mean, 22.0);
  EXPECT_DOUBLE_EQ(s.median, 3.0);
  EXPECT_NEAR(s.p99, 96.16, 1e-12);
  EXPECT_DOUBLE_EQ(s.max, 100.0);
  EXPECT_DOUBLE_EQ(quantile({1, 2, 3, 4}, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(quantile({5}, 0.99), 5.0);
  EXPECT_DOUBLE_EQ(quantile({3, 1, 2}, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(quantile({3, 1, 2}, 1.0), 3.0);
  EXPECT_THROW(quantile({}, 0.5), Error);
}

namespace {
std::vector<float> logprobs(const std::vector<float>& logits) {
  std::vector<float> out(logits.size());
  log_softmax_row(logits.data(), static_cast<int64_t>(logits.size()), out.data());
  return out;
}
}  // namespace

TEST(EvalPplStats, KlAndTopOneOfFullRows) {
  // p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120.
  const std::vector<float> ref_logits = {0.0f, std::log(3.0f)};
  RefRows ref = RefRows::from_logits(ref_logits.data(), 1, 2);
  std::vector<float> q = logprobs({0.0f, 0.0f});
  PositionCompare c = compare_position(ref, 0, q.data());
  EXPECT_NEAR(c.kl, 0.25 * std::log(0.5) + 0.75 * std::log(1.5), 1e-6);
  EXPECT_FALSE(c.top1_agree);  // ref argmax 1; the model's tie goes to the lower id, 0
  std::vector<float> same = logprobs(ref_logits);
  c = compare_position(ref, 0, same.data());
  EXPECT_EQ(c.kl, 0.0);
  EXPECT_TRUE(c.top1_agree);
}

TEST(EvalPplStats, KlOfTopKRowsIsTheBucketedBound) {
  // p = (.5, .3, .2), q = (.2, .5, .3).
  // Full: .5 ln 2.5 + .3 ln .6 + .2 ln(2/3) = 0.2238036.
  // Top-1 + rest: .5 ln(.5/.2) + .5 ln(.5/.8) = 0.2231436 (a lower bound).
  // Top-2 + rest: the rest is one token, so the full value.
  const std::vector<float> pl = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  const std::vector<float> q = logprobs({std::log(0.2f), std::log(0.5f), std::log(0.3f)});
  RefRows full = RefRows::from_logits(pl.data(), 1, 3);
  const double kl_full = .5 * std::log(2.5) + .3 * std::log(.6) + .2 * std::log(2.0 / 3.0);
  EXPECT_NEAR(compare_position(full, 0, q.data()).kl, kl_full, 1e-6);
  RefRows t1 = full.top(1);
  EXPECT_EQ(t1.ids[0], 0);
  EXPECT_NEAR(std::exp(t1.tail[0]), 0.5, 1e-6);
  EXPECT_NEAR(compare_position(t1, 0, q.data()).kl, .5 * std::log(2.5) + .5 * std::log(.5 / .8), 1e-6);
  EXPECT_FALSE(compare_position(t1, 0, q.data()).top1_agree);  // ref 0, model 1
  RefRows t2 = full.top(2);
  EXPECT_EQ(t2.ids[1], 1);
  EXPECT_NEAR(compare_position(t2, 0, q.data()).kl, kl_full, 1e-6);
  RefRows t3 = full.top(3);
  EXPECT_TRUE(std::isinf(t3.tail[0]));
  EXPECT_NEAR(compare_position(t3, 0, q.data()).kl, kl_full, 1e-6);
  EXPECT_THROW(full.top(4), Error);
}

TEST(EvalPplStats, SavedReferenceRoundTripAndRefusals) {
  const fs::path dir = fs::temp_directory_path() / ("spear_reflogits_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string text = "some text";
  const std::vector<int32_t> ids = {1, 2, 3, 4, 0, 2, 9};  // two windows of 3, one token left over
  RefLogitsHeader h = ref_logits_header(text, ids, 3, 2, 4);
  const std::vector<float> w0 = {0, 1, 2, 3, 3, 2, 1, 0}, w1 = {5, 0, 0, 0, 0, 0, 0, 5};
  const RefRows r0 = RefRows::from_logits(w0.data(), 2, 4), r1 = RefRows::from_logits(w1.data(), 2, 4);
  for (int64_t k : {0, 2}) {
    const std::string path = (dir / ("ref" + std::to_string(k) + ".bin")).string();
    h.top_k = k;
    {
      RefLogitsWriter w(path, h);
      w.write_window(r0);
      EXPECT_FALSE(fs::exists(path));  // written under a temporary name until commit
      w.write_window(r1);
      w.commit();
    }
    ASSERT_TRUE(fs::exists(path));
    RefLogitsReader rd(path);
    EXPECT_EQ(rd.header().top_k, k);
    EXPECT_EQ(rd.header().tokens_sha256, h.tokens_sha256);
    check_ref_logits_compatible(rd.header(), ref_logits_header(text, ids, 3, 2, 4), path);
    for (const RefRows* want : {&r0, &r1}) {
      RefRows got = rd.read_window();
      const RefRows expect = k == 0 ? *want : want->top(k);
      EXPECT_EQ(got.logprobs, expect.logprobs);
      EXPECT_EQ(got.ids, expect.ids);
      EXPECT_EQ(got.tail, expect.tail);
    }
    EXPECT_THROW(rd.read_window(), Error);
  }
  const std::string path = (dir / "ref0.bin").string();
  RefLogitsReader rd(path);
  auto refused = [&](const RefLogitsHeader& now, const std::string& needle) {
    try {
      check_ref_logits_compatible(rd.header(), now, path);
      ADD_FAILURE() << "expected a refusal naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused(ref_logits_header("other text", ids, 3, 2, 4), "different data");
  refused(ref_logits_header(text, ids, 2, 2, 4), "--ctx 3");
  refused(ref_logits_header(text, ids, 3, 1, 4), "--max-windows");
  refused(ref_logits_header(text, ids, 3, 2, 5), "vocabulary");
  std::vector<int32_t> other = ids;
  other[1] = 7;  // the same text, other token ids: another tokenizer
  refused(ref_logits_header(text, other, 3, 2, 4), "different tokenizer");

  // Truncated, and not a reference file at all.
  fs::copy_file(path, dir / "cut.bin");
  fs::resize_file(dir / "cut.bin", fs::file_size(path) - 4);
  EXPECT_THROW(RefLogitsReader((dir / "cut.bin").string()), Error);
  std::ofstream(dir / "junk.bin") << "not a spear file at all";
  EXPECT_THROW(RefLogitsReader((dir / "junk.bin").string()), Error);
  EXPECT_THROW(RefLogitsReader((dir / "missing.bin").string()), Error);
  {  // an uncommitted writer leaves nothing behind
    RefLogitsWriter w((dir / "never.bin").string(), h);
  }
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
  fs::remove_all(dir);
}
