#pragma once
// Decoders of tokenizer.json ("decoder"): Sequence, ByteLevel, Replace,
// ByteFallback, Fuse, Strip, Metaspace. As in tokenizers, each step rewrites
// the list of token strings and the result is their concatenation.
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

// nullptr for a null/absent decoder; throws spear::Error for unsupported types.
std::unique_ptr<Decoder> make_decoder(const nlohmann::json& spec);

}  // namespace spear::tok
