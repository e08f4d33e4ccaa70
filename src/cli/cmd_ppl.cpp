// spear ppl --model DIR --data FILE --ctx N: perplexity with the reference protocol,
// optionally compared with a reference model or its saved distributions.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "eval/ref_logits.h"
#include "quant/cpu_model.h"
#include "runtime/backend.h"
#include "runtime/load.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

void register_ppl(CLI::App& app) {
  auto* cmd = app.add_subcommand("ppl", "Perplexity of a text file in non-overlapping windows");
  struct Opts {
    std::string model, adapter, data, ref_model, ref_logits, save_logits, device = "cpu";
    int64_t ctx = 512, max_windows = -1, save_top_k = 0;
    bool json = false, autotune = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory or .spear file")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT LoRA adapter directory (spear export) applied to a quantized base as ungated ECs");
  cmd->add_option("--data", o->data, "Text file")->required();
  cmd->add_option("--ctx", o->ctx, "Window length in tokens")->capture_default_str();
  cmd->add_option("--max-windows", o->max_windows, "Score only the first N windows");
  cmd->add_option("--ref-model", o->ref_model,
                  "Compare with a reference model: KL(ref || model) per token (mean, median, p99, max) and "
                  "top-1 agreement");
  cmd->add_option("--save-logits", o->save_logits,
                  "Write the reference model's log-probabilities on the scored positions to FILE "
                  "(needs --ref-model; format in README)");
  cmd->add_option("--save-top-k", o->save_top_k,
                  "With --save-logits: keep the K most probable tokens per position plus the rest's mass; "
                  "0 = full rows")
      ->capture_default_str();
  cmd->add_option("--ref-logits", o->ref_logits,
                  "Compare with log-probabilities saved by --save-logits instead of running a reference model");
  cmd->add_flag("--json", o->json, "Print one JSON object");
  add_device_option(cmd, o->device);
  add_autotune_flag(cmd, o->autotune);
  cmd->callback([o] {
    const Device device = parse_device(o->device);
    SPEAR_CHECK(o->ref_model.empty() || o->ref_logits.empty(), "ppl: give --ref-model or --ref-logits, not both");
    SPEAR_CHECK(o->save_logits.empty() || !o->ref_model.empty(), "ppl: --save-logits needs --ref-model");
    SPEAR_CHECK(o->save_top_k == 0 || !o->save_logits.empty(), "ppl: --save-top-k needs --save-logits");
    const bool has_ref = !o->ref_model.empty() || !o->ref_logits.empty();
    SPEAR_CHECK(!has_ref || device == Device::Cpu,
                "ppl: --ref-model and --ref-logits are computed by the CPU engine only (use --device cpu)");
    // A model directory or a .spear artifact (quantized, possibly with ECs).
    LoadedModel loaded = load_model(o->model, o->adapter);
    Tokenizer tok = load_tokenizer(loaded);
    std::unique_ptr<LlamaModel> ref;
    if (!o->ref_model.empty()) ref = build_cpu_model(load_model(o->ref_model).weights);
    std::unique_ptr<RefLogitsReader> ref_reader;
    if (!o->ref_logits.empty()) ref_reader = std::make_unique<RefLogitsReader>(o->ref_logits);
    const int64_t vocab = loaded.weights.config.vocab_size;
    SequenceOptions so;
    so.max_len = o->ctx;
    so.graphs = false;
    so.autotune = o->autotune;
    std::unique_ptr<SequenceRunner> runner = make_sequence_runner(loaded.weights, device, so);
    if (const std::string mem = runner->memory_report(); !mem.empty())
      std::fprintf(stderr, "spear: on the GPU: %s\n", mem.c_str());
    loaded.weights = LlamaWeights{};  // the backend holds what it needs; unmap the rest
    std::string text = read_text_file(o->data);
    std::vector<int32_t> ids = tok.encode(text, true);
    PplOptions opt;
    opt.ctx = o->ctx;
    opt.max_windows = o->max_windows;
    opt.ref_model = ref.get();
    opt.ref_logits = ref_reader.get();
    std::unique_ptr<RefLogitsWriter> writer;
    if (has_ref) {
      // What this run scores, to check a saved file against or to record in a new one.
      RefLogitsHeader now = ref_logits_header(text, ids, o->ctx, ppl_window_count(ids.size(), opt), vocab);
      if (ref_reader) check_ref_logits_compatible(ref_reader->header(), now, o->ref_logits);
      if (!o->save_logits.empty()) {
        now.top_k = o->save_top_k;
        now.ref_model = o->ref_model;
        writer = std::make_unique<RefLogitsWriter>(o->save_logits, now);
        opt.save_logits = writer.get();
      }
    }
    Progress progress("ppl");
    opt.progress = [&](int64_t done, int64_t total) { progress.update(done, total, "windows"); };
    PplResult r = runner->perplexity(ids, opt);
    progress.finish();
    auto num = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(); };
    nlohmann::json j{{"ppl", r.ppl},
                     {"ppl_stderr", num(r.ppl_stderr)},
                     {"nll", r.nll_sum / static_cast<double>(r.predicted_tokens)},
                     {"nll_stderr", num(r.nll_stderr)},
                     {"predicted_tokens", r.predicted_tokens},
                     {"windows", r.windows},
                     {"tokens_in_file", r.tokens_in_file},
                     {"ctx", o->ctx},
                     {"model", o->model},
                     {"data", o->data},
                     {"seconds", r.seconds},
                     {"device", o->device}};
    if (r.has_ref) {
      j["mean_kl"] = r.kl.mean;
      j["kl"] = {{"mean", r.kl.mean}, {"median", r.kl.median}, {"p99", r.kl.p99}, {"max", r.kl.max}};
      j["top1_agreement"] = r.top1_agreement;
      j["top1_same"] = r.top1_same;
      if (ref_reader) {
        j["ref_logits"] = o->ref_logits;
        j["ref_top_k"] = ref_reader->header().top_k;
      } else {
        j["ref_model"] = o->ref_model;
      }
      if (writer) j["saved_logits"] = o->save_logits;
    }
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    if (std::isfinite(r.ppl_stderr))
      std::printf("ppl %.5f +/- %.5f", r.ppl, r.ppl_stderr);
    else
      std::printf("ppl %.5f", r.ppl);
    std::printf(" over %lld predicted tokens (%lld windows of %lld, %lld tokens in file), %.1f s\n",
                (long long)r.predicted_tokens, (long long)r.windows, (long long)o->ctx,
                (long long)r.tokens_in_file, r.seconds);
    if (r.has_ref) {
      std::printf("KL(ref || model) nats/token: mean %.6f, median %.6f, p99 %.6f, max %.6f%s\n", r.kl.mean,
                  r.kl.median, r.kl.p99, r.kl.max,
                  ref_reader && ref_reader->header().top_k > 0 ? " (top-k reference: a lower bound)" : "");
      std::printf("top-1 agreement %.5f (%lld of %lld positions)\n", r.top1_agreement, (long long)r.top1_same,
                  (long long)r.predicted_tokens);
    }
    if (writer) std::printf("reference log-probabilities saved to %s\n", o->save_logits.c_str());
  });
}

}  // namespace spear::cli
