// The GPU Llama engine: weights on the device, one forward pass for prefill, decode and
// mixed batches, a paged KV cache, CUDA graphs for decode steps. See gpu_model.h.
#include "gpu/gpu_model.h"

#include <cublas_v2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda/llama_ops.h"
#include "cuda/sampling.h"
#include "cuda/w4a16.h"
#include "model/rope.h"
#include "model/weights.h"
#include "quant/gpu_layout.h"

namespace spear::cuda {

#define CUDA_OK(expr)                                                                           \
  do {                                                                                          \
    cudaError_t e_ = (expr);                                                                    \
    if (e_ != cudaSuccess) throw ::spear::Error(std::string("CUDA: ") + #expr + ": " + cudaGetErrorString(e_)); \
  } while (0)
#define CUBLAS_OK(expr)                                                                         \
  do {                                                                                          \
    cublasStatus_t s_ = (expr);                                                                 \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                            \
      throw ::spear::Error(std::string("cuBLAS: ") + #expr + ": status " + std::to_string(int(s_))); \
  } while (0)

bool cuda_available(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why) *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    cudaGetLastError();
    return false;
  }
  return true;
}

double measure_copy_bandwidth_gbs(size_t bytes, int device) {
  CUDA_OK(cudaSetDevice(device));
  void *a = nullptr, *b = nullptr;
  CUDA_OK(cudaMalloc(&a, bytes));
  if (cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaFree(a);
    throw Error("bandwidth: out of memory");
  }
  cudaMemset(a, 1, bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float best = 1e30f;
  for (int i = 0; i < 6; ++i) {
    cudaEventRecord(e0);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i > 0) best = std::min(best, ms);  // the first run warms up
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  CUDA_OK(cudaGetLastError());
  return 2.0 * static_cast<double>(bytes) / (best * 1e-3) / 1e9;
}

std::string GpuMemory::str() const {
  char b[256];
  auto mib = [](int64_t x) { return static_cast<double>(x) / (1 << 20); };
  std::snprintf(b, sizeof b, "weights %.1f MiB, ECs %.1f MiB, KV cache %.1f MiB, activations %.1f MiB, total %.1f MiB",
                mib(weights), mib(ec), mib(kv_cache), mib(activations), mib(total()));
  return b;
}

namespace {

constexpr int64_t kMaxEcRank = 128;  // the EC kernels' limit (also on a stack of ECs)

// One linear module on the device.
struct GpuLinear {
  int N = 0, K = 0;
  std::string kind;
  __half* w16 = nullptr;   // (N, K) row-major, FP16 modules
  bool is_w4 = false;
  W4Matrix q;              // W4 modules (GpuW4Layout on the device)
  // Error Compensator
  int r = 0;
  bool fused = false;      // kernel layout present (EcTerm), gate the kernel implements
  EcTerm ect;
  __half* A = nullptr;     // (r, K) row-major (naive path)
  __half* B = nullptr;     // (N, r) row-major (naive path)
  float* G = nullptr;      // (r, r) or nullptr (static / per-coordinate handled by the kernel)
  float* c = nullptr;      // (r)
};

struct Slot {
  std::vector<int32_t> blocks;
  int len = 0;
};

}  // namespace

struct GpuModel::Impl {
  ModelConfig cfg;
  GpuOptions opt;
  GpuMemory mem;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  W4A16Dispatcher disp;
  std::map<void*, std::pair<int64_t, int64_t*>> allocations;  // bytes and the counter charged
  std::set<std::string> tuned;
  bool save_warned = false;
  bool ec_enabled = true;

  // weights
  __half* embed = nullptr;     // (V, D)
  __half* head = nullptr;      // (V, D) (== embed when tied)
  float* final_norm = nullptr; // (D)
  std::vector<float*> attn_norm, ffn_norm;  // per layer (D)
  std::vector<PerModule<GpuLinear>> lin;  // per layer
  // Modules that read the same input run as one GEMM over their stacked weights (see
  // stack_modules): per layer Q|K|V (N = QD + 2 KVD) and Gate|Up (N = 2 FF), when stackable.
  std::vector<GpuLinear> qkv, gate_up;
  std::vector<char> qkv_fused, gu_fused;
  float* cos_tab = nullptr;    // (max_len, HD/2)
  float* sin_tab = nullptr;
  // KV cache
  int max_blocks = 0;          // per sequence
  int64_t num_blocks = 0;
  std::vector<__half*> kc, vc; // per layer (num_blocks * bs, NKV, HD)
  std::vector<int32_t> free_blocks;
  std::vector<Slot> slots;
  // scratch (max_tokens rows)
  float* x = nullptr;          // (T, D) residual stream
  __half *xn = nullptr, *att = nullptr, *proj = nullptr;
  // q|k|v of a token side by side, (T, QD + 2 KVD), row stride ld_qkv(); gate|up, (T, 2 FF)
  __half *qkv_out = nullptr, *q = nullptr, *k = nullptr, *v = nullptr;
  __half *gu_out = nullptr, *gate = nullptr, *up = nullptr;
  __half *hid = nullptr, *z = nullptr, *s = nullptr, *xg = nullptr;
  float* logits = nullptr;     // (max_tokens, V)
  float* nll = nullptr;        // (max_tokens)
  int32_t* ids = nullptr;      // (max_tokens)
  RowSampling* draw_params = nullptr;  // (max_tokens): sample_last's per-row parameters
  int max_r = 0;
  void* w4_ws = nullptr;
  size_t w4_ws_bytes = 0;
  void* att_ws = nullptr;
  size_t att_ws_bytes = 0;
  void* blas_ws = nullptr;
  // per-call inputs: one int32 buffer, mirrored in pinned host memory
  int32_t* d_in = nullptr;
  int32_t* h_in = nullptr;
  int64_t in_len = 0;
  int64_t o_tok = 0, o_pos = 0, o_slot = 0, o_qseq = 0, o_len = 0, o_bt = 0;
  int last_rows = 0;
  // decode graphs by batch size
  std::map<int, cudaGraphExec_t> graphs;
  // the last forward's GPU time: events around the graph launch or the body
  cudaEvent_t fwd0 = nullptr, fwd1 = nullptr;
  bool fwd_timed = false;
  // dequantize + cuBLAS path of the W4 GEMMs (prefill-sized M): expanded weight rows
  void* dq_scratch = nullptr;
  size_t dq_scratch_bytes = 0;
  // Op timing for profile_decode_step: while on, mark(name) records an event before each op,
  // so that op i takes the time between events i and i + 1.
  struct OpMarks {
    bool on = false;
    std::vector<cudaEvent_t> events;
    std::vector<const char*> names;
    size_t used = 0;
  } marks;

  void mark(const char* name) {
    if (!marks.on) return;
    if (marks.used == marks.events.size()) {
      cudaEvent_t e;
      CUDA_OK(cudaEventCreate(&e));
      marks.events.push_back(e);
      marks.names.push_back(nullptr);
    }
    marks.names[marks.used] = name;
    CUDA_OK(cudaEventRecord(marks.events[marks.used++], stream));
  }

  ~Impl() {
    for (cudaEvent_t e : marks.events) cudaEventDestroy(e);
    if (fwd0) cudaEventDestroy(fwd0);
    if (fwd1) cudaEventDestroy(fwd1);
    for (auto& [b, g] : graphs) cudaGraphExecDestroy(g);
    if (stream) cudaStreamSynchronize(stream);
    for (auto& [p, sz] : allocations) cudaFree(p);
    if (h_in) cudaFreeHost(h_in);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  template <class T>
  T* alloc(int64_t n, int64_t* counter) {
    void* p = nullptr;
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error("GPU: out of memory allocating " + std::to_string(bytes >> 20) + " MiB (" + mem.str() + ")");
    }
    allocations[p] = {static_cast<int64_t>(bytes), counter};
    if (counter) *counter += static_cast<int64_t>(bytes);
    return static_cast<T*>(p);
  }
  // Frees what alloc returned, uncharging its counter (nullptr: nothing).
  void release(const void* p) {
    auto it = allocations.find(const_cast<void*>(p));
    if (it == allocations.end()) return;
    if (it->second.second) *it->second.second -= it->second.first;
    cudaFree(it->first);
    allocations.erase(it);
  }
  template <class T>
  T* upload(const T* host, int64_t n, int64_t* counter) {
    T* d = alloc<T>(n, counter);
    CUDA_OK(cudaMemcpy(d, host, static_cast<size_t>(n) * sizeof(T), cudaMemcpyHostToDevice));
    return d;
  }
  __half* upload_f16(const float* host, int64_t n, int64_t* counter) {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) h[i] = ::spear::f32_to_f16(host[i]);
    return reinterpret_cast<__half*>(upload(h.data(), n, counter));
  }

  int D() const { return static_cast<int>(cfg.hidden_size); }
  int V() const { return static_cast<int>(cfg.vocab_size); }
  int HD() const { return static_cast<int>(cfg.head_dim); }
  int QD() const { return static_cast<int>(cfg.q_dim()); }
  int KVD() const { return static_cast<int>(cfg.kv_dim()); }
  int FF() const { return static_cast<int>(cfg.intermediate_size); }
  int ld_qkv() const { return QD() + 2 * KVD(); }
  int ld_gu() const { return 2 * FF(); }

  void init_common() {
    CUDA_OK(cudaSetDevice(opt.device));
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUBLAS_OK(cublasCreate(&blas));
    CUBLAS_OK(cublasSetStream(blas, stream));
    CUDA_OK(disp.init(opt.device));
    if (opt.max_len <= 0) opt.max_len = static_cast<int>(std::min<int64_t>(cfg.max_position_embeddings, 1 << 20));
    SPEAR_CHECK(opt.max_batch >= 1 && opt.max_tokens >= 1 && opt.block_size >= 1,
                "GPU: max_batch, max_tokens and block_size must be positive");
    // decode attention splits positions into chunks of 256, each a whole number of blocks
    SPEAR_CHECK(256 % opt.block_size == 0,
                "GPU: the KV block size must divide 256 (1, 2, 4, ..., 256); got " + std::to_string(opt.block_size));
    SPEAR_CHECK(opt.max_len <= cfg.max_position_embeddings,
                "GPU: max_len " + std::to_string(opt.max_len) + " exceeds the model's context of " +
                    std::to_string(cfg.max_position_embeddings));
    SPEAR_CHECK(cfg.head_dim % 8 == 0 && cfg.head_dim <= 256,
                "GPU: head_dim " + std::to_string(cfg.head_dim) + " is not supported (a multiple of 8, at most 256)");
    attn_norm.assign(cfg.num_layers, nullptr);
    ffn_norm.assign(cfg.num_layers, nullptr);
    lin.assign(cfg.num_layers, {});
    qkv.assign(cfg.num_layers, {});
    gate_up.assign(cfg.num_layers, {});
    qkv_fused.assign(cfg.num_layers, 0);
    gu_fused.assign(cfg.num_layers, 0);
    // RoPE tables exactly as the CPU engine computes them.
    const int64_t half = cfg.head_dim / 2;
    std::vector<float> c(static_cast<size_t>(opt.max_len) * half), s(c.size());
    rope_cos_sin(rope_inv_freq(cfg.rope, cfg.head_dim), 0, opt.max_len, c.data(), s.data());
    cos_tab = upload(c.data(), static_cast<int64_t>(c.size()), &mem.activations);
    sin_tab = upload(s.data(), static_cast<int64_t>(s.size()), &mem.activations);
  }

  // Scratch, workspaces, KV cache: after the weights, so that the KV cache can take what
  // is left under gpu_memory_fraction.
  void init_buffers() {
    const int64_t T = opt.max_tokens;
    int64_t* a = &mem.activations;
    x = alloc<float>(T * D(), a);
    xn = alloc<__half>(T * D(), a);
    qkv_out = alloc<__half>(T * ld_qkv(), a);
    q = qkv_out;
    k = qkv_out + QD();
    v = qkv_out + QD() + KVD();
    att = alloc<__half>(T * QD(), a);
    proj = alloc<__half>(T * D(), a);
    gu_out = alloc<__half>(T * ld_gu(), a);
    gate = gu_out;
    up = gu_out + FF();
    hid = alloc<__half>(T * FF(), a);
    xg = alloc<__half>(static_cast<int64_t>(opt.max_batch) * D(), a);
    if (max_r > 0) {
      z = alloc<__half>(T * max_r, a);
      s = alloc<__half>(T * max_r, a);
    }
    logits = alloc<float>(T * V(), a);
    nll = alloc<float>(T, a);
    ids = alloc<int32_t>(T, a);
    draw_params = alloc<RowSampling>(T, a);
    // W4 workspace: the largest any module needs at max_tokens rows.
    auto ws_for = [&](const GpuLinear& L) {
      if (L.is_w4) w4_ws_bytes = std::max(w4_ws_bytes, w4a16_workspace_bytes(opt.max_tokens, L.q, L.fused ? &L.ect : nullptr));
    };
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      for (auto& L : lin[l]) ws_for(L);
      if (qkv_fused[l]) ws_for(qkv[l]);
      if (gu_fused[l]) ws_for(gate_up[l]);
    }
    if (w4_ws_bytes) {
      w4_ws = alloc<uint8_t>(static_cast<int64_t>(w4_ws_bytes), a);
      CUDA_OK(w4a16_workspace_init(w4_ws, w4_ws_bytes, stream));
    }
    // Scratch for the dequantize + cuBLAS path: the largest module whole, up to the cap
    // (bigger modules then run in chunks of rows), and at least 128 rows of it.
    if (opt.dequant_scratch_mb > 0 && opt.max_tokens >= 32) {
      size_t need = 0, least = 0;
      auto dq_for = [&](const GpuLinear& L) {
        if (!L.is_w4) return;
        const EcTerm* ec = L.fused ? &L.ect : nullptr;
        need = std::max(need, w4a16_dequant_scratch_bytes(0, opt.max_tokens, L.q, ec));
        least = std::max(least, w4a16_dequant_scratch_bytes(128, opt.max_tokens, L.q, ec));
      };
      for (int64_t l = 0; l < cfg.num_layers; ++l) {
        for (auto& L : lin[l]) dq_for(L);
        if (qkv_fused[l]) dq_for(qkv[l]);
        if (gu_fused[l]) dq_for(gate_up[l]);
      }
      if (need > 0) {
        dq_scratch_bytes = std::max(least, std::min(need, static_cast<size_t>(opt.dequant_scratch_mb) << 20));
        dq_scratch = alloc<uint8_t>(static_cast<int64_t>(dq_scratch_bytes), a);
        disp.set_dequant(blas, dq_scratch, dq_scratch_bytes);
      }
    }
    att_ws_bytes = decode_attention_ws_bytes(opt.max_batch, static_cast<int>(cfg.num_heads), HD(), opt.max_len);
    att_ws = alloc<uint8_t>(static_cast<int64_t>(att_ws_bytes), a);
    CUDA_OK(decode_attention_ws_init(att_ws, att_ws_bytes, stream));
    // cuBLAS gets its own workspace so that graph capture never allocates.
    const size_t blas_bytes = 32u << 20;
    blas_ws = alloc<uint8_t>(static_cast<int64_t>(blas_bytes), a);
    CUBLAS_OK(cublasSetWorkspace(blas, blas_ws, blas_bytes));
    // per-call inputs
    max_blocks = (opt.max_len + opt.block_size - 1) / opt.block_size;
    o_tok = 0;
    o_pos = o_tok + T;
    o_slot = o_pos + T;
    o_qseq = o_slot + T;
    o_len = o_qseq + T;
    o_bt = o_len + opt.max_batch;
    in_len = o_bt + static_cast<int64_t>(opt.max_batch) * max_blocks;
    d_in = alloc<int32_t>(in_len, a);
    CUDA_OK(cudaMallocHost(&h_in, static_cast<size_t>(in_len) * sizeof(int32_t)));
    // KV cache
    const int64_t block_bytes = static_cast<int64_t>(opt.block_size) * KVD() * 2 * 2 * cfg.num_layers;
    num_blocks = opt.kv_blocks;
    if (num_blocks <= 0 && opt.gpu_memory_fraction > 0) {
      size_t free_b = 0, total_b = 0;
      CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
      const double used = static_cast<double>(total_b - free_b);
      const double room = opt.gpu_memory_fraction * static_cast<double>(total_b) - used;
      SPEAR_CHECK(room > block_bytes, "GPU: --gpu-memory-fraction leaves no room for the KV cache (" + mem.str() + ")");
      num_blocks = static_cast<int64_t>(room / static_cast<double>(block_bytes));
    }
    if (num_blocks <= 0) num_blocks = static_cast<int64_t>(opt.max_batch) * max_blocks;
    const int64_t slots_n = num_blocks * opt.block_size;
    kc.resize(cfg.num_layers);
    vc.resize(cfg.num_layers);
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      kc[l] = alloc<__half>(slots_n * KVD(), &mem.kv_cache);
      vc[l] = alloc<__half>(slots_n * KVD(), &mem.kv_cache);
    }
    free_blocks.clear();
    for (int64_t b = num_blocks - 1; b >= 0; --b) free_blocks.push_back(static_cast<int32_t>(b));
    slots.assign(opt.max_batch, {});
    CUDA_OK(cudaStreamSynchronize(stream));
  }

  // ---- linear layers ------------------------------------------------------------------
  // y (M, N) = x (M, K) W^T (+ EC), fp16, row strides K and N.
  void gemm16(const __half* a_rows, int lda_rows, const __half* x, int M, int K_, int N_, __half* y, int ldy,
              float beta) {
    // Column-major view: y^T (N, M) = W (N, K) [as K x N col-major, transposed] * x^T (K, M).
    const float one = 1.0f;
    CUBLAS_OK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N_, M, K_, &one, a_rows, CUDA_R_16F, lda_rows, x,
                           CUDA_R_16F, K_, &beta, y, CUDA_R_16F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // y (M, N) with row stride ldy (>= N: the output may be a column slice of a wider buffer).
  void linear(const GpuLinear& L_in, const char* label, const __half* xin, int M, __half* y, int ldy,
              bool capturing) {
    mark(label);
    GpuLinear L_noec;
    const GpuLinear* Lp = &L_in;
    if (!ec_enabled && L_in.r > 0) {
      L_noec = L_in;
      L_noec.r = 0;
      Lp = &L_noec;
    }
    const GpuLinear& L = *Lp;
    if (!L.is_w4) {
      gemm16(L.w16, L.K, xin, M, L.K, L.N, y, ldy, 0.0f);
      return;
    }
    const bool ec_in_kernel = L.r > 0 && L.fused && opt.ec_path == EcPath::kDispatch;
    const EcTerm* ec = ec_in_kernel ? &L.ect : nullptr;
    if (opt.autotune && !capturing) {
      const std::string key = W4A16Dispatcher::key(Act::kF16, M, L.q, ec);
      if (!tuned.count(key)) {
        CUDA_OK(disp.autotune(Act::kF16, xin, L.K, M, L.q, ec, y, ldy, w4_ws, w4_ws_bytes, stream));
        tuned.insert(key);
        if (opt.save_tuning && !disp.save() && !save_warned) {
          std::fprintf(stderr, "spear: could not write the W4 tuning table %s (kept in memory)\n",
                       disp.cache_path().c_str());
          save_warned = true;
        }
      }
    }
    cudaError_t e = disp.run(Act::kF16, xin, L.K, M, L.q, ec, y, ldy, w4_ws, w4_ws_bytes, stream);
    if (e != cudaSuccess)
      throw Error("GPU: W4 GEMM (" + L.kind + ", M=" + std::to_string(M) + ", N=" + std::to_string(L.N) +
                  ", K=" + std::to_string(L.K) + ") failed: " + cudaGetErrorString(e));
    if (L.r > 0 && !ec_in_kernel) {
      // naive EC: z = x A^T, s = gate(z), y += s B^T
      mark("ec (separate launches)");
      gemm16(L.A, L.K, xin, M, L.K, L.r, z, L.r, 0.0f);
      CUDA_OK(ec_gate(z, L.G, L.c, M, L.r, s, stream));
      gemm16(L.B, L.r, s, M, L.r, L.N, y, ldy, 1.0f);
    }
  }

  // ---- one forward pass over T tokens on the inputs already in d_in ---------------------
  // decode: every chunk is one token (B = T sequences); rows: logits rows wanted (host),
  // empty = all T.
  void body(int T, int n_chunks, bool decode, const std::vector<int>& rows, bool capturing) {
    const int32_t* tok = d_in + o_tok;
    const int32_t* pos = d_in + o_pos;
    const int32_t* slot = d_in + o_slot;
    const int32_t* qseq = d_in + o_qseq;
    const int32_t* lens = d_in + o_len;
    const int32_t* bt = d_in + o_bt;
    const float eps = static_cast<float>(cfg.rms_norm_eps);
    const float scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
    const int NH = static_cast<int>(cfg.num_heads), NKV = static_cast<int>(cfg.num_kv_heads);
    mark("embed");
    CUDA_OK(embed_lookup(tok, embed, cfg.vocab_size, T, D(), x, stream));
    mark("rmsnorm");
    CUDA_OK(rmsnorm(x, attn_norm[0], eps, T, D(), xn, stream));
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      auto& Ls = lin[l];
      if (qkv_fused[l]) {
        linear(qkv[l], "gemm q|k|v", xn, T, qkv_out, ld_qkv(), capturing);
      } else {
        linear(Ls[Module::Q], "gemm q", xn, T, q, ld_qkv(), capturing);
        linear(Ls[Module::K], "gemm k", xn, T, k, ld_qkv(), capturing);
        linear(Ls[Module::V], "gemm v", xn, T, v, ld_qkv(), capturing);
      }
      mark("rope + kv write");
      CUDA_OK(rope_store_kv(q, ld_qkv(), k, ld_qkv(), v, ld_qkv(), pos, slot, cos_tab, sin_tab, opt.max_len, T, NH, NKV, HD(),
                            kc[l], vc[l], stream));
      PagedKV kv;
      kv.k_cache = kc[l];
      kv.v_cache = vc[l];
      kv.block_tables = bt;
      kv.max_blocks = max_blocks;
      kv.block_size = opt.block_size;
      kv.n_kv_heads = NKV;
      kv.head_dim = HD();
      mark("attention");
      if (decode)
        CUDA_OK(decode_attention(q, ld_qkv(), kv, lens, n_chunks, NH, scale, opt.max_len, att, QD(), att_ws, att_ws_bytes,
                                 stream));
      else
        CUDA_OK(prefill_attention(q, ld_qkv(), kv, qseq, pos, T, NH, scale, opt.max_len, att, QD(), stream));
      linear(Ls[Module::O], "gemm o", att, T, proj, D(), capturing);
      mark("add + rmsnorm");
      CUDA_OK(add_rmsnorm(x, proj, D(), ffn_norm[l], eps, T, D(), xn, stream));
      if (gu_fused[l]) {
        linear(gate_up[l], "gemm gate|up", xn, T, gu_out, ld_gu(), capturing);
      } else {
        linear(Ls[Module::Gate], "gemm gate", xn, T, gate, ld_gu(), capturing);
        linear(Ls[Module::Up], "gemm up", xn, T, up, ld_gu(), capturing);
      }
      mark("silu * up");
      CUDA_OK(silu_mul(gate, ld_gu(), up, ld_gu(), T, FF(), hid, stream));
      linear(Ls[Module::Down], "gemm down", hid, T, proj, D(), capturing);
      const float* next_norm = l + 1 < cfg.num_layers ? attn_norm[l + 1] : final_norm;
      mark("add + rmsnorm");
      CUDA_OK(add_rmsnorm(x, proj, D(), next_norm, eps, T, D(), xn, stream));
    }
    // The head on the rows asked for.
    mark("head");
    const __half* hrows = xn;
    int R = T;
    if (!rows.empty() && static_cast<int>(rows.size()) != T) {
      R = static_cast<int>(rows.size());
      for (int i = 0; i < R; ++i)
        CUDA_OK(cudaMemcpyAsync(xg + static_cast<int64_t>(i) * D(), xn + static_cast<int64_t>(rows[i]) * D(),
                                sizeof(__half) * D(), cudaMemcpyDeviceToDevice, stream));
      hrows = xg;
    }
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_OK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, V(), R, D(), &one, head, CUDA_R_16F, D(), hrows, CUDA_R_16F,
                           D(), &zero, logits, CUDA_R_32F, V(), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    last_rows = R;
  }

  int32_t take_block() {
    SPEAR_CHECK(!free_blocks.empty(), "GPU: the KV cache is full (" + std::to_string(num_blocks) +
                                          " blocks of " + std::to_string(opt.block_size) + " positions)");
    int32_t b = free_blocks.back();
    free_blocks.pop_back();
    return b;
  }
  void ensure_blocks(Slot& s, int n) {
    const int need = (n + opt.block_size - 1) / opt.block_size;
    while (static_cast<int>(s.blocks.size()) < need) s.blocks.push_back(take_block());
  }

  const float* forward(std::span<const GpuChunk> chunks) {
    const int n_chunks = static_cast<int>(chunks.size());
    SPEAR_CHECK(n_chunks >= 1 && n_chunks <= opt.max_batch,
                "GPU forward: " + std::to_string(n_chunks) + " chunks; 1.." + std::to_string(opt.max_batch) + " allowed");
    int T = 0;
    bool decode = true;
    std::set<int> seen;
    for (const GpuChunk& c : chunks) {
      SPEAR_CHECK(c.slot >= 0 && c.slot < opt.max_batch && seen.insert(c.slot).second,
                  "GPU forward: bad or repeated slot " + std::to_string(c.slot));
      SPEAR_CHECK(c.n_tokens >= 1 && c.start_pos >= 0 && c.start_pos + c.n_tokens <= opt.max_len,
                  "GPU forward: positions [" + std::to_string(c.start_pos) + ", " +
                      std::to_string(c.start_pos + c.n_tokens) + ") outside the context of " +
                      std::to_string(opt.max_len));
      if (c.blocks) {
        SPEAR_CHECK(c.n_blocks >= 0 && static_cast<int64_t>(c.n_blocks) * opt.block_size >= c.start_pos + c.n_tokens &&
                        c.n_blocks <= max_blocks,
                    "GPU forward: the block table does not cover the chunk's positions");
        for (int b = 0; b < c.n_blocks; ++b)
          SPEAR_CHECK(c.blocks[b] >= 0 && c.blocks[b] < num_blocks, "GPU forward: block id outside the KV pool");
      } else {
        SPEAR_CHECK(c.start_pos <= slots[c.slot].len,
                    "GPU forward: chunk starts at " + std::to_string(c.start_pos) + " but the sequence has " +
                        std::to_string(slots[c.slot].len) + " positions");
      }
      for (int i = 0; i < c.n_tokens; ++i)
        SPEAR_CHECK(c.tokens[i] >= 0 && c.tokens[i] < cfg.vocab_size,
                    "GPU forward: token id " + std::to_string(c.tokens[i]) + " is outside the vocabulary");
      T += c.n_tokens;
      if (c.n_tokens != 1) decode = false;
    }
    SPEAR_CHECK(T <= opt.max_tokens, "GPU forward: " + std::to_string(T) + " tokens in one call; at most " +
                                         std::to_string(opt.max_tokens));
    CUDA_OK(cudaStreamSynchronize(stream));  // h_in may still be in flight from the last call
    const std::vector<int> rows = upload_inputs(chunks);
    if (!fwd0) {
      CUDA_OK(cudaEventCreate(&fwd0));
      CUDA_OK(cudaEventCreate(&fwd1));
    }
    bool timed = false;  // the event pair brackets this call (not a first-use capture)
    if (decode && opt.graphs) {
      auto it = graphs.find(n_chunks);
      if (it == graphs.end()) {
        body(T, n_chunks, true, rows, false);  // warm-up: autotuning, cuBLAS heuristics
        cudaGraph_t g = nullptr;
        CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        try {
          body(T, n_chunks, true, rows, true);
        } catch (...) {
          cudaStreamEndCapture(stream, &g);
          if (g) cudaGraphDestroy(g);
          cudaGetLastError();
          throw;
        }
        CUDA_OK(cudaStreamEndCapture(stream, &g));
        cudaGraphExec_t ex = nullptr;
        cudaError_t e = cudaGraphInstantiate(&ex, g, 0);
        cudaGraphDestroy(g);
        CUDA_OK(e);
        it = graphs.emplace(n_chunks, ex).first;
      }
      CUDA_OK(cudaEventRecord(fwd0, stream));
      CUDA_OK(cudaGraphLaunch(it->second, stream));
      CUDA_OK(cudaEventRecord(fwd1, stream));
      timed = true;
      last_rows = T;
    } else {
      CUDA_OK(cudaEventRecord(fwd0, stream));
      body(T, n_chunks, decode, rows, false);
      CUDA_OK(cudaEventRecord(fwd1, stream));
      timed = !opt.autotune;  // autotuning on first use would be counted as GPU time
    }
    fwd_timed = timed;
    CUDA_OK(cudaGetLastError());
    for (const GpuChunk& c : chunks)
      if (!c.blocks) slots[c.slot].len = std::max(slots[c.slot].len, c.start_pos + c.n_tokens);
    return logits;
  }

  // Fills h_in (tokens, positions, cache slots, sequence of each token, lengths, block
  // tables; allocating blocks for new positions) and copies it to d_in on the stream.
  // Returns the rows whose logits are wanted.
  std::vector<int> upload_inputs(std::span<const GpuChunk> chunks) {
    const int n_chunks = static_cast<int>(chunks.size());
    std::vector<int> rows;
    int r = 0;
    for (int ci = 0; ci < n_chunks; ++ci) {
      const GpuChunk& c = chunks[ci];
      Slot& s = slots[c.slot];
      if (!c.blocks) ensure_blocks(s, c.start_pos + c.n_tokens);
      const int32_t* table = c.blocks ? c.blocks : s.blocks.data();
      const int n_table = c.blocks ? c.n_blocks : static_cast<int>(s.blocks.size());
      for (int i = 0; i < c.n_tokens; ++i, ++r) {
        const int p = c.start_pos + i;
        h_in[o_tok + r] = c.tokens[i];
        h_in[o_pos + r] = p;
        h_in[o_slot + r] = table[p / opt.block_size] * opt.block_size + p % opt.block_size;
        h_in[o_qseq + r] = ci;
        if (c.all_logits || i + 1 == c.n_tokens) rows.push_back(r);
      }
      h_in[o_len + ci] = c.start_pos + c.n_tokens;
      int32_t* btrow = h_in + o_bt + static_cast<int64_t>(ci) * max_blocks;
      for (int b = 0; b < max_blocks; ++b) btrow[b] = b < n_table ? table[b] : 0;
    }
    const int64_t copy_n = o_bt + static_cast<int64_t>(n_chunks) * max_blocks;
    CUDA_OK(cudaMemcpyAsync(d_in, h_in, sizeof(int32_t) * copy_n, cudaMemcpyHostToDevice, stream));
    return rows;
  }
};

