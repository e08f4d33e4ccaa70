// Correctness of the non-GEMM GPU Llama operations (src/cuda/llama_ops.h) against float64 CPU
// references: embeddings, RMSNorm (+ residual add), RoPE with the KV-cache write, paged decode
// attention (grouped-query heads, several splits, shuffled block tables, CUDA-graph capture),
// chunked causal prefill attention (tiles that straddle sequences), SwiGLU, the EC gate, the
// row reductions, conversions and the synthetic fills. Random inputs, odd sizes, poisoned
// (NaN) outputs: every element must be written and finite, nothing past a row touched.
// Skips without a GPU.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/gpu_test_util.h"
#include "core/dtype.h"
#include "cuda/llama_ops.h"

namespace spear::cuda {
namespace {


#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x << ": " << cudaGetErrorString(x)

constexpr uint16_t kPoison16 = 0xffff;  // NaN in fp16

uint16_t hb(float v) { return ::spear::f32_to_f16(v); }
double hv(uint16_t h) { return ::spear::f16_to_f32(h); }

// A device buffer of n elements of T, freed on scope exit.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    if (cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() { cudaFree(p); }
  cudaError_t up(const std::vector<T>& h) {
    return cudaMemcpy(p, h.data(), std::min(h.size(), n) * sizeof(T), cudaMemcpyHostToDevice);
  }
  cudaError_t down(std::vector<T>& h) const {
    h.resize(n);
    return cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  }
  cudaError_t poison() { return cudaMemset(p, 0xff, n * sizeof(T)); }
  __half* h() const { return reinterpret_cast<__half*>(p); }
};

std::vector<uint16_t> rand_half(size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = hb(scale * nd(rng));
  return v;
}

// sqrt(sum (a - r)^2 / sum r^2), or the absolute norm of a when r is all zero.
double rel_err(const std::vector<double>& a, const std::vector<double>& r) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - r[i]) * (a[i] - r[i]);
    den += r[i] * r[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// ---------------------------------------------------------------------------------------------

TEST(LlamaOps, EmbedLookup) {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  for (int D : {333, 256}) {
    SCOPED_TRACE("D=" + std::to_string(D));
    const int64_t V = 1000;
    const std::vector<int32_t> tok = {5, 0, 999, -1, 1000, 17, 5, 2147483647, 123};
    const int T = static_cast<int>(tok.size());
    std::vector<uint16_t> table = rand_half(static_cast<size_t>(V) * D, rng);
    Dev<uint16_t> dt(table.size());
    Dev<int32_t> dk(tok.size());
    Dev<float> dx(static_cast<size_t>(T) * D);
    CK(dt.up(table));
    CK(dk.up(tok));
    CK(dx.poison());
    CK(embed_lookup(dk.p, dt.h(), V, T, D, dx.p, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<float> x;
    CK(dx.down(x));
    for (int t = 0; t < T; ++t) {
      const bool ok = tok[t] >= 0 && tok[t] < V;
      for (int d = 0; d < D; ++d) {
        const double want = ok ? hv(table[static_cast<size_t>(tok[t]) * D + d]) : 0.0;
        ASSERT_EQ(x[static_cast<size_t>(t) * D + d], want) << "t=" << t << " d=" << d;
      }
    }
  }
}

void rmsnorm_ref(const std::vector<double>& x, const std::vector<float>& w, double eps, int T, int D,
                 std::vector<double>& out) {
  out.assign(static_cast<size_t>(T) * D, 0.0);
  for (int t = 0; t < T; ++t) {
    double ss = 0;
    for (int d = 0; d < D; ++d) ss += x[static_cast<size_t>(t) * D + d] * x[static_cast<size_t>(t) * D + d];
    const double rinv = 1.0 / std::sqrt(ss / D + eps);
    for (int d = 0; d < D; ++d)
      out[static_cast<size_t>(t) * D + d] = w[d] * x[static_cast<size_t>(t) * D + d] * rinv;
  }
}

// Row-relative error of an fp16 (T, D) result against a double reference; every element finite.
void check_rows_f16(const std::vector<uint16_t>& got, const std::vector<double>& ref, int T, int D, double tol) {
  for (int t = 0; t < T; ++t) {
    std::vector<double> a(D), r(D);
    for (int d = 0; d < D; ++d) {
      a[d] = hv(got[static_cast<size_t>(t) * D + d]);
      ASSERT_TRUE(std::isfinite(a[d])) << "t=" << t << " d=" << d << " not written or not finite";
      r[d] = ref[static_cast<size_t>(t) * D + d];
    }
    ASSERT_LE(rel_err(a, r), tol) << "row " << t;
  }
}

TEST(LlamaOps, RmsNorm) {
  REQUIRE_GPU();
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  const float eps = 1e-5f;
  for (int D : {333, 4096, 64}) {
    SCOPED_TRACE("D=" + std::to_string(D));
    const int T = 7;
    std::vector<float> x(static_cast<size_t>(T) * D), w(D);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (1.f + static_cast<float>(i / D % 3) * 4.f) * nd(rng);
    for (auto& v : w) v = 1.f + 0.3f * nd(rng);
    std::vector<double> xd(x.begin(), x.end()), ref;
    rmsnorm_ref(xd, w, eps, T, D, ref);
    Dev<float> dx(x.size()), dw(w.size());
    Dev<uint16_t> dout(x.size());
    CK(dx.up(x));
    CK(dw.up(w));
    CK(dout.poison());
    CK(rmsnorm(dx.p, dw.p, eps, T, D, dout.h(), nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> out;
    CK(dout.down(out));
    check_rows_f16(out, ref, T, D, 2e-3);
  }
}

TEST(LlamaOps, AddRmsNorm) {
  REQUIRE_GPU();
  std::mt19937 rng(13);
  std::normal_distribution<float> nd(0.f, 1.f);
  const float eps = 1e-6f;
  for (int D : {333, 1024}) {
    for (bool with_out : {true, false}) {
      SCOPED_TRACE("D=" + std::to_string(D) + (with_out ? " with out" : " add only"));
      const int T = 5;
      const int64_t ldd = D + 8;
      std::vector<float> x(static_cast<size_t>(T) * D), w(D);
      for (auto& v : x) v = 3.f * nd(rng);
      for (auto& v : w) v = 1.f + 0.3f * nd(rng);
      std::vector<uint16_t> delta = rand_half(static_cast<size_t>(T) * ldd, rng, 2.f);
      std::vector<float> xn(x.size());  // x + delta, rounded once in float as the kernel does
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < D; ++d)
          xn[static_cast<size_t>(t) * D + d] =
              x[static_cast<size_t>(t) * D + d] + static_cast<float>(hv(delta[static_cast<size_t>(t) * ldd + d]));
      std::vector<double> xd(xn.begin(), xn.end()), ref;
      rmsnorm_ref(xd, w, eps, T, D, ref);
      Dev<float> dx(x.size()), dw(w.size());
      Dev<uint16_t> dd(delta.size()), dout(x.size());
      CK(dx.up(x));
      CK(dw.up(w));
      CK(dd.up(delta));
      CK(dout.poison());
      CK(add_rmsnorm(dx.p, dd.h(), ldd, dw.p, eps, T, D, with_out ? dout.h() : nullptr, nullptr));
      CK(cudaDeviceSynchronize());
      std::vector<float> x2;
      CK(dx.down(x2));
      for (size_t i = 0; i < xn.size(); ++i) ASSERT_EQ(x2[i], xn[i]) << "x at " << i;
      std::vector<uint16_t> out;
      CK(dout.down(out));
      if (with_out) {
        check_rows_f16(out, ref, T, D, 2e-3);
      } else {
        for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], kPoison16) << "out touched at " << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

void run_rope(int n_heads, int n_kv, int hd, uint32_t seed) {
  SCOPED_TRACE("n_heads=" + std::to_string(n_heads) + " n_kv=" + std::to_string(n_kv) + " hd=" + std::to_string(hd));
  std::mt19937 rng(seed);
  const int T = 6, max_pos = 64, num_slots = 24, half = hd / 2;
  const int64_t ldq = static_cast<int64_t>(n_heads) * hd + 16, ldk = static_cast<int64_t>(n_kv) * hd + 8,
                ldv = static_cast<int64_t>(n_kv) * hd + 24;
  const std::vector<int32_t> pos = {0, 5, 63, 17, -1, 30}, slot = {3, 10, 0, -1, 7, 19};
  std::vector<float> cs(static_cast<size_t>(max_pos) * half), sn(cs.size());
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < half; ++i) {
      const float inv = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * i / hd));
      const float ang = static_cast<float>(p) * inv;
      cs[static_cast<size_t>(p) * half + i] = std::cos(ang);
      sn[static_cast<size_t>(p) * half + i] = std::sin(ang);
    }
  std::vector<uint16_t> q = rand_half(T * ldq, rng), k = rand_half(T * ldk, rng), v = rand_half(T * ldv, rng);
  const size_t cache_n = static_cast<size_t>(num_slots) * n_kv * hd;
  Dev<uint16_t> dq(q.size()), dk(k.size()), dv(v.size()), dkc(cache_n), dvc(cache_n);
  Dev<int32_t> dpos(T), dslot(T);
  Dev<float> dcs(cs.size()), dsn(sn.size());
  CK(dq.up(q));
  CK(dk.up(k));
  CK(dv.up(v));
  CK(dpos.up(pos));
  CK(dslot.up(slot));
  CK(dcs.up(cs));
  CK(dsn.up(sn));
  CK(dkc.poison());
  CK(dvc.poison());
  CK(rope_store_kv(dq.h(), ldq, dk.h(), ldk, dv.h(), ldv, dpos.p, dslot.p, dcs.p, dsn.p, max_pos, T, n_heads, n_kv, hd,
                   dkc.h(), dvc.h(), nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> q2, k2, kc, vc;
  CK(dq.down(q2));
  CK(dk.down(k2));
  CK(dkc.down(kc));
  CK(dvc.down(vc));
  // Rotates heads of row x (bits) in place in double; returns the reference of the row.
  auto rotate = [&](const uint16_t* x, int heads, int p) {
    std::vector<double> r(static_cast<size_t>(heads) * hd);
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i) {
        const double c = cs[static_cast<size_t>(p) * half + i], s = sn[static_cast<size_t>(p) * half + i];
        const double x0 = hv(x[h * hd + i]), x1 = hv(x[h * hd + i + half]);
        r[h * hd + i] = x0 * c - x1 * s;
        r[h * hd + i + half] = x1 * c + x0 * s;
      }
    return r;
  };
  auto close = [](double got, double want) { return std::fabs(got - want) <= 1e-3 * std::fabs(want) + 1e-5; };
  std::vector<bool> slot_used(num_slots, false);
  for (int t = 0; t < T; ++t) {
    SCOPED_TRACE("t=" + std::to_string(t));
    const bool skip = pos[t] < 0 || pos[t] >= max_pos || slot[t] < 0;
    if (skip) {
      for (int64_t e = 0; e < ldq; ++e) ASSERT_EQ(q2[t * ldq + e], q[t * ldq + e]) << "skipped token's q changed";
      for (int64_t e = 0; e < ldk; ++e) ASSERT_EQ(k2[t * ldk + e], k[t * ldk + e]) << "skipped token's k changed";
      continue;
    }
    slot_used[slot[t]] = true;
    const std::vector<double> rq = rotate(&q[t * ldq], n_heads, pos[t]), rk = rotate(&k[t * ldk], n_kv, pos[t]);
    for (int e = 0; e < n_heads * hd; ++e) ASSERT_TRUE(close(hv(q2[t * ldq + e]), rq[e])) << "q e=" << e;
    for (int64_t e = static_cast<int64_t>(n_heads) * hd; e < ldq; ++e) ASSERT_EQ(q2[t * ldq + e], q[t * ldq + e]);
    for (int e = 0; e < n_kv * hd; ++e) {
      ASSERT_TRUE(close(hv(k2[t * ldk + e]), rk[e])) << "k e=" << e;
      const size_t c = static_cast<size_t>(slot[t]) * n_kv * hd + e;
      ASSERT_EQ(kc[c], k2[t * ldk + e]) << "k_cache e=" << e;
      ASSERT_EQ(vc[c], v[t * ldv + e]) << "v_cache e=" << e;
    }
    for (int64_t e = static_cast<int64_t>(n_kv) * hd; e < ldk; ++e) ASSERT_EQ(k2[t * ldk + e], k[t * ldk + e]);
  }
  for (int s = 0; s < num_slots; ++s) {
    if (slot_used[s]) continue;
    for (int e = 0; e < n_kv * hd; ++e) {
      ASSERT_EQ(kc[static_cast<size_t>(s) * n_kv * hd + e], kPoison16) << "k_cache slot " << s << " touched";
      ASSERT_EQ(vc[static_cast<size_t>(s) * n_kv * hd + e], kPoison16) << "v_cache slot " << s << " touched";
    }
  }
}

TEST(LlamaOps, RopeStoreKv) {
  REQUIRE_GPU();
  run_rope(8, 2, 64, 21);
  run_rope(32, 8, 128, 22);
  run_rope(5, 5, 96, 23);  // rope itself takes any even head_dim
}

// ---------------------------------------------------------------------------------------------
// Paged KV fixture: n_seqs sequences with lens[i] cached positions (or more for prefill),
// blocks handed out in shuffled order, unused table entries pointing at a "trap" block whose
// K/V are huge (reading it would wreck the result).

struct Paged {
  int n_kv, hd, bs, max_blocks, num_blocks;
  std::vector<int32_t> table;   // (n_seqs, max_blocks)
  std::vector<uint16_t> kc, vc;  // (num_slots, n_kv, hd)
  size_t slot_of(int s, int p) const {
    return static_cast<size_t>(table[static_cast<size_t>(s) * max_blocks + p / bs]) * bs + p % bs;
  }
  const uint16_t* k(int s, int p, int kvh) const { return &kc[(slot_of(s, p) * n_kv + kvh) * hd]; }
  const uint16_t* v(int s, int p, int kvh) const { return &vc[(slot_of(s, p) * n_kv + kvh) * hd]; }
};

Paged make_paged(const std::vector<int>& cached, int n_kv, int hd, int bs, int extra_table_cols, std::mt19937& rng) {
  Paged pk;
  pk.n_kv = n_kv;
  pk.hd = hd;
  pk.bs = bs;
  int maxb = 1, total = 0;
  for (int len : cached) {
    maxb = std::max(maxb, (len + bs - 1) / bs);
    total += (len + bs - 1) / bs;
  }
  pk.max_blocks = maxb + extra_table_cols;
  pk.num_blocks = total + 4;  // spare blocks; the last one is the trap
  const int trap = pk.num_blocks - 1;
  std::vector<int32_t> ids(pk.num_blocks - 1);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  pk.table.assign(cached.size() * pk.max_blocks, trap);
  size_t next = 0;
  for (size_t s = 0; s < cached.size(); ++s)
    for (int b = 0; b < (cached[s] + bs - 1) / bs; ++b) pk.table[s * pk.max_blocks + b] = ids[next++];
  const size_t n = static_cast<size_t>(pk.num_blocks) * bs * n_kv * hd;
  pk.kc = rand_half(n, rng);
  pk.vc = rand_half(n, rng);
  for (size_t i = static_cast<size_t>(trap) * bs * n_kv * hd; i < n; ++i) {
    pk.kc[i] = hb(60.f);
    pk.vc[i] = hb(1000.f);
  }
  return pk;
}

struct PagedDev {
  Dev<uint16_t> kc, vc;
  Dev<int32_t> table;
  PagedKV kv;
  explicit PagedDev(const Paged& p) : kc(p.kc.size()), vc(p.vc.size()), table(p.table.size()) {
    kc.up(p.kc);
    vc.up(p.vc);
    table.up(p.table);
    kv.k_cache = kc.h();
    kv.v_cache = vc.h();
    kv.block_tables = table.p;
    kv.max_blocks = p.max_blocks;
    kv.block_size = p.bs;
    kv.n_kv_heads = p.n_kv;
    kv.head_dim = p.hd;
  }
};

// Softmax attention of one query head (bits q) over positions [0, n) of sequence s, in double.
void attend_ref(const Paged& pk, const uint16_t* q, int s, int kvh, int n, double scale, double* out) {
  const int hd = pk.hd;
  std::fill(out, out + hd, 0.0);
  if (n <= 0) return;
  std::vector<double> sc(n);
  double mx = -INFINITY;
  for (int p = 0; p < n; ++p) {
    const uint16_t* kr = pk.k(s, p, kvh);
    double a = 0;
    for (int d = 0; d < hd; ++d) a += hv(q[d]) * hv(kr[d]);
    sc[p] = a * scale;
    mx = std::max(mx, sc[p]);
  }
  double sum = 0;
  for (int p = 0; p < n; ++p) {
    sc[p] = std::exp(sc[p] - mx);
    sum += sc[p];
  }
  for (int p = 0; p < n; ++p) {
    const uint16_t* vr = pk.v(s, p, kvh);
    for (int d = 0; d < hd; ++d) out[d] += sc[p] / sum * hv(vr[d]);
  }
}

struct DecodeCase {
  int n_heads, n_kv, hd;
  std::vector<int> lens;
  int split_len = 0;  // 0: splits sized at run time (the engine's mode)
  int extra_max_len = 0;  // max_len = max(lens) + extra
  bool graph = false;
};

void run_decode(const DecodeCase& c, uint32_t seed) {
  char name[160];
  std::snprintf(name, sizeof name, "n_heads=%d n_kv=%d hd=%d split=%d B=%zu", c.n_heads, c.n_kv, c.hd, c.split_len,
                c.lens.size());
  SCOPED_TRACE(name);
  std::mt19937 rng(seed);
  const int B = static_cast<int>(c.lens.size()), hd = c.hd, nh = c.n_heads, G = nh / c.n_kv;
  const int max_len = *std::max_element(c.lens.begin(), c.lens.end()) + c.extra_max_len;
  const int bs = 16;
  std::vector<int> cached = c.lens;
  for (int& l : cached) l = std::max(l, 1);
  Paged pk = make_paged(cached, c.n_kv, hd, bs, (max_len + bs - 1) / bs + 1, rng);
  const int64_t ldq = static_cast<int64_t>(nh) * hd + 8, ldo = static_cast<int64_t>(nh) * hd + 8;
  std::vector<uint16_t> q = rand_half(static_cast<size_t>(B) * ldq, rng);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> ref(static_cast<size_t>(B) * nh * hd);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < nh; ++h)
      attend_ref(pk, &q[b * ldq + static_cast<int64_t>(h) * hd], b, h / G, c.lens[b], scale,
                 &ref[(static_cast<size_t>(b) * nh + h) * hd]);

  PagedDev dp(pk);
  Dev<uint16_t> dq(q.size()), dout(static_cast<size_t>(B) * ldo), dout2(static_cast<size_t>(B) * ldo);
  Dev<int32_t> dlens(B);
  CK(dq.up(q));
  CK(dlens.up(c.lens));
  const size_t wsb = decode_attention_ws_bytes(B, nh, hd, max_len, c.split_len);
  ASSERT_GT(wsb, 0u);
  Dev<uint8_t> ws(wsb);
  CK(ws.poison());
  CK(decode_attention_ws_init(ws.p, wsb, nullptr));
  CK(dout.poison());
  CK(decode_attention(dq.h(), ldq, dp.kv, dlens.p, B, nh, static_cast<float>(scale), max_len, dout.h(), ldo, ws.p, wsb,
                      nullptr, c.split_len));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out;
  CK(dout.down(out));
  {  // the call left its arrival counters zero: a second call on the same workspace agrees
    CK(dout2.poison());
    CK(decode_attention(dq.h(), ldq, dp.kv, dlens.p, B, nh, static_cast<float>(scale), max_len, dout2.h(), ldo, ws.p,
                        wsb, nullptr, c.split_len));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> again;
    CK(dout2.down(again));
    EXPECT_EQ(again, out) << "a second call on the same workspace differs";
  }
  double worst = 0;
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < nh; ++h) {
      std::vector<double> a(hd), r(hd);
      for (int d = 0; d < hd; ++d) {
        a[d] = hv(out[b * ldo + static_cast<int64_t>(h) * hd + d]);
        ASSERT_TRUE(std::isfinite(a[d])) << "b=" << b << " h=" << h << " d=" << d << " not written or not finite";
        r[d] = ref[(static_cast<size_t>(b) * nh + h) * hd + d];
        if (c.lens[b] == 0) {
          ASSERT_EQ(a[d], 0.0) << "seq_len 0 must give 0";
        }
      }
      const double e = rel_err(a, r);
      ASSERT_LE(e, 3e-3) << "b=" << b << " (len " << c.lens[b] << ") h=" << h;
      worst = std::max(worst, e);
    }
    for (int64_t e = static_cast<int64_t>(nh) * hd; e < ldo; ++e)
      ASSERT_EQ(out[b * ldo + e], kPoison16) << "wrote past n_heads * head_dim at b=" << b;
  }
  std::printf("  decode %-44s rel %.2e\n", name, worst);

  if (c.graph) {  // the same call captured into a CUDA graph gives the same bits
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    const cudaError_t le = decode_attention(dq.h(), ldq, dp.kv, dlens.p, B, nh, static_cast<float>(scale), max_len,
                                            dout2.h(), ldo, ws.p, wsb, st, c.split_len);
    cudaGraph_t g = nullptr;
    CK(cudaStreamEndCapture(st, &g));
    CK(le);
    cudaGraphExec_t ge = nullptr;
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(dout2.poison());
    CK(cudaGraphLaunch(ge, st));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaStreamSynchronize(st));
    std::vector<uint16_t> out2;
    CK(dout2.down(out2));
    EXPECT_EQ(out2, out) << "graph replay differs from the direct call";
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    cudaStreamDestroy(st);
  }
}

