#pragma once
// Pre-tokenizers of tokenizer.json ("pre_tokenizer"): Sequence, Split,
// ByteLevel and Metaspace. Each one splits every current piece further; the
// model then encodes each final piece on its own.
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

struct PreToken {
  std::string text;
  bool at_text_start;  // begins at offset 0 of the input (Metaspace's "first" scheme)
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` by their splits, dropping empty ones.
  virtual void pre_tokenize(std::vector<PreToken>& pieces) const = 0;
};

// nullptr for a null/absent pre-tokenizer; throws spear::Error for unsupported types.
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& spec);

}  // namespace spear::tok
