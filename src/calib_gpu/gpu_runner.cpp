#include "calib_gpu/gpu_runner.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "calib_gpu/calib_backward.h"
#include "calib_gpu/calib_kernels.h"
#include "calib_gpu/dev_buf.h"
#include "calib_gpu/gpu_grad.h"
#include "calib_gpu/gpu_static.h"
#include "calib_gpu/static_kernels.h"
#include "core/error.h"
#include "model/rope.h"

namespace spear::calib_gpu {

namespace {

// One decoder layer's weights on the device (one path).
struct DevLayer {
  int64_t layer = -1;          // which layer it holds (streaming slot), -1: none
  DevBuf attn_norm, ffn_norm;  // (dim)
  DevBuf W[kNumModules];       // (out, in) per module
};

struct GpuActs final : ForwardBackend::Acts {
  DevBuf x;  // (rows, dim)
};

struct GpuTargets final : ForwardBackend::WindowTargets {
  DevBuf logp;                     // (T, vocab) FP log-probabilities (Recompute)
  std::optional<TargetWindow> host;  // Dense / TopK: the host targets
};

int64_t layer_floats(const ModelConfig& c) {
  int64_t n = 2 * c.hidden_size;
  for (Module m : kAllModules) n += module_shape(c, m).out * module_shape(c, m).in;
  return n;
}

}  // namespace

bool gpu_calib_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    cudaGetLastError();
    return false;
  }
  return true;
}

// The device pointers a layer runs with, resolved from a LayerView.
struct LayerDev {
  const float* W[kNumModules] = {};  // (out, in) device per module
  const float* attn_norm = nullptr;  // (dim) device
  const float* ffn_norm = nullptr;   // (dim) device
};

struct GpuRunner::Impl {
  const Network* net = nullptr;
  bool resident = false;
  cudaStream_t st = nullptr;
  cublasHandle_t blas = nullptr;
  DevBuf embed, head, final_norm;  // (vocab, dim), (vocab, dim), (dim)
  DevBuf cos, sin;                 // (max_pos, head_dim/2)
  int64_t rope_positions = 0;
  std::vector<DevLayer> fp, q;     // resident: one per layer; streamed: one slot each
  DevLayer foreign;                // host matrices of a LayerView that are not the Network's
  GpuECSet view_ecs;               // (7) the host ECs of a LayerView, uploaded per call
  // One layer's activations, rows = B*T of the largest call: what layer_forward computes
  // and (recomputed) what layer_backward reads.
  DevBuf xn1, xn2;    // (rows, dim) normed inputs of the attention and SwiGLU blocks
  DevBuf qb, kb, vb;  // (rows, q_dim), (rows, kv_dim), (rows, kv_dim), after RoPE
  DevBuf att;         // (rows, q_dim) attention output
  DevBuf xmid;        // (rows, dim) residual stream between the blocks (backward only)
  DevBuf proj;        // (rows, dim) O / Down output before the residual add
  DevBuf g, u, h;     // (rows, hidden) gate, up, h = silu(g) ⊙ u
  DevBuf z[kNumModules], gam[kNumModules], s[kNumModules];  // (rows, r) per EC: A x, γ, γ ⊙ z
  DevBuf a;           // (rows, r) gate pre-activation z Gᵀ (forward scratch)
  // Backward scratch.
  DevBuf xw;          // (rows, dim) the recomputed layer's stream
  DevBuf dh, dg, du;  // (rows, hidden)
  DevBuf dxn;         // (rows, dim) gradient of a norm's output
  DevBuf datt;        // (rows, q_dim)
  DevBuf dq, dk, dv;  // (rows, q_dim), (rows, kv_dim), (rows, kv_dim)
  DevBuf astats;      // (B*NH*T, 3) attention row statistics
  DevBuf ds, da, dz;  // (rows, r) one EC's code gradients
  DevBuf dxf;         // (rows, dim) gradient of the final-normed hidden states
  // Head, targets and whole-model forward.
  DevBuf xf;        // (rows, dim) final-normed hidden states
  DevBuf logits;    // (rows, vocab)
  DevBuf klrow;     // (rows) double
  DevBuf tokens;    // (rows) int32
  DevBuf xfwd;      // (rows, dim) forward()'s stream
  DevBuf nll_tok;   // (T) int32 window_nll's tokens
  // The static control (made on first use).
  std::unique_ptr<GpuStatic> statics;
  DevWhitening wh;                // the site being fitted
  DevBuf fsite[kNumSites];        // (T, width) one window's FP site inputs (layer_moments)

  const GpuStatic& static_control() {
    if (!statics) statics = std::make_unique<GpuStatic>(blas, st);
    return *statics;
  }
  // Module `s`'s input in the last layer_fwd: (rows, site_width).
  const float* site_input(Site s) const {
    switch (s) {
      case Site::AttnIn: return xn1.f();
      case Site::AttnOut: return att.f();
      case Site::FfnIn: return xn2.f();
      case Site::DownIn: return h.f();
    }
    throw Error("GPU calibration: invalid site");
  }