// ---- building models ----------------------------------------------------------------------

namespace {

std::string w4_kind(const GpuW4Layout& l) {
  return std::string("w4-") + (l.group ? "g" + std::to_string(l.group) : "pc") + (l.symmetric ? "-sym" : "-asym");
}

void upload_w4(GpuModel::Impl& im, const GpuW4Layout& lay, GpuLinear& L) {
  L.is_w4 = true;
  W4Matrix& q = L.q;
  q.N = static_cast<int>(lay.N);
  q.K = static_cast<int>(lay.K);
  q.N_pad = static_cast<int>(lay.N_pad);
  q.K_pad = static_cast<int>(lay.K_pad);
  q.group = static_cast<int>(lay.group);
  q.G = static_cast<int>(lay.G);
  q.qweight = im.upload(lay.qweight.data(), static_cast<int64_t>(lay.qweight.size()), &im.mem.weights);
  q.scales = im.upload(lay.scales.data(), static_cast<int64_t>(lay.scales.size()), &im.mem.weights);
  q.zeros = im.upload(lay.zeros.data(), static_cast<int64_t>(lay.zeros.size()), &im.mem.weights);
  L.kind = w4_kind(lay);
}

// The kernel's gate for a calibrated EC (model/ec_params.h: gamma = 1 + tanh(G z + c)):
// ungated -> kIdentity; a diagonal G -> kSigmoid2 (1 + tanh(s) = 2 sigmoid(2 s), so
// g_j = 2 G_jj and c_j doubled: elementwise, no r x r work); otherwise kFull. g: what the
// kernel reads as gate_g (r_pad, or G transposed r_pad x r_pad; zero padded); c: (r_pad).
Gate kernel_gate(const ECParams& p, int r_pad, std::vector<float>* g, std::vector<float>* c) {
  const int64_t r = p.rank;
  c->assign(r_pad, 0.0f);
  if (!p.gated) {
    g->assign(r_pad, 0.0f);
    return Gate::kIdentity;
  }
  bool diagonal = true;
  for (int64_t j = 0; j < r && diagonal; ++j)
    for (int64_t l = 0; l < r; ++l)
      if (l != j && p.G[j * r + l] != 0.0f) {
        diagonal = false;
        break;
      }
  if (diagonal) {
    g->assign(r_pad, 0.0f);
    for (int64_t j = 0; j < r; ++j) {
      (*g)[j] = 2.0f * p.G[j * r + j];
      (*c)[j] = 2.0f * p.c[j];
    }
    return Gate::kSigmoid2;
  }
  g->assign(static_cast<size_t>(r_pad) * r_pad, 0.0f);  // transposed (w4a16.h EcTerm::gate_g)
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t l = 0; l < r; ++l) (*g)[l * r_pad + j] = p.G[j * r + l];
    (*c)[j] = p.c[j];
  }
  return Gate::kFull;
}

