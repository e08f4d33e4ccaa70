// GPTQ, AWQ and compressed-tensors W4 checkpoints as the quantized base
// (model/hf_quantized.h), and the GPTQ + PEFT LoRA export (model/hf_export.h).
//
// The checkpoints are written here with packers of this file's own, following the public
// layouts (AutoGPTQ's qlinear pack, AutoAWQ's WQLinear_GEMM order map, compressed-tensors'
// pack_to_int32), so that the loader is checked against an independent writer: the codes,
// scales and zeros read back are exactly those packed, and a model loaded from each format
// scores the same perplexity as spear's own artifact of the same quantization.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "compensate/quantize_model.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "io/safetensors.h"
#include "model/hf_export.h"
#include "model/hf_quantized.h"
#include "model/random_checkpoint.h"
#include "quant/cpu_model.h"
#include "quant/rtn.h"
#include "runtime/load.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace spear;
using spear::test::TempDir;

namespace {

// ---- matrices and independent packers ------------------------------------------------

// Random codes, zeros in [zmin, 15] (8 when symmetric) and scales that F16 holds exactly.
QuantizedMatrix random_matrix(int64_t N, int64_t K, int64_t group, bool sym, int zmin, uint32_t seed) {
  std::mt19937 rng(seed);
  QuantizedMatrix q;
  q.N = N;
  q.K = K;
  q.scheme.bits = 4;
  q.scheme.group = group;
  q.scheme.symmetric = sym;
  const int64_t G = q.scheme.num_groups(K);
  q.codes.assign(static_cast<size_t>(N * q.row_bytes()), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) q.set_code(n, k, static_cast<int>(rng() % 16));
  q.scales.resize(N * G);
  q.zeros.resize(N * G);
  for (int64_t i = 0; i < N * G; ++i) {
    q.scales[i] = f16_to_f32(f32_to_f16(std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -8 - static_cast<int>(rng() % 4))));
    q.zeros[i] = sym ? 8.0f : static_cast<float>(zmin + static_cast<int>(rng() % (16 - zmin)));
  }
  return q;
}

int64_t gsize(const QuantizedMatrix& q) { return q.scheme.group_size(q.K); }
int64_t ngroups(const QuantizedMatrix& q) { return q.scheme.num_groups(q.K); }

struct Gptq {
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales;  // F16 (G, N)
};
// AutoGPTQ: the codes of W^T (K, N) packed along K, eight per word, input j of a word at bits
// 4j; zeros (G, N) packed along N, v1 storing zero - 1; scales (G, N).
Gptq pack_gptq_ref(const QuantizedMatrix& q, bool v1) {
  const int64_t N = q.N, K = q.K, G = ngroups(q);
  Gptq p;
  p.qweight.assign(K / 8 * N, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      p.qweight[(k / 8) * N + n] = static_cast<int32_t>(static_cast<uint32_t>(p.qweight[(k / 8) * N + n]) |
                                                        (static_cast<uint32_t>(q.code(n, k)) << (4 * (k % 8))));
  p.qzeros.assign(G * N / 8, 0);
  p.scales.resize(G * N);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t z = static_cast<uint32_t>(q.zeros[n * G + g]) - (v1 ? 1u : 0u);
      p.qzeros[g * N / 8 + n / 8] = static_cast<int32_t>(static_cast<uint32_t>(p.qzeros[g * N / 8 + n / 8]) | ((z & 15u) << (4 * (n % 8))));
      p.scales[g * N + n] = f32_to_f16(q.scales[n * G + g]);
    }
  for (int64_t k = 0; k < K; ++k) p.g_idx.push_back(static_cast<int32_t>(k / gsize(q)));
  return p;
}

struct Awq {
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;
};
// AutoAWQ gemm: (K, N/8) words along N; word nibble i holds output 8c + order[i],
// order = 0 2 4 6 1 3 5 7; zeros (G, N/8) the same way, not offset; scales (G, N).
Awq pack_awq_ref(const QuantizedMatrix& q) {
  static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const int64_t N = q.N, K = q.K, G = ngroups(q);
  Awq p;
  p.qweight.assign(K * N / 8, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < N / 8; ++c) {
      uint32_t w = 0;
      for (int i = 0; i < 8; ++i) w |= static_cast<uint32_t>(q.code(c * 8 + order[i], k)) << (4 * i);
      p.qweight[k * N / 8 + c] = static_cast<int32_t>(w);
    }
  p.qzeros.assign(G * N / 8, 0);
  p.scales.resize(G * N);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < N / 8; ++c) {
      uint32_t w = 0;
      for (int i = 0; i < 8; ++i) w |= static_cast<uint32_t>(q.zeros[(c * 8 + order[i]) * G + g]) << (4 * i);
      p.qzeros[g * N / 8 + c] = static_cast<int32_t>(w);
    }
    for (int64_t n = 0; n < N; ++n) p.scales[g * N + n] = f32_to_f16(q.scales[n * G + g]);
  }
  return p;
}