  // Row-major C (M, N) = alpha · op(A) · op(B) + beta · C (gemm_rm, SGEMM).
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) const {
    gemm_rm(blas, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  // C (M, N) = X (M, K) · Wᵀ, W (N, K), all row-major; beta 0 or 1 (accumulate into C).
  void gemm_nt(const float* X, const float* W, float* C, int64_t M, int64_t K, int64_t N,
               float beta) const {
    gemm(false, true, M, N, K, 1.0f, X, K, W, K, beta, C, N);
  }

  // The device copy of layer l of one path, loaded into the streaming slot if needed.
  DevLayer& path_layer(bool quantized, int64_t l) {
    std::vector<DevLayer>& v = quantized ? q : fp;
    const std::vector<FrozenLayer>& hst = quantized ? net->q : net->fp;
    if (resident) return v[l];
    DevLayer& d = v[0];
    if (d.layer != l) {
      d.layer = l;
      const int64_t D = net->cfg.hidden_size;
      upload(d.attn_norm, hst[l].attn_norm.data(), D, st);
      upload(d.ffn_norm, hst[l].ffn_norm.data(), D, st);
      for (Module m : kAllModules)
        upload(d.W[static_cast<int>(m)], hst[l].W[m].data(), static_cast<int64_t>(hst[l].W[m].size()), st);
    }
    return d;
  }

  // lv's pointers on the device: the Network's own matrices (fp or q of layer l) from
  // their device copies, any other host matrix uploaded into `foreign` for this call.
  LayerDev resolve(const LayerView& lv, int64_t l) {
    const ModelConfig& c = net->cfg;
    LayerDev r;
    for (Module m : kAllModules) {
      const float* p = lv.W[m];
      const int mi = static_cast<int>(m);
      if (p == net->fp[l].W[m].data()) {
        r.W[mi] = path_layer(false, l).W[mi].f();
      } else if (!net->q.empty() && p == net->q[l].W[m].data()) {
        r.W[mi] = path_layer(true, l).W[mi].f();
      } else {
        const ModuleShape sh = module_shape(c, m);
        upload(foreign.W[mi], p, sh.out * sh.in, st);
        r.W[mi] = foreign.W[mi].f();
      }
    }
    const FrozenLayer* n = lv.norms;
    if (n == &net->fp[l]) {
      r.attn_norm = path_layer(false, l).attn_norm.f();
      r.ffn_norm = path_layer(false, l).ffn_norm.f();
    } else if (!net->q.empty() && n == &net->q[l]) {
      r.attn_norm = path_layer(true, l).attn_norm.f();
      r.ffn_norm = path_layer(true, l).ffn_norm.f();
    } else {
      upload(foreign.attn_norm, n->attn_norm.data(), c.hidden_size, st);
      upload(foreign.ffn_norm, n->ffn_norm.data(), c.hidden_size, st);
      r.attn_norm = foreign.attn_norm.f();
      r.ffn_norm = foreign.ffn_norm.f();
    }
    return r;
  }

  // lv's host ECs on the device (view_ecs), per module.
  PerModule<const DevEC*> view_ec_ptrs(const LayerView& lv) {
    std::vector<const ECParams*> p(kNumModules);
    for (Module m : kAllModules) p[static_cast<size_t>(m)] = lv.ec[m];
    view_ecs.upload(p, st, /*with_grads=*/false);
    return view_ecs.params(0);
  }

  // y (rows, out) = xin (rows, in) · Wᵀ + EC; the EC's z, γ and s = γ ⊙ z are kept in the
  // module's buffers.
  void linear_fwd(Module m, const float* W, const DevEC* ec, const float* xin, int64_t rows, int64_t in,
                  int64_t out, float* y) {
    gemm_nt(xin, W, y, rows, in, out, 0.0f);
    if (!ec) return;
    SPEAR_CHECK(ec->in == in && ec->out == out, "GPU calibration: an EC does not match its module");
    const int mi = static_cast<int>(m);
    const int64_t r = ec->rank;
    float* zz = z[mi].floats(rows * r);
    gemm_nt(xin, ec->A, zz, rows, in, r, 0.0f);  // z = x Aᵀ
    const float* sv = zz;
    if (ec->gated) {
      float* aa = a.floats(rows * r);
      gemm_nt(zz, ec->G, aa, rows, r, r, 0.0f);  // a = z Gᵀ
      float* so = s[mi].floats(rows * r);
      cuda_ok(ec_gate(zz, aa, ec->c, so, gam[mi].floats(rows * r), rows, r, st), "ec_gate");
      sv = so;
    }
    gemm_nt(sv, ec->B, y, rows, r, out, 1.0f);  // y += s Bᵀ
  }

  // One decoder layer in place on x (B*T, dim); save_mid: also keep the residual stream
  // between the blocks (xmid), which only the backward reads.
  void layer_fwd(const LayerDev& w, const PerModule<const DevEC*>& ecs, float* x, int64_t B, int64_t T,
                 bool save_mid) {
    const ModelConfig& c = net->cfg;
    const int64_t D = c.hidden_size, HD = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads,
                  QD = c.q_dim(), KVD = c.kv_dim(), FF = c.intermediate_size, rows = B * T;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto W = [&](Module m) { return w.W[static_cast<int>(m)]; };
    float* xn_a = xn1.floats(rows * D);
    float* xn_f = xn2.floats(rows * D);
    float* qq = qb.floats(rows * QD);
    float* kk = kb.floats(rows * KVD);
    float* vv = vb.floats(rows * KVD);
    float* at = att.floats(rows * QD);
    float* pr = proj.floats(rows * D);
    float* gg = g.floats(rows * FF);
    float* uu = u.floats(rows * FF);
    float* hh = h.floats(rows * FF);
    // Attention block: x += O(attn(rope(Q xn), rope(K xn), V xn)), xn = rmsnorm(x).
    cuda_ok(rmsnorm_rows(x, w.attn_norm, xn_a, rows, D, eps, st), "rmsnorm");
    linear_fwd(Module::Q, W(Module::Q), ecs[Module::Q], xn_a, rows, D, QD, qq);
    linear_fwd(Module::K, W(Module::K), ecs[Module::K], xn_a, rows, D, KVD, kk);
    linear_fwd(Module::V, W(Module::V), ecs[Module::V], xn_a, rows, D, KVD, vv);
    cuda_ok(rope_rows(qq, rows, NH, HD, T, cos.f(), sin.f(), st), "rope q");
    cuda_ok(rope_rows(kk, rows, NKV, HD, T, cos.f(), sin.f(), st), "rope k");
    const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
    cuda_ok(causal_attention(qq, kk, vv, at, B, T, NH, NKV, HD, scale, st), "attention");
    linear_fwd(Module::O, W(Module::O), ecs[Module::O], at, rows, QD, D, pr);
    cuda_ok(add_inplace(x, pr, rows * D, st), "residual");
    if (save_mid)
      cuda_ok(cudaMemcpyAsync(xmid.floats(rows * D), x, rows * D * sizeof(float), cudaMemcpyDeviceToDevice, st),
              "save residual");
    // SwiGLU block: x += Down(silu(Gate xn) ⊙ Up xn), xn = rmsnorm(x).
    cuda_ok(rmsnorm_rows(x, w.ffn_norm, xn_f, rows, D, eps, st), "rmsnorm");
    linear_fwd(Module::Gate, W(Module::Gate), ecs[Module::Gate], xn_f, rows, D, FF, gg);
    linear_fwd(Module::Up, W(Module::Up), ecs[Module::Up], xn_f, rows, D, FF, uu);
    cuda_ok(swiglu(gg, uu, hh, rows * FF, st), "swiglu");
    linear_fwd(Module::Down, W(Module::Down), ecs[Module::Down], hh, rows, FF, D, pr);
    cuda_ok(add_inplace(x, pr, rows * D, st), "residual");
  }

  // linear_ec_backward on the device, the EC's z, γ, s from the last layer_fwd:
  // dxin (rows, in) (+)= dy·W + the EC's input gradient; EC gradients accumulated into gr.
  void linear_bwd(Module m, const float* W, const DevEC* ec, const DevECGrad* gr, const float* xin,
                  const float* dy, int64_t rows, int64_t in, int64_t out, float* dxin, bool accumulate) {
    gemm(false, false, rows, in, out, 1.0f, dy, out, W, in, accumulate ? 1.0f : 0.0f, dxin, in);  // dx = dy W
    if (!ec) return;
    SPEAR_CHECK(gr, "GPU calibration: layer_backward: an EC without a gradient buffer");
    const int mi = static_cast<int>(m);
    const int64_t r = ec->rank;
    const float* zz = z[mi].f();                       // (rows, r)
    const float* sv = ec->gated ? s[mi].f() : zz;      // (rows, r) γ ⊙ z
    gemm(true, false, out, r, rows, 1.0f, dy, out, sv, r, 1.0f, gr->B, r);       // dB += dyᵀ s
    float* dss = ds.floats(rows * r);
    gemm(false, false, rows, r, out, 1.0f, dy, out, ec->B, r, 0.0f, dss, r);     // ds = dy B
    const float* dzz = dss;
    if (ec->gated) {
      float* daa = da.floats(rows * r);
      float* dzo = dz.floats(rows * r);
      cuda_ok(ec_gate_backward(dss, zz, gam[mi].f(), daa, dzo, rows, r, st), "ec gate backward");
      gemm(true, false, r, r, rows, 1.0f, daa, r, zz, r, 1.0f, gr->G, r);        // dG += daᵀ z
      cuda_ok(col_sum_add(daa, gr->c, rows, r, st), "ec dc");                    // dc += Σ da
      gemm(false, false, rows, r, r, 1.0f, daa, r, ec->G, r, 1.0f, dzo, r);      // dz += da G
      dzz = dzo;
    }
    gemm(true, false, r, in, rows, 1.0f, dzz, r, xin, in, 1.0f, gr->A, in);      // dA += dzᵀ x
    gemm(false, false, rows, in, r, 1.0f, dzz, r, ec->A, in, 1.0f, dxin, in);    // dx += dz A
  }

  // Runner::layer_backward, the layer's internals recomputed from x_in.
  void layer_bwd(const LayerDev& w, const PerModule<const DevEC*>& ecs, const PerModule<const DevECGrad*>& grads,
                 const float* x_in, float* dx, int64_t B, int64_t T) {
    const ModelConfig& c = net->cfg;
    const int64_t D = c.hidden_size, HD = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads,
                  QD = c.q_dim(), KVD = c.kv_dim(), FF = c.intermediate_size, rows = B * T;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto W = [&](Module m) { return w.W[static_cast<int>(m)]; };
    float* x = xw.floats(rows * D);
    cuda_ok(cudaMemcpyAsync(x, x_in, rows * D * sizeof(float), cudaMemcpyDeviceToDevice, st), "copy layer input");
    layer_fwd(w, ecs, x, B, T, /*save_mid=*/true);
    float* dhh = dh.floats(rows * FF);
    float* dgg = dg.floats(rows * FF);
    float* duu = du.floats(rows * FF);
    float* dxx = dxn.floats(rows * D);
    float* dat = datt.floats(rows * QD);
    float* dqq = dq.floats(rows * QD);
    float* dkk = dk.floats(rows * KVD);
    float* dvv = dv.floats(rows * KVD);
    auto bwd = [&](Module m, const float* xin, const float* dy, int64_t in, int64_t out, float* dxin, bool acc) {
      linear_bwd(m, W(m), ecs[m], grads[m], xin, dy, rows, in, out, dxin, acc);
    };
    // SwiGLU block: x_out = x_mid + Down(silu(g) ⊙ u).
    bwd(Module::Down, h.f(), dx, FF, D, dhh, false);
    cuda_ok(swiglu_backward(g.f(), u.f(), dhh, dgg, duu, rows * FF, st), "swiglu backward");
    bwd(Module::Gate, xn2.f(), dgg, D, FF, dxx, false);
    bwd(Module::Up, xn2.f(), duu, D, FF, dxx, true);
    cuda_ok(rmsnorm_backward_rows(xmid.f(), w.ffn_norm, dxx, dx, rows, D, eps, true, st), "rmsnorm backward");
    // Attention block: x_mid = x_in + O(attn(rope(Q xn1), rope(K xn1), V xn1)).
    bwd(Module::O, att.f(), dx, QD, D, dat, false);
    const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
    cuda_ok(causal_attention_backward(qb.f(), kb.f(), vb.f(), att.f(), dat, dqq, dkk, dvv,
                                      astats.floats(rows * NH * 3), B, T, NH, NKV, HD, scale, st),
            "attention backward");
    cuda_ok(rope_backward_rows(dqq, rows, NH, HD, T, cos.f(), sin.f(), st), "rope backward q");
    cuda_ok(rope_backward_rows(dkk, rows, NKV, HD, T, cos.f(), sin.f(), st), "rope backward k");
    bwd(Module::Q, xn1.f(), dqq, D, QD, dxx, false);
    bwd(Module::K, xn1.f(), dkk, D, KVD, dxx, true);
    bwd(Module::V, xn1.f(), dvv, D, KVD, dxx, true);
    cuda_ok(rmsnorm_backward_rows(x_in, w.attn_norm, dxx, dx, rows, D, eps, true, st), "rmsnorm backward");
  }
};

GpuRunner::GpuRunner(const Network& net, int device, double weight_fraction)
    : net_(net), im_(std::make_unique<Impl>()) {
  std::string why;
  SPEAR_CHECK(gpu_calib_available(&why), "--device cuda: no usable CUDA device (" + why + ")");
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  blas_ok(cublasCreate(&im_->blas), "create");
  blas_ok(cublasSetStream(im_->blas, stream_), "set stream");
  im_->net = &net_;
  im_->st = stream_;
  // Plain fp32 SGEMM: no TF32 tensor cores (they would cost ~1e-3 relative).
  blas_ok(cublasSetMathMode(im_->blas, CUBLAS_DEFAULT_MATH), "set math mode");
  const ModelConfig& c = net.cfg;
  SPEAR_CHECK(c.head_dim % 2 == 0 && c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0,
              "GPU calibration: unsupported attention shape");
  upload(im_->embed, net.embed.data(), static_cast<int64_t>(net.embed.size()), stream_);
  upload(im_->head, net.head.data(), static_cast<int64_t>(net.head.size()), stream_);
  upload(im_->final_norm, net.final_norm.data(), static_cast<int64_t>(net.final_norm.size()), stream_);
  // RoPE tables exactly as the CPU Rope's cache (model/rope.h).
  const int64_t half = c.head_dim / 2;
  im_->rope_positions = c.max_position_embeddings;
  std::vector<float> cs(im_->rope_positions * half), sn(im_->rope_positions * half);  // (pos, HD/2)
  rope_cos_sin(rope_inv_freq(c.rope, c.head_dim), 0, im_->rope_positions, cs.data(), sn.data());
  upload(im_->cos, cs.data(), static_cast<int64_t>(cs.size()), stream_);
  upload(im_->sin, sn.data(), static_cast<int64_t>(sn.size()), stream_);
  // Layer weights: resident when both paths fit, else one streamed layer per path.
  const int64_t paths = net.q.empty() ? 1 : 2;
  const int64_t need = paths * c.num_layers * layer_floats(c) * static_cast<int64_t>(sizeof(float));
  size_t free_b = 0, total_b = 0;
  cuda_ok(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  resident_ = static_cast<double>(need) <= weight_fraction * static_cast<double>(free_b);
  im_->resident = resident_;
  const int64_t slots = resident_ ? c.num_layers : 1;
  im_->fp.resize(slots);
  im_->q.resize(net.q.empty() ? 0 : slots);
  weight_bytes_ = paths * slots * layer_floats(c) * static_cast<int64_t>(sizeof(float));
  if (resident_) {
    auto load = [&](DevLayer& d, const FrozenLayer& h, int64_t l) {
      d.layer = l;
      upload(d.attn_norm, h.attn_norm.data(), static_cast<int64_t>(h.attn_norm.size()), stream_);
      upload(d.ffn_norm, h.ffn_norm.data(), static_cast<int64_t>(h.ffn_norm.size()), stream_);
      for (Module m : kAllModules)
        upload(d.W[static_cast<int>(m)], h.W[m].data(), static_cast<int64_t>(h.W[m].size()), stream_);
    };
    for (int64_t l = 0; l < c.num_layers; ++l) {
      load(im_->fp[l], net.fp[l], l);
      if (!net.q.empty()) load(im_->q[l], net.q[l], l);
    }
  }
  cuda_ok(cudaStreamSynchronize(stream_), "weight upload");
}

GpuRunner::~GpuRunner() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (im_ && im_->blas) cublasDestroy(im_->blas);
  im_.reset();  // frees the buffers before the stream goes
  if (stream_) cudaStreamDestroy(stream_);
}

void GpuRunner::embed_dev(const int32_t* tokens, int64_t rows, float* x) const {
  const ModelConfig& c = net_.cfg;
  for (int64_t r = 0; r < rows; ++r)
    SPEAR_CHECK(tokens[r] >= 0 && tokens[r] < c.vocab_size, "token id outside the vocabulary");
  im_->tokens.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * sizeof(int32_t));
  // The tokens buffer is reused: wait for the kernels that may still read it.
  cuda_ok(cudaStreamSynchronize(stream_), "sync");
  cuda_ok(cudaMemcpyAsync(im_->tokens.i(), tokens, rows * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
          "token upload");
  cuda_ok(embed_rows(im_->embed.f(), im_->tokens.i(), x, rows, c.hidden_size, stream_), "embed");
}

void GpuRunner::layer_forward_dev(const LayerView& lv, int64_t l, float* x, int64_t B, int64_t T) const {
  layer_forward_dev(lv, l, im_->view_ec_ptrs(lv), x, B, T);
}

void GpuRunner::layer_forward_dev(const LayerView& lv, int64_t l, const PerModule<const DevEC*>& ecs, float* x,
                                  int64_t B, int64_t T) const {
  const ModelConfig& c = net_.cfg;
  SPEAR_CHECK(l >= 0 && l < c.num_layers, "GPU calibration: layer out of range");
  SPEAR_CHECK(T <= im_->rope_positions, "GPU calibration: window longer than the model's context");
  if (B * T == 0) return;
  // The EC and foreign-weight buffers are refilled by the next call from pageable host
  // memory in stream order; nothing else to wait for here.
  im_->layer_fwd(im_->resolve(lv, l), ecs, x, B, T, /*save_mid=*/false);
}

void GpuRunner::layer_backward_dev(const LayerView& lv, int64_t l, const PerModule<const DevEC*>& ecs,
                                   const float* x_in, float* dx, int64_t B, int64_t T,
                                   const PerModule<const DevECGrad*>& grads) const {
  const ModelConfig& c = net_.cfg;
  SPEAR_CHECK(l >= 0 && l < c.num_layers, "GPU calibration: layer out of range");
  SPEAR_CHECK(T <= im_->rope_positions, "GPU calibration: window longer than the model's context");
  SPEAR_CHECK(c.head_dim <= 256, "GPU calibration: the attention backward supports head_dim <= 256, not " +
                                     std::to_string(c.head_dim));
  if (B * T == 0) return;
  im_->layer_bwd(im_->resolve(lv, l), ecs, grads, x_in, dx, B, T);
}

void GpuRunner::head_backward_dev(const float* x, const float* dlogits, int64_t rows, float* dx) const {
  const ModelConfig& c = net_.cfg;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  if (rows == 0) return;
  float* dxf = im_->dxf.floats(rows * D);  // (rows, dim)
  im_->gemm(false, false, rows, D, V, 1.0f, dlogits, V, im_->head.f(), D, 0.0f, dxf, D);  // dlogits · head
  cuda_ok(rmsnorm_backward_rows(x, im_->final_norm.f(), dxf, dx, rows, D, static_cast<float>(c.rms_norm_eps),
                                false, stream_),
          "final norm backward");
}

void GpuRunner::kl_grad_rows_dev(const float* logits, const float* ref_logp, int64_t rows, float scale,
                                 double* kl, float* dlogits) const {
  cuda_ok(kl_grad_rows(logits, ref_logp, kl, dlogits, scale, rows, net_.cfg.vocab_size, stream_), "kl_grad_rows");
}

void GpuRunner::head_forward_dev(const float* x, int64_t rows, float* logits) const {
  const ModelConfig& c = net_.cfg;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  im_->xf.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * D * sizeof(float));
  cuda_ok(rmsnorm_rows(x, im_->final_norm.f(), im_->xf.f(), rows, D, static_cast<float>(c.rms_norm_eps),
                       stream_),
          "final norm");
  im_->gemm_nt(im_->xf.f(), im_->head.f(), logits, rows, D, V, 0.0f);
}