// EC factors from calibration, in the kernel's layouts (EcTerm: fused or split in the W4
// GEMM, every gate calibration produces); row-major copies for the naive path only when
// that path is asked for (bench-latency's comparison).
void upload_ec(GpuModel::Impl& im, const ECParams& p, GpuLinear& L) {
  SPEAR_CHECK(p.rank <= kMaxEcRank, "GPU: EC rank " + std::to_string(p.rank) + " > " + std::to_string(kMaxEcRank) +
                                        " is not supported");
  L.r = static_cast<int>(p.rank);
  if (im.opt.ec_path == EcPath::kNaive) {
    L.A = im.upload_f16(p.A.data(), static_cast<int64_t>(p.A.size()), &im.mem.ec);
    L.B = im.upload_f16(p.B.data(), static_cast<int64_t>(p.B.size()), &im.mem.ec);
    if (p.gated) {
      L.G = im.upload(p.G.data(), static_cast<int64_t>(p.G.size()), &im.mem.ec);
      L.c = im.upload(p.c.data(), static_cast<int64_t>(p.c.size()), &im.mem.ec);
    }
  }
  std::vector<uint16_t> a(p.A.size()), b(p.B.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = ::spear::f32_to_f16(p.A[i]);
  for (size_t i = 0; i < b.size(); ++i) b[i] = ::spear::f32_to_f16(p.B[i]);
  const std::vector<uint16_t> at = repack_ec_a(a.data(), p.rank, p.in, L.q.K_pad);
  const std::vector<uint16_t> bt = repack_ec_b(b.data(), p.out, p.rank, L.q.N_pad);
  EcTerm& e = L.ect;
  e.r = L.r;
  e.r_pad = static_cast<int>(round_up(p.rank, 16));
  std::vector<float> g, c;
  e.gate = kernel_gate(p, e.r_pad, &g, &c);
  e.a = im.upload(at.data(), static_cast<int64_t>(at.size()), &im.mem.ec);
  e.b = im.upload(bt.data(), static_cast<int64_t>(bt.size()), &im.mem.ec);
  e.gate_g = im.upload(g.data(), static_cast<int64_t>(g.size()), &im.mem.ec);
  e.gate_c = im.upload(c.data(), static_cast<int64_t>(c.size()), &im.mem.ec);
  L.fused = true;
  L.kind += "+ec(r=" + std::to_string(p.rank) +
            (e.gate == Gate::kFull ? ",gated)" : e.gate == Gate::kSigmoid2 ? ",diag-gated)" : ")");
  im.max_r = std::max(im.max_r, L.r);
}

}  // namespace

