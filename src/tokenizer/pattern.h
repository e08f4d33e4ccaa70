#pragma once
// The {"String": ...} / {"Regex": ...} pattern objects that Replace and Split
// use, compiled to one Regex.
#include <nlohmann/json_fwd.hpp>

#include "tokenizer/regex.h"

namespace spear::tok {

Regex make_pattern(const nlohmann::json& spec, const char* where);

// Every match of `pattern` in `text` replaced by `content`.
std::string replace_all(const Regex& pattern, std::string_view text, std::string_view content);

}  // namespace spear::tok
