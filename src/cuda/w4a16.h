#pragma once
// spear's CUDA W4A16 GEMM (issue 4): y = x Q(W)^T  [+ B (gamma(A x) * A x)]  with 4-bit
// weights (per output channel or groups of a multiple of 128; asymmetric or symmetric),
// fp16 or bf16 activations, fp32 accumulation, and an optional low-rank Error
// Compensator (EC) fused into the epilogue.
//
// FlashInfer-style API: plain device pointers, an explicit workspace, a cudaStream_t, and
// a cudaError_t back (cudaErrorInvalidValue for bad arguments). Nothing allocates or
// synchronizes inside w4a16_gemm; every call is CUDA-graph capturable.
// Layouts: src/quant/gpu_layout.h (built on the CPU by repack_w4 / repack_ec_a / _b);
// kernels and derivations: docs/KERNELS.md.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace spear {
struct GpuW4Layout;
}

namespace spear::cuda {

enum class Act : int { kF16 = 0, kBF16 = 1 };

// The EC gate, applied per rank coordinate j to u = A x (per token):
//   kIdentity: v_j = u_j                      (a static low-rank correction)
//   kSigmoid2: v_j = 2 sigmoid(g_j u_j + c_j) u_j   (= u_j when g = c = 0)
//   kFull:     v_j = (1 + tanh(sum_l G_jl u_l + c_j)) u_j   (calibration's gate,
//              model/ec_params.h; kSigmoid2 is its diagonal case with g_j = 2 G_jj and c_j
//              doubled, since 1 + tanh(s) = 2 sigmoid(2 s))
// Pluggable: a new elementwise gate is one more enum value and one case in apply_gate
// (w4a16_device.cuh); kFull is applied to whole rows of u (gate_full_rows) once u is
// complete: in the fused epilogue, or by a small in-place kernel before a split GEMM.
enum class Gate : int { kIdentity = 0, kSigmoid2 = 1, kFull = 2 };

// A 4-bit weight matrix on the device, in GpuW4Layout's layout.
struct W4Matrix {
  const void* qweight = nullptr;   // (N_pad/16, K_pad/64, 32, 16 bytes), 16-byte aligned
  const float* scales = nullptr;   // (G, N_pad) fp32
  const uint8_t* zeros = nullptr;  // (G, N_pad) zero points (8 for symmetric)
  int N = 0, K = 0;                // logical shape: y has N columns, x has K
  int N_pad = 0, K_pad = 0;        // multiples of 16 and 128
  int group = 0;                   // 0 = per output channel, else a multiple of 128
  int G = 1;                       // number of groups
};

// The EC factors on the device, in the activation dtype (fp16 with Act::kF16, bf16 with
// Act::kBF16).
struct EcTerm {
  const void* a = nullptr;         // A (r, K) as repack_ec_a: (r_pad/16, K_pad/64, 4, 32, 8), 16-byte aligned
  const void* b = nullptr;         // B (N, r) as repack_ec_b: (N_pad, r_pad) row-major, 16-byte aligned
  const float* gate_g = nullptr;   // kSigmoid2: g (r_pad) fp32; kFull: G transposed, (r_pad, r_pad) fp32
                                   // with gate_g[l * r_pad + j] = G[j][l] (padding: 0); unused by kIdentity
  const float* gate_c = nullptr;   // (r_pad) fp32 (padding: 0)
  int r = 0, r_pad = 0;            // r_pad = 16 ceil(r / 16) <= 128
  Gate gate = Gate::kSigmoid2;
};

// kDecode: weights streamed from HBM straight into mma.sync (M <= 64).
// kPrefill: a cp.async-pipelined tiled mma.sync GEMM that dequantizes in registers.
// kDequant: the weights expanded to 16-bit rows in a scratch buffer (`rows` at a time) and
//   multiplied by cuBLAS (wgmma); for prefill-sized M, where the expansion's bytes are small
//   next to the GEMM. Needs a cuBLAS handle and scratch: W4A16Dispatcher::set_dequant, or
//   w4a16_gemm_dequant (w4a16_gemm refuses it).
// kBatch: batched decode and chunked prefill (9..64 tokens per launch, more in chunks): the
//   warps of a block split the outputs, x is staged in shared memory once per block, weights and
//   x move through a 4-stage cp.async pipeline, split-K across blocks; every weight is read and
//   dequantized once per launch and serves all its tokens (w4a16_batch.cuh).
enum class Kernel : int { kDecode = 0, kPrefill = 1, kDequant = 2, kBatch = 3 };
// kFused: one kernel computes u = A x from the x it loads for the GEMM (one warp per
//   16-rank x 128-input tile, right after griddepcontrol.wait), waits for all of u in its
//   epilogue, and applies gamma and B there (decode kernel only; needs the whole grid
//   resident at once, otherwise w4a16_gemm runs it as kSplit).
// kSplit: a small kernel computes u (all M), then the GEMM adds B (gamma(u) * u) in its
//   epilogue. Two launches (plus a memset of u).
enum class EcMode : int { kFused = 1, kSplit = 2 };

struct KernelConfig {
  Kernel kernel = Kernel::kDecode;
  int nt = 1;      // decode, batch: 16-row blocks per warp (1, 2, 4)
  int tg = 1;      // decode: 8-token groups (1, 2, 4, 8); M > 8 tg runs in chunks; nt * tg <= 8
                   // batch: 2, 4, 8 (any nt)
  int warps = 8;   // decode: warps per block (1..8); batch: 4 or 8
  int splits = 1;  // decode, batch: blocks along K (1..K_pad/128)
  int bulk = 0;    // decode, tg <= 2: 1 = each block's weight slice streamed into shared memory by
                   // cp.async.bulk (TMA) copies issued at entry; 0 = per-lane register loads
  int bm = 128;    // prefill: tokens per block (64 or 128)
  int rows = 0;    // dequant: output rows expanded per cuBLAS call (multiple of 16); 0 = all that fit
  EcMode ec = EcMode::kFused;  // used only with an EcTerm; prefill is always split (decode and
                               // batch: fused, or split where the grid cannot be resident at once)
  std::string str() const;
  static bool parse(const std::string& s, KernelConfig* out);
};

// Workspace: one buffer per stream, zeroed once by w4a16_workspace_init; every call
// leaves it zeroed again. Size for the largest M that will be used.
size_t w4a16_workspace_bytes(int max_m, const W4Matrix& w, const EcTerm* ec);
cudaError_t w4a16_workspace_init(void* ws, size_t bytes, cudaStream_t stream);

// y (M, N) = x (M, K) Q(W)^T [+ EC]. x: row stride ldx elements; y: row stride ldy.
// 16-byte loads of x are used when K, ldx are multiples of 8 and x is 16-byte aligned;
// otherwise the decode kernel reads element by element (the prefill kernel refuses).
cudaError_t w4a16_gemm(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec,
                       void* y, int64_t ldy, const KernelConfig& cfg, void* ws, size_t ws_bytes,
                       cudaStream_t stream);

// The dequantize-then-cuBLAS path (Kernel::kDequant) with its own scratch: for each chunk of
// cfg.rows output rows (0: as many as fit), expand them to 16-bit (act's type) in scratch and
// call cublasGemmEx on `blas` (its stream is set to `stream`); with an EC, u = A x (split),
// v = gamma(u) * u, then y += v B^T by cuBLAS. ws as for w4a16_gemm (u lives there).
// Scratch: w4a16_dequant_scratch_bytes(rows, M, w, ec); fewer rows per chunk fit a smaller one.
size_t w4a16_dequant_scratch_bytes(int rows, int max_m, const W4Matrix& w, const EcTerm* ec);
cudaError_t w4a16_gemm_dequant(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec,
                               void* y, int64_t ldy, const KernelConfig& cfg, cublasHandle_t blas, void* scratch,
                               size_t scratch_bytes, void* ws, size_t ws_bytes, cudaStream_t stream);

// Programmatic dependent launch (Hopper) of the decode kernel: it may start while the
// previous kernel in the stream drains, fetching its weights, and waits (griddepcontrol)
// before it reads x or the workspace. On by default; $SPEAR_W4A16_PDL=0 or
// w4a16_set_pdl(false) turns it off (process-wide).
void w4a16_set_pdl(bool on);
bool w4a16_pdl();

// The batch kernel (Kernel::kBatch) among the dispatcher's candidates and heuristic choices
// (process-wide): on by default; $SPEAR_W4A16_BATCH=0 or w4a16_set_batch(false) leaves it out,
// so a benchmark can measure the step with and without it in the same run (docs/KERNELS.md).
// An explicit config runs whatever it names.
void w4a16_set_batch(bool on);
bool w4a16_batch();

// True when cfg can run this problem (checked again by w4a16_gemm).
bool w4a16_config_ok(const KernelConfig& cfg, const void* x, int64_t ldx, int M, const W4Matrix& w,
                     const EcTerm* ec);
// A reasonable config without measurements.
KernelConfig w4a16_heuristic(int M, const W4Matrix& w, const EcTerm* ec, int num_sms, bool x_vec);

// ---- dispatcher: a table measured on the GPU, cached on disk keyed by GPU name -----------
// Key: (act, M bucket, K, N, r, group); M bucket = M rounded up to a power of two.
// File: one line per entry "key config us", header "# spear w4a16 <gpu name>".
class W4A16Dispatcher {
 public:
  // cache_path "": $SPEAR_W4A16_CACHE if set, else $HOME/.cache/spear/w4a16-<gpu>.txt.
  explicit W4A16Dispatcher(std::string cache_path = "");
  cudaError_t init(int device = -1);  // reads the GPU name and SM count, loads the cache
  const std::string& gpu_name() const { return gpu_; }
  const std::string& cache_path() const { return path_; }
  int num_sms() const { return sms_; }
  // Makes Kernel::kDequant available (a candidate of autotune, and the heuristic's choice for
  // M >= 512): cuBLAS calls go to `blas`, expanded weights to `scratch` (not owned).
  void set_dequant(cublasHandle_t blas, void* scratch, size_t scratch_bytes);
  bool dequant_available() const { return blas_ != nullptr; }
  static std::string key(Act act, int M, const W4Matrix& w, const EcTerm* ec);
  // The cached config for this shape when there is one, else the heuristic.
  KernelConfig select(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec,
                      bool* from_cache = nullptr) const;
  cudaError_t run(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y,
                  int64_t ldy, void* ws, size_t ws_bytes, cudaStream_t stream) const;
  // Runs one config (any kernel; kDequant through set_dequant's handle and scratch).
  cudaError_t run_config(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y,
                         int64_t ldy, const KernelConfig& cfg, void* ws, size_t ws_bytes, cudaStream_t stream) const;
  // Times every candidate config on these buffers (y is overwritten), stores the fastest
  // in the table under this shape's key. With ec, fused and split are both candidates.
  cudaError_t autotune(Act act, const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec, void* y,
                       int64_t ldy, void* ws, size_t ws_bytes, cudaStream_t stream, KernelConfig* best = nullptr,
                       float* best_us = nullptr, int reps = 20);
  // The configs autotune tries for this problem (valid ones only).
  std::vector<KernelConfig> candidates(const void* x, int64_t ldx, int M, const W4Matrix& w, const EcTerm* ec) const;
  // Stores a measurement made elsewhere (e.g. by CUDA-graph replay with rotated weights),
  // keeping the faster of it and any entry already under this key.
  void record(Act act, int M, const W4Matrix& w, const EcTerm* ec, const KernelConfig& cfg, float us);
  bool save() const;  // writes the table; false on an I/O error
  size_t size() const { return table_.size(); }

 private:
  std::string path_, gpu_;
  int sms_ = 132;
  cublasHandle_t blas_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  bool dequant_fits(int rows, int M, const W4Matrix& w, const EcTerm* ec) const;
  struct Entry {
    KernelConfig cfg;
    float us;
  };
  std::map<std::string, Entry> table_;
};

// ---- device copies of the CPU layouts (convenience; not needed by the kernels) --------
cudaError_t w4_upload(const spear::GpuW4Layout& l, W4Matrix* out);  // cudaMalloc + copy
void w4_free(W4Matrix* w);
// a_tiled/b_padded from repack_ec_a/_b; g/c: r values (padded with 0 to r_pad); with
// Gate::kFull, g is G (r, r) row-major (stored transposed and padded with 0 to (r_pad, r_pad)).
cudaError_t ec_upload(const std::vector<uint16_t>& a_tiled, const std::vector<uint16_t>& b_padded,
                      const float* g, const float* c, int r, Gate gate, EcTerm* out);
void ec_free(EcTerm* ec);

}  // namespace spear::cuda