GpuModel::GpuModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModel::~GpuModel() = default;

namespace {

// A host tensor as fp16 on the device. bf16 and fp16 bytes go up as they are (bf16 is then
// rounded to fp16 in place, on the device: the same round-to-nearest-even as the host's
// f32_to_f16); float32 is rounded on the host. No host copy of a 16-bit tensor is made.
__half* upload_tensor_f16(GpuModel::Impl& im, const WeightTensor& t, int64_t* counter) {
  const int64_t n = t.numel();
  if (t.dtype == DType::F32) {
    const float* f = reinterpret_cast<const float*>(t.data);
    if (reinterpret_cast<uintptr_t>(f) % alignof(float) == 0) return im.upload_f16(f, n, counter);
    return im.upload_f16(t.to_f32().data(), n, counter);
  }
  SPEAR_CHECK(t.dtype == DType::BF16 || t.dtype == DType::F16, "GPU: a weight tensor must be F32, F16 or BF16");
  __half* d = im.alloc<__half>(n, counter);
  CUDA_OK(cudaMemcpyAsync(d, t.data, static_cast<size_t>(n) * 2, cudaMemcpyHostToDevice, im.stream));
  if (t.dtype == DType::BF16) CUDA_OK(bf16_to_f16_inplace(d, n, im.stream));
  return d;
}

float* upload_tensor_f32(GpuModel::Impl& im, const WeightTensor& t, int64_t* counter) {
  const std::vector<float> f = t.to_f32();
  return im.upload(f.data(), static_cast<int64_t>(f.size()), counter);
}

}  // namespace

