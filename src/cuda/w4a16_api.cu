// Host side of the W4A16 GEMM: argument checks, workspace, launches, the dispatcher with
// its autotuned on-disk table, device uploads.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <type_traits>

#include "cuda/w4a16.h"
#include "cuda/w4a16_batch.cuh"
#include "cuda/w4a16_dequant.cuh"
#include "cuda/w4a16_kernels.cuh"
#include "quant/gpu_layout.h"

namespace spear::cuda {

using detail::DecodeParams;
using detail::PrefillParams;

namespace detail {
namespace {
int g_pdl = -1;  // -1: not read yet
}
bool pdl_enabled() {
  if (g_pdl < 0) {
    const char* e = std::getenv("SPEAR_W4A16_PDL");
    g_pdl = (e && *e == '0') ? 0 : 1;
  }
  return g_pdl == 1;
}
}  // namespace detail

void w4a16_set_pdl(bool on) { detail::g_pdl = on ? 1 : 0; }
bool w4a16_pdl() { return detail::pdl_enabled(); }

namespace {
int g_batch = -1;  // -1: not read yet
}
void w4a16_set_batch(bool on) { g_batch = on ? 1 : 0; }
bool w4a16_batch() {
  if (g_batch < 0) {
    // On by default (first run on the GPU 2026-12-07: 43/43 GPU tests, memcheck clean,
    // bench_w4a16 in BENCHMARKS.md); SPEAR_W4A16_BATCH=0 leaves it out.
    const char* e = std::getenv("SPEAR_W4A16_BATCH");
    g_batch = (e && *e == '0') ? 0 : 1;
  }
  return g_batch == 1;
}

namespace {

constexpr int kFusedMaxM = 64;  // the decode kernel's largest token tile (tg = 8)

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

// 8-token groups that hold M tokens in one decode launch (at most 8: 64 tokens); the batch
// kernel's token tile is at least 2 groups.
int decode_tg(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }
int batch_tg(int M) { return std::max(2, decode_tg(M)); }

struct WsLayout {
  unsigned* ctrl;
  unsigned* cnt;
  float* u_fused;
  float* ws_y;
  float* u_split;
  size_t fixed_bytes;
  WsLayout(void* ws, const W4Matrix& w, const EcTerm* ec) {
    char* b = static_cast<char*>(ws);
    const int r_pad = ec ? ec->r_pad : 0;
    size_t off = 0;
    ctrl = reinterpret_cast<unsigned*>(b + off);
    off += 256;
    cnt = reinterpret_cast<unsigned*>(b + off);
    off += align256(sizeof(unsigned) * (w.N_pad / 16));
    u_fused = reinterpret_cast<float*>(b + off);
    off += align256(sizeof(float) * kFusedMaxM * r_pad);
    ws_y = reinterpret_cast<float*>(b + off);
    // (M, N_pad) for the decode and prefill kernels; the batch kernel's tiles in fragment
    // order cover up to 16 * 4 * 8 - 16 rows past N_pad (NT = 4, 8 warps)
    off += align256(sizeof(float) * kFusedMaxM * (static_cast<size_t>(w.N_pad) + 512));
    u_split = reinterpret_cast<float*>(b + off);
    fixed_bytes = off;
  }
};

bool x_vec_ok(const void* x, int64_t ldx, int K) {
  return K % 8 == 0 && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

bool weights_ok(const W4Matrix& w) {
  if (!w.qweight || !w.scales || !w.zeros || w.N <= 0 || w.K <= 0) return false;
  if (w.N_pad != round_up(w.N, 16) || w.K_pad != round_up(w.K, kGpuKUnit)) return false;
  if (reinterpret_cast<uintptr_t>(w.qweight) % 16 != 0) return false;
  if (w.group == 0) return w.G == 1;
  return w.group > 0 && w.group % kGpuKUnit == 0 && w.G == (w.K + w.group - 1) / w.group;
}

bool ec_ok(const EcTerm* ec, const W4Matrix& w) {
  if (!ec) return true;
  if (!ec->a || !ec->b || ec->r <= 0 || ec->r_pad != round_up(ec->r, 16) || ec->r_pad > 128) return false;
  if (reinterpret_cast<uintptr_t>(ec->a) % 16 || reinterpret_cast<uintptr_t>(ec->b) % 16) return false;
  if (ec->gate == Gate::kSigmoid2 || ec->gate == Gate::kFull) return ec->gate_g && ec->gate_c;
  return ec->gate == Gate::kIdentity;
}

// Dynamic shared memory of a decode launch: the bulk weight slice, then v and B rows.
constexpr size_t kBulkSmemLimit = 216 * 1024;  // leaves room for static smem under 227 KB
int max_units_of(const KernelConfig& c, const W4Matrix& w) {
  const int KU = w.K_pad / static_cast<int>(kGpuKUnit);
  return (KU + c.splits - 1) / c.splits;
}
size_t decode_smem(const KernelConfig& c, int M, const W4Matrix& w, const EcTerm* ec) {
  size_t s = c.bulk ? static_cast<size_t>(c.nt) * max_units_of(c, w) * 1024 : 0;
  if (ec) {
    const int chunk = std::min(std::max(M, 1), 8 * c.tg);
    s += sizeof(float) * chunk * ec->r_pad + 2 * static_cast<size_t>(16 * c.nt) * ec->r_pad;
  }
  return s;
}

// The batch kernel: output tiles of 16 nt warps rows, and its dynamic shared memory.
int batch_tiles(const KernelConfig& c, const W4Matrix& w) {
  const int rows = c.nt * c.warps;
  return (w.N_pad / 16 + rows - 1) / rows;
}
size_t batch_smem(const KernelConfig& c, const EcTerm* ec) {
  return static_cast<size_t>(detail::batch_smem_bytes(c.nt, c.tg, c.warps, ec ? ec->r_pad : 0));
}

// The fused EC waits inside the launch for A items held by other blocks: it needs the
// whole grid resident at once, and every A item (16 ranks x 128 inputs) on its own warp.
template <typename T>
bool fused_fits(const KernelConfig& c, int M, const W4Matrix& w, const EcTerm* ec) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return false;
  const int KU = w.K_pad / static_cast<int>(kGpuKUnit);
  const int nA = (ec->r_pad / 16) * KU;
  if (c.kernel == Kernel::kBatch) {
    const int grid = batch_tiles(c, w) * c.splits + (nA + c.warps - 1) / c.warps;
    return grid <= detail::batch_blocks_per_sm<T>(c.nt, c.tg, w.group != 0, c.warps * 32, batch_smem(c, ec)) * sms;
  }
  const int grid = (w.N_pad / 16 + c.nt - 1) / c.nt * c.splits + (nA + c.warps - 1) / c.warps;
  const int per_sm =
      detail::decode_blocks_per_sm<T>(c.nt, c.tg, w.group != 0, c.bulk != 0, c.warps * 32, decode_smem(c, M, w, ec));
  return grid <= per_sm * sms;
}

int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The decode kernels' parameters common to every config (and to the split u kernel).
DecodeParams decode_params(const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y,
                           int64_t ldy, const WsLayout& L) {
  DecodeParams d{};
  d.x = x;
  d.ldx = ldx;
  d.y = y;
  d.ldy = ldy;
  d.M = M;
  d.N = w.N;
  d.K = w.K;
  d.qw = static_cast<const uint4*>(w.qweight);
  d.scales = w.scales;
  d.zeros = w.zeros;
  d.N_pad = w.N_pad;
  d.KB = w.K_pad / 64;
  d.KU = w.K_pad / kGpuKUnit;
  d.upg = w.group ? w.group / kGpuKUnit : d.KU;
  d.x_vec = x_vec_ok(x, ldx, w.K);
  d.ctrl = L.ctrl;
  d.ws_cnt = L.cnt;
  d.ws_y = L.ws_y;
  if (ec) {
    d.ec_a = static_cast<const uint4*>(ec->a);
    d.ec_b = ec->b;
    d.gate_g = ec->gate_g;
    d.gate_c = ec->gate_c;
    d.gate = static_cast<int>(ec->gate);
    d.r_pad = ec->r_pad;
  }
  return d;
}

// Split EC, step 1: u (M, r_pad) f32 = A x for all M tokens (zeroed, then accumulated by
// (16-rank tile, K chunk, token chunk) blocks; about two blocks per SM).
template <typename T>
cudaError_t launch_split_u(DecodeParams d, float* u, cudaStream_t stream) {
  const int M = d.M, KU = d.KU;
  const int tg = decode_tg(M);
  const int mchunks = (M + tg * 8 - 1) / (tg * 8);
  const int a_tiles = d.r_pad / 16;
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int chunks = std::clamp((2 * sms + a_tiles * mchunks - 1) / (a_tiles * mchunks), 1, KU);
  d.a_units = (KU + chunks - 1) / chunks;
  d.a_chunks = (KU + d.a_units - 1) / d.a_units;
  d.u = u;
  cudaError_t e;
  if ((e = cudaMemsetAsync(u, 0, sizeof(float) * M * d.r_pad, stream)) != cudaSuccess) return e;
  return detail::launch_ec_u<T>(d, tg, a_tiles * d.a_chunks, mchunks, 256, stream);
}

template <typename T>
cudaError_t run_typed(const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y, int64_t ldy,
                      const KernelConfig& cfg, void* ws, cudaStream_t stream) {
  WsLayout L(ws, w, ec);
  const bool vec = x_vec_ok(x, ldx, w.K);
  const int KU = w.K_pad / kGpuKUnit;
  const int upg = w.group ? w.group / kGpuKUnit : KU;
  EcMode mode = ec ? (cfg.kernel == Kernel::kPrefill ? EcMode::kSplit : cfg.ec) : EcMode::kFused;
  const int NB = w.N_pad / 16;
  const int NG = (NB + cfg.nt - 1) / cfg.nt;
  // (config_ok checked this with the fp16 instantiation; the bf16 one may differ)
  if (ec && mode == EcMode::kFused && !fused_fits<T>(cfg, M, w, ec)) mode = EcMode::kSplit;
  cudaError_t e;
  DecodeParams d = decode_params(x, ldx, M, w, ec, y, ldy, L);

  if (ec && mode == EcMode::kSplit) {  // u = A x for all M tokens first
    if ((e = launch_split_u<T>(d, L.u_split, stream)) != cudaSuccess) return e;
    // The full gate: the decode kernel applies it to the rows of u it reads (as fused); for
    // the prefill kernel, u -> gamma(u) * u in place first, then it adds B u as it is.
    if (ec->gate == Gate::kFull && cfg.kernel == Kernel::kPrefill) {
      if ((e = detail::launch_ec_gate_full(L.u_split, M, ec->r_pad, ec->gate_g, ec->gate_c, stream)) != cudaSuccess)
        return e;
      d.gate = static_cast<int>(Gate::kIdentity);
    }
  }

  if (cfg.kernel == Kernel::kPrefill) {
    PrefillParams pp{};
    pp.x = x;
    pp.ldx = ldx;
    pp.y = y;
    pp.ldy = ldy;
    pp.M = M;
    pp.N = w.N;
    pp.K = w.K;
    pp.qw = d.qw;
    pp.scales = w.scales;
    pp.zeros = w.zeros;
    pp.N_pad = w.N_pad;
    pp.KB = d.KB;
    pp.KU = KU;
    pp.upg = upg;
    if (ec) {
      pp.ec = 2;
      pp.ec_b = ec->b;
      pp.u = L.u_split;
      pp.gate_g = ec->gate_g;
      pp.gate_c = ec->gate_c;
      pp.gate = d.gate;
      pp.r_pad = ec->r_pad;
    }
    pp.splits = cfg.splits;
    pp.ws_y = L.ws_y;
    pp.ws_cnt = L.cnt;
    return detail::launch_prefill<T>(pp, cfg.bm, w.group != 0, stream);
  }

  // Decode and batch, in chunks of 8 tg tokens (one chunk whenever M <= 8 tg).
  const bool batch = cfg.kernel == Kernel::kBatch;
  const int chunk = 8 * cfg.tg;
  d.NG = batch ? batch_tiles(cfg, w) : NG;  // output tiles (batch) or row groups (decode)
  d.splits = cfg.splits;
  d.max_units = max_units_of(cfg, w);
  d.w_smem = cfg.bulk ? cfg.nt * d.max_units * 1024 : 0;
  for (int t0 = 0; t0 < M; t0 += chunk) {
    DecodeParams c = d;
    c.M = std::min(chunk, M - t0);
    c.x = static_cast<const T*>(x) + static_cast<int64_t>(t0) * ldx;
    c.y = static_cast<T*>(y) + static_cast<int64_t>(t0) * ldy;
    int grid = c.NG * c.splits;
    const size_t smem = batch ? batch_smem(cfg, ec) : decode_smem(cfg, c.M, w, ec);
    if (ec) {
      if (mode == EcMode::kFused) {
        c.ec = 1;
        c.u = L.u_fused;
        c.nA = (ec->r_pad / 16) * KU;                 // one warp per 16 ranks x 128 inputs
        c.a_blocks = (c.nA + cfg.warps - 1) / cfg.warps;  // blocks of their own, first in the grid
        grid += c.a_blocks;
      } else {
        c.ec = 2;
        c.u = L.u_split + static_cast<int64_t>(t0) * ec->r_pad;
      }
    }
    e = batch ? detail::launch_batch<T>(c, cfg.nt, cfg.tg, w.group != 0, grid, cfg.warps * 32, smem, stream)
              : detail::launch_decode<T>(c, cfg.nt, cfg.tg, w.group != 0, cfg.bulk != 0, grid, cfg.warps * 32, smem,
                                         stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Scratch of the dequant path: with an EC, v (max_m, r_pad) in 16-bit and A (r_pad, K_pad)
// row-major in 16-bit (untiled from the kernel layout, for cuBLAS); then `rows` expanded rows
// of K_pad.
size_t dequant_v_bytes(int max_m, const EcTerm* ec) {
  return ec ? align256(2 * static_cast<size_t>(std::max(max_m, 1)) * ec->r_pad) : 0;
}
size_t dequant_ec_bytes(int max_m, const W4Matrix& w, const EcTerm* ec) {
  return ec ? dequant_v_bytes(max_m, ec) + align256(2 * static_cast<size_t>(ec->r_pad) * w.K_pad) : 0;
}
int dequant_rows(int rows, const W4Matrix& w) {
  return rows <= 0 ? w.N_pad : static_cast<int>(std::min<int64_t>(round_up(rows, 16), w.N_pad));
}

template <typename T>
cudaError_t dequant_typed(const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y, int64_t ldy,
                          int rows_req, cublasHandle_t blas, void* scratch, size_t scratch_bytes, void* ws,
                          cudaStream_t stream) {
  constexpr cudaDataType_t kType = std::is_same_v<T, __half> ? CUDA_R_16F : CUDA_R_16BF;
  const size_t v_bytes = dequant_ec_bytes(M, w, ec);
  const size_t row_bytes = 2 * static_cast<size_t>(w.K_pad);
  // rows per chunk: as asked (0: all), then as many as the scratch holds
  int rows = dequant_rows(rows_req, w);
  if (scratch_bytes < v_bytes + 16 * row_bytes) return cudaErrorInvalidValue;
  rows = static_cast<int>(std::min<int64_t>(rows, static_cast<int64_t>((scratch_bytes - v_bytes) / row_bytes) / 16 * 16));
  T* v = static_cast<T*>(scratch);
  T* wbuf = reinterpret_cast<T*>(static_cast<char*>(scratch) + v_bytes);
  cublasStatus_t st = cublasSetStream(blas, stream);
  if (st != CUBLAS_STATUS_SUCCESS) return cudaErrorInvalidResourceHandle;
  cudaError_t e;
  const float one = 1.0f, zero = 0.0f;
  for (int r0 = 0; r0 < w.N; r0 += rows) {
    const int rn = std::min(rows, w.N_pad - r0);
    if ((e = detail::launch_dequant<T>(static_cast<const uint4*>(w.qweight), w.scales, w.zeros, w.K_pad / 64, w.N_pad,
                                       w.group, r0, rn, wbuf, w.K_pad, stream)) != cudaSuccess)
      return e;
    // y[:, r0 : r0 + n] (column-major view: (n, M), ld ldy) = W_chunk (n, K) x^T
    const int n = std::min(rn, w.N - r0);
    st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, M, w.K, &one, wbuf, kType, w.K_pad, x, kType,
                      static_cast<int>(ldx), &zero, static_cast<T*>(y) + r0, kType, static_cast<int>(ldy),
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return cudaErrorLaunchFailure;
  }
  if (!ec) return cudaSuccess;
  WsLayout L(ws, w, ec);
  DecodeParams d = decode_params(x, ldx, M, w, ec, y, ldy, L);
  // u (M, r_pad) f32 = x A^T by cuBLAS over A untiled to row-major (the split u kernel's
  // atomics cost more than the GEMM at prefill sizes); column-major view: (r_pad, M).
  T* a_rows = reinterpret_cast<T*>(static_cast<char*>(scratch) + dequant_v_bytes(M, ec));
  if ((e = detail::launch_ec_a_untile(static_cast<const uint16_t*>(ec->a), ec->r_pad, w.K_pad,
                                      reinterpret_cast<uint16_t*>(a_rows), stream)) != cudaSuccess)
    return e;
  st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, ec->r_pad, M, w.K, &one, a_rows, kType, w.K_pad, x, kType,
                    static_cast<int>(ldx), &zero, L.u_split, CUDA_R_32F, ec->r_pad, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) return cudaErrorLaunchFailure;
  if (ec->gate == Gate::kFull) {  // gamma(u) * u in place, then a plain cast
    if ((e = detail::launch_ec_gate_full(L.u_split, M, ec->r_pad, ec->gate_g, ec->gate_c, stream)) != cudaSuccess)
      return e;
    d.gate = static_cast<int>(Gate::kIdentity);
  }
  if ((e = detail::launch_ec_gate_cast<T>(L.u_split, M, ec->r_pad, d.gate, ec->gate_g, ec->gate_c, v, stream)) !=
      cudaSuccess)
    return e;
  // y (column-major (N, M)) += B (N_pad, r_pad) row-major [= (r_pad, N) column-major, transposed] v^T
  st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, w.N, M, ec->r_pad, &one, ec->b, kType, ec->r_pad, v, kType,
                    ec->r_pad, &one, y, kType, static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  return st == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace

std::string KernelConfig::str() const {
  std::ostringstream o;
  if (kernel == Kernel::kDecode)
    o << "decode nt=" << nt << " tg=" << tg << " warps=" << warps << " splits=" << splits << (bulk ? " bulk=1" : "");
  else if (kernel == Kernel::kBatch)
    o << "batch nt=" << nt << " tg=" << tg << " warps=" << warps << " splits=" << splits;
  else if (kernel == Kernel::kPrefill)
    o << "prefill bm=" << bm << (splits > 1 ? " splits=" + std::to_string(splits) : std::string());
  else
    o << "dequant" << (rows > 0 ? " rows=" + std::to_string(rows) : std::string());
  o << " ec=" << (ec == EcMode::kFused ? "fused" : "split");
  return o.str();
}

bool KernelConfig::parse(const std::string& s, KernelConfig* out) {
  std::istringstream in(s);
  std::string tok;
  KernelConfig c;
  if (!(in >> tok)) return false;
  if (tok == "decode")
    c.kernel = Kernel::kDecode;
  else if (tok == "prefill")
    c.kernel = Kernel::kPrefill;
  else if (tok == "dequant")
    c.kernel = Kernel::kDequant;
  else if (tok == "batch")
    c.kernel = Kernel::kBatch;
  else
    return false;
  while (in >> tok) {
    const auto eq = tok.find('=');
    if (eq == std::string::npos) return false;
    const std::string k = tok.substr(0, eq), v = tok.substr(eq + 1);
    if (k == "ec") {
      if (v == "fused")
        c.ec = EcMode::kFused;
      else if (v == "split")
        c.ec = EcMode::kSplit;
      else
        return false;
      continue;
    }
    char* end = nullptr;
    const long n = std::strtol(v.c_str(), &end, 10);
    if (!end || *end || n <= 0 || n > 1 << 20) return false;
    if (k == "nt")
      c.nt = static_cast<int>(n);
    else if (k == "tg")
      c.tg = static_cast<int>(n);
    else if (k == "warps")
      c.warps = static_cast<int>(n);
    else if (k == "splits")
      c.splits = static_cast<int>(n);
    else if (k == "bm")
      c.bm = static_cast<int>(n);
    else if (k == "bulk")
      c.bulk = static_cast<int>(n);
    else if (k == "rows")
      c.rows = static_cast<int>(n);
    else
      return false;
  }
  *out = c;
  return true;
}

size_t w4a16_workspace_bytes(int max_m, const W4Matrix& w, const EcTerm* ec) {
  WsLayout L(nullptr, w, ec);
  const int r_pad = ec ? ec->r_pad : 0;
  return L.fixed_bytes + align256(sizeof(float) * static_cast<size_t>(std::max(max_m, 1)) * r_pad);
}

cudaError_t w4a16_workspace_init(void* ws, size_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(ws, 0, bytes, stream);
}

bool w4a16_config_ok(const KernelConfig& c, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec) {
  if (M < 0 || !weights_ok(w) || !ec_ok(ec, w)) return false;
  if (ec && (ec->r_pad != 0) && false) return false;
  const int KU = w.K_pad / kGpuKUnit;
  if (c.kernel == Kernel::kPrefill)  // split-K needs one token tile (the workspace holds kFusedMaxM rows)
    return (c.bm == 64 || c.bm == 128) && x_vec_ok(x, ldx, w.K) && c.splits >= 1 && c.splits <= KU &&
           (c.splits == 1 || M <= std::min(c.bm, kFusedMaxM));
  if (c.kernel == Kernel::kDequant) return c.rows >= 0 && c.rows % 16 == 0;
  if (c.kernel == Kernel::kBatch)
    return (c.nt == 1 || c.nt == 2 || c.nt == 4) && (c.tg == 2 || c.tg == 4 || c.tg == 8) &&
           (c.warps == 4 || c.warps == 8) && c.splits >= 1 && c.splits <= KU && x_vec_ok(x, ldx, w.K) &&
           (!ec || c.ec == EcMode::kFused || c.ec == EcMode::kSplit) && c.bulk == 0 &&
           batch_smem(c, ec) <= kBulkSmemLimit;
  if (c.kernel != Kernel::kDecode) return false;
  const bool nt_ok = c.nt == 1 || c.nt == 2 || c.nt == 4;
  const bool tg_ok = c.tg == 1 || c.tg == 2 || c.tg == 4 || c.tg == 8;
  if (!nt_ok || !tg_ok || c.nt * c.tg > 8) return false;
  if (c.warps < 1 || c.warps > 8 || c.splits < 1 || c.splits > KU) return false;
  if (ec && c.ec != EcMode::kFused && c.ec != EcMode::kSplit) return false;
  if (c.bulk != 0 && c.bulk != 1) return false;
  if (c.bulk && (c.tg > 2 || decode_smem(c, M, w, ec) > kBulkSmemLimit)) return false;
  return true;  // (a fused EC whose grid cannot be resident at once runs split: run_typed)
}

cudaError_t w4a16_gemm(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y,
                       int64_t ldy, const KernelConfig& cfg, void* ws, size_t ws_bytes, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (!x || !y || !ws || ldx < w.K || ldy < w.N) return cudaErrorInvalidValue;
  if (cfg.kernel == Kernel::kDequant) return cudaErrorInvalidValue;  // needs cuBLAS: w4a16_gemm_dequant
  if (!w4a16_config_ok(cfg, x, ldx, M, w, ec)) return cudaErrorInvalidValue;
  if (ws_bytes < w4a16_workspace_bytes(M, w, ec)) return cudaErrorInvalidValue;
  if (act == Act::kF16) return run_typed<__half>(x, ldx, M, w, ec, y, ldy, cfg, ws, stream);
  if (act == Act::kBF16) return run_typed<__nv_bfloat16>(x, ldx, M, w, ec, y, ldy, cfg, ws, stream);
  return cudaErrorInvalidValue;
}

size_t w4a16_dequant_scratch_bytes(int rows, int max_m, const W4Matrix& w, const EcTerm* ec) {
  return dequant_ec_bytes(max_m, w, ec) + 2 * static_cast<size_t>(dequant_rows(rows, w)) * w.K_pad;
}

cudaError_t w4a16_gemm_dequant(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec,
                               void* y, int64_t ldy, const KernelConfig& cfg, cublasHandle_t blas, void* scratch,
                               size_t scratch_bytes, void* ws, size_t ws_bytes, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (!x || !y || !blas || !scratch || ldx < w.K || ldy < w.N) return cudaErrorInvalidValue;
  if (cfg.kernel != Kernel::kDequant || !w4a16_config_ok(cfg, x, ldx, M, w, ec)) return cudaErrorInvalidValue;
  if (ec && ws_bytes < w4a16_workspace_bytes(M, w, ec)) return cudaErrorInvalidValue;
  if (ldx > INT32_MAX || ldy > INT32_MAX) return cudaErrorInvalidValue;
  if (act == Act::kF16)
    return dequant_typed<__half>(x, ldx, M, w, ec, y, ldy, cfg.rows, blas, scratch, scratch_bytes, ws, stream);
  if (act == Act::kBF16)
    return dequant_typed<__nv_bfloat16>(x, ldx, M, w, ec, y, ldy, cfg.rows, blas, scratch, scratch_bytes, ws, stream);
  return cudaErrorInvalidValue;
}

namespace {
// The batch kernel for 8 < M: the (nt, warps, splits) whose grid fills the GPU best (busy
// block slots over the slots of the waves it takes), at least 4 units of K per block; ties
// go to fewer splits (less workspace traffic). With an EC, fused if it fits, else split.
KernelConfig batch_heuristic(int M, const W4Matrix& w, const EcTerm* ec, int num_sms) {
  const int KU = std::max(1, w.K_pad / static_cast<int>(kGpuKUnit));
  KernelConfig best;
  best.kernel = Kernel::kBatch;
  best.tg = batch_tg(M);
  best.nt = 2;
  double best_score = -1;
  for (int warps : {8, 4})
    for (int nt : {2, 1}) {
      KernelConfig c = best;
      c.warps = warps;
      c.nt = nt;
      const int per_sm =
          std::max(1, detail::batch_blocks_per_sm<__half>(nt, c.tg, w.group != 0, warps * 32, batch_smem(c, ec)));
      const int slots = per_sm * num_sms, tiles = batch_tiles(c, w);
      for (int splits = 1; splits <= std::max(1, KU / 4); ++splits) {
        const int blocks = tiles * splits, waves = (blocks + slots - 1) / slots;
        const double score = static_cast<double>(blocks) / (static_cast<double>(waves) * slots);
        if (score > best_score + 1e-9) {
          best_score = score;
          best = c;
          best.splits = splits;
        }
      }
    }
  best.ec = EcMode::kFused;
  if (ec && !fused_fits<__half>(best, M, w, ec)) best.ec = EcMode::kSplit;
  return best;
}
}  // namespace

KernelConfig w4a16_heuristic(int M, const W4Matrix& w, const EcTerm* ec, int num_sms, bool x_vec) {
  KernelConfig c;
  const int KU = std::max(1, w.K_pad / static_cast<int>(kGpuKUnit));
  // The batch kernel where bench_w4a16 measured it ahead of the other kernels (H100,
  // 2026-12-07, the 8 Llama shapes, BENCHMARKS.md): every shape at 33-64 tokens; at 9-32
  // only the tall-K shapes (down, K > 2N: the decode kernel's split-K workspace round trip
  // costs more there) and, from 17, the wide ones (gate+up, N > 4K); beyond 64 tokens
  // (64-token launches that re-read the weights) only the tall-K ones (7B down at 128
  // tokens: 76 us against the prefill kernel's 98).
  const bool tall = w.K_pad > 2 * w.N_pad, wide = w.N_pad > 4 * w.K_pad;
  const bool use_batch = M <= 16 ? tall : M <= 32 ? tall || wide : M <= 64 ? true : tall;
  if (M > 8 && M <= 128 && x_vec && w4a16_batch() && use_batch)
    return batch_heuristic(M, w, ec, num_sms);
  if (M > 64 && x_vec) {
    c.kernel = Kernel::kPrefill;
    c.bm = M <= 128 ? 64 : 128;
    c.ec = EcMode::kSplit;
    return c;
  }
  // Decode: what autotuning chose on the H200 for the Llama shapes at M = 1 (bench_w4a16,
  // BENCHMARKS.md), as a rule: the register weight stream, two 16-row blocks per warp at
  // M <= 8 (one beyond), and split-K until the grid holds about three blocks per SM.
  c.kernel = Kernel::kDecode;
  c.tg = decode_tg(M);
  c.nt = c.tg == 1 ? 2 : 1;
  const int NB = std::max(1, w.N_pad / 16);
  const int NG = (NB + c.nt - 1) / c.nt;
  c.splits = std::clamp((3 * num_sms + NG / 2) / NG, 1, std::max(1, KU / 4));
  c.warps = std::clamp(KU / c.splits, 1, 8);
  c.ec = EcMode::kFused;
  if (ec && !fused_fits<__half>(c, M, w, ec)) {
    // The fused EC needs the whole grid resident: fewer, taller blocks first (nt = 4, as
    // autotuning picked for 7B down), then fewer K splits; split EC (two launches) last.
    KernelConfig f = c;
    if (f.tg * 4 <= 8) f.nt = 4;
    while (!fused_fits<__half>(f, M, w, ec) && f.splits > 1) {
      --f.splits;
      f.warps = std::clamp(KU / f.splits, 1, 8);
    }
    if (fused_fits<__half>(f, M, w, ec))
      c = f;
    else
      c.ec = EcMode::kSplit;
  }
  return c;
}

// ---- dispatcher ----------------------------------------------------------------------

W4A16Dispatcher::W4A16Dispatcher(std::string cache_path) : path_(std::move(cache_path)) {}

cudaError_t W4A16Dispatcher::init(int device) {
  cudaError_t e;
  if (device < 0 && (e = cudaGetDevice(&device)) != cudaSuccess) return e;
  cudaDeviceProp prop;
  if ((e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess) return e;
  gpu_ = prop.name;
  sms_ = prop.multiProcessorCount;
  if (path_.empty()) {
    if (const char* p = std::getenv("SPEAR_W4A16_CACHE"); p && *p) {
      path_ = p;
    } else {
      std::string safe;
      for (char ch : gpu_) safe += (std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_');
      const char* home = std::getenv("HOME");
      path_ = std::string(home && *home ? home : ".") + "/.cache/spear/w4a16-" + safe + ".txt";
    }
  }
  table_.clear();
  std::ifstream in(path_);
  std::string line;
  bool header_ok = false;
  while (std::getline(in, line)) {
    if (line.rfind("# spear w4a16 ", 0) == 0) {
      header_ok = line.substr(14) == gpu_;  // a table measured on another GPU is ignored
      continue;
    }
    if (!header_ok || line.empty() || line[0] == '#') continue;
    // key | config | us
    const auto a = line.find(" | "), b = line.rfind(" | ");
    if (a == std::string::npos || b == a) continue;
    Entry en;
    if (!KernelConfig::parse(line.substr(a + 3, b - a - 3), &en.cfg)) continue;
    en.us = std::strtof(line.c_str() + b + 3, nullptr);
    table_[line.substr(0, a)] = en;
  }
  return cudaSuccess;
}

std::string W4A16Dispatcher::key(Act act, int M, const W4Matrix& w, const EcTerm* ec) {
  std::ostringstream o;
  o << (act == Act::kF16 ? "f16" : "bf16") << " M" << pow2_at_least(std::max(M, 1)) << " K" << w.K << " N" << w.N
    << " r" << (ec ? ec->r_pad : 0) << " g" << w.group;
  return o.str();
}

KernelConfig W4A16Dispatcher::select(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w,
                                     const EcTerm* ec, bool* from_cache) const {
  if (from_cache) *from_cache = false;
  auto it = table_.find(key(act, M, w, ec));
  if (it != table_.end()) {
    KernelConfig c = it->second.cfg;
    if (c.kernel == Kernel::kDecode) {  // a bucket's tg may exceed what a smaller M needs
      const int need = decode_tg(M);
      if (c.tg > need && c.nt * need <= 8) c.tg = need;
    }
    if (c.kernel == Kernel::kBatch) c.tg = std::min(c.tg, batch_tg(M));
    const bool usable = c.kernel == Kernel::kDequant ? w4a16_config_ok(c, x, ldx, M, w, ec) &&
                                                            dequant_fits(c.rows, M, w, ec)
                                                      : w4a16_config_ok(c, x, ldx, M, w, ec);
    if (usable && !(c.kernel == Kernel::kBatch && !w4a16_batch())) {
      if (from_cache) *from_cache = true;
      return c;
    }
  }
  // Unmeasured: at prefill sizes the expanded weights' extra bytes are small next to the
  // GEMM, and cuBLAS' wgmma outruns the mma.sync prefill kernel (BENCHMARKS.md).
  if (M >= 512 && dequant_fits(0, M, w, ec)) {
    KernelConfig c;
    c.kernel = Kernel::kDequant;
    c.ec = EcMode::kSplit;
    return c;
  }
  return w4a16_heuristic(M, w, ec, sms_, x_vec_ok(x, ldx, w.K));
}

void W4A16Dispatcher::set_dequant(cublasHandle_t blas, void* scratch, size_t scratch_bytes) {
  blas_ = scratch ? blas : nullptr;
  scratch_ = scratch;
  scratch_bytes_ = scratch_bytes;
}

// At least 128 rows per chunk (a narrower cuBLAS call wastes the GPU).
bool W4A16Dispatcher::dequant_fits(int rows, int M, const W4Matrix& w, const EcTerm* ec) const {
  if (!blas_) return false;
  const int need_rows = std::min(rows > 0 ? rows : w.N_pad, std::min(w.N_pad, 128));
  return w4a16_dequant_scratch_bytes(need_rows, M, w, ec) <= scratch_bytes_;
}

cudaError_t W4A16Dispatcher::run_config(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w,
                                        const EcTerm* ec, void* y, int64_t ldy, const KernelConfig& cfg, void* ws,
                                        size_t ws_bytes, cudaStream_t stream) const {
  if (cfg.kernel == Kernel::kDequant) {
    if (!dequant_fits(cfg.rows, M, w, ec)) return cudaErrorInvalidValue;
    return w4a16_gemm_dequant(act, x, ldx, M, w, ec, y, ldy, cfg, blas_, scratch_, scratch_bytes_, ws, ws_bytes,
                              stream);
  }
  return w4a16_gemm(act, x, ldx, M, w, ec, y, ldy, cfg, ws, ws_bytes, stream);
}

cudaError_t W4A16Dispatcher::run(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec,
                                 void* y, int64_t ldy, void* ws, size_t ws_bytes, cudaStream_t stream) const {
  return run_config(act, x, ldx, M, w, ec, y, ldy, select(act, x, ldx, M, w, ec), ws, ws_bytes, stream);
}

std::vector<KernelConfig> W4A16Dispatcher::candidates(const void* x, int64_t ldx, int M, const W4Matrix& w,
                                                       const EcTerm* ec) const {
  std::vector<KernelConfig> cands;
  const int KU = w.K_pad / static_cast<int>(kGpuKUnit);
  const bool vec = x_vec_ok(x, ldx, w.K);
  if (M <= 64) {
    const int tg = decode_tg(M);
    for (int nt : {1, 2, 4}) {
      if (nt * tg > 8) continue;
      for (int splits : {1, 2, 3, 4, 6, 8}) {
        if (splits > KU) continue;
        for (int warps : {4, 8}) {
          if (KU / splits < warps / 2) continue;  // most warps would idle
          for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
            if (!ec && m == EcMode::kSplit) continue;
            KernelConfig c;
            c.kernel = Kernel::kDecode;
            c.nt = nt;
            c.tg = tg;
            c.splits = splits;
            c.warps = warps;
            c.ec = m;
            cands.push_back(c);
          }
        }
      }
    }
    if (tg <= 2)  // bulk (TMA) weight stream
      for (int nt : {1, 2, 4}) {
        if (nt * tg > 8) continue;
        for (int splits : {1, 2, 3, 4, 6, 8, 12, 16}) {
          if (splits > KU) continue;
          for (int warps : {4, 8}) {
            if (KU / splits < warps / 2) continue;
            for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
              if (!ec && m == EcMode::kSplit) continue;
              KernelConfig c;
              c.kernel = Kernel::kDecode;
              c.nt = nt;
              c.tg = tg;
              c.splits = splits;
              c.warps = warps;
              c.bulk = 1;
              c.ec = m;
              cands.push_back(c);
            }
          }
        }
      }
  }
  if (vec && M > 8 && w4a16_batch())  // the batch kernel: 8 tg tokens per launch (chunks beyond 64)
    for (int nt : {1, 2, 4})
      for (int warps : {4, 8})
        for (int splits : {1, 2, 3, 4, 6, 8, 12, 16}) {
          if (splits > 1 && KU / splits < 2) continue;  // a pipeline of one unit
          for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
            if (!ec && m == EcMode::kSplit) continue;
            KernelConfig c;
            c.kernel = Kernel::kBatch;
            c.nt = nt;
            c.tg = batch_tg(M);
            c.warps = warps;
            c.splits = splits;
            c.ec = m;
            cands.push_back(c);
          }
        }
  if (vec && M >= 16)
    for (int bm : {64, 128}) {
      KernelConfig c;
      c.kernel = Kernel::kPrefill;
      c.bm = bm;
      c.ec = EcMode::kSplit;
      cands.push_back(c);
      if (bm == 64 && M <= 64)  // one token tile: split-K fills the GPU
        for (int splits : {2, 3, 4, 6, 8}) {
          c.splits = splits;
          cands.push_back(c);
        }
    }
  if (blas_ && M >= 32)  // dequantize + cuBLAS, whole matrix or in chunks (L2-sized at 4096 x 4096)
    for (int rows : {0, 8192, 4096, 2048}) {
      if (rows >= w.N_pad || !dequant_fits(rows, M, w, ec)) continue;
      KernelConfig c;
      c.kernel = Kernel::kDequant;
      c.rows = rows;
      c.ec = EcMode::kSplit;
      cands.push_back(c);
    }
  std::vector<KernelConfig> ok;
  for (const KernelConfig& c : cands)  // fused candidates only where they really run fused
    if (w4a16_config_ok(c, x, ldx, M, w, ec) &&
        !(ec && (c.kernel == Kernel::kDecode || c.kernel == Kernel::kBatch) && c.ec == EcMode::kFused &&
          !fused_fits<__half>(c, M, w, ec)))
      ok.push_back(c);
  return ok;
}

void W4A16Dispatcher::record(Act act, int M, const W4Matrix& w, const EcTerm* ec, const KernelConfig& cfg, float us) {
  const std::string k = key(act, M, w, ec);
  auto it = table_.find(k);
  if (it == table_.end() || us < it->second.us) table_[k] = Entry{cfg, us};
}

cudaError_t W4A16Dispatcher::autotune(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w,
                                      const EcTerm* ec, void* y, int64_t ldy, void* ws, size_t ws_bytes,
                                      cudaStream_t stream, KernelConfig* best, float* best_us, int reps) {
  std::vector<KernelConfig> cands = candidates(x, ldx, M, w, ec);
  const bool vec = x_vec_ok(x, ldx, w.K);
  if (cands.empty()) cands.push_back(w4a16_heuristic(M, w, ec, sms_, vec));
  cudaEvent_t e0, e1;
  cudaError_t e;
  if ((e = cudaEventCreate(&e0)) != cudaSuccess) return e;
  if ((e = cudaEventCreate(&e1)) != cudaSuccess) return e;
  float best_t = 1e30f;
  KernelConfig best_c = cands[0];
  for (const KernelConfig& c : cands) {
    if (!w4a16_config_ok(c, x, ldx, M, w, ec)) continue;
    bool failed = false;
    for (int i = 0; i < 3 && !failed; ++i)
      failed = run_config(act, x, ldx, M, w, ec, y, ldy, c, ws, ws_bytes, stream) != cudaSuccess;
    if (failed) continue;
    cudaEventRecord(e0, stream);
    for (int i = 0; i < reps; ++i) run_config(act, x, ldx, M, w, ec, y, ldy, c, ws, ws_bytes, stream);
    cudaEventRecord(e1, stream);
    if ((e = cudaEventSynchronize(e1)) != cudaSuccess) break;
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    const float us = ms * 1000.f / reps;
    if (us < best_t) {
      best_t = us;
      best_c = c;
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (e != cudaSuccess) return e;
  table_[key(act, M, w, ec)] = Entry{best_c, best_t};
  if (best) *best = best_c;
  if (best_us) *best_us = best_t;
  return cudaGetLastError();
}

bool W4A16Dispatcher::save() const {
  std::error_code ec;
  const std::filesystem::path p(path_);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  std::ofstream out(path_);
  if (!out) return false;
  out << "# spear w4a16 " << gpu_ << "\n# key | config | us (autotuned)\n";
  for (const auto& [k, v] : table_) out << k << " | " << v.cfg.str() << " | " << v.us << "\n";
  return static_cast<bool>(out);
}

// ---- uploads ---------------------------------------------------------------------------

cudaError_t w4_upload(const GpuW4Layout& l, W4Matrix* out) {
  W4Matrix w;
  void *q = nullptr, *s = nullptr, *z = nullptr;
  cudaError_t e;
  if ((e = cudaMalloc(&q, l.qweight.size())) != cudaSuccess) return e;
  if ((e = cudaMalloc(&s, l.scales.size() * sizeof(float))) != cudaSuccess) return e;
  if ((e = cudaMalloc(&z, l.zeros.size())) != cudaSuccess) return e;
  cudaMemcpy(q, l.qweight.data(), l.qweight.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(s, l.scales.data(), l.scales.size() * sizeof(float), cudaMemcpyHostToDevice);
  if ((e = cudaMemcpy(z, l.zeros.data(), l.zeros.size(), cudaMemcpyHostToDevice)) != cudaSuccess) return e;
  w.qweight = q;
  w.scales = static_cast<float*>(s);
  w.zeros = static_cast<uint8_t*>(z);
  w.N = static_cast<int>(l.N);
  w.K = static_cast<int>(l.K);
  w.N_pad = static_cast<int>(l.N_pad);
  w.K_pad = static_cast<int>(l.K_pad);
  w.group = static_cast<int>(l.group);
  w.G = static_cast<int>(l.G);
  *out = w;
  return cudaSuccess;
}

void w4_free(W4Matrix* w) {
  cudaFree(const_cast<void*>(w->qweight));
  cudaFree(const_cast<float*>(w->scales));
  cudaFree(const_cast<uint8_t*>(w->zeros));
  *w = W4Matrix{};
}

cudaError_t ec_upload(const std::vector<uint16_t>& a_tiled, const std::vector<uint16_t>& b_padded, const float* g,
                      const float* c, int r, Gate gate, EcTerm* out) {
  EcTerm t;
  t.r = r;
  t.r_pad = static_cast<int>(round_up(r, 16));
  t.gate = gate;
  void *a = nullptr, *b = nullptr;
  float *gg = nullptr, *gc = nullptr;
  cudaError_t e;
  if ((e = cudaMalloc(&a, a_tiled.size() * 2)) != cudaSuccess) return e;
  if ((e = cudaMalloc(&b, b_padded.size() * 2)) != cudaSuccess) return e;
  const bool full = gate == Gate::kFull;
  const size_t g_count = full ? static_cast<size_t>(t.r_pad) * t.r_pad : static_cast<size_t>(t.r_pad);
  if ((e = cudaMalloc(&gg, g_count * sizeof(float))) != cudaSuccess) return e;
  if ((e = cudaMalloc(&gc, t.r_pad * sizeof(float))) != cudaSuccess) return e;
  std::vector<float> hg(g_count, 0.f), hc(t.r_pad, 0.f);
  for (int j = 0; j < r; ++j) {
    if (full)
      for (int l = 0; l < r; ++l) hg[static_cast<size_t>(l) * t.r_pad + j] = g ? g[static_cast<size_t>(j) * r + l] : 0.f;
    else
      hg[j] = g ? g[j] : 0.f;
    hc[j] = c ? c[j] : 0.f;
  }
  cudaMemcpy(a, a_tiled.data(), a_tiled.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(b, b_padded.data(), b_padded.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(gg, hg.data(), g_count * sizeof(float), cudaMemcpyHostToDevice);
  if ((e = cudaMemcpy(gc, hc.data(), t.r_pad * sizeof(float), cudaMemcpyHostToDevice)) != cudaSuccess) return e;
  t.a = a;
  t.b = b;
  t.gate_g = gg;
  t.gate_c = gc;
  *out = t;
  return cudaSuccess;
}

void ec_free(EcTerm* ec) {
  cudaFree(const_cast<void*>(ec->a));
  cudaFree(const_cast<void*>(ec->b));
  cudaFree(const_cast<float*>(ec->gate_g));
  cudaFree(const_cast<float*>(ec->gate_c));
  *ec = EcTerm{};
}

}  // namespace spear::cuda
