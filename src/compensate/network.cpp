#include "compensate/network.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "model/linear.h"
#include "model/load_hf.h"
#include "quant/rtn.h"

namespace spear {

const char* site_name(Site s) {
  static const char* n[] = {"attn_in", "attn_out", "ffn_in", "down_in"};
  return n[static_cast<int>(s)];
}

int64_t site_width(const ModelConfig& c, Site s) {
  switch (s) {
    case Site::AttnOut: return c.q_dim();
    case Site::DownIn: return c.intermediate_size;
    default: return c.hidden_size;
  }
}

// ---- weights ------------------------------------------------------------------

Network Network::from_weights(const LlamaWeights& w) {
  Network n;
  n.cfg = w.config;
  n.embed = w.embed.to_f32();
  n.final_norm = w.final_norm.to_f32();
  n.head = w.head().to_f32();
  n.fp.resize(n.cfg.num_layers);
  for (int64_t l = 0; l < n.cfg.num_layers; ++l) {
    n.fp[l].attn_norm = w.layers[l].attn_norm.to_f32();
    n.fp[l].ffn_norm = w.layers[l].ffn_norm.to_f32();
    for (Module mod : kAllModules) {
      const ModuleWeights& mw = w.at(l, mod);
      SPEAR_CHECK(!mw.quantized(), "calibration needs a full-precision model directory");
      n.fp[l].W[mod] = mw.dense.to_f32();
    }
  }
  return n;
}

Network Network::load_fp(const std::string& dir) { return from_weights(load_hf_weights(dir)); }

void Network::set_quantized(const LlamaWeights& w) {
  const ModelConfig& c = w.config;
  SPEAR_CHECK(c.num_layers == cfg.num_layers && c.hidden_size == cfg.hidden_size &&
                  c.intermediate_size == cfg.intermediate_size && c.vocab_size == cfg.vocab_size &&
                  c.num_heads == cfg.num_heads && c.num_kv_heads == cfg.num_kv_heads,
              "the quantized artifact has a different architecture than the model");
  q.resize(cfg.num_layers);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    q[l].attn_norm = fp[l].attn_norm;
    q[l].ffn_norm = fp[l].ffn_norm;
    for (Module m : kAllModules) {
      const ModuleWeights& mw = w.at(l, m);
      SPEAR_CHECK(mw.quantized(), "the quantized artifact has a full-precision module");
      q[l].W[m] = dequantize(*mw.quant);
    }
  }
}

int64_t Network::module_out(Module m) const { return module_shape(cfg, m).out; }
int64_t Network::module_in(Module m) const { return module_shape(cfg, m).in; }

LayerView layer_view(const FrozenLayer& f) {
  LayerView v;
  v.norms = &f;
  for (Module m : kAllModules) v.W[m] = f.W[m].data();
  return v;
}

LayerView fp_view(const Network& n, int64_t l) { return layer_view(n.fp[l]); }

LayerView q_view(const Network& n, int64_t l, const std::vector<std::optional<ECParams>>* ecs) {
  SPEAR_CHECK(!n.q.empty(), "quantized weights not set");
  LayerView v;
  v.norms = &n.q[l];
  for (Module m : kAllModules) {
    v.W[m] = n.q[l].W[m].data();
    if (ecs && (*ecs)[module_index(l, m)]) v.ec[m] = &*(*ecs)[module_index(l, m)];
  }
  return v;
}

void ECGrad::zero_like(const ECParams& p) {
  A.assign(p.A.size(), 0.0f);
  B.assign(p.B.size(), 0.0f);
  G.assign(p.G.size(), 0.0f);
  c.assign(p.c.size(), 0.0f);
}

// ---- linear + EC ----------------------------------------------------------------