std::unique_ptr<GpuModel> GpuModel::create(const LlamaWeights& w, const GpuOptions& opt) {
  std::string why;
  SPEAR_CHECK(cuda_available(&why), "--device cuda: no usable CUDA device (" + why + ")");
  w.validate("model");
  auto im = std::make_unique<Impl>();
  im->cfg = w.config;
  im->opt = opt;
  im->init_common();
  const ModelConfig& cfg = im->cfg;
  im->embed = upload_tensor_f16(*im, w.embed, &im->mem.weights);
  im->head = w.lm_head.empty() ? im->embed : upload_tensor_f16(*im, w.lm_head, &im->mem.weights);
  im->final_norm = upload_tensor_f32(*im, w.final_norm, &im->mem.weights);
  // One module (or a stack of modules) of the description as a GpuLinear of shape (N, K).
  auto upload_module = [&](const ModuleWeights& src, int64_t N, int64_t K, GpuLinear& L, const std::string& what) {
    L.N = static_cast<int>(N);
    L.K = static_cast<int>(K);
    if (src.quant) {
      SPEAR_CHECK(src.quant->scheme.bits == 4,
                  "--device cuda runs 4-bit weights only; " + what + " is " + src.quant->scheme.name());
      upload_w4(*im, repack_w4(*src.quant), L);
    } else {
      L.w16 = upload_tensor_f16(*im, src.dense, &im->mem.weights);
      L.kind = "f16";
    }
    if (src.ec) upload_ec(*im, *src.ec, L);
  };
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const LlamaLayerWeights& LW = w.layers[l];
    const std::string layer = "layer " + std::to_string(l);
    im->attn_norm[l] = upload_tensor_f32(*im, LW.attn_norm, &im->mem.weights);
    im->ffn_norm[l] = upload_tensor_f32(*im, LW.ffn_norm, &im->mem.weights);
    // Q|K|V and Gate|Up as one GEMM each where they stack (model/weights.h stack_modules).
    auto group = [&](const std::vector<Module>& ms, GpuLinear& dst, char& fused, const char* name) {
      if (!opt.fuse_projections) return;
      std::string why;
      std::optional<ModuleWeights> st = stack_modules(w, l, ms, kMaxEcRank, &why);
      if (!st) {
        if (opt.verbose) std::fprintf(stderr, "spear: %s %s: separate GEMMs (%s)\n", layer.c_str(), name, why.c_str());
        return;
      }
      const int64_t N = st->quant ? st->quant->N : st->dense.shape[0];
      upload_module(*st, N, module_shape(cfg, ms[0]).in, dst, layer + " " + name);
      fused = 1;
    };
    group({Module::Q, Module::K, Module::V}, im->qkv[l], im->qkv_fused[l], "qkv");
    group({Module::Gate, Module::Up}, im->gate_up[l], im->gu_fused[l], "gate_up");
    for (Module mod : kAllModules) {
      const bool in_qkv = mod == Module::Q || mod == Module::K || mod == Module::V;
      const bool in_gu = mod == Module::Gate || mod == Module::Up;
      if ((in_qkv && im->qkv_fused[l]) || (in_gu && im->gu_fused[l])) continue;  // runs stacked
      const ModuleShape s = module_shape(cfg, mod);
      upload_module(LW.modules[mod], s.out, s.in, im->lin[l][mod], std::string(module_name(mod)) + " of " + layer);
    }
  }
  CUDA_OK(cudaStreamSynchronize(im->stream));  // the host tensors may be unmapped after this
  im->init_buffers();
  return std::unique_ptr<GpuModel>(new GpuModel(std::move(im)));
}

