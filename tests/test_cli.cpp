// The `spear` binary end to end: JSON outputs, and bad input ending in one clear
// error line and a non-zero exit (never a crash).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "test_paths.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct CliRun {
  int status = -1;  // exit code, or 128+signal
  std::string out, err;
};

CliRun run_cli(const std::string& args) {
  fs::path err_file = fs::temp_directory_path() / ("spear_cli_err_" + std::to_string(getpid()));
  std::string cmd = spear::test::cli_path() + " " + args + " 2>" + err_file.string();
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  std::ifstream e(err_file);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  fs::remove(err_file);
  return r;
}

// A scratch copy of the tiny model that a test may damage.
fs::path scratch_model(const std::string& tag) {
  fs::path d = fs::temp_directory_path() / ("spear_cli_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    fs::copy_file(fs::path(spear::test::tiny_model_dir()) / f, d / f);
  return d;
}

void write(const fs::path& p, const std::string& s) {
  std::ofstream o(p, std::ios::binary | std::ios::trunc);
  o << s;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void expect_clean_error(const CliRun& r, const std::string& needle) {
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(r.err.rfind("spear: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
}

}  // namespace

TEST(Cli, JsonOutputs) {
  const std::string model = spear::test::tiny_model_dir();
  CliRun t = run_cli("tokenize --model " + model + " --text 'Once upon a time' --json");
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_EQ(json::parse(t.out)["ids"], json::parse("[1, 403, 407, 261, 378]"));

  // The empty text is BOS alone, as Hugging Face encodes "" (issue 14); without
  // BOS it is no tokens. Giving neither --text nor --file stays an error.
  CliRun e = run_cli("tokenize --model " + model + " --text '' --json");
  ASSERT_EQ(e.status, 0) << e.err;
  EXPECT_EQ(json::parse(e.out)["ids"], json::parse("[1]"));
  CliRun en = run_cli("tokenize --model " + model + " --text '' --no-special --json");
  ASSERT_EQ(en.status, 0) << en.err;
  EXPECT_EQ(json::parse(en.out)["ids"], json::array());
  expect_clean_error(run_cli("tokenize --model " + model), "give --text or --file");

  CliRun g = run_cli("generate --model " + model + " --prompt 'Once upon a time' -n 24 --json");
  ASSERT_EQ(g.status, 0) << g.err;
  json gj = json::parse(g.out);
  json ref = json::parse(slurp(fs::path(model) / "reference.json"));
  EXPECT_EQ(gj["prompt_ids"], json::parse("[1, 403, 407, 261, 378]"));
  EXPECT_EQ(gj["ids"], ref["generate"][0]["greedy_ids"]);
  EXPECT_EQ(gj["text"], ref["generate"][0]["greedy_text"]);

  CliRun p = run_cli("ppl --model " + model + " --data " + spear::test::data_dir() +
                  "/tinystories/tinystories_val.txt --ctx 256 --max-windows 4 --json");
  ASSERT_EQ(p.status, 0) << p.err;
  json pj = json::parse(p.out);
  EXPECT_EQ(pj["predicted_tokens"], 4 * 255);
  EXPECT_GT(pj["ppl"].get<double>(), 1.0);
  EXPECT_LT(pj["ppl"].get<double>(), 20.0);

  CliRun k = run_cli("ppl --model " + model + " --ref-model " + model + " --data " +
                  spear::test::data_dir() + "/tinystories/tinystories_val.txt --ctx 128 --max-windows 1 --json");
  ASSERT_EQ(k.status, 0) << k.err;
  EXPECT_NEAR(json::parse(k.out)["mean_kl"].get<double>(), 0.0, 1e-9);

  CliRun i = run_cli("info " + model + " --json");
  ASSERT_EQ(i.status, 0) << i.err;
  json ij = json::parse(i.out);
  EXPECT_EQ(ij["parameters"].get<int64_t>(), ij["parameters_by_config"].get<int64_t>());
  EXPECT_EQ(ij["dtypes"]["F32"]["bytes"].get<int64_t>(), 4 * ij["parameters"].get<int64_t>());
}

TEST(Cli, BadInputGivesOneClearError) {
  const std::string model = spear::test::tiny_model_dir();
  const std::string data = spear::test::data_dir() + "/tinystories/tinystories_sample.txt";
  expect_clean_error(run_cli("ppl --model /nonexistent/model --data " + data), "not found");
  expect_clean_error(run_cli("ppl --model " + model + " --data /nonexistent.txt"), "cannot open");
  expect_clean_error(run_cli("ppl --model " + model + " --data " + data + " --ctx 4096"),
                     "exceeds the model's context");

  fs::path d = scratch_model("trunc");
  fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 100);
  expect_clean_error(run_cli("generate --model " + d.string() + " --prompt hi"), "model.safetensors");

  d = scratch_model("shape");
  std::string cfg = slurp(d / "config.json");
  cfg.replace(cfg.find("\"intermediate_size\": 172"), 24, "\"intermediate_size\": 170");
  write(d / "config.json", cfg);
  expect_clean_error(run_cli("generate --model " + d.string() + " --prompt hi"), "shape");

  d = scratch_model("arch");
  cfg = slurp(d / "config.json");
  cfg.replace(cfg.find("LlamaForCausalLM"), 16, "GPT2LMHeadModel0");
  write(d / "config.json", cfg);
  expect_clean_error(run_cli("generate --model " + d.string() + " --prompt hi"),
                     "unsupported architecture");

  d = scratch_model("cfgjson");
  write(d / "config.json", "{\"hidden_size\": 64,");
  expect_clean_error(run_cli("info " + d.string()), "not valid JSON");

  d = scratch_model("tokjson");
  write(d / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": 5}}");
  expect_clean_error(run_cli("tokenize --model " + d.string() + " --text hi"), "tokenizer");

  d = scratch_model("dtype");
  // Rewrite the header's dtype of the first tensor from F32 to I32 (same byte size).
  std::string st = slurp(d / "model.safetensors");
  size_t at = st.find("\"F32\"");
  ASSERT_NE(at, std::string::npos);
  st.replace(at, 5, "\"I32\"");
  write(d / "model.safetensors", st);
  expect_clean_error(run_cli("generate --model " + d.string() + " --prompt hi"), "dtype");

  // Enum-valued flags are parsed before any work: the message names the flag and the
  // accepted values (the other paths need not exist).
  expect_clean_error(run_cli("quantize --model " + model + " --out x.spear --method awq"),
                     "quantize: --method: unknown quantization method 'awq' (accepted: rtn, gptq)");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --objective kl"),
                     "calibrate: --objective: unknown calibration objective 'kl'");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --static-mode svd"),
                     "(accepted: rrr, qera)");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --gate tanh"),
                     "calibrate: --gate: unknown gate 'tanh' (accepted: full, diag, none)");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --gate diag --no-gate"),
                     "--no-gate contradicts --gate diag");
  // Teacher targets (--targets, --target-top-k) for calibrate, diagnose and eval.
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --targets sparse"),
                     "calibrate: --targets: unknown teacher targets 'sparse' (accepted: dense, topk, recompute)");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --targets topk --target-top-k 0"),
                     "calibrate: --target-top-k must be at least 1 (got 0)");
  expect_clean_error(run_cli("calibrate --model " + model + " --quantized x.spear --out y.spear "
                             "--calib " + data + " --targets recompute --target-top-k 16"),
                     "calibrate: --target-top-k applies only to --targets topk (given --targets recompute)");
  expect_clean_error(run_cli("diagnose --model " + model + " --quantized x.spear --calib " + data +
                             " --targets TopK"),
                     "diagnose: --targets: unknown teacher targets 'TopK'");
  expect_clean_error(run_cli("eval --model " + model + " --data " + data + " --calib " + data +
                             " --targets topk --target-top-k -3"),
                     "eval: --target-top-k must be at least 1 (got -3)");
  expect_clean_error(run_cli("eval --model " + model + " --data " + data + " --calib " + data +
                             " --base hqq"),
                     "eval: --base: unknown quantization method 'hqq'");

  CliRun bad_flag = run_cli("ppl --model " + model + " --ctx notanumber --data " + data);
  EXPECT_NE(bad_flag.status, 0);
  EXPECT_LT(bad_flag.status, 128);
}

