#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

// Length of the well-formed sequence at p[0..n), or 0 when ill-formed; then
// *bad_len is the length of its maximal subpart (at least 1).
size_t well_formed_length(const unsigned char* p, size_t n, size_t* bad_len) {
  const unsigned char lead = p[0];
  if (lead < 0x80) return 1;
  size_t continuation = 0;
  unsigned char first_lo = 0x80, first_hi = 0xBF;  // range of the 2nd byte (Unicode table 3-7)
  if (lead >= 0xC2 && lead <= 0xDF) {
    continuation = 1;
  } else if (lead == 0xE0) {
    continuation = 2, first_lo = 0xA0;
  } else if ((lead >= 0xE1 && lead <= 0xEC) || lead == 0xEE || lead == 0xEF) {
    continuation = 2;
  } else if (lead == 0xED) {
    continuation = 2, first_hi = 0x9F;
  } else if (lead == 0xF0) {
    continuation = 3, first_lo = 0x90;
  } else if (lead >= 0xF1 && lead <= 0xF3) {
    continuation = 3;
  } else if (lead == 0xF4) {
    continuation = 3, first_hi = 0x8F;
  } else {
    *bad_len = 1;
    return 0;
  }
  for (size_t k = 1; k <= continuation; ++k) {
    const unsigned char lo = k == 1 ? first_lo : 0x80, hi = k == 1 ? first_hi : 0xBF;
    if (k >= n || p[k] < lo || p[k] > hi) {
      *bad_len = k;
      return 0;
    }
  }
  return continuation + 1;
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, bad = 0;
  while (i < s.size()) {
    if (p[i] < 0x80) {  // fast path for ASCII runs
      ++i;
      continue;
    }
    const size_t len = well_formed_length(p + i, s.size() - i, &bad);
    if (len == 0) return i;
    i += len;
  }
  return kAllValid;
}

std::string utf8_lossy(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0, bad = 0;
  while (i < bytes.size()) {
    const size_t len = well_formed_length(p + i, bytes.size() - i, &bad);
    if (len == 0) {
      out += kReplacementChar;
      i += bad;
    } else {
      out.append(bytes.data() + i, len);
      i += len;
    }
  }
  return out;
}

char32_t utf8_decode_at(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  if (p[0] < 0x80) return p[0];
  if (p[0] < 0xE0) return (char32_t(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
  if (p[0] < 0xF0) return (char32_t(p[0] & 0x0F) << 12) | (char32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  return (char32_t(p[0] & 0x07) << 18) | (char32_t(p[1] & 0x3F) << 12) | (char32_t(p[2] & 0x3F) << 6) |
         (p[3] & 0x3F);
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

bool is_unicode_whitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

}  // namespace spear::tok