TEST(LlamaOps, DecodeAttentionGqa8x2Hd64) {
  REQUIRE_GPU();
  run_decode({8, 2, 64, {1, 37, 300, 16, 0, 513}}, 31);
}
TEST(LlamaOps, DecodeAttentionGqa32x8Hd128Graph) {
  REQUIRE_GPU();
  DecodeCase c{32, 8, 128, {1, 37, 300, 16, 0, 513}};
  c.graph = true;
  run_decode(c, 32);
}
TEST(LlamaOps, DecodeAttentionManySplits) {
  REQUIRE_GPU();
  run_decode({8, 2, 128, {700, 5, 64, 65}, 64}, 33);
  run_decode({8, 2, 64, {129, 1, 48}, 16}, 34);  // split_len == block_size
  run_decode({8, 2, 64, {1, 37, 300, 16, 0, 513}, 256}, 38);  // fixed chunks of 256
  // run-time splits: one sequence (many splits of few tiles each) and a long context (few
  // splits of many tiles)
  run_decode({32, 8, 128, {1000}}, 39);
  run_decode({8, 8, 64, {1500, 3}, 16}, 41);  // 94 splits of one head: merged from global memory
  DecodeCase longc{8, 8, 64, {4000, 64, 65}};
  longc.extra_max_len = 3000;
  run_decode(longc, 40);
}
TEST(LlamaOps, DecodeAttentionGroupSizes) {
  REQUIRE_GPU();
  run_decode({12, 4, 64, {100, 257}, 128}, 35);        // group 3 (not a power of two)
  run_decode({16, 1, 128, {200, 1, 31}}, 36);          // group 16
  run_decode({16, 2, 64, {300, 3}}, 37);               // group 8, head_dim 64
  run_decode({4, 2, 128, {90, 17}}, 38);               // group 2
  DecodeCase mha{4, 4, 64, {33, 600}};                 // group 1; max_len above every length
  mha.extra_max_len = 300;
  run_decode(mha, 39);
  run_decode({6, 1, 128, {257, 256, 255}}, 40);        // group 6, lengths around one split
}

