#include "compensate/quantize_model.h"

#include <cblas.h>

#include <chrono>
#include <cstdio>

#include "compensate/network.h"
#include "core/error.h"
#include "core/linalg.h"
#include "quant/rtn.h"

namespace spear {

std::string_view quant_method_name(QuantMethod m) {
  switch (m) {
    case QuantMethod::Rtn: return "rtn";
    case QuantMethod::Gptq: return "gptq";
  }
  throw Error("quantize: invalid QuantMethod " + std::to_string(static_cast<int>(m)));
}

QuantMethod parse_quant_method(std::string_view s) {
  for (QuantMethod m : {QuantMethod::Rtn, QuantMethod::Gptq})
    if (s == quant_method_name(m)) return m;
  throw Error("unknown quantization method '" + std::string(s) + "' (accepted: rtn, gptq)");
}

SpearArtifact quantize_model(const std::string& dir, const QuantizeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  SPEAR_CHECK(opt.scheme.bits >= 2 && opt.scheme.bits <= 8, "quantize: --bits must be in 2..8");
  SpearArtifact a = artifact_from_model_dir(dir);
  const ModelConfig& c = a.config();
  for (Module m : kAllModules) {
    const int64_t K = module_shape(c, m).in;
    SPEAR_CHECK(opt.scheme.group <= 0 || opt.scheme.group <= K,
                "quantize: --group " + std::to_string(opt.scheme.group) + " exceeds the input size " +
                    std::to_string(K) + " of " + std::string(module_name(m)));
  }
  nlohmann::json qmeta{{"method", std::string(quant_method_name(opt.method))},
                       {"bits", opt.scheme.bits},
                       {"group", opt.scheme.group},
                       {"symmetric", opt.scheme.symmetric},
                       {"scheme", opt.scheme.name()}};
  // Each module's dense weight (a view of the mapped checkpoint) is replaced by its codes.
  auto set_quantized = [&](int64_t l, Module m, QuantizedMatrix q) {
    ModuleWeights& mw = a.at(l, m);
    mw.quant = std::move(q);
    mw.dense = WeightTensor{};
  };
  if (opt.method == QuantMethod::Rtn) {
    // One module widened to float32 at a time, its mapped pages dropped once read: host
    // memory is the codes so far plus a module, not the checkpoint.
    for (int64_t l = 0; l < c.num_layers; ++l)
      for (Module m : kAllModules) {
        const ModuleShape s = module_shape(c, m);
        const std::vector<float> W = a.at(l, m).dense.to_f32();
        a.at(l, m).dense.release();
        set_quantized(l, m, quantize_rtn(W.data(), s.out, s.in, opt.scheme));
      }
  } else {
    SPEAR_CHECK(opt.calib_ctx > 0 && !opt.calib_tokens.empty() &&
                    opt.calib_tokens.size() % opt.calib_ctx == 0,
                "quantize: gptq needs calibration windows (--calib FILE)");
    qmeta["damp"] = opt.gptq.damp;
    qmeta["act_order"] = opt.gptq.act_order;
    qmeta["calibration"] = opt.calib_meta;
    // Layer after layer: the Hessians of layer l come from running layer l in full
    // precision on the output of the already-quantized layers 0..l-1. One layer's float32
    // weights (full precision, then dequantized) are held at a time, its mapped pages
    // dropped once widened: host memory is the residual stream, a layer, its Hessians and
    // the codes so far, not the model in float32.
    const int64_t T = opt.calib_ctx, nw = static_cast<int64_t>(opt.calib_tokens.size()) / T,
                  D = c.hidden_size;
    Network net;  // config and embeddings only: the Runner reads its weights from LayerViews
    net.cfg = c;
    net.embed = a.weights.embed.to_f32();
    const Runner run(net);
    std::vector<float> x(nw * T * D);  // (windows*T, dim) quantized-path residual stream
    run.embed(opt.calib_tokens.data(), nw * T, x.data());
    std::vector<float>().swap(net.embed);
    a.weights.embed.release();
    for (int64_t l = 0; l < c.num_layers; ++l) {
      FrozenLayer fl, ql;  // layer l: full precision, then dequantized
      fl.attn_norm = a.weights.layers[l].attn_norm.to_f32();
      fl.ffn_norm = a.weights.layers[l].ffn_norm.to_f32();
      for (Module m : kAllModules) {
        fl.W[m] = a.at(l, m).dense.to_f32();
        a.at(l, m).dense.release();
      }
      std::vector<double> H[kNumSites];
      for (int s = 0; s < kNumSites; ++s) {
        const int64_t n = site_width(c, static_cast<Site>(s));
        H[s].assign(n * n, 0.0);
      }
      // H[s] += xᵀx of each window's inputs at site s, upper triangle only (mirrored below).
      std::vector<float> g;  // (cols, cols) one window's xᵀx at a site, upper triangle (overwritten)
      SiteTap tap = [&](Site s, const float* xs, int64_t rows, int64_t cols) {
        if (static_cast<int64_t>(g.size()) < cols * cols) g.resize(cols * cols);
        {
          const BlasThreadsScope blas;
          cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, cols, rows, 1.0f, xs, cols, 0.0f, g.data(), cols);
        }
        double* h = H[static_cast<int>(s)].data();
#pragma omp parallel for schedule(dynamic, 64)
        for (int64_t i = 0; i < cols; ++i)
          for (int64_t j = i; j < cols; ++j) h[i * cols + j] += g[i * cols + j];
      };
      const LayerView fv = layer_view(fl);
      for (int64_t w = 0; w < nw; ++w) {
        std::vector<float> xw(x.begin() + w * T * D, x.begin() + (w + 1) * T * D);
        run.layer_forward(fv, l, xw.data(), 1, T, nullptr, tap);
      }
      ql.attn_norm = fl.attn_norm;
      ql.ffn_norm = fl.ffn_norm;
      // One factor of each site's Hessian, shared by the modules that read that site.
      for (int s = 0; s < kNumSites; ++s) {
        const int64_t n = site_width(c, static_cast<Site>(s));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < i; ++j) H[s][i * n + j] = H[s][j * n + i];
        const GptqFactor f = gptq_factor(H[s], n, opt.gptq);
        std::vector<double>().swap(H[s]);
        for (Module m : kAllModules) {
          if (static_cast<int>(module_site(m)) != s) continue;
          set_quantized(l, m, quantize_gptq(fl.W[m].data(), net.module_out(m), net.module_in(m), opt.scheme,
                                            f, opt.gptq));
          std::vector<float>().swap(fl.W[m]);
          ql.W[m] = dequantize(*a.at(l, m).quant);
        }
      }
      const LayerView qv = layer_view(ql);
      for (int64_t w = 0; w < nw; ++w)
        run.layer_forward(qv, l, &x[w * T * D], 1, T, nullptr);
      if (opt.verbose) {
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "gptq: layer %lld/%lld done, %.0f s, ETA %.0f s\n", (long long)l + 1,
                     (long long)c.num_layers, el, el / static_cast<double>(l + 1) * static_cast<double>(c.num_layers - l - 1));
      }
    }
  }
  qmeta["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  a.meta["quantizer"] = qmeta;
  return a;
}

}  // namespace spear
