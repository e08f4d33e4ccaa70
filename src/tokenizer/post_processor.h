#pragma once
// Post-processors of tokenizer.json ("post_processor") for a single sequence:
// TemplateProcessing, RobertaProcessing/BertProcessing (cls A sep), ByteLevel
// (no effect on ids) and Sequence of those.
#include <cstdint>
#include <memory>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens around one encoded sequence.
  virtual std::vector<int32_t> process(std::vector<int32_t> ids) const = 0;
};

// nullptr for a null/absent post-processor; throws spear::Error for unsupported types.
std::unique_ptr<PostProcessor> make_post_processor(const nlohmann::json& spec);

}  // namespace spear::tok
