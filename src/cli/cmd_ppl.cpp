// spear ppl --model DIR --data FILE --ctx N: perplexity with the reference protocol.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "quant/cpu_model.h"
#include "runtime/backend.h"
#include "runtime/load.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_ppl(CLI::App& app) {
  auto* cmd = app.add_subcommand("ppl", "Perplexity of a text file in non-overlapping windows");
  struct Opts {
    std::string model, data, ref_model, device = "cpu";
    int64_t ctx = 512, max_windows = -1;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory or .spear file")->required();
  cmd->add_option("--data", o->data, "Text file")->required();
  cmd->add_option("--ctx", o->ctx, "Window length in tokens")->capture_default_str();
  cmd->add_option("--max-windows", o->max_windows, "Score only the first N windows");
  cmd->add_option("--ref-model", o->ref_model, "Also report mean KL(ref || model) per token");
  cmd->add_flag("--json", o->json, "Print one JSON object");
  add_device_option(cmd, o->device);
  cmd->callback([o] {
    const Device device = parse_device(o->device);
    // A model directory or a .spear artifact (quantized, possibly with ECs).
    LoadedModel loaded = load_model(o->model);
    Tokenizer tok = load_tokenizer(loaded);
    std::unique_ptr<LlamaModel> ref;
    if (!o->ref_model.empty()) ref = build_cpu_model(load_model(o->ref_model).weights);
    SequenceOptions so;
    so.max_len = o->ctx;
    so.graphs = false;
    std::unique_ptr<SequenceRunner> runner = make_sequence_runner(loaded.weights, device, so);
    if (const std::string mem = runner->memory_report(); !mem.empty())
      std::fprintf(stderr, "spear: on the GPU: %s\n", mem.c_str());
    loaded.weights = LlamaWeights{};  // the backend holds what it needs; unmap the rest
    std::string text = read_text_file(o->data);
    std::vector<int32_t> ids = tok.encode(text, true);
    Progress progress("ppl");
    PplOptions opt;
    opt.ctx = o->ctx;
    opt.max_windows = o->max_windows;
    opt.ref_model = ref.get();
    opt.progress = [&](int64_t done, int64_t total) { progress.update(done, total, "windows"); };
    PplResult r = runner->perplexity(ids, opt);
    progress.finish();
    nlohmann::json j{{"ppl", r.ppl},
                     {"nll", r.nll_sum / static_cast<double>(r.predicted_tokens)},
                     {"predicted_tokens", r.predicted_tokens},
                     {"windows", r.windows},
                     {"tokens_in_file", r.tokens_in_file},
                     {"ctx", o->ctx},
                     {"model", o->model},
                     {"data", o->data},
                     {"seconds", r.seconds},
                     {"device", o->device}};
    if (ref) j["mean_kl"] = r.mean_kl;
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("ppl %.5f over %lld predicted tokens (%lld windows of %lld, %lld tokens in file), "
                "%.1f s\n",
                r.ppl, (long long)r.predicted_tokens, (long long)r.windows, (long long)o->ctx,
                (long long)r.tokens_in_file, r.seconds);
    if (ref) std::printf("mean KL(ref || model) %.6f nats/token\n", r.mean_kl);
  });
}

}  // namespace spear::cli