void GpuRunner::kl_rows_dev(const float* logits, const float* ref_logp, int64_t rows, double* kl) const {
  cuda_ok(kl_rows(logits, ref_logp, kl, rows, net_.cfg.vocab_size, stream_), "kl_rows");
}

void GpuRunner::log_softmax_dev(float* logits, int64_t rows) const {
  cuda_ok(log_softmax_rows(logits, logits, rows, net_.cfg.vocab_size, stream_), "log_softmax");
}

void GpuRunner::forward(const int32_t* tokens, int64_t B, int64_t T, bool quantized,
                        const std::vector<std::optional<ECParams>>* ecs, float* logits) const {
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size, rows = B * T;
  im_->xfwd.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * D * sizeof(float));
  im_->logits.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * V * sizeof(float));
  embed_dev(tokens, rows, im_->xfwd.f());
  for (int64_t l = 0; l < net_.cfg.num_layers; ++l)
    layer_forward_dev(quantized ? q_view(net_, l, ecs) : fp_view(net_, l), l, im_->xfwd.f(), B, T);
  head_forward_dev(im_->xfwd.f(), rows, im_->logits.f());
  cuda_ok(cudaMemcpyAsync(logits, im_->logits.f(), rows * V * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "logits download");
  cuda_ok(cudaStreamSynchronize(stream_), "forward");
}

