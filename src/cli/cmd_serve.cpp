// spear serve --model PATH: the OpenAI-compatible server (src/server) in front of the
// continuous-batching engine (src/engine).
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "engine/engine_loop.h"
#include "runtime/backend.h"
#include "runtime/load.h"
#include "server/chat_template.h"
#include "server/generation_defaults.h"
#include "server/http_server.h"
#include "server/stop_signals.h"
#include "tokenizer/tokenizer.h"

namespace spear::cli {

namespace {

// End-of-turn tokens of common chat templates: generation stops at them in chat.
std::vector<int32_t> chat_stop_ids(const Tokenizer& tok, const server::ChatTemplate& t) {
  std::vector<int32_t> ids;
  std::vector<std::string> names = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                    "<|endoftext|>"};
  if (!t.eos_token().empty()) names.push_back(t.eos_token());
  for (const std::string& n : names) {
    int32_t id = tok.token_to_id(n);
    if (id >= 0) ids.push_back(id);
  }
  return ids;
}

// --api-key-file: the key is the file's text without surrounding whitespace.
std::string read_key_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "--api-key-file: cannot open " + path);
  std::string k(std::istreambuf_iterator<char>(in), {});
  const auto ws = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!k.empty() && ws(k.back())) k.pop_back();
  size_t i = 0;
  while (i < k.size() && ws(k[i])) ++i;
  k.erase(0, i);
  SPEAR_CHECK(!k.empty(), "--api-key-file: " + path + " holds no key");
  SPEAR_CHECK(k.find_first_of("\r\n") == std::string::npos, "--api-key-file: " + path + " holds more than one line");
  return k;
}

// Every flag of `spear serve` can come from the environment: --max-batch from
// SPEAR_MAX_BATCH, --api-key from SPEAR_API_KEY, ... (a flag on the command line wins).
// Set when serve is the command being parsed: CLI11 reads the environment of every
// subcommand, and a stray SPEAR_PORT must not break `spear info`.
void add_env_names(CLI::App* cmd) {
  for (CLI::Option* opt : cmd->get_options()) {
    if (opt->get_lnames().empty() || opt->get_lnames()[0] == "help") continue;
    std::string env = "SPEAR_";
    for (char c : opt->get_lnames()[0]) env += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    opt->envname(env);
  }
}

}  // namespace