struct Ct {
  std::vector<int32_t> packed, zero_point;  // zero_point empty when symmetric
  std::vector<uint16_t> scale;              // (N, G) F16
};
// compressed-tensors pack-quantized: the signed value (code - 8) stored + 8, i.e. the code,
// packed along K into ceil(K/8) words per row (value i of a word at bits 4i, zero padded);
// asymmetric zero points (zp - 8 signed, + 8 stored) packed along N: (ceil(N/8), G).
Ct pack_ct_ref(const QuantizedMatrix& q, bool sym) {
  const int64_t N = q.N, K = q.K, G = ngroups(q), W = (K + 7) / 8;
  Ct p;
  p.packed.assign(N * W, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int signed_value = q.code(n, k) - 8;
      const uint32_t stored = static_cast<uint32_t>(signed_value + 8);
      p.packed[n * W + k / 8] = static_cast<int32_t>(static_cast<uint32_t>(p.packed[n * W + k / 8]) | (stored << (4 * (k % 8))));
    }
  p.scale.resize(N * G);
  for (int64_t i = 0; i < N * G; ++i) p.scale[i] = f32_to_f16(q.scales[i]);
  if (!sym) {
    p.zero_point.assign((N + 7) / 8 * G, 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t stored = static_cast<uint32_t>(static_cast<int>(q.zeros[n * G + g]) - 8 + 8);
        p.zero_point[(n / 8) * G + g] = static_cast<int32_t>(static_cast<uint32_t>(p.zero_point[(n / 8) * G + g]) | (stored << (4 * (n % 8))));
      }
  }
  return p;
}

std::vector<float> widen(const std::vector<uint16_t>& h) {
  std::vector<float> r(h.size());
  for (size_t i = 0; i < h.size(); ++i) r[i] = f16_to_f32(h[i]);
  return r;
}

void expect_same(const QuantizedMatrix& want, const QuantizedMatrix& got, const std::string& what) {
  ASSERT_EQ(want.N, got.N) << what;
  ASSERT_EQ(want.K, got.K) << what;
  EXPECT_EQ(want.scheme.bits, got.scheme.bits) << what;
  EXPECT_EQ(want.scheme.group_size(want.K), got.scheme.group_size(got.K)) << what;
  EXPECT_EQ(want.codes, got.codes) << what;
  EXPECT_EQ(want.scales, got.scales) << what;
  EXPECT_EQ(want.zeros, got.zeros) << what;
  const std::vector<float> a = dequantize(want), b = dequantize(got);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << what << ": dequantized weights differ";
}

// ---- layouts, one matrix --------------------------------------------------------------

TEST(HfQuantLayout, GptqV1AndV2UnpackExactly) {
  for (bool sym : {true, false})
    for (bool v1 : {true, false})
      for (int64_t group : {int64_t(32), int64_t(-1)}) {
        // v1 stores zero - 1: its zeros start at 1; v2 holds 0 too.
        const QuantizedMatrix q = random_matrix(48, 96, group, sym, v1 ? 1 : 0, 7 + sym + 2 * v1);
        const Gptq p = pack_gptq_ref(q, v1);
        const QuantizedMatrix got = unpack_gptq(p.qweight.data(), p.qzeros.data(), widen(p.scales).data(),
                                                p.g_idx.data(), q.N, q.K, group, v1, sym, "m");
        expect_same(q, got, "gptq sym=" + std::to_string(sym) + " v1=" + std::to_string(v1));
        EXPECT_EQ(got.scheme.symmetric, sym);
        // spear's own packer (export) writes the same words.
        const GptqPacked mine = pack_gptq(q, v1, "m");
        EXPECT_EQ(mine.qweight, p.qweight);
        EXPECT_EQ(mine.qzeros, p.qzeros);
        EXPECT_EQ(mine.g_idx, p.g_idx);
      }
}

TEST(HfQuantLayout, AwqUnpacksExactly) {
  for (int64_t group : {int64_t(32), int64_t(-1)}) {
    const QuantizedMatrix q = random_matrix(40, 64, group, false, 0, 11);
    const Awq p = pack_awq_ref(q);
    expect_same(q, unpack_awq(p.qweight.data(), p.qzeros.data(), widen(p.scales).data(), q.N, q.K, group, "m"), "awq");
  }
}

