#pragma once
// Device helpers shared by the W4A16 kernels: fragment dequantization, mma.sync,
// loads, the gate. Layout and derivations: docs/KERNELS.md, src/quant/gpu_layout.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace spear::cuda::detail {

template <typename T>
struct Traits;

// fp16: 0x6400 is 1024.0; OR-ing a 4-bit code into the low mantissa bits gives 1024 + q
// exactly (spacing 1 in [1024, 2048)).
template <>
struct Traits<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicF = 1024.0f;
  __device__ static __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float lo(uint32_t v) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(v & 0xffffu)));
  }
  __device__ static __forceinline__ float hi(uint32_t v) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16)));
  }
  __device__ static __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

// bf16: 0x4300 is 128.0; 128 + q is exact (spacing 1 in [128, 256)).
template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicF = 128.0f;
  __device__ static __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float lo(uint32_t v) { return __uint_as_float(v << 16); }
  __device__ static __forceinline__ float hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
  __device__ static __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// D (16x8, f32) += A (16x16) * B (16x8).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 32-bit word of the W4 layout -> the A fragment (4 registers) of one 16x16 sub-tile,
// as exact integers (q - zero). zr0/zr1: (magic + zero) of rows g and g + 8, both halves.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t zr0, uint32_t zr1, uint32_t (&a)[4]) {
  a[0] = Traits<T>::sub2((w & 0x000f000fu) | Traits<T>::kMagic, zr0);
  a[1] = Traits<T>::sub2(((w >> 4) & 0x000f000fu) | Traits<T>::kMagic, zr1);
  a[2] = Traits<T>::sub2(((w >> 8) & 0x000f000fu) | Traits<T>::kMagic, zr0);
  a[3] = Traits<T>::sub2(((w >> 12) & 0x000f000fu) | Traits<T>::kMagic, zr1);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant
}

// Weights are read once: keep them out of L1 and ask L2 to fetch 256-byte lines.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Programmatic dependent launch (sm_90): both are no-ops when the launch did not ask for it.
__device__ __forceinline__ void grid_dep_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void grid_dep_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// ---- Hopper bulk copies (cp.async.bulk, the TMA engine's 1-D mode) and mbarriers ----------
__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the barrier initialisation visible to the async proxy (the bulk-copy engine).
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, unsigned parity) {
  uint32_t ok;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
// L2 policy for data read once (weights): evict first.
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
// bytes (multiple of 16, both addresses 16-byte aligned) global -> shared, completion
// counted on the mbarrier as transaction bytes.
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, unsigned bytes, uint32_t bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(pol)
      : "memory");
}

// The EC gate on one rank coordinate: v = gamma(u) * u.
//   kind 0 (identity): gamma = 1;  kind 1 (sigmoid2): gamma = 2 sigmoid(g u + c)
// (gamma = 1 when g = c = 0). New elementwise gates are added here and in Gate (w4a16.h).
// kind 2 (full) mixes coordinates and is not elementwise: gate_full_rows below; callers
// apply it before apply_gate sees the values (which then takes them as they are).
constexpr int kGateFull = 2;  // Gate::kFull (w4a16.h)
__device__ __forceinline__ float apply_gate(int kind, float u, const float* gg, const float* gc, int j) {
  if (kind == 1) {
    const float z = gg[j] * u + gc[j];
    return 2.0f * u / (1.0f + __expf(-z));
  }
  return u;
}

// The full gate (Gate::kFull), in place on rows of u held by one block (shared or global
// memory): for each row t, v_j = (1 + tanh(sum_l G[j][l] u_l + c_j)) u_j, with G stored
// transposed, Gt[l * r_pad + j] = G[j][l] (the threads of a warp take consecutive j, so each
// load of the l loop is one coalesced row of Gt, not 32 lines r_pad words apart), c (r_pad),
// zero padding (so padded coordinates stay 0). Every thread of the
// block must call it (it synchronizes). Each pass computes up to 4 values per thread into
// registers from the unchanged rows, then, after a barrier, writes them back.
// Cost: r_pad multiply-adds per value; with r_pad <= 128 and decode-sized M this is a few
// thousand per block, next to nothing beside the weight stream.
__device__ __forceinline__ void gate_full_rows(float* u, int rows, int r_pad, const float* __restrict__ G,
                                               const float* __restrict__ c, int tid, int nthreads) {
  constexpr int kPer = 4;
  const int total = rows * r_pad;
  for (int base = 0; base < total; base += kPer * nthreads) {  // same trip count in every thread
    float out[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int i = base + k * nthreads + tid;
      out[k] = 0.f;
      if (i < total) {
        const int j = i % r_pad;
        const float* ut = u + (i - j);
        const float* gj = G + j;  // column j of Gt: G[j][l] at gj[l * r_pad]
        // r_pad is a multiple of 16: four independent partial sums, loads issued ahead
        float s0 = __ldg(c + j), s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll 4
        for (int l = 0; l < r_pad; l += 4) {
          s0 = fmaf(__ldg(gj + l * r_pad), ut[l], s0);
          s1 = fmaf(__ldg(gj + (l + 1) * r_pad), ut[l + 1], s1);
          s2 = fmaf(__ldg(gj + (l + 2) * r_pad), ut[l + 2], s2);
          s3 = fmaf(__ldg(gj + (l + 3) * r_pad), ut[l + 3], s3);
        }
        out[k] = (1.0f + tanhf((s0 + s1) + (s2 + s3))) * ut[j];
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int i = base + k * nthreads + tid;
      if (i < total) u[i] = out[k];
    }
    __syncthreads();
  }
}

}  // namespace spear::cuda::detail