void linear_ec_forward(const float* W, const ECParams* ec, const float* x, int64_t M, int64_t in,
                       int64_t out, float* y, std::vector<float>* z_save,
                       std::vector<float>* gamma_save) {
  matmul_nt(x, W, y, M, in, out);
  if (!ec) return;
  const int64_t r = ec->rank;
  std::vector<float> z(M * r), s(M * r), gamma(M * r);  // (M, r)
  ec_codes(*ec, x, M, z.data(), s.data(), gamma.data());
  // y += s Bᵀ
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, out, r, 1.0f, s.data(), r, ec->B.data(),
              r, 1.0f, y, out);
  if (z_save) *z_save = std::move(z);
  if (gamma_save) *gamma_save = std::move(gamma);
}

void linear_ec_backward(const float* W, const ECParams* ec, const float* x, const float* dy,
                        int64_t M, int64_t in, int64_t out, const std::vector<float>* z,
                        const std::vector<float>* gamma, float* dx, bool accumulate, ECGrad* g) {
  // dx = dy W  (M, out)·(out, in)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, in, out, 1.0f, dy, out, W, in,
              accumulate ? 1.0f : 0.0f, dx, in);
  if (!ec) return;
  const int64_t r = ec->rank;
  const float* zz = z->data();
  const float* gg = gamma->data();
  // s = γ ⊙ z; dB += dyᵀ s; ds = dy B
  std::vector<float> s(M * r), ds(M * r), dz(M * r);  // (M, r)
  for (int64_t i = 0; i < M * r; ++i) s[i] = gg[i] * zz[i];
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, r, M, 1.0f, dy, out, s.data(), r, 1.0f,
              g->B.data(), r);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, r, out, 1.0f, dy, out, ec->B.data(), r,
              0.0f, ds.data(), r);
  if (ec->gated) {
    // γ = 1 + tanh(a), a = G z + c: da = ds ⊙ z ⊙ (1 - tanh²(a)); dz = ds ⊙ γ + da G.
    std::vector<float> da(M * r);  // (M, r)
    for (int64_t i = 0; i < M * r; ++i) {
      const float t = gg[i] - 1.0f;
      da[i] = ds[i] * zz[i] * (1.0f - t * t);
      dz[i] = ds[i] * gg[i];
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, r, M, 1.0f, da.data(), r, zz, r, 1.0f,
                g->G.data(), r);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < r; ++i) g->c[i] += da[m * r + i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, r, r, 1.0f, da.data(), r,
                ec->G.data(), r, 1.0f, dz.data(), r);
  } else {
    dz = ds;
  }
  // dA += dzᵀ x; dx += dz A
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, M, 1.0f, dz.data(), r, x, in, 1.0f,
              g->A.data(), in);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, in, r, 1.0f, dz.data(), r,
              ec->A.data(), in, 1.0f, dx, in);
}

// ---- kernels --------------------------------------------------------------------

namespace {

// y = x / sqrt(mean(x²) + eps) * w, as ops.cpp; rstd saved per row.
void rms_fwd(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t D,
             float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    const float* xr = x + t * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    rstd[t] = inv;
    for (int64_t i = 0; i < D; ++i) y[t * D + i] = w[i] * (xr[i] * inv);
  }
}

// dx += rstd·(dy⊙w) − x·rstd³/D·Σ(dy⊙w⊙x)
void rms_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx,
             int64_t rows, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    const float* xr = x + t * D;
    const float* dr = dy + t * D;
    double dot = 0;
    for (int64_t i = 0; i < D; ++i) dot += static_cast<double>(dr[i]) * w[i] * xr[i];
    const float r = rstd[t];
    const float k = static_cast<float>(dot) * r * r * r / static_cast<float>(D);
    for (int64_t i = 0; i < D; ++i) dx[t * D + i] += r * dr[i] * w[i] - xr[i] * k;
  }
}

}  // namespace

Runner::Runner(const Network& net) : net_(net), rope_(net.cfg.rope, net.cfg.head_dim) {
  rope_.reserve(net.cfg.max_position_embeddings);
}

void Runner::embed(const int32_t* tokens, int64_t rows, float* x) const {
  const int64_t D = net_.cfg.hidden_size;
  for (int64_t r = 0; r < rows; ++r) {
    SPEAR_CHECK(tokens[r] >= 0 && tokens[r] < net_.cfg.vocab_size, "token id outside the vocabulary");
    std::copy_n(&net_.embed[static_cast<int64_t>(tokens[r]) * D], D, x + r * D);
  }
}