// ---- ForwardBackend -----------------------------------------------------------------

namespace {
GpuActs& gpu(const ForwardBackend::Acts& a) {
  auto* p = dynamic_cast<const GpuActs*>(&a);
  SPEAR_CHECK(p, "GpuRunner: activations of another backend");
  return const_cast<GpuActs&>(*p);
}
}  // namespace

std::unique_ptr<ForwardBackend::Acts> GpuRunner::embed(const int32_t* tokens, int64_t rows) const {
  auto a = std::make_unique<GpuActs>();
  a->rows = rows;
  a->x.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * net_.cfg.hidden_size * sizeof(float));
  embed_dev(tokens, rows, a->x.f());
  return a;
}

std::unique_ptr<ForwardBackend::Acts> GpuRunner::copy_rows(const Acts& x, int64_t row0, int64_t rows) const {
  const GpuActs& s = gpu(x);
  SPEAR_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= s.rows, "GpuRunner: rows out of range");
  const int64_t D = net_.cfg.hidden_size;
  auto a = std::make_unique<GpuActs>();
  a->rows = rows;
  a->x.ensure(static_cast<size_t>(std::max<int64_t>(rows, 1)) * D * sizeof(float));
  if (rows)
    cuda_ok(cudaMemcpyAsync(a->x.f(), s.x.f() + row0 * D, rows * D * sizeof(float), cudaMemcpyDeviceToDevice,
                            stream_),
            "copy rows");
  return a;
}