TEST(HfQuantLayout, CompressedTensorsUnpacksExactlyWithPadding) {
  // K = 172 and N = 20 are not multiples of 8: the last word of a row and of the zero
  // points' last column block are padded.
  for (bool sym : {true, false}) {
    const QuantizedMatrix q = random_matrix(20, 172, -1, sym, 0, 13 + sym);
    const Ct p = pack_ct_ref(q, sym);
    expect_same(q, unpack_compressed_tensors(p.packed.data(), widen(p.scale).data(),
                                             sym ? nullptr : p.zero_point.data(), nullptr, q.N, q.K, -1, sym, "m"),
                "ct");
  }
  const QuantizedMatrix q = random_matrix(24, 128, 32, false, 0, 17);
  const Ct p = pack_ct_ref(q, false);
  expect_same(q, unpack_compressed_tensors(p.packed.data(), widen(p.scale).data(), p.zero_point.data(), nullptr,
                                           q.N, q.K, 32, false, "m"),
              "ct g32");
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(HfQuantLayout, RefusesPermutedGidxAndV1ZeroSixteen) {
  const QuantizedMatrix q = random_matrix(16, 64, 16, false, 1, 5);
  Gptq p = pack_gptq_ref(q, true);
  std::swap(p.g_idx[0], p.g_idx[63]);  // desc_act: group of input 0 is 3
  const std::string e1 = error_of([&] {
    unpack_gptq(p.qweight.data(), p.qzeros.data(), widen(p.scales).data(), p.g_idx.data(), 16, 64, 16, true, false, "m");
  });
  EXPECT_NE(e1.find("m.g_idx[0]"), std::string::npos) << e1;
  EXPECT_NE(e1.find("desc_act"), std::string::npos) << e1;
  p = pack_gptq_ref(q, true);
  p.qzeros[0] |= 15;  // stored 15: zero point 16 in v1
  const std::string e2 = error_of([&] {
    unpack_gptq(p.qweight.data(), p.qzeros.data(), widen(p.scales).data(), nullptr, 16, 64, 16, true, false, "m");
  });
  EXPECT_NE(e2.find("zero point 16"), std::string::npos) << e2;
  QuantizedMatrix z0 = q;
  z0.zeros[0] = 0;
  EXPECT_THROW(pack_gptq(z0, /*v1=*/true, "m"), Error);
  EXPECT_NO_THROW(pack_gptq(z0, /*v1=*/false, "m"));
}

// ---- checkpoint directories -----------------------------------------------------------

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_all(const fs::path& p, const std::string& s) {
  std::ofstream o(p, std::ios::binary | std::ios::trunc);
  o << s;
}

std::string mprefix(int64_t l, Module m) { return "model.layers." + std::to_string(l) + "." + std::string(module_name(m)); }

enum class Fmt { GptqV1, GptqV2, Awq, Ct };

// Writes `a`'s quantization as a checkpoint directory of format `f` (tokenizer and config
// from `src`); `qc_patch` is merged into quantization_config; `mutate` may edit the tensors.
struct Owned {
  std::vector<std::vector<int32_t>> i32;
  std::vector<std::vector<uint16_t>> f16;
  std::vector<std::vector<int64_t>> i64;
};
void write_checkpoint(const SpearArtifact& a, const fs::path& src, const fs::path& out, Fmt f,
                      const json& qc_patch = json::object(),
                      const std::function<void(std::vector<TensorToWrite>&)>& mutate = {}) {
  fs::create_directories(out);
  fs::copy_file(src / "tokenizer.json", out / "tokenizer.json", fs::copy_options::overwrite_existing);
  const QuantizedMatrix& q0 = a.quant(0, Module::Q);
  const bool sym = q0.scheme.symmetric;
  const int64_t group = q0.scheme.group;
  json cfg = json::parse(read_all(src / "config.json"));
  json qc;
  if (f == Fmt::GptqV1 || f == Fmt::GptqV2)
    qc = {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", group}, {"desc_act", false}, {"sym", sym},
          {"checkpoint_format", f == Fmt::GptqV1 ? "gptq" : "gptq_v2"}};
  else if (f == Fmt::Awq)
    qc = {{"quant_method", "awq"}, {"bits", 4}, {"group_size", group}, {"zero_point", true}, {"version", "gemm"},
          {"modules_to_not_convert", nullptr}};
  else
    qc = {{"quant_method", "compressed-tensors"},
          {"format", "pack-quantized"},
          {"quantization_status", "compressed"},
          {"ignore", {"lm_head"}},
          {"config_groups",
           {{"group_0",
             {{"targets", {"Linear"}},
              {"input_activations", nullptr},
              {"output_activations", nullptr},
              {"format", "pack-quantized"},
              {"weights",
               {{"num_bits", 4}, {"type", "int"}, {"symmetric", sym}, {"strategy", group > 0 ? "group" : "channel"},
                {"group_size", group > 0 ? json(group) : json(nullptr)}, {"dynamic", false}, {"actorder", nullptr}}}}}}}};
  qc.merge_patch(qc_patch);
  cfg["quantization_config"] = qc;
  write_all(out / "config.json", cfg.dump(2));
  Owned own;
  own.i32.reserve(1000);
  own.f16.reserve(1000);
  own.i64.reserve(1000);
  std::vector<TensorToWrite> t;
  for (const auto& u : unquantized_tensors(a.weights)) t.push_back({u.name, u.tensor->dtype, u.tensor->shape, u.tensor->data});
  for (int64_t l = 0; l < a.config().num_layers; ++l)
    for (Module m : kAllModules) {
      const QuantizedMatrix& q = a.quant(l, m);
      const std::string p = mprefix(l, m);
      const int64_t N = q.N, K = q.K, G = ngroups(q);
      if (f == Fmt::GptqV1 || f == Fmt::GptqV2) {
        Gptq g = pack_gptq_ref(q, f == Fmt::GptqV1);
        own.i32.push_back(std::move(g.qweight));
        t.push_back({p + ".qweight", DType::I32, {K / 8, N}, own.i32.back().data()});
        own.i32.push_back(std::move(g.qzeros));
        t.push_back({p + ".qzeros", DType::I32, {G, N / 8}, own.i32.back().data()});
        own.f16.push_back(std::move(g.scales));
        t.push_back({p + ".scales", DType::F16, {G, N}, own.f16.back().data()});
        own.i32.push_back(std::move(g.g_idx));
        t.push_back({p + ".g_idx", DType::I32, {K}, own.i32.back().data()});
      } else if (f == Fmt::Awq) {
        Awq w = pack_awq_ref(q);
        own.i32.push_back(std::move(w.qweight));
        t.push_back({p + ".qweight", DType::I32, {K, N / 8}, own.i32.back().data()});
        own.i32.push_back(std::move(w.qzeros));
        t.push_back({p + ".qzeros", DType::I32, {G, N / 8}, own.i32.back().data()});
        own.f16.push_back(std::move(w.scales));
        t.push_back({p + ".scales", DType::F16, {G, N}, own.f16.back().data()});
      } else {
        Ct c = pack_ct_ref(q, sym);
        own.i32.push_back(std::move(c.packed));
        t.push_back({p + ".weight_packed", DType::I32, {N, (K + 7) / 8}, own.i32.back().data()});
        own.f16.push_back(std::move(c.scale));
        t.push_back({p + ".weight_scale", DType::F16, {N, G}, own.f16.back().data()});
        if (!sym) {
          own.i32.push_back(std::move(c.zero_point));
          t.push_back({p + ".weight_zero_point", DType::I32, {(N + 7) / 8, G}, own.i32.back().data()});
        }
        own.i64.push_back({N, K});
        t.push_back({p + ".weight_shape", DType::I64, {2}, own.i64.back().data()});
      }
    }
  if (mutate) mutate(t);
  write_safetensors((out / "model.safetensors").string(), t, {{"format", "pt"}});
}

// Rounds every scale to F16 (what the formats store), so that the artifact and a checkpoint
// hold the same quantization.
void round_scales_to_f16(SpearArtifact& a) {
  for (auto& L : a.weights.layers)
    for (auto& m : L.modules)
      for (float& s : m.quant->scales) s = f16_to_f32(f32_to_f16(s));
}

struct CliRun {
  int status = -1;
  std::string out, err;
};
CliRun run_cli(const std::string& args) {
  const fs::path err_file = fs::temp_directory_path() / ("spear_hfq_err_" + std::to_string(getpid()));
  const std::string cmd = spear::test::cli_path() + " " + args + " 2>" + err_file.string();
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.err = read_all(err_file);
  fs::remove(err_file);
  return r;
}

// One tiny random model (the named "tiny" architecture: widths multiples of 128) and its
// RTN quantizations, shared by the tests below.
class HfQuantDir : public ::testing::Test {
 protected:
  static inline TempDir* dir = nullptr;
  static void SetUpTestSuite() {
    dir = new TempDir("hfq");
    RandomCheckpointOptions o;
    o.seed = 3;
    o.init_std = 0.05;
    o.tokenizer_json = read_all(fs::path(spear::test::tiny_model_dir()) / "tokenizer.json");
    write_random_checkpoint(named_config("tiny"), (dir->path / "fp").string(), o);
  }
  static void TearDownTestSuite() {
    delete dir;
    dir = nullptr;
  }
  static fs::path fp() { return dir->path / "fp"; }
  static SpearArtifact rtn(int64_t group, bool sym) {
    QuantizeOptions q;
    q.scheme.bits = 4;
    q.scheme.group = group;
    q.scheme.symmetric = sym;
    q.verbose = false;
    SpearArtifact a = quantize_model(fp().string(), q);
    round_scales_to_f16(a);
    return a;
  }
  static void expect_same_base(const SpearArtifact& want, const SpearArtifact& got, const std::string& what) {
    for (int64_t l = 0; l < want.config().num_layers; ++l)
      for (Module m : kAllModules) expect_same(want.quant(l, m), got.quant(l, m), what + " " + mprefix(l, m));
  }
  static std::string data_file() { return spear::test::data_dir() + "/tinystories/tinystories_val.txt"; }
  static double ppl_of(const std::string& model) {
    const CliRun r = run_cli("ppl --model " + model + " --data " + data_file() + " --ctx 64 --max-windows 3 --json");
    EXPECT_EQ(r.status, 0) << r.err;
    if (r.status != 0) return -1;
    return json::parse(r.out).at("ppl").get<double>();
  }
};

TEST_F(HfQuantDir, EveryFormatLoadsBitExactAndScoresAsTheSpearArtifact) {
  struct Case {
    Fmt f;
    int64_t group;
    bool sym;
    const char* name;
  };
  const SpearArtifact sym64 = rtn(64, true), asym64 = rtn(64, false), asym_pc = rtn(-1, false);
  // GPTQ v1 stores zero - 1: asymmetric RTN zeros may be 0, which only v2 can store.
  bool asym_has_zero0 = false;
  for (auto& L : asym64.weights.layers)
    for (auto& m : L.modules)
      for (float z : m.quant->zeros) asym_has_zero0 = asym_has_zero0 || z == 0;
  const std::vector<Case> cases = {{Fmt::GptqV1, 64, true, "gptq-v1-sym-g64"},
                                   {Fmt::GptqV2, 64, false, "gptq-v2-asym-g64"},
                                   {Fmt::Awq, 64, false, "awq-g64"},
                                   {Fmt::Awq, -1, false, "awq-pc"},
                                   {Fmt::Ct, 64, true, "ct-sym-g64"},
                                   {Fmt::Ct, 64, false, "ct-asym-g64"}};
  const fs::path art_sym = dir->path / "sym64.spear", art_asym = dir->path / "asym64.spear";
  write_spear(art_sym.string(), sym64);
  write_spear(art_asym.string(), asym64);
  const double ppl_sym = ppl_of(art_sym.string()), ppl_asym = ppl_of(art_asym.string());
  ASSERT_GT(ppl_sym, 0);
  ASSERT_NE(ppl_sym, ppl_asym);
  for (const Case& c : cases) {
    const SpearArtifact& src = c.group < 0 ? asym_pc : (c.sym ? sym64 : asym64);
    const fs::path d = dir->path / c.name;
    write_checkpoint(src, fp(), d, c.f);
    ASSERT_TRUE(hf_quantization_config(d.string()).has_value()) << c.name;
    const SpearArtifact got = artifact_from_hf_quantized(d.string());
    expect_same_base(src, got, c.name);
    EXPECT_EQ(got.quant(0, Module::Q).scheme.symmetric, c.sym) << c.name;
    // The unquantized tensors are the source's bytes.
    EXPECT_EQ(0, std::memcmp(got.weights.embed.data, src.weights.embed.data, src.weights.embed.nbytes));
    // The CLI path: ppl --model DIR is the artifact's perplexity exactly.
    if (c.group > 0) {
      EXPECT_EQ(ppl_of(d.string()), c.sym ? ppl_sym : ppl_asym) << c.name;
    }
  }
  (void)asym_has_zero0;
}

TEST_F(HfQuantDir, BadCheckpointsGiveClearErrors) {
  const SpearArtifact a = rtn(64, true);
  struct Bad {
    std::string name;
    Fmt f;
    json patch;
    std::function<void(std::vector<TensorToWrite>&)> mutate;
    std::string expect;
  };
  static int32_t junk[4] = {0, 0, 0, 0};
  const std::vector<Bad> bad = {
      {"bits8", Fmt::GptqV1, {{"bits", 8}}, {}, "spear loads 4-bit checkpoints only"},
      {"unknown-method", Fmt::GptqV1, {{"quant_method", "bitsandbytes"}}, {}, "quant_method 'bitsandbytes' is not supported"},
      {"marlin", Fmt::GptqV1, {{"checkpoint_format", "marlin"}}, {}, "checkpoint_format 'marlin'"},
      {"awq-gemv", Fmt::Awq, {{"version", "gemv"}}, {}, "version 'gemv'"},
      {"ct-int-quantized", Fmt::Ct, {{"config_groups", {{"group_0", {{"format", "int-quantized"}}}}}}, {}, "int-quantized"},
      {"ct-w4a8", Fmt::Ct, {{"config_groups", {{"group_0", {{"input_activations", {{"num_bits", 8}}}}}}}}, {},
       "input_activations"},
      {"wrong-shape", Fmt::GptqV1, json::object(),
       [](std::vector<TensorToWrite>& t) {
         for (auto& x : t)
           if (x.name == "model.layers.1.mlp.down_proj.qweight") {
             x.shape = {2, 2};
             x.data = junk;
           }
       },
       "model.layers.1.mlp.down_proj.qweight' has shape (2, 2)"},
      {"missing", Fmt::Awq, json::object(),
       [](std::vector<TensorToWrite>& t) {
         std::erase_if(t, [](const TensorToWrite& x) { return x.name == "model.layers.0.self_attn.k_proj.qzeros"; });
       },
       "missing tensor 'model.layers.0.self_attn.k_proj.qzeros'"},
  };
  for (const Bad& b : bad) {
    const fs::path d = dir->path / ("bad-" + b.name);
    write_checkpoint(a, fp(), d, b.f, b.patch, b.mutate);
    const std::string e = error_of([&] { artifact_from_hf_quantized(d.string()); });
    EXPECT_NE(e.find(b.expect), std::string::npos) << b.name << ": " << e;
    // The CLI: one error line, exit 1, never a crash.
    const CliRun r = run_cli("ppl --model " + d.string() + " --data " + data_file() + " --ctx 64 --max-windows 1");
    EXPECT_EQ(r.status, 1) << b.name << ": " << r.err;
    EXPECT_NE(r.err.find("spear: error:"), std::string::npos) << b.name << ": " << r.err;
  }
  // A desc_act checkpoint with a permuted g_idx is refused naming the field.
  {
    const fs::path d = dir->path / "bad-desc-act";
    static std::vector<int32_t> perm;
    write_checkpoint(a, fp(), d, Fmt::GptqV1, {{"desc_act", true}}, [](std::vector<TensorToWrite>& t) {
      for (auto& x : t)
        if (x.name == "model.layers.0.mlp.up_proj.g_idx") {
          perm.assign(static_cast<const int32_t*>(x.data), static_cast<const int32_t*>(x.data) + x.shape[0]);
          std::swap(perm.front(), perm.back());
          x.data = perm.data();
        }
    });
    const std::string e = error_of([&] { artifact_from_hf_quantized(d.string()); });
    EXPECT_NE(e.find("model.layers.0.mlp.up_proj.g_idx[0]"), std::string::npos) << e;
  }
  // A truncated safetensors file.
  {
    const fs::path d = dir->path / "bad-truncated";
    write_checkpoint(a, fp(), d, Fmt::GptqV1);
    fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 1000);
    EXPECT_THROW(artifact_from_hf_quantized(d.string()), Error);
    const CliRun r = run_cli("generate --model " + d.string() + " --prompt hi -n 2");
    EXPECT_EQ(r.status, 1) << r.err;
  }
  // A full-precision directory where a quantized base is needed, and the other way round.
  EXPECT_NE(error_of([&] { load_quantized_base(fp().string()); }).find("full-precision"), std::string::npos);
  const fs::path d = dir->path / "gptq-for-fp";
  write_checkpoint(a, fp(), d, Fmt::GptqV1);
  const CliRun r = run_cli("quantize --model " + d.string() + " --out " + (dir->path / "x.spear").string());
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is a quantized checkpoint"), std::string::npos) << r.err;
}

