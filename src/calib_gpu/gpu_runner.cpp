#include "calib_gpu/gpu_runner.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "calib_gpu/calib_kernels.h"
#include "core/error.h"
#include "model/rope.h"

namespace spear::calib_gpu {

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(std::string("GPU calibration: ") + what + ": " + cudaGetErrorString(e));
}

void blas_ok(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("GPU calibration: cuBLAS ") + what + " failed (status " +
                std::to_string(static_cast<int>(s)) + ")");
}

// A device allocation, grown on demand (contents are not kept when it grows).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  void ensure(size_t bytes) {
    if (bytes <= bytes_) return;
    if (p_) cuda_ok(cudaFree(p_), "cudaFree");
    p_ = nullptr;
    bytes_ = 0;
    cuda_ok(cudaMalloc(&p_, bytes), ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
    bytes_ = bytes;
  }
  float* f() const { return static_cast<float*>(p_); }
  double* d() const { return static_cast<double*>(p_); }
  int32_t* i() const { return static_cast<int32_t*>(p_); }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Copies n floats of host memory into buf (grown to hold them), in stream order.
void upload(DevBuf& buf, const float* host, int64_t n, cudaStream_t s) {
  buf.ensure(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float));
  if (n) cuda_ok(cudaMemcpyAsync(buf.f(), host, n * sizeof(float), cudaMemcpyHostToDevice, s), "upload");
}

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

struct GpuRunner::Impl {
  cublasHandle_t blas = nullptr;
  DevBuf embed, head, final_norm;  // (vocab, dim), (vocab, dim), (dim)
  DevBuf cos, sin;                 // (max_pos, head_dim/2)
  int64_t rope_positions = 0;
  std::vector<DevLayer> fp, q;     // resident: one per layer; streamed: one slot each
  DevLayer foreign;                // host matrices of a LayerView that are not the Network's
  // Scratch of one layer_forward, rows = B*T of the largest call.
  DevBuf xn;        // (rows, dim) normed input of a block
  DevBuf qb, kb, vb;  // (rows, q_dim), (rows, kv_dim), (rows, kv_dim)
  DevBuf att;       // (rows, q_dim)
  DevBuf proj;      // (rows, dim) O / Down output before the residual add
  DevBuf g, u;      // (rows, hidden) gate / up, h = silu(g) ⊙ u in g
  DevBuf ecA, ecB, ecG, ecc;  // one EC's (r, in), (out, r), (r, r), (r)
  DevBuf z, a, s;   // (rows, r) EC codes, gate pre-activation, γ ⊙ z
  // Head, targets and whole-model forward.
  DevBuf xf;        // (rows, dim) final-normed hidden states
  DevBuf logits;    // (rows, vocab)
  DevBuf klrow;     // (rows) double
  DevBuf tokens;    // (rows) int32
  DevBuf xfwd;      // (rows, dim) forward()'s stream

  // C (M, N) = X (M, K) · Wᵀ, W (N, K), all row-major; beta 0 or 1 (accumulate into C).
  void gemm_nt(const float* X, const float* W, float* C, int64_t M, int64_t K, int64_t N,
               float beta) const {
    const float one = 1.0f;
    // Column-major view: Cᵀ (N, M) = W (col-major K×N, transposed) · Xᵀ (col-major K×M).
    blas_ok(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
                        static_cast<int>(K), &one, W, static_cast<int>(K), X, static_cast<int>(K),
                        &beta, C, static_cast<int>(N)),
            "sgemm");
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
  const ModelConfig& c = net_.cfg;
  const int64_t D = c.hidden_size, HD = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads,
                QD = c.q_dim(), KVD = c.kv_dim(), FF = c.intermediate_size, rows = B * T;
  SPEAR_CHECK(l >= 0 && l < c.num_layers, "GPU calibration: layer out of range");
  SPEAR_CHECK(T <= im_->rope_positions, "GPU calibration: window longer than the model's context");
  if (rows == 0) return;
  Impl& I = *im_;
  const cudaStream_t st = stream_;
  const size_t F = sizeof(float);