void GpuRunner::layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                              int64_t T) const {
  GpuActs& a = gpu(x);
  SPEAR_CHECK(row0 >= 0 && row0 + B * T <= a.rows, "GpuRunner: rows out of range");
  layer_forward_dev(lv, layer, a.x.f() + row0 * net_.cfg.hidden_size, B, T);
}

std::unique_ptr<ForwardBackend::WindowTargets> GpuRunner::window_targets(const CalibData& data,
                                                                         const TeacherTargets& targets,
                                                                         int64_t w) const {
  SPEAR_CHECK(w >= 0 && w < data.windows, "GpuRunner: window out of range");
  auto t = std::make_unique<GpuTargets>();
  if (targets.mode() != TargetMode::Recompute) {
    t->host.emplace(targets.window(w));
    return t;
  }
  // Recompute on the device: FP forward of the window, log-softmax in place.
  const int64_t T = data.ctx, D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  DevBuf x;  // (T, dim)
  x.ensure(static_cast<size_t>(T) * D * sizeof(float));
  t->logp.ensure(static_cast<size_t>(T) * V * sizeof(float));
  embed_dev(data.window(w), T, x.f());
  for (int64_t l = 0; l < net_.cfg.num_layers; ++l) layer_forward_dev(fp_view(net_, l), l, x.f(), 1, T);
  head_forward_dev(x.f(), T, t->logp.f());
  log_softmax_dev(t->logp.f(), T);
  cuda_ok(cudaStreamSynchronize(stream_), "teacher targets");  // before x is freed
  return t;
}

