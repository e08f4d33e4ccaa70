#pragma once
// Normalizers of tokenizer.json ("normalizer"): Sequence, Prepend, Replace,
// Strip. Unicode normalization forms and case folding are not implemented and
// are rejected at load time rather than silently skipped.
#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string normalize(std::string text) const = 0;
};

// nullptr for a null/absent normalizer; throws spear::Error for unsupported types.
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& spec);

}  // namespace spear::tok