// Random damage to every format's files: each load either converts or throws an error,
// never crashes or accepts a value spear's layout cannot hold.
TEST_F(HfQuantDir, RandomDamageIsAnErrorNeverACrash) {
  const SpearArtifact sym = rtn(64, true), asym = rtn(64, false);
  std::mt19937 rng(99);
  int loaded = 0, refused = 0;
  for (Fmt f : {Fmt::GptqV1, Fmt::GptqV2, Fmt::Awq, Fmt::Ct}) {
    const fs::path d = dir->path / ("damage-" + std::to_string(static_cast<int>(f)));
    write_checkpoint(f == Fmt::GptqV1 ? sym : asym, fp(), d, f);
    const std::string st = read_all(d / "model.safetensors"), cfg = read_all(d / "config.json");
    for (int it = 0; it < 60; ++it) {
      std::string s2 = st, c2 = cfg;
      if (it % 3 == 2) {
        // A quantization_config field replaced by a value of another type or range.
        json j = json::parse(cfg);
        json& q = j["quantization_config"];
        std::vector<std::string> keys;
        for (auto k = q.begin(); k != q.end(); ++k) keys.push_back(k.key());
        const json vals[] = {json("4"), json(-1), json(0), json(3), json(nullptr), json::array(), json::object(),
                             json(true), json(1 << 20), json("gptq_v3")};
        q[keys[rng() % keys.size()]] = vals[rng() % std::size(vals)];
        c2 = j.dump();
      } else {
        // A few bytes anywhere in the file, header included.
        for (int b = 0; b < 1 + static_cast<int>(rng() % 4); ++b) {
          const size_t at = (it % 3 == 0) ? rng() % std::min<size_t>(s2.size(), 4096) : rng() % s2.size();
          s2[at] = static_cast<char>(rng());
        }
      }
      write_all(d / "model.safetensors", s2);
      write_all(d / "config.json", c2);
      try {
        const SpearArtifact a = artifact_from_hf_quantized(d.string());
        validate_artifact(a, "damaged");  // what loaded is a valid base
        ++loaded;
      } catch (const std::exception& e) {
        EXPECT_GT(std::strlen(e.what()), 10u);
        ++refused;
      }
    }
  }
  std::printf("damaged checkpoints: %d loaded, %d refused\n", loaded, refused);
  EXPECT_GT(refused, 0);
  EXPECT_GT(loaded, 0);  // damage to codes (any nibble is a code) still loads
}