double GpuRunner::window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const {
  const GpuActs& a = gpu(x);
  const auto* gt = dynamic_cast<const GpuTargets*>(&t);
  SPEAR_CHECK(gt, "GpuRunner: targets of another backend");
  SPEAR_CHECK(row0 >= 0 && row0 + T <= a.rows, "GpuRunner: rows out of range");
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  im_->logits.ensure(static_cast<size_t>(std::max<int64_t>(T, 1)) * V * sizeof(float));
  head_forward_dev(a.x.f() + row0 * D, T, im_->logits.f());
  if (gt->host) {
    std::vector<float> logits(T * V);  // (T, V)
    cuda_ok(cudaMemcpyAsync(logits.data(), im_->logits.f(), T * V * sizeof(float), cudaMemcpyDeviceToHost,
                            stream_),
            "logits download");
    cuda_ok(cudaStreamSynchronize(stream_), "window_kl");
    return gt->host->kl(logits.data(), 0.0f, nullptr);
  }
  im_->klrow.ensure(static_cast<size_t>(std::max<int64_t>(T, 1)) * sizeof(double));
  kl_rows_dev(im_->logits.f(), gt->logp.f(), T, im_->klrow.d());
  std::vector<double> kl(T);  // (T)
  cuda_ok(cudaMemcpyAsync(kl.data(), im_->klrow.d(), T * sizeof(double), cudaMemcpyDeviceToHost, stream_),
          "kl download");
  cuda_ok(cudaStreamSynchronize(stream_), "window_kl");
  double s = 0;
  for (double v : kl) s += v;
  return s;
}

