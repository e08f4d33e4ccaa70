// spear tokenize --model DIR (--text T | --file F): token ids of a text.
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Encode text with a model's tokenizer.json");
  struct Opts {
    std::string model, text, file;
    bool json = false, no_special = false, decode = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory (with tokenizer.json)")->required();
  auto* t = cmd->add_option("--text", o->text, "Text to encode");
  auto* f = cmd->add_option("--file", o->file, "File to encode");
  t->excludes(f);
  cmd->add_flag("--no-special", o->no_special, "Do not add BOS/post-processor tokens");
  cmd->add_flag("--json", o->json, "Print {\"ids\": [...]}");
  cmd->callback([o, t, f] {
    // An empty --text is a text like any other (BOS alone where the tokenizer adds it,
    // as Hugging Face encodes ""); only giving neither option is an error.
    SPEAR_CHECK(t->count() > 0 || f->count() > 0, "tokenize: give --text or --file");
    Tokenizer tok = Tokenizer::from_file(
        (std::filesystem::path(o->model) / "tokenizer.json").string());
    std::string text = o->file.empty() ? o->text : read_text_file(o->file);
    std::vector<int32_t> ids = tok.encode(text, !o->no_special);
    if (o->json) {
      std::printf("%s\n", nlohmann::json{{"ids", ids}}.dump().c_str());
      return;
    }
    if (ids.size() > 200) {
      std::printf("%zu tokens\n", ids.size());
      return;
    }
    for (int32_t id : ids) {
      std::string piece = tok.id_to_token(id);
      std::printf("%6d  %s\n", id, nlohmann::json(piece).dump(-1, ' ', false,
                                       nlohmann::json::error_handler_t::replace).c_str());
    }
  });
}

}  // namespace spear::cli