void Runner::layer_forward(const LayerView& lv, int64_t layer, float* x, int64_t B, int64_t T,
                           LayerCache* cache, const SiteTap& tap) const {
  const ModelConfig& c = net_.cfg;
  const int64_t D = c.hidden_size, HD = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads,
                QD = c.q_dim(), KVD = c.kv_dim(), FF = c.intermediate_size, rows = B * T;
  const float eps = static_cast<float>(c.rms_norm_eps);
  LayerCache local;
  LayerCache& C = cache ? *cache : local;
  auto W = [&](Module m) { return lv.W[m]; };
  auto E = [&](Module m) { return lv.ec[m]; };
  auto zs = [&](Module m) { return cache ? &C.z[m] : nullptr; };
  auto gs = [&](Module m) { return cache ? &C.gamma[m] : nullptr; };

  C.x_in.assign(x, x + rows * D);
  C.rstd1.resize(rows);
  C.xn1.resize(rows * D);
  rms_fwd(x, lv.norms->attn_norm.data(), C.xn1.data(), C.rstd1.data(), rows, D, eps);
  if (tap) tap(Site::AttnIn, C.xn1.data(), rows, D);
  C.q.resize(rows * QD);
  C.k.resize(rows * KVD);
  C.v.resize(rows * KVD);
  linear_ec_forward(W(Module::Q), E(Module::Q), C.xn1.data(), rows, D, QD, C.q.data(), zs(Module::Q), gs(Module::Q));
  linear_ec_forward(W(Module::K), E(Module::K), C.xn1.data(), rows, D, KVD, C.k.data(), zs(Module::K), gs(Module::K));
  linear_ec_forward(W(Module::V), E(Module::V), C.xn1.data(), rows, D, KVD, C.v.data(), zs(Module::V), gs(Module::V));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    rope_.apply(&C.q[r * QD], NH, r % T);
    rope_.apply(&C.k[r * KVD], NKV, r % T);
  }
  // Causal attention per window and head; P (B, NH, T, T) kept for backward.
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  const int64_t group = NH / NKV;
  C.P.resize(B * NH * T * T);
  C.att.resize(rows * QD);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      float* P = &C.P[(b * NH + h) * T * T];
      const float* Qh = &C.q[b * T * QD + h * HD];
      const float* Kh = &C.k[b * T * KVD + (h / group) * HD];
      const float* Vh = &C.v[b * T * KVD + (h / group) * HD];
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, HD, scale, Qh, QD, Kh, KVD, 0.0f,
                  P, T);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < T; ++i) {
        float* p = P + i * T;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, p[j]);
        float s = 0.0f;
        for (int64_t j = 0; j <= i; ++j) {
          p[j] = std::exp(p[j] - mx);
          s += p[j];
        }
        const float inv = 1.0f / s;
        for (int64_t j = 0; j <= i; ++j) p[j] *= inv;
        for (int64_t j = i + 1; j < T; ++j) p[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, HD, T, 1.0f, P, T, Vh, KVD, 0.0f,
                  &C.att[b * T * QD + h * HD], QD);
    }
  if (tap) tap(Site::AttnOut, C.att.data(), rows, QD);
  std::vector<float> proj(rows * D);  // (rows, dim)
  linear_ec_forward(W(Module::O), E(Module::O), C.att.data(), rows, QD, D, proj.data(), zs(Module::O), gs(Module::O));
  for (int64_t i = 0; i < rows * D; ++i) x[i] += proj[i];
  C.x_mid.assign(x, x + rows * D);
  C.rstd2.resize(rows);
  C.xn2.resize(rows * D);
  rms_fwd(x, lv.norms->ffn_norm.data(), C.xn2.data(), C.rstd2.data(), rows, D, eps);
  if (tap) tap(Site::FfnIn, C.xn2.data(), rows, D);
  C.g.resize(rows * FF);
  C.u.resize(rows * FF);
  C.h.resize(rows * FF);
  linear_ec_forward(W(Module::Gate), E(Module::Gate), C.xn2.data(), rows, D, FF, C.g.data(), zs(Module::Gate), gs(Module::Gate));
  linear_ec_forward(W(Module::Up), E(Module::Up), C.xn2.data(), rows, D, FF, C.u.data(), zs(Module::Up), gs(Module::Up));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows * FF; ++i) {
    const float g = C.g[i];
    C.h[i] = g / (1.0f + std::exp(-g)) * C.u[i];
  }
  if (tap) tap(Site::DownIn, C.h.data(), rows, FF);
  linear_ec_forward(W(Module::Down), E(Module::Down), C.h.data(), rows, FF, D, proj.data(), zs(Module::Down), gs(Module::Down));
  for (int64_t i = 0; i < rows * D; ++i) x[i] += proj[i];
}

