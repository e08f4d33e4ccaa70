#pragma once
// A training-mode Llama forward and backward over float32 weights, for calibration:
// the full-precision model and the quantized model (dequantized weights, the exact
// values QuantLinear computes with) side by side, with Error Compensators on any module
// of the quantized path. Only EC parameters get gradients; every other weight is frozen,
// so the backward pass computes input gradients (dX = dY·W) and EC gradients only.
//
// Batches are windows of T tokens each starting at position 0 (the perplexity
// protocol), rows = windows × T, attention causal inside each window.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/ec_layer.h"
#include "io/model_config.h"
#include "model/module.h"
#include "model/weights.h"
#include "model/rope.h"

namespace spear {

// The inputs of the seven modules come from four places in a layer.
using Site = ModuleInput;  // model/module.h
inline constexpr int kNumSites = kNumModuleInputs;
inline Site module_site(Module m) { return module_input(m); }
const char* site_name(Site s);
// The width of a site's inputs: q_dim (AttnOut), intermediate_size (DownIn), else hidden_size.
int64_t site_width(const ModelConfig& c, Site s);

struct FrozenLayer {
  std::vector<float> attn_norm, ffn_norm;  // (dim)
  PerModule<std::vector<float>> W;         // (out, in) per module
};

// Weights of both paths. The unquantized tensors (embeddings, norms, head) are shared.
struct Network {
  ModelConfig cfg;
  std::vector<float> embed;       // (vocab, dim)
  std::vector<float> final_norm;  // (dim)
  std::vector<float> head;        // (vocab, dim); a copy of embed when tied
  std::vector<FrozenLayer> fp;    // full precision
  std::vector<FrozenLayer> q;     // dequantized quantized weights (empty until set)

  // Full precision from the model description (every module dense), widened to float32.
  static Network from_weights(const LlamaWeights& w);
  // The same, loading a model directory.
  static Network load_fp(const std::string& dir);
  // Sets `q` from quantized weights (an artifact's): the dequantized values QuantLinear
  // computes with. Same architecture required (checked).
  void set_quantized(const LlamaWeights& w);
  int64_t module_out(Module m) const;
  int64_t module_in(Module m) const;
};

// Which weights a layer runs with: per module a weight matrix and optionally an EC.
struct LayerView {
  const FrozenLayer* norms = nullptr;  // attn_norm / ffn_norm
  PerModule<const float*> W;           // (out, in)
  PerModule<const ECParams*> ec;       // nullptr = no EC
};
// The weights of one FrozenLayer (no ECs).
LayerView layer_view(const FrozenLayer& f);
LayerView fp_view(const Network& n, int64_t l);
LayerView q_view(const Network& n, int64_t l, const std::vector<std::optional<ECParams>>* ecs);

// Gradients of one EC (same shapes as ECParams).
struct ECGrad {
  std::vector<float> A, B, G, c;
  void zero_like(const ECParams& p);
};

// Everything a layer's backward pass needs, saved by the forward pass.
struct LayerCache {
  std::vector<float> x_in, rstd1, xn1, q, k, v, P, att, x_mid, rstd2, xn2, g, u, h;
  // Per module with an EC: z = A x and γ, both (rows, r).
  PerModule<std::vector<float>> z, gamma;
};

// Called with the input of each site: (site, x (rows, cols)).
using SiteTap = std::function<void(Site, const float* x, int64_t rows, int64_t cols)>;

class Runner {
 public:
  explicit Runner(const Network& net);
  const Network& net() const { return net_; }

  // x (B*T, dim) = embeddings of tokens (B*T).
  void embed(const int32_t* tokens, int64_t rows, float* x) const;
  // One decoder layer in place on x (B*T, dim). cache: saved for backward (may be null).
  void layer_forward(const LayerView& lv, int64_t layer, float* x, int64_t B, int64_t T,
                     LayerCache* cache, const SiteTap& tap = nullptr) const;
  // Final norm and head: logits (rows, vocab). xf_out (rows, dim) and rstd (rows)
  // receive what head_backward needs (may be null).
  void head_forward(const float* x, int64_t rows, float* logits, std::vector<float>* rstd) const;
  // dx (rows, dim) in: dL/d(layer output); out: dL/d(layer input). grads: per module
  // with an EC, accumulated into (must be sized by zero_like).
  void layer_backward(const LayerView& lv, int64_t layer, const LayerCache& cache, float* dx,
                      int64_t B, int64_t T, const PerModule<ECGrad*>& grads) const;
  // dlogits (rows, vocab) -> dx (rows, dim), for the x given to head_forward.
  void head_backward(const float* x, const std::vector<float>& rstd, const float* dlogits,
                     int64_t rows, float* dx) const;
  // Whole model: logits (B*T, vocab).
  void forward(const int32_t* tokens, int64_t B, int64_t T, bool quantized,
               const std::vector<std::optional<ECParams>>* ecs, float* logits) const;

 private:
  const Network& net_;
  Rope rope_;
};

// y (M, out) = x (M, in) · Wᵀ + EC; saves z and γ when asked.
void linear_ec_forward(const float* W, const ECParams* ec, const float* x, int64_t M, int64_t in,
                       int64_t out, float* y, std::vector<float>* z_save,
                       std::vector<float>* gamma_save);
// dx (M, in) (+)= dy·W + EC input gradient; EC gradients accumulated into g.
void linear_ec_backward(const float* W, const ECParams* ec, const float* x, const float* dy,
                        int64_t M, int64_t in, int64_t out, const std::vector<float>* z,
                        const std::vector<float>* gamma, float* dx, bool accumulate, ECGrad* g);

}  // namespace spear
