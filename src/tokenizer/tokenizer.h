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
  // (BOS for our models). Throws spear::Error if text is not valid UTF-8.
  // Thread-safe (the word cache is shared behind a lock).
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // As tokenizer.decode(ids, skip_special_tokens=skip_special), without
  // clean_up_tokenization_spaces (transformers' default is off). An id that is
  // not in the vocabulary decodes to U+FFFD rather than being dropped.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;

  int32_t vocab_size() const;          // 1 + the largest id of the model vocab and added tokens
  int32_t bos_id() const;              // what the post-processor puts first; -1 if none
  int32_t token_to_id(std::string_view token) const;  // -1 if absent
  std::string id_to_token(int32_t id) const;           // raw vocab string; throws if absent
  bool is_special(int32_t id) const;                   // an added token marked special

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of generated ids into text as it arrives. Text is emitted only
// once it is complete UTF-8 and the decoder's context-dependent rules (e.g. the
// stripped leading space of SentencePiece) are settled, so that the concatenation
// of everything emitted equals tokenizer.decode(all ids).
//
// Works like tokenizers' DecodeStream: only a short window of recent ids is
// re-decoded per push (the ids of the previous emission as context plus those
// not yet emitted), so a long generation costs O(length), not O(length^2).
// Known limit, shared with tokenizers: when a run of <0xXX> byte tokens that was
// valid UTF-8 (and already emitted) is extended into invalid UTF-8, decode()
// turns the whole run into U+FFFD; the stream cannot take back what it emitted
// and continues from where the two texts still agree.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true);
  std::string push(int32_t id);  // newly completed text (may be empty)
  std::string finish();          // whatever is left (invalid bytes as U+FFFD); resets the stream

 private:
  // The part of window_text not yet emitted, given that emitted_text was.
  static std::string unseen_suffix(const std::string& window_text, const std::string& emitted_text);

  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;  // the window: context ids, then ids not yet emitted
  size_t context_ids_ = 0;    // leading ids of ids_ whose text was already emitted
  std::string context_text_;  // decode(first context_ids_ of ids_)
};

}  // namespace spear