std::unique_ptr<GpuModel> GpuModel::synthetic(const ModelConfig& cfg_in, const SyntheticSpec& spec,
                                              const GpuOptions& opt) {
  std::string why;
  SPEAR_CHECK(cuda_available(&why), "bench-latency: no usable CUDA device (" + why + ")");
  auto im = std::make_unique<Impl>();
  im->cfg = cfg_in;
  im->opt = opt;
  im->init_common();
  const ModelConfig& cfg = im->cfg;
  cudaStream_t st = im->stream;
  uint64_t seed = spec.seed * 0x9E3779B97F4A7C15ull;
  auto next_seed = [&seed]() { return seed += 0xBF58476D1CE4E5B9ull; };
  const int64_t D = cfg.hidden_size, V = cfg.vocab_size;
  auto rand_f16 = [&](int64_t n, float scale, int64_t* counter) {
    __half* p = im->alloc<__half>(n, counter);
    CUDA_OK(fill_uniform_f16(p, n, next_seed(), scale, st));
    return p;
  };
  auto rand_f32 = [&](int64_t n, float lo, float hi, int64_t* counter) {
    float* p = im->alloc<float>(n, counter);
    CUDA_OK(fill_uniform_f32(p, n, next_seed(), lo, hi, st));
    return p;
  };
  im->embed = rand_f16(V * D, 1.0f, &im->mem.weights);
  im->head = cfg.tie_word_embeddings ? im->embed : rand_f16(V * D, std::sqrt(3.0f / D), &im->mem.weights);
  im->final_norm = rand_f32(D, 0.9f, 1.1f, &im->mem.weights);
  // Random weights of shape (N, K) for one module (or a stack of modules).
  auto rand_linear = [&](GpuLinear& L, int64_t N, int64_t K) {
    L.N = static_cast<int>(N);
    L.K = static_cast<int>(K);
    const float wscale = std::sqrt(3.0f / static_cast<float>(K));
    if (spec.kind == WeightKind::kFp16) {
      L.w16 = rand_f16(N * K, wscale, &im->mem.weights);
      L.kind = "f16";
      return;
    }
    W4Matrix& q = L.q;
    L.is_w4 = true;
    q.N = L.N;
    q.K = L.K;
    q.N_pad = static_cast<int>(round_up(N, 16));
    q.K_pad = static_cast<int>(round_up(K, 128));
    q.group = spec.group;
    q.G = spec.group ? q.K_pad / spec.group : 1;
    SPEAR_CHECK(spec.group == 0 || spec.group % 128 == 0, "bench-latency: --group must be 0 or a multiple of 128");
    const int64_t qbytes = static_cast<int64_t>(q.N_pad) * q.K_pad / 2;
    uint8_t* qw = im->alloc<uint8_t>(qbytes, &im->mem.weights);
    CUDA_OK(fill_random_bytes(qw, qbytes, next_seed(), st));
    q.qweight = qw;
    q.scales = rand_f32(static_cast<int64_t>(q.G) * q.N_pad, 0.5f * wscale / 8, 1.5f * wscale / 8, &im->mem.weights);
    uint8_t* zp = im->alloc<uint8_t>(static_cast<int64_t>(q.G) * q.N_pad, &im->mem.weights);
    CUDA_OK(cudaMemsetAsync(zp, 8, static_cast<size_t>(q.G) * q.N_pad, st));
    q.zeros = zp;
    L.kind = std::string("w4-") + (spec.group ? "g" + std::to_string(spec.group) : "pc") + "-asym";
  };
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    im->attn_norm[l] = rand_f32(D, 0.9f, 1.1f, &im->mem.weights);
    im->ffn_norm[l] = rand_f32(D, 0.9f, 1.1f, &im->mem.weights);
    for (Module mod : kAllModules) {
      const ModuleShape shape = module_shape(cfg, mod);
      rand_linear(im->lin[l][mod], shape.out, shape.in);
    }
  }
  const int64_t quant_bytes = im->mem.weights;  // the model the EC budget is a share of
  if (spec.kind == WeightKind::kW4Ec) {
    // Placement as calibrations on real models come out: spread over layers, the most
    // damaged module types first (down, o, v, then the rest), rank r each, until the
    // budget (EC fp16 bytes / quantized model bytes) is spent.
    const int r = spec.ec_rank;
    SPEAR_CHECK(r >= 1 && r <= 128, "bench-latency: --ec-rank must be in 1..128");
    const double budget = spec.ec_budget * static_cast<double>(quant_bytes);
    double used = 0;
    const bool naive = im->opt.ec_path == EcPath::kNaive;
    const Module order[] = {Module::Down, Module::O, Module::V, Module::Gate, Module::Up, Module::Q, Module::K};
    for (Module mod : order)
      for (int64_t l = 0; l < cfg.num_layers; ++l) {
        GpuLinear& L = im->lin[l][mod];
        const double bytes = 2.0 * r * (L.K + L.N) + (spec.ec_full_gate ? 2.0 * (r * r + r) : 0.0);
        if (used + bytes > budget) continue;
        used += bytes;
        L.r = r;
        const float as = std::sqrt(3.0f / L.K), bs = 0.05f * std::sqrt(3.0f / r);
        if (naive) {
          // separate launches: row-major factors, and the full r x r gate when asked for
          L.A = rand_f16(static_cast<int64_t>(r) * L.K, as, &im->mem.ec);
          L.B = rand_f16(static_cast<int64_t>(L.N) * r, bs, &im->mem.ec);
          if (spec.ec_full_gate) {
            L.G = rand_f32(static_cast<int64_t>(r) * r, -0.1f, 0.1f, &im->mem.ec);
            L.c = rand_f32(r, -0.1f, 0.1f, &im->mem.ec);
          }
        } else {
          EcTerm& e = L.ect;
          e.r = r;
          e.r_pad = static_cast<int>(round_up(r, 16));
          e.gate = spec.ec_full_gate ? Gate::kFull : Gate::kSigmoid2;
          // the kernel's layouts (values do not matter for speed); padding must hold zeros,
          // so the buffers are filled only when there is none (the real shapes have none)
          const int64_t an = static_cast<int64_t>(e.r_pad) * L.q.K_pad, bn = static_cast<int64_t>(L.q.N_pad) * e.r_pad;
          __half* a = im->alloc<__half>(an, &im->mem.ec);
          __half* b = im->alloc<__half>(bn, &im->mem.ec);
          CUDA_OK(cudaMemsetAsync(a, 0, an * 2, st));
          CUDA_OK(cudaMemsetAsync(b, 0, bn * 2, st));
          if (e.r_pad == r && L.q.K_pad == L.K) CUDA_OK(fill_uniform_f16(a, an, next_seed(), as, st));
          if (e.r_pad == r && L.q.N_pad == L.N) CUDA_OK(fill_uniform_f16(b, bn, next_seed(), bs, st));
          e.a = a;
          e.b = b;
          if (spec.ec_full_gate) {  // G (r_pad, r_pad): zero padding, so filled only when there is none
            const int64_t gn = static_cast<int64_t>(e.r_pad) * e.r_pad;
            float* g = im->alloc<float>(gn, &im->mem.ec);
            CUDA_OK(cudaMemsetAsync(g, 0, gn * sizeof(float), st));
            if (e.r_pad == r) CUDA_OK(fill_uniform_f32(g, gn, next_seed(), -0.1f, 0.1f, st));
            e.gate_g = g;
          } else {
            e.gate_g = rand_f32(e.r_pad, -0.2f, 0.2f, &im->mem.ec);
          }
          e.gate_c = rand_f32(e.r_pad, -0.2f, 0.2f, &im->mem.ec);
          L.fused = true;
        }
        L.kind += "+ec(r=" + std::to_string(r) + ")";
        im->max_r = std::max(im->max_r, r);
      }
  }
  // Groups that read one input and carry no EC run as one GEMM, as GpuModel::create stacks
  // them: random weights of the stacked shape replace the members' (same bytes in all).
  if (im->opt.fuse_projections) {
    auto fuse = [&](int64_t l, const std::vector<Module>& ms, GpuLinear& dst, char& fused) {
      int64_t N = 0;
      for (Module m : ms) {
        if (im->lin[l][m].r > 0) return;
        N += im->lin[l][m].N;
      }
      for (Module m : ms) {
        GpuLinear& L = im->lin[l][m];
        for (const void* p : std::initializer_list<const void*>{L.w16, L.q.qweight, L.q.scales, L.q.zeros})
          im->release(p);
        L = GpuLinear{};
      }
      rand_linear(dst, N, module_shape(cfg, ms[0]).in);
      fused = 1;
    };
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      fuse(l, {Module::Q, Module::K, Module::V}, im->qkv[l], im->qkv_fused[l]);
      fuse(l, {Module::Gate, Module::Up}, im->gate_up[l], im->gu_fused[l]);
    }
  }
  CUDA_OK(cudaStreamSynchronize(st));
  im->init_buffers();
  // Random K/V everywhere, so fake contexts attend over realistic values.
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const int64_t n = im->num_blocks * im->opt.block_size * im->KVD();
    CUDA_OK(fill_uniform_f16(im->kc[l], n, next_seed(), 1.0f, st));
    CUDA_OK(fill_uniform_f16(im->vc[l], n, next_seed(), 1.0f, st));
  }
  CUDA_OK(cudaStreamSynchronize(st));
  return std::unique_ptr<GpuModel>(new GpuModel(std::move(im)));
}

