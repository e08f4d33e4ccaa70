#pragma once
// GPT-2's reversible byte <-> printable-character map used by byte-level BPE:
// printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in
// byte order, so every byte string becomes a string of visible characters.
#include <string>
#include <string_view>

namespace spear::tok {

// UTF-8 of the character standing for each byte.
std::string byte_level_encode(std::string_view bytes);

// The byte a character stands for, or -1 if it is not one of the 256.
int byte_level_char_to_byte(char32_t cp);

}  // namespace spear::tok
