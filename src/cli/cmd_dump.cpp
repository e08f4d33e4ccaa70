// spear dump --model DIR --prompt T --out F.safetensors [--match S] [--compare REF]:
// runs one prompt and writes the named intermediate tensors (hidden.i, layers.l.q,
// layers.l.attn_out, ...) to a safetensors file, or diffs them against a reference
// dump such as the hidden_states.safetensors that ships with each model.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_dump(CLI::App& app) {
  auto* cmd = app.add_subcommand("dump", "Dump or diff named intermediate tensors of one prompt");
  struct Opts {
    std::string model, prompt, ids, out, match, compare;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory")->required();
  cmd->add_option("--prompt", o->prompt, "Prompt text (encoded with BOS)");
  cmd->add_option("--ids", o->ids, "Token ids as a JSON list, instead of --prompt");
  cmd->add_option("--out", o->out, "Write the tensors to this .safetensors file");
  cmd->add_option("--match", o->match, "Keep only tensors whose name contains this");
  cmd->add_option("--compare", o->compare,
                  "Diff against a reference .safetensors (its 'ids' metadata is the prompt "
                  "unless --prompt/--ids is given)");
  cmd->add_flag("--json", o->json, "Print one JSON object");
  cmd->callback([o] {
    namespace fs = std::filesystem;
    SPEAR_CHECK(!o->out.empty() || !o->compare.empty(), "dump: give --out and/or --compare");
    std::shared_ptr<SafetensorsFile> ref;
    if (!o->compare.empty()) ref = SafetensorsFile::open(o->compare);
    std::vector<int32_t> ids;
    if (!o->ids.empty() || (o->prompt.empty() && ref)) {
      std::string text = !o->ids.empty() ? o->ids : "";
      if (text.empty()) {
        auto it = ref->metadata().find("ids");
        SPEAR_CHECK(it != ref->metadata().end(), "dump: " + o->compare + " has no 'ids' metadata");
        text = it->second;
      }
      auto j = nlohmann::json::parse(text, nullptr, false);
      SPEAR_CHECK(j.is_array(), "dump: ids must be a JSON list of integers");
      for (const auto& v : j) {
        SPEAR_CHECK(v.is_number_integer(), "dump: ids must be a JSON list of integers");
        ids.push_back(v.get<int32_t>());
      }
    } else {
      SPEAR_CHECK(!o->prompt.empty(), "dump: give --prompt or --ids");
      Tokenizer tok = Tokenizer::from_file((fs::path(o->model) / "tokenizer.json").string());
      ids = tok.encode(o->prompt, true);
    }
    SPEAR_CHECK(!ids.empty(), "dump: empty prompt");
    auto model = LlamaModel::load(o->model);
    const ModelConfig& cfg = model->config();
    SPEAR_CHECK(static_cast<int64_t>(ids.size()) <= cfg.max_position_embeddings,
                "dump: prompt longer than the model's context");

    struct Captured {
      std::vector<float> data;
      int64_t rows, cols;
    };
    std::map<std::string, Captured> got;  // name -> (rows, cols)
    model->set_trace([&](std::string_view name, const float* d, int64_t r, int64_t c) {
      if (!o->match.empty() && name.find(o->match) == std::string_view::npos) return;
      got[std::string(name)] = {std::vector<float>(d, d + r * c), r, c};
    });
    ContiguousKVCache kv(cfg.num_layers, static_cast<int64_t>(ids.size()), cfg.kv_dim());
    model->forward(ids.data(), static_cast<int64_t>(ids.size()), kv, 0, /*all_logits=*/true);

    nlohmann::json result{{"ids", ids}, {"tensors", got.size()}};
    if (!o->out.empty()) {
      std::vector<TensorToWrite> ts;
      for (auto& [name, c] : got) ts.push_back({name, DType::F32, {c.rows, c.cols}, c.data.data()});
      write_safetensors(o->out, ts, {{"ids", nlohmann::json(ids).dump()}, {"model", o->model}});
      result["out"] = o->out;
    }
    if (ref) {
      nlohmann::json diffs = nlohmann::json::object();
      for (const TensorView& t : ref->tensors()) {
        auto it = got.find(t.name);
        if (it == got.end()) {
          diffs[t.name] = {{"error", "not produced by spear"}};
          continue;
        }
        std::vector<float> want = to_f32(t);
        if (want.size() != it->second.data.size()) {
          diffs[t.name] = {{"error", "size differs"}};
          continue;
        }
        double max_abs = 0, max_ref = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          max_abs = std::max(max_abs, std::abs(double(want[i]) - it->second.data[i]));
          max_ref = std::max(max_ref, std::abs(double(want[i])));
        }
        diffs[t.name] = {{"max_abs_diff", max_abs}, {"max_abs_ref", max_ref}};
        if (!o->json)
          std::printf("%-28s max |diff| %.3g (max |ref| %.3g)\n", t.name.c_str(), max_abs, max_ref);
      }
      result["diff"] = diffs;
    }
    if (o->json) std::printf("%s\n", result.dump().c_str());
    else if (!o->out.empty()) std::printf("wrote %zu tensors to %s\n", got.size(), o->out.c_str());
  });
}

}  // namespace spear::cli