void Runner::layer_backward(const LayerView& lv, int64_t layer, const LayerCache& C, float* dx,
                            int64_t B, int64_t T, const PerModule<ECGrad*>& grads) const {
  const ModelConfig& c = net_.cfg;
  const int64_t D = c.hidden_size, HD = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads,
                QD = c.q_dim(), KVD = c.kv_dim(), FF = c.intermediate_size, rows = B * T;
  auto W = [&](Module m) { return lv.W[m]; };
  auto E = [&](Module m) { return lv.ec[m]; };
  auto G = [&](Module m) { return grads[m]; };
  auto bwd = [&](Module m, const float* xin, const float* dy, int64_t M, int64_t in, int64_t out,
                 float* dxin, bool acc) {
    const ECParams* ec = E(m);
    SPEAR_CHECK(!ec || G(m), "layer_backward: an EC without a gradient buffer");
    linear_ec_backward(W(m), ec, xin, dy, M, in, out, &C.z[m], &C.gamma[m], dxin, acc, G(m));
  };

  // --- SwiGLU block: x_out = x_mid + Down(silu(g) ⊙ u)
  std::vector<float> dh(rows * FF), dg(rows * FF), du(rows * FF);  // (rows, hidden)
  bwd(Module::Down, C.h.data(), dx, rows, FF, D, dh.data(), false);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows * FF; ++i) {
    const float g = C.g[i];
    const float sg = 1.0f / (1.0f + std::exp(-g));
    const float silu = g * sg;
    du[i] = dh[i] * silu;
    dg[i] = dh[i] * C.u[i] * (sg * (1.0f + g * (1.0f - sg)));
  }
  std::vector<float> dxn(rows * D);  // (rows, dim)
  bwd(Module::Gate, C.xn2.data(), dg.data(), rows, D, FF, dxn.data(), false);
  bwd(Module::Up, C.xn2.data(), du.data(), rows, D, FF, dxn.data(), true);
  // dx now holds d x_mid (residual) plus the norm's path.
  rms_bwd(C.x_mid.data(), lv.norms->ffn_norm.data(), C.rstd2.data(), dxn.data(), dx, rows, D);

  // --- attention block: x_mid = x_in + O(attn(rope(Q xn1), rope(K xn1), V xn1))
  std::vector<float> datt(rows * QD);  // (rows, q_dim)
  bwd(Module::O, C.att.data(), dx, rows, QD, D, datt.data(), false);
  std::vector<float> dq(rows * QD, 0.0f), dk(rows * KVD, 0.0f), dv(rows * KVD, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  const int64_t group = NH / NKV;
  std::vector<float> dP(T * T);  // (T, T)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const float* P = &C.P[(b * NH + h) * T * T];
      const float* Qh = &C.q[b * T * QD + h * HD];
      const float* Kh = &C.k[b * T * KVD + (h / group) * HD];
      const float* Vh = &C.v[b * T * KVD + (h / group) * HD];
      const float* dO = &datt[b * T * QD + h * HD];
      const float* O = &C.att[b * T * QD + h * HD];
      // dP = dO Vᵀ; dV += Pᵀ dO
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, HD, 1.0f, dO, QD, Vh, KVD, 0.0f,
                  dP.data(), T);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, 1.0f, P, T, dO, QD, 1.0f,
                  &dv[b * T * KVD + (h / group) * HD], KVD);
      // dS = P ⊙ (dP − rowsum(dO ⊙ O))
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < T; ++i) {
        float d = 0.0f;
        for (int64_t e = 0; e < HD; ++e) d += dO[i * QD + e] * O[i * QD + e];
        float* dpi = &dP[i * T];
        const float* pi = P + i * T;
        for (int64_t j = 0; j <= i; ++j) dpi[j] = pi[j] * (dpi[j] - d);
        for (int64_t j = i + 1; j < T; ++j) dpi[j] = 0.0f;
      }
      // dQ = scale dS K; dK += scale dSᵀ Q
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, HD, T, scale, dP.data(), T, Kh, KVD,
                  0.0f, &dq[b * T * QD + h * HD], QD);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, HD, T, scale, dP.data(), T, Qh, QD,
                  1.0f, &dk[b * T * KVD + (h / group) * HD], KVD);
    }
  // RoPE is a rotation: its backward is the inverse rotation R(−θ)(a, b), obtained from
  // the forward one as flip(R(θ)(a, −b)) with flip negating the second half.
  auto unrope = [&](float* v, int64_t heads, int64_t pos) {
    const int64_t half = HD / 2;
    for (int64_t hh = 0; hh < heads; ++hh)
      for (int64_t i = half; i < HD; ++i) v[hh * HD + i] = -v[hh * HD + i];
    rope_.apply(v, heads, pos);
    for (int64_t hh = 0; hh < heads; ++hh)
      for (int64_t i = half; i < HD; ++i) v[hh * HD + i] = -v[hh * HD + i];
  };
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    unrope(&dq[r * QD], NH, r % T);
    unrope(&dk[r * KVD], NKV, r % T);
  }
  bwd(Module::Q, C.xn1.data(), dq.data(), rows, D, QD, dxn.data(), false);
  bwd(Module::K, C.xn1.data(), dk.data(), rows, D, KVD, dxn.data(), true);
  bwd(Module::V, C.xn1.data(), dv.data(), rows, D, KVD, dxn.data(), true);
  rms_bwd(C.x_in.data(), lv.norms->attn_norm.data(), C.rstd1.data(), dxn.data(), dx, rows, D);
}

