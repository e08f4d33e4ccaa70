// The whole SPEAR pipeline through the CLI on the shipped tiny model: quantize,
// diagnose, calibrate, then ppl/info on the .spear files and the eval report.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "test_paths.h"

namespace spear {
namespace {

namespace fs = std::filesystem;

struct Out {
  int rc;
  std::string text;
};

Out sh(const std::string& args) {
  const std::string cmd = test::cli_path() + " " + args + " 2>/dev/null";
  Out o{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.text.append(buf, n);
  o.rc = pclose(p);
  return o;
}

nlohmann::json last_json_line(const std::string& s) {
  size_t end = s.find_last_not_of("\n");
  size_t start = s.rfind('\n', end);
  return nlohmann::json::parse(s.substr(start == std::string::npos ? 0 : start + 1, end + 1));
}

TEST(Pipeline, TinyModelEndToEnd) {
  const fs::path dir = fs::temp_directory_path() / ("spear_pipeline_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string model = test::tiny_model_dir();
  const std::string data = test::data_dir() + "/tinystories/tinystories_val.txt";
  // Calibration text: the tail of the file; evaluation: its first windows (disjoint).
  const std::string calib = "--calib " + data + " --calib-offset 300000 --calib-ctx 256";
  const std::string w4 = (dir / "w4.spear").string(), ec = (dir / "ec.spear").string();

  ASSERT_EQ(sh("quantize --model " + model + " --out " + w4).rc, 0);
  Out d = sh("diagnose --model " + model + " --quantized " + w4 + " " + calib +
             " --calib-windows 2 --probe-windows 1 --out-dir " + dir.string() + " -q");
  ASSERT_EQ(d.rc, 0) << d.text;
  EXPECT_NE(d.text.find("| rank | layer | module |"), std::string::npos) << d.text;
  EXPECT_TRUE(fs::exists(dir / "spear-heatmap.svg"));
  EXPECT_TRUE(fs::exists(dir / "spear-token-error.svg"));

  Out c = sh("calibrate --model " + model + " --quantized " + w4 + " " + calib +
             " --calib-windows 8 --budget 0.05 --epochs 3 -q --out " + ec + " --report-json " +
             (dir / "rep.json").string());
  ASSERT_EQ(c.rc, 0) << c.text;
  std::ifstream rf(dir / "rep.json");
  nlohmann::json rep = nlohmann::json::parse(rf);
  EXPECT_LT(rep["calib_kl_trained"].get<double>(), rep["calib_kl_w4"].get<double>());
  EXPECT_LE(rep["ec_bytes"].get<int64_t>(), rep["budget_bytes"].get<int64_t>());
  EXPECT_GT(rep["placement"].size(), 0u);
  std::ofstream(dir / "placement.json") << rep["placement"].dump();

  // The diagonal gate (--gate diag) through the CLI, from the same placement.
  Out cd = sh("calibrate --model " + model + " --quantized " + w4 + " " + calib +
              " --calib-windows 8 --epochs 1 --gate diag -q --placement " + (dir / "placement.json").string() +
              " --out " + (dir / "diag.spear").string() + " --report-json " + (dir / "rep-diag.json").string());
  ASSERT_EQ(cd.rc, 0) << cd.text;
  nlohmann::json repd = nlohmann::json::parse(std::ifstream(dir / "rep-diag.json"));
  EXPECT_EQ(repd["settings"]["gate"], "diag");
  EXPECT_EQ(repd["placement"].size(), rep["placement"].size());
  EXPECT_LT(repd["calib_kl_trained"].get<double>(), repd["calib_kl_w4"].get<double>());

  Out info = sh("info " + ec + " --json");
  ASSERT_EQ(info.rc, 0);
  nlohmann::json ij = last_json_line(info.text);
  EXPECT_GT(ij["quant_model_bytes"].get<int64_t>(), 0);
  EXPECT_EQ(ij["ec_bytes"].get<int64_t>(), rep["ec_bytes"].get<int64_t>());

  const std::string ppl_args = " --data " + data + " --ctx 256 --max-windows 6 --json";
  Out p4 = sh("ppl --model " + w4 + ppl_args), pe = sh("ppl --model " + ec + ppl_args + " --ref-model " + model);
  ASSERT_EQ(p4.rc, 0);
  ASSERT_EQ(pe.rc, 0);
  EXPECT_GT(last_json_line(pe.text)["mean_kl"].get<double>(), 0.0);
  Out gen = sh("generate --model " + ec + " --prompt \"Once upon a time\" -n 8 --json");
  ASSERT_EQ(gen.rc, 0);
  EXPECT_EQ(last_json_line(gen.text)["new_ids"].size(), 8u);

  Out e = sh("eval --model " + model + " --data " + data + " " + calib +
             " --calib-windows 8 --ctx 256 --max-windows 6 --budgets 0.05 --epochs 3 -q --json " +
             (dir / "eval.json").string());
  ASSERT_EQ(e.rc, 0) << e.text;
  EXPECT_NE(e.text.find("| method | base | budget |"), std::string::npos) << e.text;
  std::ifstream ef(dir / "eval.json");
  nlohmann::json ev = nlohmann::json::parse(ef);
  double kl_w4 = -1, kl_spear = -1;
  for (const auto& r : ev["rows"]) {
    if (r["method"] == "w4") kl_w4 = r["mean_kl"].get<double>();
    if (r["method"] == "spear") kl_spear = r["mean_kl"].get<double>();
  }
  EXPECT_GT(kl_w4, 0);
  EXPECT_LT(kl_spear, kl_w4);

  // Bad input: a clear error, not a crash.
  Out bad = sh("calibrate --model " + model + " --quantized " + model + "/model.safetensors " +
               calib + " --out " + ec);
  EXPECT_NE(bad.rc, 0);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace spear
