#pragma once
// Turns chat messages into prompt text. Uses the model's Jinja chat template
// (tokenizer_config.json "chat_template", a string or the entry named "default" of
// a list) when spear's Jinja subset (server/jinja.h) can render it; otherwise a
// plain template:
//     system: You are helpful.\n
//     user: Hi\n
//     assistant:
// A Jinja template writes its own BOS (bos_token), so its text is encoded without
// special tokens, as transformers' apply_chat_template does; the plain template's
// text gets the tokenizer's usual BOS.
#include <memory>
#include <string>
#include <vector>

namespace spear::server {

namespace jinja {
class Template;
}

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  static ChatTemplate plain();
  // Throws std::runtime_error if the template does not parse or fails on a sample
  // conversation.
  static ChatTemplate from_jinja(const std::string& source, std::string bos_token,
                                 std::string eos_token);
  // From the text of a tokenizer_config.json (a model directory's file or a .spear
  // artifact's copy); the plain template (with *note saying why) when the text, the
  // template, or spear's support for it is missing.
  static ChatTemplate from_tokenizer_config(const std::string& json_text, std::string* note);
  // From <model_dir>/tokenizer_config.json, as from_tokenizer_config.
  static ChatTemplate from_model_dir(const std::string& model_dir, std::string* note);
  // `spear serve --chat-template FILE`: FILE is a tokenizer_config.json (a JSON object
  // with "chat_template") or a Jinja template. bos_token / eos_token come from FILE
  // when it is a tokenizer_config.json that names them, else from the model's
  // tokenizer_config.json text (may be empty). Throws std::runtime_error when the file
  // cannot be read or its template is not usable: an explicit template never falls
  // back to the plain one.
  static ChatTemplate from_file(const std::string& path, const std::string& model_tokenizer_config);

  // Throws std::runtime_error (e.g. the template's raise_exception for roles that do
  // not alternate); the server answers 400 with the message.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  bool is_jinja() const { return tmpl_ != nullptr; }
  bool encode_with_special_tokens() const { return !is_jinja(); }
  const std::string& eos_token() const { return eos_; }
  const std::string& description() const { return desc_; }

 private:
  std::shared_ptr<jinja::Template> tmpl_;
  std::string bos_, eos_, desc_;
};

}  // namespace spear::server
