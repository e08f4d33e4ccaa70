// spear ppl against a reference on the shipped tiny model, end to end through the CLI:
// the model against itself (KL 0, top-1 agreement 1), against a 4-bit artifact (KL > 0),
// the reference saved with --save-logits and read back with --ref-logits (the same
// numbers), a top-k file (a lower bound, same agreement), and the refusals.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "test_paths.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct CliRun {
  int rc = -1;
  std::string out, err;
};

CliRun cli(const std::string& args) {
  const fs::path err = fs::temp_directory_path() / ("spear_pplref_err_" + std::to_string(getpid()));
  const std::string cmd = spear::test::cli_path() + " " + args + " 2>" + err.string();
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  std::ifstream e(err);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  fs::remove(err);
  return r;
}

json ok_json(const CliRun& r) {
  EXPECT_EQ(r.rc, 0) << r.err;
  json j = json::parse(r.out, nullptr, false);
  EXPECT_TRUE(j.is_object()) << r.out;
  return j;
}

void refused(const CliRun& r, const std::string& needle) {
  EXPECT_EQ(r.rc, 1) << r.err;
  EXPECT_EQ(r.err.rfind("spear: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
}

}  // namespace

TEST(CliPplReference, SelfQuantizedSavedAndLoaded) {
  const fs::path dir = fs::temp_directory_path() / ("spear_pplref_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string model = spear::test::tiny_model_dir();
  const std::string data = spear::test::data_dir() + "/tinystories/tinystories_val.txt";
  const std::string win = " --data " + data + " --ctx 128 --max-windows 3 --json";
  const std::string w4 = (dir / "w4.spear").string();
  const std::string saved = (dir / "ref.lp").string(), saved_k = (dir / "ref_top8.lp").string();

  // The model against itself: KL exactly 0, every argmax the same.
  json self = ok_json(cli("ppl --model " + model + " --ref-model " + model + win));
  EXPECT_EQ(self["predicted_tokens"], 3 * 127);
  EXPECT_EQ(self["kl"]["mean"].get<double>(), 0.0);
  EXPECT_EQ(self["kl"]["max"].get<double>(), 0.0);
  EXPECT_EQ(self["top1_agreement"].get<double>(), 1.0);
  EXPECT_EQ(self["top1_same"], 3 * 127);
  // PPL +/- its standard error, with the NLL's: se(PPL) = PPL * se(NLL), and exp(nll) = PPL.
  const double ppl = self["ppl"].get<double>(), se = self["ppl_stderr"].get<double>();
  EXPECT_GT(se, 0.0);
  EXPECT_LT(se, ppl);
  EXPECT_NEAR(se, ppl * self["nll_stderr"].get<double>(), 1e-9 * ppl);
  EXPECT_NEAR(std::exp(self["nll"].get<double>()), ppl, 1e-9 * ppl);

  // A 4-bit artifact against the full-precision reference, saving the reference.
  ASSERT_EQ(cli("quantize --model " + model + " --out " + w4 + " --bits 4 --group 32").rc, 0);
  json q = ok_json(cli("ppl --model " + w4 + " --ref-model " + model + win + " --save-logits " + saved));
  const json& kl = q["kl"];
  EXPECT_GT(kl["mean"].get<double>(), 0.0);
  EXPECT_LE(kl["median"].get<double>(), kl["p99"].get<double>());
  EXPECT_LE(kl["p99"].get<double>(), kl["max"].get<double>());
  EXPECT_LE(kl["mean"].get<double>(), kl["max"].get<double>());
  EXPECT_GT(q["top1_agreement"].get<double>(), 0.3);
  EXPECT_LT(q["top1_agreement"].get<double>(), 1.0);
  EXPECT_EQ(q["mean_kl"], kl["mean"]);
  ASSERT_TRUE(fs::exists(saved));
  // Full rows: 381 positions x 512 log-probabilities x 4 bytes, after a short header.
  EXPECT_GT(fs::file_size(saved), 381u * 512 * 4);
  EXPECT_LT(fs::file_size(saved), 381u * 512 * 4 + 4096);

  // Read back: every number the same as with the reference model run.
  json l = ok_json(cli("ppl --model " + w4 + " --ref-logits " + saved + win));
  for (const char* k : {"ppl", "ppl_stderr", "nll", "nll_stderr", "kl", "top1_agreement", "top1_same", "mean_kl"})
    EXPECT_EQ(l[k], q[k]) << k;
  EXPECT_EQ(l["ref_top_k"], 0);

  // Human output carries the same statistics.
  CliRun h = cli("ppl --model " + w4 + " --ref-logits " + saved + " --data " + data + " --ctx 128 --max-windows 3");
  ASSERT_EQ(h.rc, 0) << h.err;
  EXPECT_NE(h.out.find(" +/- "), std::string::npos) << h.out;
  EXPECT_NE(h.out.find("median"), std::string::npos) << h.out;
  EXPECT_NE(h.out.find("p99"), std::string::npos) << h.out;
  EXPECT_NE(h.out.find("top-1 agreement"), std::string::npos) << h.out;

  // A top-8 file: smaller, KL a lower bound of the full one, the same top-1 agreement.
  ok_json(cli("ppl --model " + w4 + " --ref-model " + model + win + " --save-logits " + saved_k +
              " --save-top-k 8"));
  EXPECT_LT(fs::file_size(saved_k), fs::file_size(saved));
  json lk = ok_json(cli("ppl --model " + w4 + " --ref-logits " + saved_k + win));
  EXPECT_EQ(lk["ref_top_k"], 8);
  EXPECT_LE(lk["kl"]["mean"].get<double>(), kl["mean"].get<double>() + 1e-9);
  EXPECT_GT(lk["kl"]["mean"].get<double>(), 0.5 * kl["mean"].get<double>());
  EXPECT_EQ(lk["top1_same"], q["top1_same"]);
  EXPECT_EQ(lk["ppl"], q["ppl"]);

  // Refusals: another window count, ctx, data; flags that need each other; the GPU.
  refused(cli("ppl --model " + w4 + " --ref-logits " + saved + " --data " + data + " --ctx 128 --max-windows 2"),
          "--max-windows");
  refused(cli("ppl --model " + w4 + " --ref-logits " + saved + " --data " + data + " --ctx 64 --max-windows 3"),
          "--ctx 128");
  const std::string other = spear::test::data_dir() + "/tinystories/tinystories_sample.txt";
  refused(cli("ppl --model " + w4 + " --ref-logits " + saved + " --data " + other + " --ctx 128 --max-windows 3"),
          "different data");
  refused(cli("ppl --model " + w4 + " --ref-logits " + saved + " --ref-model " + model + win), "not both");
  refused(cli("ppl --model " + w4 + win + " --save-logits " + saved), "needs --ref-model");
  refused(cli("ppl --model " + w4 + " --ref-model " + model + win + " --save-logits " + saved_k +
              " --save-top-k 100000"),
          "--save-top-k");
  refused(cli("ppl --model " + w4 + " --ref-logits " + model + "/config.json" + win), "not a spear reference");
  refused(cli("ppl --model " + w4 + " --ref-model " + model + win + " --device cuda"), "CPU engine only");
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
  fs::remove_all(dir);
}
