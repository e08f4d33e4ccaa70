#pragma once
// Tokenizers read from Hugging Face tokenizer.json:
//  * byte-level BPE with a Split regex pre-tokenizer (Llama-3 / GPT-2 style),
//  * SentencePiece-style BPE with byte fallback and Prepend/Replace normalizers
//    (Llama-2 style),
// plus added/special tokens and the TemplateProcessing post-processor (BOS).
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace spear {

class Tokenizer {
 public:
  // Throws spear::Error with a clear message for a missing file, malformed JSON,
  // or a tokenizer.json using features spear does not implement.
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json(std::string_view json_text);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // As transformers' tokenizer(text)["input_ids"]: special tokens written in the
  // text are matched as single tokens; add_special applies the post-processor
  // (BOS for our models).
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // As tokenizer.decode(ids, skip_special_tokens=skip_special).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;

  int32_t vocab_size() const;          // model vocab + added tokens
  int32_t bos_id() const;              // -1 if none
  int32_t token_to_id(std::string_view token) const;  // -1 if absent
  std::string id_to_token(int32_t id) const;           // raw vocab string
  bool is_special(int32_t id) const;

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of generated ids into text as it arrives. Text is emitted only
// once it is complete UTF-8 and the decoder's context-dependent rules (e.g. the
// stripped leading space of SentencePiece) are settled, so that the concatenation
// of everything emitted equals tokenizer.decode(all ids).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true);
  std::string push(int32_t id);  // newly completed text (may be empty)
  std::string finish();          // whatever is left (invalid bytes as U+FFFD)

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t emitted_ = 0;  // bytes of decode(ids_) already emitted
};

}  // namespace spear