double GpuRunner::window_kl_backward_dev(const float* x, int64_t T, const WindowTargets& t, float scale,
                                         float* dx) const {
  const auto* gt = dynamic_cast<const GpuTargets*>(&t);
  SPEAR_CHECK(gt, "GpuRunner: targets of another backend");
  const int64_t V = net_.cfg.vocab_size;
  float* logits = im_->logits.floats(T * V);  // (T, V) logits, then scale · dKL/dlogits in place
  head_forward_dev(x, T, logits);
  double kl = 0;
  if (gt->host) {
    std::vector<float> h(T * V);  // (T, V) host logits, then their gradient
    cuda_ok(cudaMemcpyAsync(h.data(), logits, T * V * sizeof(float), cudaMemcpyDeviceToHost, stream_),
            "logits download");
    cuda_ok(cudaStreamSynchronize(stream_), "window_kl_backward");
    kl = gt->host->kl(h.data(), scale, h.data());
    cuda_ok(cudaMemcpyAsync(logits, h.data(), T * V * sizeof(float), cudaMemcpyHostToDevice, stream_),
            "dlogits upload");
    head_backward_dev(x, logits, T, dx);
    cuda_ok(cudaStreamSynchronize(stream_), "window_kl_backward");  // before h goes
    return kl;
  }
  im_->klrow.ensure(static_cast<size_t>(std::max<int64_t>(T, 1)) * sizeof(double));
  double* klr = im_->klrow.d();  // (T)
  kl_grad_rows_dev(logits, gt->logp.f(), T, scale, klr, logits);
  head_backward_dev(x, logits, T, dx);
  std::vector<double> kr(T);  // (T)
  cuda_ok(cudaMemcpyAsync(kr.data(), klr, T * sizeof(double), cudaMemcpyDeviceToHost, stream_), "kl download");
  cuda_ok(cudaStreamSynchronize(stream_), "window_kl_backward");
  for (double v : kr) kl += v;
  return kl;
}

void GpuRunner::layer_backward(const LayerView& lv, int64_t layer, const float* x_in, float* dx, int64_t B,
                               int64_t T, const PerModule<ECGrad*>& grads) const {
  const int64_t n = B * T * net_.cfg.hidden_size;
  DevBuf xd, dxd;  // (B*T, dim) each
  upload(xd, x_in, n, stream_);
  upload(dxd, dx, n, stream_);
  std::vector<const ECParams*> p(kNumModules);
  for (Module m : kAllModules) {
    p[static_cast<size_t>(m)] = lv.ec[m];
    SPEAR_CHECK(!lv.ec[m] || grads[m], "GpuRunner::layer_backward: an EC without a gradient buffer");
  }
  GpuECSet set;
  set.upload(p, stream_, /*with_grads=*/true);
  layer_backward_dev(lv, layer, set.params(0), xd.f(), dxd.f(), B, T, set.grads(0));
  cuda_ok(cudaMemcpyAsync(dx, dxd.f(), n * sizeof(float), cudaMemcpyDeviceToHost, stream_), "dx download");
  std::vector<ECGrad> g(kNumModules);
  set.download_grads(g, stream_);  // synchronizes
  for (Module m : kAllModules) {
    if (!lv.ec[m]) continue;
    ECGrad& out = *grads[m];
    const ECGrad& got = g[static_cast<size_t>(m)];
    auto add = [](std::vector<float>& to, const std::vector<float>& from) {
      SPEAR_CHECK(to.size() == from.size(), "GpuRunner::layer_backward: a gradient buffer not sized by zero_like");
      for (size_t i = 0; i < to.size(); ++i) to[i] += from[i];
    };
    add(out.A, got.A);
    add(out.B, got.B);
    add(out.G, got.G);
    add(out.c, got.c);
  }
}

void GpuRunner::head_backward(const float* x, const float* dlogits, int64_t rows, float* dx) const {
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  DevBuf xd, dld, dxd;  // (rows, dim), (rows, vocab), (rows, dim)
  upload(xd, x, rows * D, stream_);
  upload(dld, dlogits, rows * V, stream_);
  head_backward_dev(xd.f(), dld.f(), rows, dxd.floats(rows * D));
  cuda_ok(cudaMemcpyAsync(dx, dxd.f(), rows * D * sizeof(float), cudaMemcpyDeviceToHost, stream_), "dx download");
  cuda_ok(cudaStreamSynchronize(stream_), "head_backward");
}