const ModelConfig& GpuModel::config() const { return impl_->cfg; }
const GpuMemory& GpuModel::memory() const { return impl_->mem; }
const GpuOptions& GpuModel::options() const { return impl_->opt; }
int64_t GpuModel::kv_blocks_free() const { return static_cast<int64_t>(impl_->free_blocks.size()); }
int GpuModel::last_rows() const { return impl_->last_rows; }
double GpuModel::last_forward_device_seconds() const {
  if (!impl_->fwd_timed) return -1;
  CUDA_OK(cudaEventSynchronize(impl_->fwd1));
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, impl_->fwd0, impl_->fwd1));
  return ms * 1e-3;
}
int64_t GpuModel::kv_blocks_total() const { return impl_->num_blocks; }
void GpuModel::set_ec_enabled(bool on) {
  if (on == impl_->ec_enabled) return;
  impl_->ec_enabled = on;
  // captured graphs hold the old choice
  for (auto& [b, g] : impl_->graphs) cudaGraphExecDestroy(g);
  impl_->graphs.clear();
}

std::string GpuModel::describe() const {
  std::string out;
  auto fused = [&](const char* name, const std::vector<GpuLinear>& ls, const std::vector<char>& on) {
    std::map<std::string, int> kinds;
    for (size_t l = 0; l < ls.size(); ++l)
      if (on[l]) kinds[ls[l].kind]++;
    if (kinds.empty()) return;
    out += std::string(name) + " (one GEMM):";
    for (auto& [k, n] : kinds) out += " " + k + " x" + std::to_string(n);
    out += "\n";
  };
  fused("q|k|v", impl_->qkv, impl_->qkv_fused);
  fused("gate|up", impl_->gate_up, impl_->gu_fused);
  for (Module mod : kAllModules) {
    std::map<std::string, int> kinds;
    for (auto& layer : impl_->lin)
      if (!layer[mod].kind.empty()) kinds[layer[mod].kind]++;  // empty: runs stacked
    if (kinds.empty()) continue;
    out += std::string(module_name(mod)) + ":";
    for (auto& [k, n] : kinds) out += " " + k + " x" + std::to_string(n);
    out += "\n";
  }
  return out;
}

void GpuModel::reset(int slot) {
  SPEAR_CHECK(slot >= 0 && slot < impl_->opt.max_batch, "GPU: bad slot " + std::to_string(slot));
  Slot& s = impl_->slots[slot];
  for (int32_t b : s.blocks) impl_->free_blocks.push_back(b);
  s.blocks.clear();
  s.len = 0;
}

