// spear generate --model DIR --prompt TEXT: greedy or sampled text, streamed.
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "engine/generate.h"
#include "runtime/backend.h"
#include "runtime/load.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt (streamed to stdout)");
  struct Opts {
    std::string model, adapter, prompt, device = "cpu";
    int64_t max_tokens = 64;
    SamplingParams s;
    bool json = false, ignore_eos = false, autotune = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory or .spear file")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT LoRA adapter directory (spear export) applied to a quantized base as ungated ECs");
  cmd->add_option("--prompt,-p", o->prompt, "Prompt text")->required();
  cmd->add_option("--max-tokens,-n", o->max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature,-t", o->s.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", o->s.top_k, "Keep the k most likely tokens (0 = all)");
  cmd->add_option("--top-p", o->s.top_p, "Nucleus sampling mass (1 = off)");
  cmd->add_option("--seed", o->s.seed, "Random seed for sampling");
  cmd->add_flag("--ignore-eos", o->ignore_eos, "Keep going past end-of-sequence tokens");
  cmd->add_flag("--json", o->json, "Print {\"prompt_ids\", \"ids\", \"text\"} at the end");
  add_device_option(cmd, o->device);
  add_autotune_flag(cmd, o->autotune);
  cmd->callback([o] {
    SPEAR_CHECK(o->max_tokens >= 0 && o->max_tokens <= 1 << 20, "generate: bad --max-tokens");
    const Device device = parse_device(o->device);
    // A model directory or a .spear artifact (quantized, possibly with ECs).
    LoadedModel loaded = load_model(o->model, o->adapter);
    Tokenizer tok = load_tokenizer(loaded);
    std::vector<int32_t> prompt = tok.encode(o->prompt, true);
    SequenceOptions so;
    so.max_len = static_cast<int64_t>(prompt.size()) + o->max_tokens;
    so.max_tokens = std::max<int64_t>(static_cast<int64_t>(prompt.size()), 1);
    so.autotune = o->autotune;
    std::unique_ptr<SequenceRunner> runner = make_sequence_runner(loaded.weights, device, so);
    loaded.weights = LlamaWeights{};
    GenerateOptions g;
    g.max_new_tokens = o->max_tokens;
    g.sampling = o->s;
    g.stop_at_eos = !o->ignore_eos;
    StreamDecoder stream(tok);
    if (!o->json) {
      std::fputs(o->prompt.c_str(), stdout);
      std::fflush(stdout);
      g.on_token = [&](int32_t id) {
        std::string piece = stream.push(id);
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
        return true;
      };
    }
    GenerateResult r = runner->generate(prompt, g);
    if (o->json) {
      std::vector<int32_t> all = prompt;
      all.insert(all.end(), r.ids.begin(), r.ids.end());
      nlohmann::json j{{"prompt_ids", prompt},
                       {"ids", all},
                       {"new_ids", r.ids},
                       {"text", tok.decode(all)},
                       {"completion", tok.decode(r.ids)},
                       {"stopped_at_eos", r.stopped_at_eos},
                       {"prefill_seconds", r.prefill_seconds},
                       {"decode_seconds", r.decode_seconds}};
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      return;
    }
    std::fputs(stream.finish().c_str(), stdout);
    std::fputs("\n", stdout);
    double tps = r.ids.size() > 1 ? (r.ids.size() - 1) / std::max(r.decode_seconds, 1e-9) : 0;
    std::fprintf(stderr, "[%zu prompt tokens in %.3f s; %zu generated, %.1f tok/s decode]\n",
                 prompt.size(), r.prefill_seconds, r.ids.size(), tps);
  });
}

}  // namespace spear::cli