void register_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Serve a model over an OpenAI-compatible HTTP API");
  struct Opts {
    std::string model, adapter, name, scheduler = "ec-aware", device = "cpu";
    std::string chat_template, api_key_file, generation_config = "auto";
    double gpu_memory_fraction = 0.9;
    server::ServerOptions http;
    EngineConfig eng;
    double slo_tpot_ms = 50, slo_ttft_ms = 1000;
    int64_t kv_cache_mb = 0, max_body_mb = 8;
    bool no_prefix_cache = false, prefix_cache = false;
    double shutdown_timeout_s = 30;
    bool no_profile = false, autotune = false, host_sampling = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Model directory or .spear artifact")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT LoRA adapter directory (spear export) applied to a quantized base as ungated ECs");
  cmd->add_option("--served-model-name", o->name, "Model id in the API (default: the file or directory name)");
  cmd->add_option("--host", o->http.host, "Address to bind (127.0.0.1 = this machine only)")->capture_default_str();
  cmd->add_option("--port", o->http.port, "Port (0 = any free port, printed at start)")->capture_default_str();
  cmd->add_option("--api-key", o->http.api_key,
                  "Require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (visible in ps: "
                  "prefer --api-key-file or SPEAR_API_KEY)");
  cmd->add_option("--api-key-file", o->api_key_file, "Read the API key from this file (its text, trimmed)");
  cmd->add_option("--chat-template", o->chat_template,
                  "Chat template: a Jinja file, or a tokenizer_config.json (default: the model's)");
  cmd->add_option("--generation-config", o->generation_config,
                  "auto: sampling defaults from the model's generation_config.json; none: OpenAI's defaults")
      ->check(CLI::IsMember({"auto", "none"}))
      ->capture_default_str();
  cmd->add_option("--max-batch", o->eng.sched.max_batch, "Running sequences at most")->capture_default_str();
  cmd->add_option("--max-model-len", o->eng.max_model_len, "Context length per request (default: the model's)");
  cmd->add_option("--max-num-batched-tokens", o->eng.sched.max_batched_tokens, "Token rows per step at most")->capture_default_str();
  cmd->add_option("--min-prefill-chunk", o->eng.sched.min_prefill_chunk, "Prompt tokens per step at least (progress guarantee)")->capture_default_str();
  cmd->add_option("--slo-tpot-ms", o->slo_tpot_ms, "Time-per-output-token target")->capture_default_str();
  cmd->add_option("--slo-ttft-ms", o->slo_ttft_ms, "Time-to-first-token target")->capture_default_str();
  cmd->add_option("--scheduler", o->scheduler, "ec-aware | ec-blind | fixed | no-chunk")->capture_default_str();
  cmd->add_option("--kv-cache-mb", o->kv_cache_mb, "KV cache memory (0 = max-batch full-length sequences, at most 512)")->capture_default_str();
  cmd->add_option("--block-size", o->eng.block_size, "Positions per KV block")->capture_default_str();
  cmd->add_flag("--no-prefix-cache", o->no_prefix_cache,
                "Compute every prompt in full (by default full prompt blocks already in the KV cache, the same "
                "tokens from the start, e.g. a shared system prompt, are reused instead of prefilled again)");
  cmd->add_flag("--prefix-cache", o->prefix_cache,
                "--device cuda: turn the prefix cache on (off by default there until it has been run on a GPU; "
                "on by default with --device cpu)");
  cmd->add_option("--max-queue", o->eng.max_waiting, "Waiting requests at most (then 429)")->capture_default_str();
  cmd->add_option("--http-threads", o->http.http_threads, "Requests served at once (slow senders take none)")->capture_default_str();
  cmd->add_option("--max-body-mb", o->max_body_mb, "Largest request body, after de-chunking and decompressing (413)")->capture_default_str();
  cmd->add_option("--header-timeout", o->http.header_timeout_s, "Seconds for a request's head to arrive (408)")
      ->check(CLI::Range(1, 3600))->capture_default_str();
  cmd->add_option("--body-timeout", o->http.body_timeout_s, "Seconds for a request's body to arrive after its head (408)")
      ->check(CLI::Range(1, 3600))->capture_default_str();
  cmd->add_option("--keep-alive-timeout", o->http.keep_alive_timeout_s, "Seconds an idle connection stays open")
      ->check(CLI::Range(1, 3600))->capture_default_str();
  cmd->add_option("--max-connections", o->http.max_connections, "Open connections at most (503 beyond)")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_option("--max-connections-per-ip", o->http.max_connections_per_ip,
                  "Open connections per client address at most (429 beyond)")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_flag("--allow-unknown-fields", o->http.allow_unknown_fields,
                "Ignore request fields spear does not know instead of refusing them (400)");
  cmd->add_option("--shutdown-timeout", o->shutdown_timeout_s,
                  "On SIGTERM/SIGINT: seconds in-flight requests may finish before they are cancelled")
      ->check(CLI::Range(0.0, 86400.0))->capture_default_str();
  add_device_option(cmd, o->device);
  add_autotune_flag(cmd, o->autotune);
  cmd->add_option("--gpu-memory-fraction", o->gpu_memory_fraction,
                  "--device cuda: the share of GPU memory to use; the KV cache takes what the weights leave")
      ->check(CLI::Range(0.05, 0.99))
      ->capture_default_str();
  cmd->add_flag("--no-profile", o->no_profile, "Skip the start-up cost-model profile (use the online fit only)");
  cmd->add_flag("--host-sampling", o->host_sampling,
                "--device cuda: copy every step's logits and sample on the host (default: tokens drawn on the GPU "
                "when no request of the step needs logprobs or penalties)");
  cmd->preparse_callback([cmd](size_t) { add_env_names(cmd); });
  cmd->callback([o] {
    namespace fs = std::filesystem;
    const Device device = parse_device(o->device);
    SPEAR_CHECK(parse_policy(o->scheduler, &o->eng.sched.policy),
                "--scheduler must be one of ec-aware, ec-blind, fixed, no-chunk");
    SPEAR_CHECK(o->slo_tpot_ms > 0 && o->slo_ttft_ms > 0, "SLOs must be positive");
    SPEAR_CHECK(o->kv_cache_mb >= 0 && o->kv_cache_mb <= (1 << 20), "--kv-cache-mb must be in [0, 2^20]");
    SPEAR_CHECK(o->max_body_mb >= 1 && o->max_body_mb <= 1024, "--max-body-mb must be in [1, 1024]");
    o->eng.sched.slo_tpot_s = o->slo_tpot_ms / 1e3;
    o->eng.sched.slo_ttft_s = o->slo_ttft_ms / 1e3;
    o->eng.kv_cache_bytes = o->kv_cache_mb << 20;
    SPEAR_CHECK(!(o->prefix_cache && o->no_prefix_cache), "give --prefix-cache or --no-prefix-cache, not both");
    o->eng.prefix_caching = !o->no_prefix_cache && (device == Device::Cpu || o->prefix_cache);
    o->eng.profile = !o->no_profile;
    o->eng.backend_sampling = !o->host_sampling;
    o->http.max_body_bytes = static_cast<size_t>(o->max_body_mb) << 20;
    if (!o->api_key_file.empty()) {
      SPEAR_CHECK(o->http.api_key.empty(),
                  "give the API key once: --api-key, --api-key-file or SPEAR_API_KEY (SPEAR_API_KEY_FILE)");
      o->http.api_key = read_key_file(o->api_key_file);
    }

    // SIGINT/SIGTERM stop the server in order (drain), whichever thread they land on:
    // a handler and a signalfd, not only a mask (OpenBLAS's threads, started before
    // main, block nothing; server/stop_signals.h). Installed before spear starts any
    // thread, which then inherit the block; a signal that comes while loading stops the
    // server once it is ready.
    server::StopSignals& stop_signals = server::StopSignals::install();

    // Blocks of 1 MiB and more (a request's body, its de-chunked or inflated copy) are
    // mmapped, so freeing them gives the memory back. glibc's default threshold is
    // dynamic: the free of an mmapped block raises it to that block's size (up to 32
    // MiB), after which the next 8 MB bodies come from the serving threads' malloc
    // arenas and stay there: +8 MB of RSS per large request, +161 MB after 20
    // (docs/BENCHMARKS.md). The engine makes its allocations of 1 MiB and more once, not
    // per step (mixlm-19m, bench-serve 64 x 64 tokens: 334 mmap calls pinned, 326 not).
    // A threshold given in GLIBC_TUNABLES wins.
    if (const char* t = std::getenv("GLIBC_TUNABLES"); !t || !std::strstr(t, "mmap_threshold"))
      mallopt(M_MMAP_THRESHOLD, 1 << 20);

    std::string name = o->name;
    if (name.empty()) {
      fs::path p = fs::path(o->model);
      name = (p.has_filename() ? p.filename() : p.parent_path().filename()).string();
    }
    server::HttpServer http(o->http);
    http.metrics().set_model_name(name);
    http.start();
    std::fprintf(stderr, "spear: listening on http://%s:%d (loading %s)\n", o->http.host.c_str(),
                 http.port(), o->model.c_str());
    std::fflush(stderr);

    LoadedModel lm = load_model(o->model, o->adapter);
    Tokenizer tok = load_tokenizer(lm);
    // The chat template and sampling defaults travel in a .spear artifact as in a
    // model directory.
    std::string note;
    server::ChatTemplate tmpl = server::ChatTemplate::plain();
    if (o->chat_template.empty()) {
      tmpl = server::ChatTemplate::from_tokenizer_config(lm.tokenizer_config_json, &note);
    } else {
      try {
        tmpl = server::ChatTemplate::from_file(o->chat_template, lm.tokenizer_config_json);
      } catch (const std::exception& e) {
        throw Error(std::string("--chat-template: ") + e.what());
      }
    }
    if (!note.empty()) note = " (" + note + ")";
    std::string gen_note;
    server::GenerationDefaults gen_defaults;
    if (o->generation_config == "auto")
      gen_defaults = server::GenerationDefaults::from_json_text(lm.generation_config_json, &gen_note);
    if (!gen_note.empty()) std::fprintf(stderr, "spear: %s\n", gen_note.c_str());
    const ModelConfig mc = lm.weights.config;
    ServeDeviceOptions dev;
    dev.max_batch = static_cast<int>(o->eng.sched.max_batch);
    dev.max_tokens = static_cast<int>(std::max<int64_t>(o->eng.sched.max_batched_tokens, 1));
    dev.max_len = static_cast<int>(o->eng.max_model_len > 0 ? o->eng.max_model_len : mc.max_position_embeddings);
    dev.block_size = static_cast<int>(o->eng.block_size);
    dev.gpu_memory_fraction = o->gpu_memory_fraction;
    dev.autotune = o->autotune;
    std::unique_ptr<StepModel> backend = make_step_model(lm.weights, device, dev);
    lm.weights = LlamaWeights{};  // the backend holds what it needs
    Engine engine(*backend, o->eng, &http.metrics());
    std::vector<std::pair<std::string, int64_t>> mem = backend->memory_by_use();
    if (backend->host_kv())  // the KV cache lives in the engine's pool, in float32
      mem.push_back({"kv_cache", engine.stats().kv_blocks_total * o->eng.block_size * mc.num_layers * mc.kv_dim() * 2 * 4});
    std::string mem_line;
    for (const auto& [use, bytes] : mem)
      mem_line += (mem_line.empty() ? "" : ", ") + use + " " + std::to_string(bytes >> 20) + " MiB";
    std::fprintf(stderr, "spear: %s: %s\n", backend->device().c_str(), mem_line.c_str());
    http.metrics().set_memory(std::string(device_name(device)), std::map<std::string, int64_t>(mem.begin(), mem.end()));
    engine.start();

    server::ServeState st;
    st.tok = &tok;
    st.engine = &engine;
    st.tmpl = tmpl;
    st.defaults = gen_defaults;
    st.model_name = name;
    st.chat_stop_ids = tmpl.is_jinja() ? chat_stop_ids(tok, tmpl) : std::vector<int32_t>{};
    st.limits.max_model_len = engine.max_model_len();
    st.limits.vocab_size = mc.vocab_size;
    http.set_ready(st);
    std::fprintf(stderr,
                 "spear: ready: model '%s', scheduler %s, max batch %lld, context %lld, KV %lld "
                 "blocks of %lld, prefix cache %s; chat template: %s%s; generation defaults: %s\nspear: %s\n",
                 name.c_str(), policy_name(o->eng.sched.policy),
                 static_cast<long long>(o->eng.sched.max_batch),
                 static_cast<long long>(engine.max_model_len()),
                 static_cast<long long>(engine.stats().kv_blocks_total),
                 static_cast<long long>(o->eng.block_size), o->eng.prefix_caching ? "on" : "off",
                 tmpl.description().c_str(),
                 note.c_str(), gen_defaults.describe().c_str(), engine.cost_model_summary().c_str());
    std::fflush(stderr);

    const int sig = stop_signals.wait();
    std::fprintf(stderr, "spear: stopping (signal %d): no new connections; in-flight requests have %g s\n",
                 sig, o->shutdown_timeout_s);
    std::fflush(stderr);
    // A second signal cancels what is still in flight at once.
    std::atomic<bool> drained{false};
    std::thread second([&http, &drained, &stop_signals] {
      if (stop_signals.wait() != 0 && !drained.load()) http.cancel_in_flight();
    });
    http.drain(o->shutdown_timeout_s);
    drained.store(true);
    stop_signals.wake();  // ends the second thread's wait
    second.join();
    engine.stop();
    std::fprintf(stderr, "spear: stopped\n");
  });
}

}  // namespace spear::cli
