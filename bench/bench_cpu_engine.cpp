// CPU engine speed: prefill and decode tokens per second on a real checkpoint,
// against this machine's memory bandwidth measured in the same run.
//
//   build/bench/bench_cpu_engine [MODEL_DIR] [--prefill 512] [--decode 128] [--reps 5]
//
// Decode at batch 1 must read every weight once per token, so its floor is
// weight_bytes / bandwidth; the ratio printed says how close the engine gets.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <omp.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/llama.h"

using namespace spear;
using clk = std::chrono::steady_clock;

static double secs(clk::time_point a) { return std::chrono::duration<double>(clk::now() - a).count(); }
static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Best of a multi-threaded sum over 1 GiB (read) and a memcpy of 512 MiB (read+write).
static double measure_bandwidth() {
  const size_t n = (1u << 30) / sizeof(float);
  std::vector<float> a(n, 1.0f), b(n / 2);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t = clk::now();
    double s = 0;
#pragma omp parallel for reduction(+ : s)
    for (size_t i = 0; i < n; i += 16) {
      float acc = 0;
      for (int j = 0; j < 16; ++j) acc += a[i + j];
      s += acc;
    }
    double dt = secs(t);
    if (s < 0) std::printf("?");
    best = std::max(best, n * 4.0 / dt);
    t = clk::now();
#pragma omp parallel for
    for (int c = 0; c < 8; ++c)
      std::memcpy(&b[c * (n / 16)], &a[c * (n / 16)], n / 16 * sizeof(float));
    dt = secs(t);
    best = std::max(best, 2.0 * (n / 2) * 4.0 / dt);
  }
  return best;
}

int main(int argc, char** argv) {
  std::string dir = "../shared/models/mixlm-19m";
  int64_t prefill = 512, decode = 128, reps = 5;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--prefill" && i + 1 < argc) prefill = std::stoll(argv[++i]);
    else if (a == "--decode" && i + 1 < argc) decode = std::stoll(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::stoll(argv[++i]);
    else dir = a;
  }
  try {
    TensorStore store = TensorStore::open(dir);
    auto model = LlamaModel::load(dir);
    const ModelConfig& c = model->config();
    prefill = std::min(prefill, c.max_position_embeddings - decode);
    std::vector<int32_t> ids(prefill + decode);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);

    const double bw = measure_bandwidth();
    std::printf("model %s: %lld params, %d threads\n", dir.c_str(), (long long)c.num_parameters(),
                omp_get_max_threads());
    std::printf("memory mapped: %.1f MB (files)\n", store.mapped_bytes() / 1e6);
    std::printf("bandwidth ceiling (best of read / copy): %.2f GB/s\n", bw / 1e9);
    struct Result {
      double pre, dec;
    };
    auto measure = [&](const LlamaModel& m, const char* label) {
      std::vector<double> pre_t, dec_t;
      for (int64_t r = 0; r < reps; ++r) {
        ContiguousKVCache kv(c.num_layers, prefill + decode, c.kv_dim());
        auto t = clk::now();
        m.forward(ids.data(), prefill, kv, 0, false);
        pre_t.push_back(secs(t));
        t = clk::now();
        for (int64_t s = 0; s < decode; ++s) m.forward(&ids[prefill + s], 1, kv, prefill + s, false);
        dec_t.push_back(secs(t) / decode);
      }
      const double pre = median(pre_t), dec = median(dec_t);
      // Bytes a decode step must read: all resident weights (embedding: one row only)
      // plus the KV cache up to the mean position.
      const double emb = double(c.vocab_size) * c.hidden_size * 4;
      const double kv_bytes = 2.0 * c.num_layers * (prefill + decode / 2.0) * c.kv_dim() * 4;
      const double step_bytes = double(m.weight_bytes()) - emb + kv_bytes;
      std::printf("[%s] resident weights %.1f MB (linear layers: %s)\n", label, m.weight_bytes() / 1e6,
                  m.layer(0).at(Module::Q).kind().c_str());
      std::printf("[%s] prefill %lld tokens: median %.3f s = %.0f tok/s\n", label, (long long)prefill, pre,
                  prefill / pre);
      std::printf("[%s] decode at ctx %lld..%lld: median %.2f ms/token = %.1f tok/s\n", label, (long long)prefill,
                  (long long)(prefill + decode), dec * 1e3, 1.0 / dec);
      std::printf("[%s] decode bytes/token %.1f MB; floor %.2f ms; achieved %.2f GB/s = %.0f%% of ceiling\n",
                  label, step_bytes / 1e6, step_bytes / bw * 1e3, step_bytes / dec / 1e9,
                  100.0 * step_bytes / dec / bw);
      return Result{pre, dec};
    };
    const Result as_loaded = measure(*model, "as loaded");
    // Baseline in the same run: every linear layer widened to float32 storage.
    bool any16 = false;
    for (int64_t l = 0; l < c.num_layers; ++l)
      for (auto& mod : model->layer(l).modules)
        if (auto* d = dynamic_cast<DenseLinear*>(mod.get()); d && d->storage() != DenseLinear::Storage::F32) {
          mod = std::make_unique<DenseLinear>(d->out_features(), d->in_features(), d->to_f32());
          any16 = true;
        }
    if (any16) {
      const Result f32 = measure(*model, "f32 weights");
      std::printf("16-bit storage vs float32: prefill %.2fx, decode %.2fx faster\n", f32.pre / as_loaded.pre,
                  f32.dec / as_loaded.dec);
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_cpu_engine: %s\n", e.what());
    return 1;
  }
  return 0;
}