void GpuModel::fake_context(int slot, int n) {
  SPEAR_CHECK(slot >= 0 && slot < impl_->opt.max_batch, "GPU: bad slot " + std::to_string(slot));
  SPEAR_CHECK(n >= 1 && n <= impl_->opt.max_len, "GPU: fake context of " + std::to_string(n) + " positions");
  reset(slot);
  impl_->ensure_blocks(impl_->slots[slot], n);
  impl_->slots[slot].len = n;
}

const float* GpuModel::forward(std::span<const GpuChunk> chunks) { return impl_->forward(chunks); }

void GpuModel::logits_to_host(float* dst) const {
  CUDA_OK(cudaMemcpyAsync(dst, impl_->logits, sizeof(float) * impl_->last_rows * impl_->cfg.vocab_size,
                          cudaMemcpyDeviceToHost, impl_->stream));
  CUDA_OK(cudaStreamSynchronize(impl_->stream));
}

std::vector<int32_t> GpuModel::argmax_last() const {
  const int R = impl_->last_rows;
  CUDA_OK(argmax_rows(impl_->logits, impl_->cfg.vocab_size, R, static_cast<int>(impl_->cfg.vocab_size), impl_->ids,
                      impl_->stream));
  std::vector<int32_t> out(R);
  CUDA_OK(cudaMemcpyAsync(out.data(), impl_->ids, sizeof(int32_t) * R, cudaMemcpyDeviceToHost, impl_->stream));
  CUDA_OK(cudaStreamSynchronize(impl_->stream));
  return out;
}

std::vector<int32_t> GpuModel::sample_last(std::span<const RowSampling> rows) {
  const int R = impl_->last_rows;
  SPEAR_CHECK(static_cast<int>(rows.size()) == R, "GPU sampling: one parameter set per logits row expected");
  CUDA_OK(cudaMemcpyAsync(impl_->draw_params, rows.data(), sizeof(RowSampling) * R, cudaMemcpyHostToDevice,
                          impl_->stream));
  CUDA_OK(sample_rows(impl_->logits, impl_->cfg.vocab_size, R, static_cast<int>(impl_->cfg.vocab_size),
                      impl_->draw_params, impl_->ids, impl_->stream));
  std::vector<int32_t> out(R);
  CUDA_OK(cudaMemcpyAsync(out.data(), impl_->ids, sizeof(int32_t) * R, cudaMemcpyDeviceToHost, impl_->stream));
  CUDA_OK(cudaStreamSynchronize(impl_->stream));
  return out;
}

double GpuModel::nll_last(const std::vector<int32_t>& targets) const {
  const int R = impl_->last_rows;
  SPEAR_CHECK(static_cast<int>(targets.size()) == R, "GPU nll: one target per logits row expected");
  // targets go through the spare id buffer (argmax is not needed at the same time)
  CUDA_OK(cudaMemcpyAsync(impl_->ids, targets.data(), sizeof(int32_t) * R, cudaMemcpyHostToDevice, impl_->stream));
  CUDA_OK(nll_rows(impl_->logits, impl_->cfg.vocab_size, impl_->ids, R, static_cast<int>(impl_->cfg.vocab_size),
                   impl_->nll, impl_->stream));
  std::vector<float> h(R);
  CUDA_OK(cudaMemcpyAsync(h.data(), impl_->nll, sizeof(float) * R, cudaMemcpyDeviceToHost, impl_->stream));
  CUDA_OK(cudaStreamSynchronize(impl_->stream));
  double s = 0;
  for (float x : h) s += x;
  return s;
}

void GpuModel::decode_step_bench(int B, int32_t tok) {
  SPEAR_CHECK(B >= 1 && B <= impl_->opt.max_batch, "GPU: bench batch out of range");
  std::vector<GpuChunk> ch(B);
  std::vector<int32_t> toks(B, tok);
  for (int b = 0; b < B; ++b) {
    const int len = impl_->slots[b].len;
    SPEAR_CHECK(len >= 1, "GPU: decode_step_bench needs fake_context on every slot first");
    // rewrite the last position: the context stays at len
    ch[b] = GpuChunk{b, &toks[b], 1, len - 1, false};
  }
  impl_->forward(ch);
}

StepProfile GpuModel::profile_decode_step(int B, int32_t tok, int reps) {
  SPEAR_CHECK(reps >= 1 && reps <= 1000, "GPU: profile repetitions out of range");
  Impl& im = *impl_;
  SPEAR_CHECK(im.opt.graphs, "GPU: profile_decode_step compares against the decode graph; graphs are off");
  for (int i = 0; i < 3; ++i) decode_step_bench(B, tok);  // the graph captured, kernels tuned
  std::vector<GpuChunk> ch(B);
  std::vector<int32_t> toks(B, tok);
  for (int b = 0; b < B; ++b) ch[b] = GpuChunk{b, &toks[b], 1, im.slots[b].len - 1, false};
  CUDA_OK(cudaStreamSynchronize(im.stream));
  const std::vector<int> rows = im.upload_inputs(ch);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  StepProfile prof;
  // The graph step, queued behind a spin so that it starts right after the first event.
  cudaEvent_t g0, g1;
  CUDA_OK(cudaEventCreate(&g0));
  CUDA_OK(cudaEventCreate(&g1));
  std::vector<double> graph_us;
  for (int r = 0; r < reps; ++r) {
    CUDA_OK(gpu_spin(200000, im.stream));
    CUDA_OK(cudaEventRecord(g0, im.stream));
    CUDA_OK(cudaGraphLaunch(im.graphs.at(B), im.stream));
    CUDA_OK(cudaEventRecord(g1, im.stream));
    CUDA_OK(cudaEventSynchronize(g1));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, g0, g1));
    graph_us.push_back(ms * 1e3);
  }
  cudaEventDestroy(g0);
  cudaEventDestroy(g1);
  prof.graph_us = median(graph_us);
  // The ops one by one. The spin must outlast the host's queueing of the whole step: when
  // the first event has already completed by the time everything is queued, double it.
  int64_t spin_ns = 5'000'000;
  std::map<std::string, std::vector<double>> us_by_op;
  std::map<std::string, int> calls;
  std::vector<std::string> order;
  std::vector<double> sums;
  for (int r = 0; r < reps;) {
    CUDA_OK(gpu_spin(spin_ns, im.stream));
    im.marks.on = true;
    im.marks.used = 0;
    im.body(B, B, true, rows, false);
    im.mark("sampling (argmax)");
    CUDA_OK(argmax_rows(im.logits, im.V(), im.last_rows, im.V(), im.ids, im.stream));
    im.mark("end");
    im.marks.on = false;
    const bool late = cudaEventQuery(im.marks.events[0]) == cudaSuccess;
    CUDA_OK(cudaStreamSynchronize(im.stream));
    if (late) {
      SPEAR_CHECK(spin_ns < 2'000'000'000, "GPU: the step could not be queued ahead of the GPU");
      spin_ns *= 2;
      continue;
    }
    std::map<std::string, double> step;
    std::map<std::string, int> step_calls;
    double sum = 0;
    for (size_t i = 0; i + 1 < im.marks.used; ++i) {
      float ms = 0;
      CUDA_OK(cudaEventElapsedTime(&ms, im.marks.events[i], im.marks.events[i + 1]));
      const std::string name = im.marks.names[i];
      if (!step.count(name) && !us_by_op.count(name)) order.push_back(name);
      step[name] += ms * 1e3;
      step_calls[name] += 1;
      sum += ms * 1e3;
    }
    for (const auto& [name, us] : step) us_by_op[name].push_back(us);
    calls = step_calls;
    sums.push_back(sum);
    ++r;
  }
  for (const std::string& name : order) prof.ops.push_back({name, calls[name], median(us_by_op[name])});
  prof.sum_us = median(sums);
  return prof;
}

void GpuModel::synchronize() const { CUDA_OK(cudaStreamSynchronize(impl_->stream)); }

}  // namespace spear::cuda