// --device cuda where it cannot run (no GPU, or a build without CUDA) is one clear error;
// where it can, it must agree with the CPU (checked in tests/cuda). bench-latency likewise.
TEST(Cli, DeviceCudaFailsCleanlyWithoutAGpu) {
  const std::string model = spear::test::tiny_model_dir();
  const std::string data = spear::test::data_dir() + "/tinystories/tinystories_val.txt";
  for (const std::string& args :
       {"ppl --model " + model + " --data " + data + " --ctx 256 --max-windows 2 --device cuda --json",
        "generate --model " + model + " --prompt hi -n 4 --device cuda --json",
        std::string("bench-latency --config llama-3.2-1b --batches 1 --contexts 64 --prefill 64 --iters 2")}) {
    CliRun r = run_cli(args);
    if (r.status == 0) continue;  // a GPU is present and the command ran
    EXPECT_EQ(r.status, 1) << args << "\n" << r.err;
    EXPECT_EQ(r.err.rfind("spear: error: ", 0), 0u) << r.err;
    EXPECT_TRUE(r.err.find("CUDA") != std::string::npos || r.err.find("cuda") != std::string::npos) << r.err;
  }
  CliRun bad = run_cli("ppl --model " + model + " --data " + data + " --device tpu");
  EXPECT_NE(bad.status, 0);
  EXPECT_LT(bad.status, 128);
  // The static control on the GPU only with the GPU backend: refused before anything loads.
  CliRun mixed = run_cli("calibrate --model " + model + " --quantized " + model + " --calib " + data +
                         " --out /nonexistent/x.spear --static-device cuda");
  EXPECT_EQ(mixed.status, 1) << mixed.err;
  EXPECT_NE(mixed.err.find("--static-device cuda needs --device cuda"), std::string::npos) << mixed.err;
}

