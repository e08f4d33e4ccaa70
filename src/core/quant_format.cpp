#include "core/quant_format.h"

#include "core/error.h"

namespace spear {

std::string QuantScheme::name() const {
  std::string s = "w" + std::to_string(bits) + "-";
  s += group <= 0 ? std::string("pc") : "g" + std::to_string(group);
  s += symmetric ? "-sym" : "-asym";
  return s;
}

int QuantizedMatrix::code(int64_t n, int64_t k) const {
  const int b = scheme.bits;
  const uint8_t* row = codes.data() + n * row_bytes();
  const int64_t bit = k * b;
  // A code spans at most two bytes (b <= 8).
  uint32_t w = row[bit >> 3];
  if (((bit & 7) + b) > 8) w |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << 8;
  return static_cast<int>((w >> (bit & 7)) & ((1u << b) - 1u));
}

void QuantizedMatrix::set_code(int64_t n, int64_t k, int q) {
  const int b = scheme.bits;
  SPEAR_CHECK(q >= 0 && q < (1 << b), "set_code: code out of range");
  uint8_t* row = codes.data() + n * row_bytes();
  const int64_t bit = k * b;
  const uint32_t mask = ((1u << b) - 1u) << (bit & 7);
  const uint32_t v = static_cast<uint32_t>(q) << (bit & 7);
  uint8_t* p = row + (bit >> 3);
  p[0] = static_cast<uint8_t>((p[0] & ~mask) | (v & 0xffu));
  if (((bit & 7) + b) > 8) p[1] = static_cast<uint8_t>((p[1] & ~(mask >> 8)) | (v >> 8));
}

int64_t QuantizedMatrix::serving_bytes() const {
  const int64_t g = scheme.num_groups(K);
  return N * row_bytes() + N * g * 2 + (scheme.symmetric ? 0 : N * g * 2);
}

}  // namespace spear