  // The device copy of the layer of one path, loaded into the streaming slot if needed.
  auto path_layer = [&](bool quantized) -> DevLayer& {
    std::vector<DevLayer>& v = quantized ? I.q : I.fp;
    const std::vector<FrozenLayer>& h = quantized ? net_.q : net_.fp;
    if (resident_) return v[l];
    DevLayer& d = v[0];
    if (d.layer != l) {
      d.layer = l;
      upload(d.attn_norm, h[l].attn_norm.data(), D, st);
      upload(d.ffn_norm, h[l].ffn_norm.data(), D, st);
      for (Module m : kAllModules)
        upload(d.W[static_cast<int>(m)], h[l].W[m].data(), static_cast<int64_t>(h[l].W[m].size()), st);
    }
    return d;
  };
  auto weight = [&](Module m) -> const float* {
    const float* p = lv.W[m];
    if (p == net_.fp[l].W[m].data()) return path_layer(false).W[static_cast<int>(m)].f();
    if (!net_.q.empty() && p == net_.q[l].W[m].data()) return path_layer(true).W[static_cast<int>(m)].f();
    const ModuleShape sh = module_shape(c, m);
    upload(I.foreign.W[static_cast<int>(m)], p, sh.out * sh.in, st);
    return I.foreign.W[static_cast<int>(m)].f();
  };
  auto norm = [&](bool ffn) -> const float* {
    const FrozenLayer* n = lv.norms;
    if (n == &net_.fp[l]) return ffn ? path_layer(false).ffn_norm.f() : path_layer(false).attn_norm.f();
    if (!net_.q.empty() && n == &net_.q[l])
      return ffn ? path_layer(true).ffn_norm.f() : path_layer(true).attn_norm.f();
    DevBuf& b = ffn ? I.foreign.ffn_norm : I.foreign.attn_norm;
    upload(b, ffn ? n->ffn_norm.data() : n->attn_norm.data(), D, st);
    return b.f();
  };
  // y (rows, out) = xin (rows, in) · Wᵀ + EC.
  auto linear = [&](Module m, const float* xin, int64_t in, int64_t out, float* y) {
    I.gemm_nt(xin, weight(m), y, rows, in, out, 0.0f);
    const ECParams* ec = lv.ec[m];
    if (!ec) return;
    SPEAR_CHECK(ec->in == in && ec->out == out, "GPU calibration: an EC does not match its module");
    const int64_t r = ec->rank;
    upload(I.ecA, ec->A.data(), r * in, st);
    upload(I.ecB, ec->B.data(), out * r, st);
    I.z.ensure(rows * r * F);
    I.gemm_nt(xin, I.ecA.f(), I.z.f(), rows, in, r, 0.0f);  // z = x Aᵀ
    const float* s = I.z.f();
    if (ec->gated) {
      upload(I.ecG, ec->G.data(), r * r, st);
      upload(I.ecc, ec->c.data(), r, st);
      I.a.ensure(rows * r * F);
      I.s.ensure(rows * r * F);
      I.gemm_nt(I.z.f(), I.ecG.f(), I.a.f(), rows, r, r, 0.0f);  // a = z Gᵀ
      cuda_ok(ec_gate(I.z.f(), I.a.f(), I.ecc.f(), I.s.f(), nullptr, rows, r, st), "ec_gate");
      s = I.s.f();
    }
    I.gemm_nt(s, I.ecB.f(), y, rows, r, out, 1.0f);  // y += s Bᵀ
  };

  I.xn.ensure(rows * D * F);
  I.qb.ensure(rows * QD * F);
  I.kb.ensure(rows * KVD * F);
  I.vb.ensure(rows * KVD * F);
  I.att.ensure(rows * QD * F);
  I.proj.ensure(rows * D * F);
  I.g.ensure(rows * FF * F);
  I.u.ensure(rows * FF * F);
  const float eps = static_cast<float>(c.rms_norm_eps);

  // Attention block: x += O(attn(rope(Q xn), rope(K xn), V xn)), xn = rmsnorm(x).
  cuda_ok(rmsnorm_rows(x, norm(false), I.xn.f(), rows, D, eps, st), "rmsnorm");
  linear(Module::Q, I.xn.f(), D, QD, I.qb.f());
  linear(Module::K, I.xn.f(), D, KVD, I.kb.f());
  linear(Module::V, I.xn.f(), D, KVD, I.vb.f());
  cuda_ok(rope_rows(I.qb.f(), rows, NH, HD, T, I.cos.f(), I.sin.f(), st), "rope q");
  cuda_ok(rope_rows(I.kb.f(), rows, NKV, HD, T, I.cos.f(), I.sin.f(), st), "rope k");
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  cuda_ok(causal_attention(I.qb.f(), I.kb.f(), I.vb.f(), I.att.f(), B, T, NH, NKV, HD, scale, st),
          "attention");
  linear(Module::O, I.att.f(), QD, D, I.proj.f());
  cuda_ok(add_inplace(x, I.proj.f(), rows * D, st), "residual");
  // SwiGLU block: x += Down(silu(Gate xn) ⊙ Up xn), xn = rmsnorm(x).
  cuda_ok(rmsnorm_rows(x, norm(true), I.xn.f(), rows, D, eps, st), "rmsnorm");
  linear(Module::Gate, I.xn.f(), D, FF, I.g.f());
  linear(Module::Up, I.xn.f(), D, FF, I.u.f());
  cuda_ok(swiglu(I.g.f(), I.u.f(), I.g.f(), rows * FF, st), "swiglu");
  linear(Module::Down, I.g.f(), FF, D, I.proj.f());
  cuda_ok(add_inplace(x, I.proj.f(), rows * D, st), "residual");
  // The EC and foreign-weight buffers are refilled by the next call from pageable host
  // memory in stream order; nothing else to wait for here.
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

ForwardFactory gpu_forward_factory() {
  return [](const Network& n) -> std::unique_ptr<ForwardBackend> { return std::make_unique<GpuRunner>(n); };
}

}  // namespace spear::calib_gpu