// Head dims the tiled kernels do not cover go through the generic kernel (stories260K: 8).
TEST(LlamaOps, DecodeAttentionGenericHeadDims) {
  REQUIRE_GPU();
  run_decode({8, 4, 8, {1, 37, 300, 0, 17}}, 51);
  run_decode({6, 2, 96, {129, 5}}, 52);
  run_decode({4, 4, 256, {70, 1}}, 53);
}

// ---------------------------------------------------------------------------------------------

void run_prefill(int nh, int n_kv, int hd, uint32_t seed) {
  char name[120];
  std::snprintf(name, sizeof name, "n_heads=%d n_kv=%d hd=%d", nh, n_kv, hd);
  SCOPED_TRACE(name);
  std::mt19937 rng(seed);
  const int G = nh / n_kv, bs = 16;
  // Block-table rows: 0 continues at position 37 (30 new tokens), 1 one token at position 5,
  // 2 a fresh chunk at position 0 (45 tokens). Token order: row 2, row 0, row 1, so the tiles
  // of 16 tokens straddle sequences.
  std::vector<int32_t> q_seq, q_pos;
  for (int p = 0; p < 45; ++p) {
    q_seq.push_back(2);
    q_pos.push_back(p);
  }
  for (int p = 37; p < 67; ++p) {
    q_seq.push_back(0);
    q_pos.push_back(p);
  }
  q_seq.push_back(1);
  q_pos.push_back(5);
  const int T = static_cast<int>(q_seq.size());
  const int max_pos = 66;
  Paged pk = make_paged({67, 6, 45}, n_kv, hd, bs, 2, rng);
  const int64_t ldq = static_cast<int64_t>(nh) * hd + 24, ldo = static_cast<int64_t>(nh) * hd + 8;
  std::vector<uint16_t> q = rand_half(static_cast<size_t>(T) * ldq, rng, 2.f);  // peaky softmax
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> ref(static_cast<size_t>(T) * nh * hd);
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < nh; ++h)
      attend_ref(pk, &q[t * ldq + static_cast<int64_t>(h) * hd], q_seq[t], h / G, q_pos[t] + 1, scale,
                 &ref[(static_cast<size_t>(t) * nh + h) * hd]);
  PagedDev dp(pk);
  Dev<uint16_t> dq(q.size()), dout(static_cast<size_t>(T) * ldo);
  Dev<int32_t> dseq(T), dpos(T);
  CK(dq.up(q));
  CK(dseq.up(q_seq));
  CK(dpos.up(q_pos));
  CK(dout.poison());
  CK(prefill_attention(dq.h(), ldq, dp.kv, dseq.p, dpos.p, T, nh, static_cast<float>(scale), max_pos, dout.h(), ldo,
                       nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out;
  CK(dout.down(out));
  double worst = 0;
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < nh; ++h) {
      std::vector<double> a(hd), r(hd);
      for (int d = 0; d < hd; ++d) {
        a[d] = hv(out[t * ldo + static_cast<int64_t>(h) * hd + d]);
        ASSERT_TRUE(std::isfinite(a[d])) << "t=" << t << " h=" << h << " d=" << d << " not written or not finite";
        r[d] = ref[(static_cast<size_t>(t) * nh + h) * hd + d];
      }
      const double e = rel_err(a, r);
      ASSERT_LE(e, 3e-3) << "t=" << t << " (seq " << q_seq[t] << " pos " << q_pos[t] << ") h=" << h;
      worst = std::max(worst, e);
    }
    for (int64_t e = static_cast<int64_t>(nh) * hd; e < ldo; ++e)
      ASSERT_EQ(out[t * ldo + e], kPoison16) << "wrote past n_heads * head_dim at t=" << t;
  }
  std::printf("  prefill %-30s T=%d rel %.2e\n", name, T, worst);
}

