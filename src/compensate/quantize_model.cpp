#include "compensate/quantize_model.h"

#include <cblas.h>

#include <chrono>
#include <cstdio>

#include "compensate/network.h"
#include "core/error.h"
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
    Network net = Network::from_weights(a.weights);
    SPEAR_CHECK(opt.calib_ctx > 0 && !opt.calib_tokens.empty() &&
                    opt.calib_tokens.size() % opt.calib_ctx == 0,
                "quantize: gptq needs calibration windows (--calib FILE)");
    qmeta["damp"] = opt.gptq.damp;
    qmeta["act_order"] = opt.gptq.act_order;
    qmeta["calibration"] = opt.calib_meta;
    // Layer after layer: the Hessians of layer l come from running layer l in full
    // precision on the output of the already-quantized layers 0..l-1.
    const int64_t T = opt.calib_ctx, nw = static_cast<int64_t>(opt.calib_tokens.size()) / T,
                  D = c.hidden_size;
    net.q.resize(c.num_layers);
    Runner run(net);
    std::vector<float> x(nw * T * D);  // (windows*T, dim) quantized-path residual stream
    run.embed(opt.calib_tokens.data(), nw * T, x.data());
    for (int64_t l = 0; l < c.num_layers; ++l) {
      std::vector<double> H[kNumSites];
      for (int s = 0; s < kNumSites; ++s) {
        const int64_t n = s == static_cast<int>(Site::AttnOut) ? c.q_dim()
                          : s == static_cast<int>(Site::DownIn) ? c.intermediate_size : D;
        H[s].assign(n * n, 0.0);
      }
      SiteTap tap = [&](Site s, const float* xs, int64_t rows, int64_t cols) {
        std::vector<float> g(cols * cols);  // (cols, cols) xᵀx of this window
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, cols, cols, rows, 1.0f, xs, cols, xs,
                    cols, 0.0f, g.data(), cols);
        for (int64_t i = 0; i < cols * cols; ++i) H[static_cast<int>(s)][i] += g[i];
      };
      LayerView fv = fp_view(net, l);
      for (int64_t w = 0; w < nw; ++w) {
        std::vector<float> xw(x.begin() + w * T * D, x.begin() + (w + 1) * T * D);
        run.layer_forward(fv, l, xw.data(), 1, T, nullptr, tap);
      }
      net.q[l].attn_norm = net.fp[l].attn_norm;
      net.q[l].ffn_norm = net.fp[l].ffn_norm;
      for (Module m : kAllModules) {
        const std::vector<float>& W = net.fp[l].W[m];
        set_quantized(l, m, quantize_gptq(W.data(), net.module_out(m), net.module_in(m), opt.scheme,
                                          H[static_cast<int>(module_site(m))], opt.gptq));
        net.q[l].W[m] = dequantize(*a.at(l, m).quant);
      }
      LayerView qv = q_view(net, l, nullptr);
      for (int64_t w = 0; w < nw; ++w)
        run.layer_forward(qv, l, &x[w * T * D], 1, T, nullptr);
      if (opt.verbose) std::fprintf(stderr, "gptq: layer %lld/%lld done\n", (long long)l + 1, (long long)c.num_layers);
    }
  }
  qmeta["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  a.meta["quantizer"] = qmeta;
  return a;
}

}  // namespace spear
