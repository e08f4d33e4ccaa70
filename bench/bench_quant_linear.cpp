// The CPU W4 kernel (QuantLinear::forward, AVX2) against the plain reference kernel and
// against dequantize-then-sgemm, on mixlm-19m and Llama-2-7B layer shapes, per channel and
// per group of 128, for 1..32 rows. Median of repeated runs; ratios against the reference
// measured in the same run; "layer" is QuantizedLinearLayer::forward, which switches from the
// fast kernel to unpack-once + sgemm at kDequantizeMinRows rows: where that switch should be.
//   build/bench/bench_quant_linear [--reps N]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "model/linear.h"
#include "quant/quant_linear.h"
#include "quant/quantized_linear_layer.h"
#include "quant/rtn.h"

using namespace spear;
using clk = std::chrono::steady_clock;

template <class F>
double median_us(F&& f, int reps) {
  std::vector<double> t;
  f();  // warm-up
  for (int i = 0; i < reps; ++i) {
    auto t0 = clk::now();
    f();
    t.push_back(std::chrono::duration<double, std::micro>(clk::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  int reps = 15;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--reps" && i + 1 < argc) reps = std::stoi(argv[++i]);
  struct Shape {
    const char* name;
    int64_t N, K;
  };
  const Shape shapes[] = {{"mixlm gate (1024x384)", 1024, 384},
                          {"mixlm down (384x1024)", 384, 1024},
                          {"7B o (4096x4096)", 4096, 4096},
                          {"7B down (4096x11008)", 4096, 11008}};
  std::printf("threads %d; median of %d runs; µs per call\n\n", omp_get_max_threads(), reps);
  std::printf("| shape | scheme | M | reference | fast | fast speedup | layer |\n|---|---|---:|---:|---:|---:|---:|\n");
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  for (const Shape& s : shapes)
    for (int64_t group : {int64_t{-1}, int64_t{128}}) {
      std::vector<float> w(s.N * s.K);
      for (float& v : w) v = nd(rng) * 0.02f;
      QuantizedMatrix qm = quantize_rtn(w.data(), s.N, s.K, QuantScheme{4, group, false});
      QuantLinear q(qm);
      QuantizedLinearLayer layer(qm);  // from kDequantizeMinRows rows on: unpack once, sgemm
      for (int64_t M : {1, 4, 8, 16, 32}) {
        std::vector<float> x(M * s.K), y(M * s.N);
        for (float& v : x) v = nd(rng);
        const double ref = median_us([&] { q.forward_reference(x.data(), M, y.data()); }, reps);
        const double fast = median_us([&] { q.forward(x.data(), M, y.data()); }, reps);
        const double sg = median_us([&] { layer.forward(x.data(), M, y.data()); }, reps);
        std::printf("| %s | %s | %lld | %.0f | %.0f | %.2fx | %.0f |\n", s.name, q.w.scheme.name().c_str(),
                    (long long)M, ref, fast, ref / fast, sg);
      }
    }
  return 0;
}