TEST(LlamaOps, PrefillAttentionChunksGqa8x2Hd64) {
  REQUIRE_GPU();
  run_prefill(8, 2, 64, 41);
}
TEST(LlamaOps, PrefillAttentionChunksGqa32x8Hd128) {
  REQUIRE_GPU();
  run_prefill(32, 8, 128, 42);
}
TEST(LlamaOps, PrefillAttentionChunksMhaHd128) {
  REQUIRE_GPU();
  run_prefill(4, 4, 128, 43);
}
TEST(LlamaOps, PrefillAttentionGenericHeadDims) {
  REQUIRE_GPU();
  run_prefill(8, 4, 8, 44);
  run_prefill(6, 2, 96, 45);
}

// Prefill of a whole prompt gives, at its last token, what decode gives over the same cache.
TEST(LlamaOps, PrefillLastTokenMatchesDecode) {
  REQUIRE_GPU();
  std::mt19937 rng(44);
  const int nh = 8, n_kv = 2, hd = 128, L = 200;
  Paged pk = make_paged({L}, n_kv, hd, 16, 0, rng);
  std::vector<uint16_t> q = rand_half(static_cast<size_t>(L) * nh * hd, rng);
  std::vector<int32_t> seq(L, 0), pos(L);
  std::iota(pos.begin(), pos.end(), 0);
  PagedDev dp(pk);
  Dev<uint16_t> dq(q.size()), dpo(q.size()), ddo(static_cast<size_t>(nh) * hd);
  Dev<int32_t> dseq(L), dpos(L), dlen(1);
  CK(dq.up(q));
  CK(dseq.up(seq));
  CK(dpos.up(pos));
  CK(dlen.up({L}));
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  CK(prefill_attention(dq.h(), nh * hd, dp.kv, dseq.p, dpos.p, L, nh, scale, L - 1, dpo.h(), nh * hd, nullptr));
  const size_t wsb = decode_attention_ws_bytes(1, nh, hd, L);
  Dev<uint8_t> ws(wsb);
  CK(decode_attention_ws_init(ws.p, wsb, nullptr));
  CK(decode_attention(dq.h() + static_cast<size_t>(L - 1) * nh * hd, nh * hd, dp.kv, dlen.p, 1, nh, scale, L, ddo.h(),
                      nh * hd, ws.p, wsb, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> po, dec;
  CK(dpo.down(po));
  CK(ddo.down(dec));
  std::vector<double> a(static_cast<size_t>(nh) * hd), b(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = hv(po[static_cast<size_t>(L - 1) * nh * hd + i]);
    b[i] = hv(dec[i]);
  }
  EXPECT_LE(rel_err(a, b), 2e-3);
}

// ---------------------------------------------------------------------------------------------

TEST(LlamaOps, SiluMul) {
  REQUIRE_GPU();
  std::mt19937 rng(51);
  struct C {
    int T, H;
    bool fused;  // gate/up the two halves of one (T, 2H) buffer
  };
  for (const C& c : {C{5, 333, false}, C{7, 1024, true}, C{3, 8, false}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H));
    const int64_t ldg = c.fused ? 2 * c.H : c.H + 7, ldu = c.fused ? 2 * c.H : c.H;
    std::vector<uint16_t> g = rand_half(static_cast<size_t>(c.T) * ldg, rng, 3.f);
    std::vector<uint16_t> u = c.fused ? g : rand_half(static_cast<size_t>(c.T) * ldu, rng, 2.f);
    Dev<uint16_t> dg(g.size()), du(u.size()), dout(static_cast<size_t>(c.T) * c.H);
    CK(dg.up(g));
    CK(du.up(u));
    CK(dout.poison());
    const __half* gp = dg.h();
    const __half* up = c.fused ? dg.h() + c.H : du.h();
    CK(silu_mul(gp, ldg, up, ldu, c.T, c.H, dout.h(), nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> out;
    CK(dout.down(out));
    for (int t = 0; t < c.T; ++t)
      for (int h = 0; h < c.H; ++h) {
        const double gv = hv(g[t * ldg + h]);
        const double uv = c.fused ? hv(g[t * ldg + c.H + h]) : hv(u[t * ldu + h]);
        const double want = gv / (1.0 + std::exp(-gv)) * uv;
        const double got = hv(out[static_cast<size_t>(t) * c.H + h]);
        ASSERT_TRUE(std::isfinite(got)) << "t=" << t << " h=" << h;
        ASSERT_NEAR(got, want, 1e-3 * std::fabs(want) + 1e-5) << "t=" << t << " h=" << h;
      }
  }
}

TEST(LlamaOps, EcGate) {
  REQUIRE_GPU();
  std::mt19937 rng(52);
  std::normal_distribution<float> nd(0.f, 1.f);
  struct C {
    int T, r;
    bool gate, in_place;
  };
  for (const C& c : {C{13, 20, true, false}, C{9, 256, true, false}, C{17, 64, true, true}, C{5, 7, false, false},
                     C{4, 7, false, true}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " r=" + std::to_string(c.r) + (c.gate ? " G" : " static") +
                 (c.in_place ? " in place" : ""));
    std::vector<uint16_t> z = rand_half(static_cast<size_t>(c.T) * c.r, rng);
    std::vector<float> G(static_cast<size_t>(c.r) * c.r), cv(c.r);
    for (auto& v : G) v = nd(rng) / std::sqrt(static_cast<float>(c.r));
    for (auto& v : cv) v = 0.5f * nd(rng);
    Dev<uint16_t> dz(z.size()), ds(z.size());
    Dev<float> dG(G.size()), dc(cv.size());
    CK(dz.up(z));
    CK(dG.up(G));
    CK(dc.up(cv));
    CK(ds.poison());
    __half* s = c.in_place ? dz.h() : ds.h();
    CK(ec_gate(dz.h(), c.gate ? dG.p : nullptr, c.gate ? dc.p : nullptr, c.T, c.r, s, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> out;
    CK(c.in_place ? dz.down(out) : ds.down(out));
    for (int t = 0; t < c.T; ++t)
      for (int i = 0; i < c.r; ++i) {
        const size_t at = static_cast<size_t>(t) * c.r + i;
        if (!c.gate) {
          ASSERT_EQ(out[at], z[at]) << "static control must copy z";
          continue;
        }
        double u = cv[i];
        for (int j = 0; j < c.r; ++j) u += static_cast<double>(G[static_cast<size_t>(i) * c.r + j]) * hv(z[t * c.r + j]);
        const double want = (1.0 + std::tanh(u)) * hv(z[at]);
        const double got = hv(out[at]);
        ASSERT_TRUE(std::isfinite(got)) << "t=" << t << " i=" << i;
        ASSERT_NEAR(got, want, 1e-3 * std::fabs(want) + 1e-4) << "t=" << t << " i=" << i;
      }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(LlamaOps, ArgmaxRows) {
  REQUIRE_GPU();
  std::mt19937 rng(61);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int V : {32003, 32000, 5}) {
    SCOPED_TRACE("V=" + std::to_string(V));
    const int T = 6;
    const int64_t ld = V % 4 == 0 ? V : V + 5;
    std::vector<float> x(static_cast<size_t>(T) * ld, 1e30f);  // padding would win if read
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v) x[t * ld + v] = nd(rng);
    auto row = [&](int t) { return &x[t * ld]; };
    row(1)[std::min(100, V - 1)] = 10.f;
    row(1)[V - 1 > 100 ? 20000 % V : 0] = 10.f;  // a later tie
    std::fill(row(2), row(2) + V, 0.f);         // all equal: 0
    row(3)[V - 1] = 50.f;                       // the last element
    for (int v : {3, 4}) row(4)[std::min(v, V - 1)] = 7.f;  // ties inside one vector
    if (V > 7) row(4)[7] = 7.f;
    row(5)[0] = -INFINITY;
    Dev<float> dx(x.size());
    Dev<int32_t> dids(T);
    CK(dx.up(x));
    CK(dids.poison());
    CK(argmax_rows(dx.p, ld, T, V, dids.p, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<int32_t> ids;
    CK(dids.down(ids));
    for (int t = 0; t < T; ++t) {
      const int want = static_cast<int>(std::max_element(row(t), row(t) + V) - row(t));
      EXPECT_EQ(ids[t], want) << "row " << t;
    }
  }
}

TEST(LlamaOps, NllRows) {
  REQUIRE_GPU();
  std::mt19937 rng(62);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int V : {32000, 1001}) {
    SCOPED_TRACE("V=" + std::to_string(V));
    const int T = 6;
    const int64_t ld = V % 4 == 0 ? V + 4 : V + 2;
    std::vector<float> x(static_cast<size_t>(T) * ld, 1e30f);
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v) x[t * ld + v] = 3.f * nd(rng) + 40.f;  // a large offset: max subtraction
    x[4 * ld + 9] = 120.f;                                               // one dominant logit
    const std::vector<int32_t> tgt = {5, -1, V - 1, 0, 9, 777 % V};
    Dev<float> dx(x.size()), dn(T);
    Dev<int32_t> dt(T);
    CK(dx.up(x));
    CK(dt.up(tgt));
    CK(dn.poison());
    CK(nll_rows(dx.p, ld, dt.p, T, V, dn.p, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<float> nll;
    CK(dn.down(nll));
    for (int t = 0; t < T; ++t) {
      if (tgt[t] < 0) {
        EXPECT_EQ(nll[t], 0.f) << "row " << t;
        continue;
      }
      double mx = -INFINITY, s = 0;
      for (int v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(x[t * ld + v]));
      for (int v = 0; v < V; ++v) s += std::exp(x[t * ld + v] - mx);
      const double want = mx + std::log(s) - x[t * ld + tgt[t]];
      ASSERT_TRUE(std::isfinite(nll[t])) << "row " << t;
      EXPECT_NEAR(nll[t], want, 1e-4 * std::max(1.0, std::fabs(want))) << "row " << t;
    }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(LlamaOps, F32ToF16) {
  REQUIRE_GPU();
  std::mt19937 rng(71);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> in(1001);
  for (auto& v : in) v = 100.f * nd(rng);
  const std::vector<float> special = {0.f, -0.f, 65504.f, 65519.f, 65520.f, 1e5f, -1e5f, 6e-8f, 3e-8f, 1e-6f,
                                      -1e-5f, 1.f / 3, INFINITY, -INFINITY};
  std::copy(special.begin(), special.end(), in.begin());
  Dev<float> din(in.size());
  Dev<uint16_t> dout(in.size() + 3);
  CK(din.up(in));
  CK(dout.poison());
  CK(f32_to_f16(din.p, static_cast<int64_t>(in.size()), dout.h(), nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out;
  CK(dout.down(out));
  for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(out[i], hb(in[i])) << "i=" << i << " x=" << in[i];
  for (size_t i = in.size(); i < out.size(); ++i) ASSERT_EQ(out[i], kPoison16) << "wrote past n";
}

TEST(LlamaOps, FillRandom) {
  REQUIRE_GPU();
  const int64_t n = 100003;
  {  // fp16: range, moments, determinism, seed dependence, counter-based prefix
    Dev<uint16_t> a(n), b(n), c(n), small(17);
    CK(fill_uniform_f16(a.h(), n, 42, 0.5f, nullptr));
    CK(fill_uniform_f16(b.h(), n, 42, 0.5f, nullptr));
    CK(fill_uniform_f16(c.h(), n, 43, 0.5f, nullptr));
    CK(fill_uniform_f16(small.h(), 17, 42, 0.5f, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> ha, hb_, hc, hs;
    CK(a.down(ha));
    CK(b.down(hb_));
    CK(c.down(hc));
    CK(small.down(hs));
    EXPECT_EQ(ha, hb_) << "same seed, different data";
    int64_t same = 0;
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = hv(ha[i]);
      ASSERT_TRUE(std::isfinite(v));
      ASSERT_GE(v, -0.5);
      ASSERT_LE(v, 0.5);
      sum += v;
      sq += v * v;
      same += ha[i] == hc[i];
    }
    EXPECT_LT(same, n / 50) << "seeds 42 and 43 agree too often";
    EXPECT_NEAR(sum / n, 0.0, 0.01);
    EXPECT_NEAR(std::sqrt(sq / n), 0.5 / std::sqrt(3.0), 0.01);
    for (int i = 0; i < 17; ++i) EXPECT_EQ(hs[i], ha[i]) << "element " << i << " depends on n";
  }
  {  // f32 in [lo, hi)
    Dev<float> a(n);
    CK(fill_uniform_f32(a.p, n, 7, 2.f, 5.f, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<float> h;
    CK(a.down(h));
    double sum = 0;
    for (float v : h) {
      ASSERT_GE(v, 2.f);
      ASSERT_LT(v, 5.f);
      sum += v;
    }
    EXPECT_NEAR(sum / n, 3.5, 0.02);
  }
  {  // bytes: every value about equally often; aligned and unaligned destinations agree
    Dev<uint8_t> a(n), b(n + 1);
    CK(fill_random_bytes(a.p, n, 9, nullptr));
    CK(fill_random_bytes(b.p + 1, n, 9, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> ha, hb2;
    CK(a.down(ha));
    CK(b.down(hb2));
    std::vector<int> hist(256, 0);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(ha[i], hb2[i + 1]) << "byte " << i << " depends on the alignment";
      ++hist[ha[i]];
    }
    for (int v = 0; v < 256; ++v) {
      EXPECT_GT(hist[v], 250) << "byte value " << v;
      EXPECT_LT(hist[v], 550) << "byte value " << v;
    }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(LlamaOps, RejectsBadArguments) {
  REQUIRE_GPU();
  constexpr cudaError_t kBad = cudaErrorInvalidValue;
  // Fake, aligned device pointers: every call below must fail its checks before any launch.
  void* fake = reinterpret_cast<void*>(uintptr_t{1} << 20);
  auto* h = static_cast<__half*>(fake);
  auto* f = static_cast<float*>(fake);
  auto* i32 = static_cast<int32_t*>(fake);
  PagedKV kv;
  kv.k_cache = h;
  kv.v_cache = h;
  kv.block_tables = i32;
  kv.max_blocks = 64;
  kv.block_size = 16;
  kv.n_kv_heads = 2;
  kv.head_dim = 100;  // not a multiple of 8
  const size_t big = size_t{1} << 30;
  EXPECT_EQ(decode_attention(h, 8 * 100, kv, i32, 2, 8, 0.1f, 100, h, 8 * 100, fake, big, nullptr), kBad);
  EXPECT_EQ(prefill_attention(h, 8 * 100, kv, i32, i32, 4, 8, 0.1f, 100, h, 8 * 100, nullptr), kBad);
  kv.head_dim = 264;  // above the generic kernel's 256
  EXPECT_EQ(decode_attention(h, 8 * 264, kv, i32, 2, 8, 0.1f, 100, h, 8 * 264, fake, big, nullptr), kBad);
  kv.head_dim = 64;
  EXPECT_EQ(decode_attention(h, 512, kv, i32, -1, 8, 0.1f, 100, h, 512, fake, big, nullptr), kBad);   // B < 0
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 2, 7, 0.1f, 100, h, 512, fake, big, nullptr), kBad);    // 7 % 2
  EXPECT_EQ(decode_attention(h, 64 * 34, kv, i32, 2, 34, 0.1f, 100, h, 64 * 34, fake, big, nullptr), kBad);  // group 17
  EXPECT_EQ(decode_attention(nullptr, 512, kv, i32, 2, 8, 0.1f, 100, h, 512, fake, big, nullptr), kBad);
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 2, 8, 0.1f, 100, h, 512, nullptr, big, nullptr), kBad);
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 2, 8, 0.1f, 100, h, 512, fake,
                             decode_attention_ws_bytes(2, 8, 64, 100) - 4, nullptr),
            kBad);                                                                                    // ws too small
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 2, 8, 0.1f, 100, h, 512, fake, big, nullptr, 100), kBad);  // split % 16
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 2, 8, 0.1f, 2000, h, 512, fake, big, nullptr), kBad);  // table too short
  EXPECT_EQ(decode_attention(h, 100, kv, i32, 2, 8, 0.1f, 100, h, 512, fake, big, nullptr), kBad);   // ldq too small
  EXPECT_EQ(prefill_attention(h, 512, kv, i32, i32, -1, 8, 0.1f, 100, h, 512, nullptr), kBad);
  EXPECT_EQ(prefill_attention(h, 512, kv, nullptr, i32, 4, 8, 0.1f, 100, h, 512, nullptr), kBad);
  PagedKV no_cache = kv;
  no_cache.k_cache = nullptr;
  EXPECT_EQ(prefill_attention(h, 512, no_cache, i32, i32, 4, 8, 0.1f, 100, h, 512, nullptr), kBad);

  EXPECT_EQ(embed_lookup(i32, h, 10, -1, 8, f, nullptr), kBad);
  EXPECT_EQ(embed_lookup(nullptr, h, 10, 2, 8, f, nullptr), kBad);
  EXPECT_EQ(rmsnorm(f, f, 1e-5f, -1, 8, h, nullptr), kBad);
  EXPECT_EQ(rmsnorm(nullptr, f, 1e-5f, 1, 8, h, nullptr), kBad);
  EXPECT_EQ(rmsnorm(f, f, 1e-5f, 1, 0, h, nullptr), kBad);
  EXPECT_EQ(add_rmsnorm(f, h, 8, f, 1e-5f, -1, 8, h, nullptr), kBad);
  EXPECT_EQ(add_rmsnorm(f, h, 4, f, 1e-5f, 1, 8, h, nullptr), kBad);  // ld_delta < D
  EXPECT_EQ(add_rmsnorm(f, nullptr, 8, f, 1e-5f, 1, 8, h, nullptr), kBad);
  EXPECT_EQ(rope_store_kv(h, 512, h, 128, h, 128, i32, i32, f, f, 64, -1, 8, 2, 64, h, h, nullptr), kBad);
  EXPECT_EQ(rope_store_kv(h, 512, h, 128, h, 128, i32, i32, f, f, 64, 2, 8, 2, 63, h, h, nullptr), kBad);  // odd
  EXPECT_EQ(rope_store_kv(h, 512, h, 128, h, 128, i32, i32, nullptr, f, 64, 2, 8, 2, 64, h, h, nullptr), kBad);
  EXPECT_EQ(rope_store_kv(h, 500, h, 128, h, 128, i32, i32, f, f, 64, 2, 8, 2, 64, h, h, nullptr), kBad);  // ldq
  EXPECT_EQ(silu_mul(h, 8, h, 8, -1, 8, h, nullptr), kBad);
  EXPECT_EQ(silu_mul(h, 8, nullptr, 8, 1, 8, h, nullptr), kBad);
  EXPECT_EQ(ec_gate(h, f, f, -1, 8, h, nullptr), kBad);
  EXPECT_EQ(ec_gate(h, f, f, 1, 257, h, nullptr), kBad);
  EXPECT_EQ(ec_gate(h, f, nullptr, 1, 8, h, nullptr), kBad);  // G without c
  EXPECT_EQ(ec_gate(nullptr, f, f, 1, 8, h, nullptr), kBad);
  EXPECT_EQ(argmax_rows(f, 8, -1, 8, i32, nullptr), kBad);
  EXPECT_EQ(argmax_rows(f, 4, 1, 8, i32, nullptr), kBad);  // ld < V
  EXPECT_EQ(argmax_rows(nullptr, 8, 1, 8, i32, nullptr), kBad);
  EXPECT_EQ(nll_rows(f, 8, i32, -1, 8, f, nullptr), kBad);
  EXPECT_EQ(nll_rows(f, 8, nullptr, 1, 8, f, nullptr), kBad);
  EXPECT_EQ(f32_to_f16(f, -1, h, nullptr), kBad);
  EXPECT_EQ(f32_to_f16(nullptr, 4, h, nullptr), kBad);
  EXPECT_EQ(fill_uniform_f16(nullptr, 4, 1, 1.f, nullptr), kBad);
  EXPECT_EQ(fill_uniform_f16(h, -1, 1, 1.f, nullptr), kBad);
  EXPECT_EQ(fill_uniform_f32(f, 4, 1, 2.f, 1.f, nullptr), kBad);  // lo > hi
  EXPECT_EQ(fill_random_bytes(nullptr, 4, 1, nullptr), kBad);
  // Empty work is fine and launches nothing.
  EXPECT_EQ(rmsnorm(nullptr, nullptr, 1e-5f, 0, 8, nullptr, nullptr), cudaSuccess);
  EXPECT_EQ(decode_attention(h, 512, kv, i32, 0, 8, 0.1f, 100, h, 512, nullptr, 0, nullptr), cudaSuccess);
  EXPECT_EQ(prefill_attention(h, 512, kv, i32, i32, 0, 8, 0.1f, 100, h, 512, nullptr), cudaSuccess);
  EXPECT_EQ(f32_to_f16(nullptr, 0, nullptr, nullptr), cudaSuccess);
  // 256 bytes of arrival counters, then (B, n_heads, splits) rows of head_dim + 2 floats
  EXPECT_EQ(decode_attention_ws_bytes(3, 8, 64, 0), 256 + size_t{3} * 8 * 1 * 66 * 4);  // one split even for max_len 0
  EXPECT_EQ(decode_attention_ws_bytes(3, 8, 64, 513, 256), 256 + size_t{3} * 8 * 3 * 66 * 4);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // nothing was launched
}

}  // namespace
}  // namespace spear::cuda
