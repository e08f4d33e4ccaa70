#include "tokenizer/tokenizer.h"

#include "tokenizer/utf8.h"

namespace spear {

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(tok), skip_special_(skip_special) {}

std::string StreamDecoder::unseen_suffix(const std::string& window_text, const std::string& emitted_text) {
  if (window_text.compare(0, emitted_text.size(), emitted_text) == 0) return window_text.substr(emitted_text.size());
  // The window's text no longer extends what was emitted (see the class comment):
  // continue after the longest common prefix, cut at a character boundary.
  size_t common = 0;
  while (common < emitted_text.size() && common < window_text.size() && emitted_text[common] == window_text[common]) {
    ++common;
  }
  while (common > 0 && (static_cast<unsigned char>(window_text[common]) & 0xC0) == 0x80) --common;
  return window_text.substr(common);
}

std::string StreamDecoder::push(int32_t id) {
  ids_.push_back(id);
  std::string text = tok_.decode(ids_, skip_special_);
  // A trailing U+FFFD is almost always a character still missing its last bytes.
  const bool incomplete = text.size() >= 3 && text.compare(text.size() - 3, 3, tok::kReplacementChar) == 0;
  if (text.size() <= context_text_.size() || incomplete) return {};

  std::string fresh = unseen_suffix(text, context_text_);
  // The ids just emitted become the context of the next window.
  ids_.erase(ids_.begin(), ids_.begin() + std::ptrdiff_t(context_ids_));
  context_ids_ = ids_.size();
  context_text_ = tok_.decode(ids_, skip_special_);
  return fresh;
}

std::string StreamDecoder::finish() {
  std::string rest;
  const std::string text = tok_.decode(ids_, skip_special_);
  if (text != context_text_) rest = unseen_suffix(text, context_text_);
  ids_.clear();
  context_ids_ = 0;
  context_text_.clear();
  return rest;
}

}  // namespace spear
