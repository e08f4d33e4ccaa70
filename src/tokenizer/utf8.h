#pragma once
// UTF-8 helpers shared by the tokenizer stages. Encoding requires valid UTF-8
// input (as Rust strings are in HF tokenizers); decoding produces bytes that may
// not be valid and repairs them the way Rust's String::from_utf8_lossy does.
#include <cstddef>
#include <string>
#include <string_view>

namespace spear::tok {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD
inline constexpr size_t kAllValid = std::string_view::npos;

// Byte offset of the first ill-formed sequence (overlongs, surrogates and
// code points above U+10FFFF count as ill-formed), or kAllValid.
size_t find_invalid_utf8(std::string_view s);

// Each maximal ill-formed subsequence becomes one U+FFFD (the Unicode
// "substitution of maximal subparts" practice that Rust and Python follow).
std::string utf8_lossy(std::string_view bytes);

// Byte length of the character starting at s[i]; s must be valid UTF-8.
inline size_t utf8_char_len(std::string_view s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

// Code point starting at s[i]; s must be valid UTF-8.
char32_t utf8_decode_at(std::string_view s, size_t i);

void append_utf8(std::string& out, char32_t cp);

// Unicode White_Space (what Rust's char::is_whitespace and regex \s test).
bool is_unicode_whitespace(char32_t cp);

}  // namespace spear::tok