void Runner::head_forward(const float* x, int64_t rows, float* logits,
                          std::vector<float>* rstd) const {
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  std::vector<float> xf(rows * D), rs(rows);  // (rows, dim), (rows)
  rms_fwd(x, net_.final_norm.data(), xf.data(), rs.data(), rows, D,
          static_cast<float>(net_.cfg.rms_norm_eps));
  matmul_nt(xf.data(), net_.head.data(), logits, rows, D, V);
  if (rstd) *rstd = std::move(rs);
}

void Runner::head_backward(const float* x, const std::vector<float>& rstd, const float* dlogits,
                           int64_t rows, float* dx) const {
  const int64_t D = net_.cfg.hidden_size, V = net_.cfg.vocab_size;
  std::vector<float> dxf(rows * D);  // (rows, dim)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, V, 1.0f, dlogits, V,
              net_.head.data(), D, 0.0f, dxf.data(), D);
  std::fill_n(dx, rows * D, 0.0f);
  rms_bwd(x, net_.final_norm.data(), rstd.data(), dxf.data(), dx, rows, D);
}

void Runner::forward(const int32_t* tokens, int64_t B, int64_t T, bool quantized,
                     const std::vector<std::optional<ECParams>>* ecs, float* logits) const {
  const int64_t D = net_.cfg.hidden_size;
  std::vector<float> x(B * T * D);  // (rows, dim)
  embed(tokens, B * T, x.data());
  for (int64_t l = 0; l < net_.cfg.num_layers; ++l) {
    LayerView lv = quantized ? q_view(net_, l, ecs) : fp_view(net_, l);
    layer_forward(lv, l, x.data(), B, T, nullptr);
  }
  head_forward(x.data(), B * T, logits, nullptr);
}

}  // namespace spear
