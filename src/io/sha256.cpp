#include "io/sha256.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "core/error.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;

namespace spear {

// ---- SHA-256 (FIPS 180-4) -------------------------------------------------------

namespace {
constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

#if defined(__x86_64__)
// The x86 SHA extensions (SHA-NI): 4-6x the portable loop (a .spear file is hashed in full
// on every load). Same state, same result. The hardware keeps the state as two vectors,
// ABEF and CDGH; sha256rnds2 does two rounds from the low two words of (W + K), and
// sha256msg1/msg2 extend the message schedule: for the 4-word group j >= 4,
//   M[j] = msg2(msg1(M[j-4], M[j-3]) + alignr(M[j-1], M[j-2], 4), M[j-1]).
__attribute__((target("sha,sse4.1,ssse3"))) void blocks_shani(uint32_t* state, const uint8_t* p, size_t n) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);  // big-endian words
  __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state)), 0xB1);  // CDAB
  __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4)), 0x1B);  // EFGH
  __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);   // ABEF
  s1 = _mm_blend_epi16(s1, tmp, 0xF0);        // CDGH
  for (; n > 0; --n, p += 64) {
    const __m128i abef = s0, cdgh = s1;
    __m128i m[4];
    for (int j = 0; j < 4; ++j)
      m[j] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)), bswap);
    for (int g = 0; g < 16; ++g) {
      if (g >= 4)  // m[g & 3] holds M[g-4]; replace it with M[g]
        m[g & 3] = _mm_sha256msg2_epu32(
            _mm_add_epi32(_mm_sha256msg1_epu32(m[g & 3], m[(g + 1) & 3]),
                          _mm_alignr_epi8(m[(g + 3) & 3], m[(g + 2) & 3], 4)),
            m[(g + 3) & 3]);
      __m128i wk = _mm_add_epi32(m[g & 3], _mm_loadu_si128(reinterpret_cast<const __m128i*>(kK + 4 * g)));
      s1 = _mm_sha256rnds2_epu32(s1, s0, wk);
      s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(wk, 0x0E));
    }
    s0 = _mm_add_epi32(s0, abef);
    s1 = _mm_add_epi32(s1, cdgh);
  }
  tmp = _mm_shuffle_epi32(s0, 0x1B);       // FEBA
  s1 = _mm_shuffle_epi32(s1, 0xB1);        // DCHG
  s0 = _mm_blend_epi16(tmp, s1, 0xF0);     // DCBA
  s1 = _mm_alignr_epi8(s1, tmp, 8);        // HGFE
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), s0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), s1);
}

// CPUID directly: clang 14 (the fuzz build's compiler) does not know
// __builtin_cpu_supports("sha"). SHA: leaf 7 EBX bit 29; SSE4.1: leaf 1 ECX bit 19.
bool have_shani() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 19))) return false;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & (1u << 29)) != 0;
  }();
  return yes;
}
#endif

bool g_portable_only = false;  // tests compare both paths
}  // namespace

void sha256_force_portable(bool on) { g_portable_only = on; }

Sha256::Sha256()
    : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
         0x5be0cd19} {}

void Sha256::block(const uint8_t* p) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) |
           (uint32_t(p[4 * i + 2]) << 8) | uint32_t(p[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
  for (int i = 0; i < 64; ++i) {
    uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
    uint32_t ch = (e & f) ^ (~e & g);
    uint32_t t1 = h + S1 + ch + kK[i] + w[i];
    uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
    uint32_t mj = (a & b) ^ (a & c) ^ (b & c);
    uint32_t t2 = S0 + mj;
    h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += h;
}

void Sha256::blocks(const uint8_t* p, size_t n) {
#if defined(__x86_64__)
  if (!g_portable_only && have_shani()) {
    blocks_shani(h_.data(), p, n);
    return;
  }
#endif
  for (; n > 0; --n, p += 64) block(p);
}

void Sha256::update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buf_len_) {
    size_t take = std::min(n, 64 - buf_len_);
    std::memcpy(buf_.data() + buf_len_, p, take);
    buf_len_ += take;
    p += take;
    n -= take;
    if (buf_len_ == 64) {
      block(buf_.data());
      buf_len_ = 0;
    }
  }
  blocks(p, n / 64);
  p += n / 64 * 64;
  n %= 64;
  if (n) {
    std::memcpy(buf_.data(), p, n);
    buf_len_ = n;
  }
}

std::string Sha256::hex() {
  const uint64_t bits = total_ * 8;
  const uint8_t one = 0x80, zero = 0;
  update(&one, 1);
  while (buf_len_ != 56) update(&zero, 1);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  update(len, 8);
  static const char* hx = "0123456789abcdef";
  std::string s;
  for (uint32_t v : h_)
    for (int i = 28; i >= 0; i -= 4) s += hx[(v >> i) & 15];
  return s;
}

std::string sha256_hex(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.hex();
}

std::string model_dir_hash(const std::string& dir) {
  SPEAR_CHECK(fs::is_directory(dir), "model directory not found: " + dir);
  std::vector<std::string> files{(fs::path(dir) / "config.json").string()};
  std::vector<std::string> st;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors")
      st.push_back(e.path().string());
  std::sort(st.begin(), st.end());
  files.insert(files.end(), st.begin(), st.end());
  Sha256 h;
  // Chunk by chunk, each chunk's pages dropped once hashed: a checkpoint is hashed without
  // holding it in memory.
  constexpr size_t kChunk = size_t{64} << 20;
  for (const std::string& f : files) {
    MappedFile m(f);
    for (size_t off = 0; off < m.size(); off += kChunk) {
      const size_t n = std::min(kChunk, m.size() - off);
      h.update(m.data() + off, n);
      m.release(m.data() + off, n);
    }
  }
  return h.hex();
}

}  // namespace spear
