// spear bench-serve --url URL: load-test an OpenAI-compatible server (see
// server/load_generator.h for what is measured and how).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include "cli/commands.h"
#include "core/error.h"
#include "server/load_generator.h"

namespace spear::cli {

void register_bench_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench-serve", "Load-test a running server (TTFT, TPOT, ITL, goodput)");
  struct Opts {
    server::LoadConfig cfg;
    std::string json_out, rate = "4";
    bool per_request = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--url", o->cfg.url, "Server base URL")->capture_default_str();
  cmd->add_option("--model", o->cfg.model, "Model id (default: the server's first)");
  cmd->add_option("--api-key", o->cfg.api_key, "Bearer key, if the server needs one");
  cmd->add_option("--rate", o->rate, "Poisson request rate per second, or 'inf' (all at once)")->capture_default_str();
  cmd->add_option("--concurrency", o->cfg.concurrency, "In-flight requests at most (0 = no cap)")->capture_default_str();
  cmd->add_option("--requests,-n", o->cfg.requests, "Requests to send")->capture_default_str();
  cmd->add_option("--input-len", o->cfg.input_len, "Prompt tokens")->capture_default_str();
  cmd->add_option("--output-len", o->cfg.output_len, "Generated tokens")->capture_default_str();
  cmd->add_option("--range-ratio", o->cfg.range_ratio, "Sample lengths uniformly in len*(1 +- r)")->capture_default_str();
  cmd->add_option("--shared-prefix-len", o->cfg.shared_prefix_len,
                  "The first N tokens of every prompt are the same (a shared system prompt: measures prefix "
                  "caching); prompts keep their --input-len")
      ->capture_default_str();
  cmd->add_option("--seed", o->cfg.seed, "Workload seed")->capture_default_str();
  cmd->add_option("--temperature", o->cfg.temperature, "Sampling temperature of every request (0: greedy)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-p", o->cfg.top_p, "Nucleus mass of every request")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--slo-ttft-ms", o->cfg.slo_ttft_ms, "TTFT SLO for goodput")->capture_default_str();
  cmd->add_option("--slo-tpot-ms", o->cfg.slo_tpot_ms, "TPOT SLO for goodput")->capture_default_str();
  cmd->add_option("--timeout", o->cfg.timeout_s, "Per-request timeout, seconds")->capture_default_str();
  cmd->add_option("--json", o->json_out, "Also write the results as JSON here");
  cmd->add_flag("--per-request", o->per_request, "Include every request in the JSON");
  cmd->add_flag("--profile", o->cfg.profile,
                "Also report where the server's engine thread spent the run (schedule, prepare, forward on the "
                "device / copying logits / host, sampling, other) and its prefix cache hit rate, from its /metrics");
  cmd->callback([o] {
    if (o->rate == "inf") {
      o->cfg.rate = std::numeric_limits<double>::infinity();
    } else {
      try {
        o->cfg.rate = std::stod(o->rate);
      } catch (...) {
        throw Error("--rate must be a number or 'inf'");
      }
      SPEAR_CHECK(o->cfg.rate > 0, "--rate must be positive");
    }
    server::LoadReport rep = server::run_load(o->cfg);
    std::fputs(rep.table().c_str(), stdout);
    if (!o->json_out.empty()) write_text_file(o->json_out, rep.to_json(o->per_request).dump(2) + "\n");
    for (const auto& r : rep.requests)
      if (!r.ok) {
        std::fprintf(stderr, "spear: first failure: status %d: %s\n", r.status, r.error.c_str());
        break;
      }
  });
}

}  // namespace spear::cli