TEST_F(HfQuantDir, CalibrateOnImportedBaseThenExportPeftAndReload) {
  const SpearArtifact a = rtn(64, true);
  const fs::path gq = dir->path / "calib-gptq";
  write_checkpoint(a, fp(), gq, Fmt::GptqV1);
  const fs::path ec = dir->path / "ec.spear";
  CliRun r = run_cli("calibrate --model " + fp().string() + " --quantized " + gq.string() + " --calib " + data_file() +
                     " --calib-windows 4 --calib-ctx 64 --stat-windows 4 --report-windows 2 --probe-windows 1"
                     " --budget 0.05 --max-rank 8 --objective static --no-gate -q --out " + ec.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("cannot be verified"), std::string::npos) << r.err;
  const SpearArtifact cal = read_spear(ec.string());
  ASSERT_GT(cal.ec_count(), 0);
  expect_same_base(a, cal, "calibrated");

  // export: GPTQ base + LoRA adapter.
  const fs::path out = dir->path / "export";
  r = run_cli("export --model " + ec.string() + " --format peft --out " + out.string() + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json ej = json::parse(r.out);
  EXPECT_EQ(ej["checkpoint_format"], "gptq");
  EXPECT_EQ(ej["ec_modules"].get<int64_t>(), cal.ec_count());
  EXPECT_EQ(ej["max_scale_rel_change"].get<double>(), 0.0);  // the scales came from F16
  const json acfg = json::parse(read_all(out / "adapter" / "adapter_config.json"));
  EXPECT_EQ(acfg["peft_type"], "LORA");
  EXPECT_EQ(acfg["r"], acfg["lora_alpha"]);
  for (auto it = acfg["rank_pattern"].begin(); it != acfg["rank_pattern"].end(); ++it)
    EXPECT_EQ(it.value(), acfg["alpha_pattern"][it.key()]) << it.key();
  {
    std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open((out / "adapter" / "adapter_model.safetensors").string());
    EXPECT_EQ(static_cast<int64_t>(f->tensors().size()), 2 * cal.ec_count());
    for (const auto& t : f->tensors()) {
      EXPECT_EQ(t.name.rfind("base_model.model.model.layers.", 0), 0u) << t.name;
      EXPECT_TRUE(t.name.ends_with(".lora_A.weight") || t.name.ends_with(".lora_B.weight")) << t.name;
    }
  }
  // Re-load: the base bit for bit, the adapter as the same ECs.
  SpearArtifact back = artifact_from_hf_quantized(out.string());
  expect_same_base(cal, back, "exported");
  attach_peft_adapter(back, (out / "adapter").string());
  EXPECT_EQ(back.ec_count(), cal.ec_count());
  for (int64_t l = 0; l < cal.config().num_layers; ++l)
    for (Module m : kAllModules) {
      const auto& e0 = cal.at(l, m).ec;
      const auto& e1 = back.at(l, m).ec;
      ASSERT_EQ(e0.has_value(), e1.has_value()) << mprefix(l, m);
      if (!e0) continue;
      EXPECT_EQ(e0->A, e1->A);
      EXPECT_EQ(e0->B, e1->B);
    }
  // Same model, same perplexity: the re-loaded base + adapter against the .spear.
  const Tokenizer tok = Tokenizer::from_json(cal.tokenizer_json);
  const std::vector<int32_t> ids = tok.encode(read_all(data_file()).substr(0, 20000));
  PplOptions po;
  po.ctx = 64;
  po.max_windows = 3;
  const PplResult p0 = perplexity(*build_cpu_model(cal.weights), ids, po);
  const PplResult p1 = perplexity(*build_cpu_model(back.weights), ids, po);
  EXPECT_EQ(p0.ppl, p1.ppl);
  // The CLI loads the exported base too, and with --adapter scores as the .spear it came from.
  EXPECT_GT(ppl_of(out.string()), 0);
  EXPECT_EQ(ppl_of(out.string() + " --adapter " + (out / "adapter").string()), ppl_of(ec.string()));
  r = run_cli("ppl --model " + fp().string() + " --adapter " + (out / "adapter").string() + " --data " + data_file() +
              " --ctx 64 --max-windows 1");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("full-precision"), std::string::npos) << r.err;

  // A non-empty --out needs --force; a gated EC is refused.
  r = run_cli("export --model " + ec.string() + " --out " + out.string());
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  SpearArtifact gated = read_spear(ec.string());
  for (auto& L : gated.weights.layers)
    for (auto& m : L.modules)
      if (m.ec) {
        m.ec->gated = true;
        m.ec->G.assign(m.ec->rank * m.ec->rank, 0.0f);
        m.ec->c.assign(m.ec->rank, 0.0f);
      }
  PeftExportOptions eo;
  eo.overwrite = true;
  EXPECT_NO_THROW(export_gptq_peft(gated, out.string(), eo));  // G = 0, c = 0: γ ≡ 1
  for (auto& L : gated.weights.layers)
    for (auto& m : L.modules)
      if (m.ec) m.ec->c[0] = 0.5f;
  const std::string e = error_of([&] { export_gptq_peft(gated, out.string(), eo); });
  EXPECT_NE(e.find("gated EC"), std::string::npos) << e;
  eo.adapter = false;
  const PeftExportResult base_only = export_gptq_peft(gated, out.string(), eo);
  EXPECT_TRUE(base_only.adapter_dir.empty());
  EXPECT_FALSE(fs::exists(out / "adapter"));
}

TEST_F(HfQuantDir, ExportWritesV2WhenAZeroPointIsZeroAndRoundsF32Scales) {
  QuantizeOptions q;
  q.scheme.group = 64;
  q.verbose = false;
  SpearArtifact a = quantize_model(fp().string(), q);  // asymmetric, F32 scales
  a.quant(0, Module::Q).zeros[0] = 0;                   // force a zero point of 0
  const fs::path out = dir->path / "export-v2";
  PeftExportOptions eo;
  const PeftExportResult r = export_gptq_peft(a, out.string(), eo);
  EXPECT_EQ(r.checkpoint_format, "gptq_v2");
  EXPECT_GT(r.max_scale_rel_change, 0.0);
  EXPECT_LE(r.max_scale_rel_change, 1.0 / 2048);
  SpearArtifact back = artifact_from_hf_quantized(out.string());
  round_scales_to_f16(a);
  expect_same_base(a, back, "v2");
  // --scales f32 keeps them exact.
  SpearArtifact b = quantize_model(fp().string(), q);
  eo.overwrite = true;
  eo.scales_f32 = true;
  export_gptq_peft(b, out.string(), eo);
  expect_same_base(b, artifact_from_hf_quantized(out.string()), "f32 scales");
}

}  // namespace
