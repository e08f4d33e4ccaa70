// spear ppl --model DIR --data FILE --ctx N: perplexity with the reference protocol.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "io/spear_artifact.h"
#include "tokenizer/tokenizer.h"
#ifdef SPEAR_WITH_CUDA
#include "cuda/gpu_model.h"
#endif

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
    // A model directory or a .spear artifact (quantized, possibly with ECs).
    LoadedModel loaded = load_model_any(o->model);
    Tokenizer tok = load_tokenizer(loaded);
    const std::unique_ptr<LlamaModel>& model = loaded.model;
    std::unique_ptr<LlamaModel> ref;
    if (!o->ref_model.empty()) ref = load_model_any(o->ref_model).model;
    std::string text = read_text_file(o->data);
    std::vector<int32_t> ids = tok.encode(text, true);
    Progress progress("ppl");
    PplOptions opt;
    opt.ctx = o->ctx;
    opt.max_windows = o->max_windows;
    opt.ref_model = ref.get();
    opt.progress = [&](int64_t done, int64_t total) { progress.update(done, total, "windows"); };
    PplResult r;
    if (o->device == "cuda") {
#ifdef SPEAR_WITH_CUDA
      // fp16 activations, fp32 residual stream; NLL reduced on the device per window.
      cuda::GpuOptions go;
      go.max_batch = 1;
      go.max_tokens = static_cast<int>(std::min<int64_t>(o->ctx, model->config().max_position_embeddings));
      go.max_len = go.max_tokens;
      go.graphs = false;
      auto gm = cuda::GpuModel::from_cpu(*model, go);
      std::fprintf(stderr, "spear: on the GPU: %s\n", gm->memory().str().c_str());
      std::vector<int32_t> targets;
      WindowScorer score = [&](const int32_t* win, int64_t n) {
        gm->reset(0);
        cuda::GpuChunk c{0, win, static_cast<int>(n), 0, true};
        gm->forward(std::span<const cuda::GpuChunk>(&c, 1));
        targets.assign(win + 1, win + n);
        targets.push_back(-1);  // the last position has no next token in the window
        return gm->nll_last(targets);
      };
      r = perplexity_with(score, model->config().max_position_embeddings, ids, opt);
#else
      throw Error("ppl: --device cuda: this spear was built without CUDA");
#endif
    } else {
      r = perplexity(*model, ids, opt);
    }
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