double GpuRunner::window_nll(const Acts& x, int64_t row0, int64_t T, const int32_t* tokens) const {
  const GpuActs& a = gpu(x);
  SPEAR_CHECK(row0 >= 0 && row0 + T <= a.rows, "GpuRunner: rows out of range");
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  for (int64_t t = 0; t < T; ++t)
    SPEAR_CHECK(tokens[t] >= 0 && tokens[t] < V, "token id outside the vocabulary");
  float* logp = im_->logits.floats(T * V);  // (T, V) logits, then log-probabilities
  head_forward_dev(a.x.f() + row0 * D, T, logp);
  log_softmax_dev(logp, T);
  im_->nll_tok.ensure(static_cast<size_t>(std::max<int64_t>(T, 1)) * sizeof(int32_t));
  cuda_ok(cudaMemcpyAsync(im_->nll_tok.i(), tokens, T * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
          "token upload");
  double* out = im_->klrow.doubles(1);
  cuda_ok(next_token_nll(logp, im_->nll_tok.i(), T, V, out, stream_), "next_token_nll");
  double nll = 0;
  cuda_ok(cudaMemcpyAsync(&nll, out, sizeof(double), cudaMemcpyDeviceToHost, stream_), "nll download");
  cuda_ok(cudaStreamSynchronize(stream_), "window_nll");
  return nll;
}

namespace {
struct GpuMoments final : ForwardBackend::Moments {
  DevSiteStats st[kNumSites];
};
}  // namespace

std::unique_ptr<ForwardBackend::Moments> GpuRunner::layer_moments(
    int64_t l, Acts& xf_a, Acts& xq_a, int64_t nw, int64_t T, const std::vector<std::optional<ECParams>>* ecs,
    unsigned sites) const {
  GpuActs& xf = gpu(xf_a);
  GpuActs& xq = gpu(xq_a);
  SPEAR_CHECK(nw * T <= xf.rows && nw * T <= xq.rows, "GpuRunner: rows out of range");
  SPEAR_CHECK(!net_.q.empty(), "GpuRunner: the static control needs the quantized path");
  const int64_t D = net_.cfg.hidden_size;
  const GpuStatic& gs = im_->static_control();
  auto mo = std::make_unique<GpuMoments>();
  mo->sites = sites;
  auto each_site = [&](auto&& fn) {
    for (int s = 0; s < kNumSites; ++s)
      if (sites & (1u << s)) fn(static_cast<Site>(s), s);
  };
  each_site([&](Site s, int si) { gs.reset(mo->st[si], site_width(net_.cfg, s)); });
  const LayerView fv = fp_view(net_, l), qv = q_view(net_, l, ecs);
  for (int64_t w = 0; w < nw; ++w) {
    layer_forward_dev(fv, l, xf.x.f() + w * T * D, 1, T);
    each_site([&](Site s, int si) {  // keep the FP inputs: the quantized pass reuses the buffers
      const int64_t n = T * site_width(net_.cfg, s);
      cuda_ok(cudaMemcpyAsync(im_->fsite[si].floats(n), im_->site_input(s), n * sizeof(float),
                              cudaMemcpyDeviceToDevice, stream_),
              "keep site input");
    });
    layer_forward_dev(qv, l, xq.x.f() + w * T * D, 1, T);
    each_site([&](Site s, int si) { gs.add(mo->st[si], im_->fsite[si].f(), im_->site_input(s), T); });
  }
  mo->tokens = nw * T;
  return mo;
}

std::vector<StaticFit> GpuRunner::fit_site(const Moments& mo, int64_t l, Site s,
                                           const std::vector<std::pair<Module, int64_t>>& mods, double damp,
                                           StaticMode mode) const {
  const auto* gm = dynamic_cast<const GpuMoments*>(&mo);
  SPEAR_CHECK(gm, "GpuRunner: moments of another backend");
  const int si = static_cast<int>(s);
  SPEAR_CHECK(mo.sites & (1u << si), "GpuRunner: no moments at this site");
  SPEAR_CHECK(!net_.q.empty(), "GpuRunner: the static control needs the quantized path");
  const GpuStatic& gs = im_->static_control();
  std::vector<StaticFit> fits;
  if (mods.empty()) return fits;
  gs.whiten(gm->st[si], damp, im_->wh);
  for (const auto& [m, rank] : mods) {
    SPEAR_CHECK(module_site(m) == s, "GpuRunner: a module of another site");
    const int mi = static_cast<int>(m);
    // Both slots stay valid together: fp and q have one streaming slot each.
    const float* W = im_->path_layer(false, l).W[mi].f();
    const float* Q = im_->path_layer(true, l).W[mi].f();
    fits.push_back(gs.fit(W, Q, net_.module_out(m), net_.module_in(m), gm->st[si], im_->wh, rank, mode));
  }
  return fits;
}

std::unique_ptr<GradBackend> GpuRunner::gradients() const { return std::make_unique<GpuGrad>(*this); }

ForwardFactory gpu_forward_factory() {
  return [](const Network& n) -> std::unique_ptr<ForwardBackend> { return std::make_unique<GpuRunner>(n); };
}

}  // namespace spear::calib_gpu