TEST(Cli, DumpDiffsAgainstReferenceHiddenStates) {
  const std::string model = spear::test::tiny_model_dir();
  fs::path out = fs::temp_directory_path() / ("spear_dump_" + std::to_string(getpid()) + ".safetensors");
  CliRun r = run_cli("dump --model " + model + " --compare " + model +
                     "/hidden_states.safetensors --out " + out.string() + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  json j = json::parse(r.out);
  ASSERT_EQ(j["diff"].size(), 6u);
  for (auto& [name, d] : j["diff"].items()) EXPECT_LT(d["max_abs_diff"].get<double>(), 1e-4) << name;
  EXPECT_GT(j["tensors"].get<int>(), 6 * 5);  // hidden states plus per-layer intermediates
  EXPECT_TRUE(fs::exists(out));
  fs::remove(out);
}

// make-checkpoint: a random HF directory of a named architecture that the rest of spear
// takes as it takes a downloaded one (info, quantize, ppl, generate).
TEST(Cli, MakeCheckpointFeedsThePipeline) {
  const fs::path d = fs::temp_directory_path() / ("spear_cli_mkck_" + std::to_string(getpid()));
  fs::remove_all(d);
  const std::string data = spear::test::data_dir() + "/tinystories/tinystories_val.txt";
  CliRun m = run_cli("make-checkpoint --config tiny --random --seed 5 --shard-mb 0.3 --out " + d.string());
  ASSERT_EQ(m.status, 0) << m.err;
  EXPECT_NE(m.out.find("in 4 shards"), std::string::npos) << m.out;
  for (const char* f : {"config.json", "model.safetensors.index.json", "model-00001-of-00004.safetensors",
                        "model-00004-of-00004.safetensors", "tokenizer.json", "tokenizer_config.json"})
    EXPECT_TRUE(fs::exists(d / f)) << f;
  // The tokenizer is the one compiled in: the shipped stories260K tokenizer, byte for byte.
  EXPECT_EQ(slurp(d / "tokenizer.json"),
            slurp(fs::path(spear::test::tiny_model_dir()) / "tokenizer.json"));

  CliRun i = run_cli("info " + d.string() + " --json");
  ASSERT_EQ(i.status, 0) << i.err;
  json ij = json::parse(i.out);
  EXPECT_EQ(ij["config"]["hidden_size"], 128);
  EXPECT_EQ(ij["config"]["num_key_value_heads"], 2);
  EXPECT_EQ(ij["config"]["tie_word_embeddings"], false);
  EXPECT_EQ(ij["config"]["dtype"], "bfloat16");
  EXPECT_EQ(ij["shards"], 4);
  EXPECT_EQ(ij["parameters"].get<int64_t>(), ij["parameters_by_config"].get<int64_t>());
  EXPECT_EQ(ij["dtypes"]["BF16"]["bytes"].get<int64_t>(), 2 * ij["parameters"].get<int64_t>());

  const std::string w4 = (d.string() + "-w4.spear");
  CliRun q = run_cli("quantize --model " + d.string() + " --out " + w4);
  ASSERT_EQ(q.status, 0) << q.err;
  for (const std::string& model : {d.string(), w4}) {
    CliRun p = run_cli("ppl --model " + model + " --data " + data + " --ctx 64 --max-windows 2 --json");
    ASSERT_EQ(p.status, 0) << model << "\n" << p.err;
    const double ppl = json::parse(p.out)["ppl"].get<double>();
    EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0) << ppl;  // random weights: near the vocabulary size
  }
  CliRun g = run_cli("generate --model " + d.string() + " --prompt 'Once upon a time' -n 4 --json");
  ASSERT_EQ(g.status, 0) << g.err;
  const json gj = json::parse(g.out);
  EXPECT_EQ(gj["ids"].size(), gj["prompt_ids"].size() + 4);

  // Again into the same directory: refused without --force, and nothing there changes.
  const std::string cfg = slurp(d / "config.json");
  expect_clean_error(run_cli("make-checkpoint --config tiny --out " + d.string()), "is not empty (--force");
  EXPECT_EQ(slurp(d / "config.json"), cfg);
  // With --force, one shard this time: the four old shards and the index are gone, no
  // temporary is left.
  CliRun f = run_cli("make-checkpoint --config tiny --force --out " + d.string());
  ASSERT_EQ(f.status, 0) << f.err;
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(d)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"config.json", "generation_config.json", "model.safetensors",
                                             "tokenizer.json", "tokenizer_config.json"}));
  EXPECT_EQ(run_cli("info " + d.string() + " --json").status, 0);

  expect_clean_error(run_cli("make-checkpoint --config llama-9 --out " + d.string() + "-x"),
                     "make-checkpoint: --config: unknown config 'llama-9' (known: llama-3.2-1b");
  expect_clean_error(run_cli("make-checkpoint --config tiny --dtype f32 --out " + d.string() + "-x"),
                     "--dtype must be bf16 or f16");
  expect_clean_error(run_cli("make-checkpoint --config tiny --tokenizer /nonexistent.json --out " + d.string() + "-x"),
                     "/nonexistent.json");
  EXPECT_FALSE(fs::exists(d.string() + "-x"));
  fs::remove_all(d);
  fs::remove(w4);
}
