#include "server/generation.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <memory>
#include <random>

#include <nlohmann/json.hpp>

#include "engine/engine_loop.h"
#include "server/api_error.h"
#include "server/connection.h"
#include "server/httplib_config.h"
#include "server/stop_matcher.h"
#include "tokenizer/tokenizer.h"

namespace spear::server {

using nlohmann::json;

std::string token_text(const Tokenizer& tok, int32_t id) {
  std::string t = tok.decode({id}, false);
  // SentencePiece decoders drop the leading space of a sequence's first piece;
  // for a token shown on its own the space belongs to it.
  std::string raw;
  try {
    raw = tok.id_to_token(id);
  } catch (...) {
  }
  if (raw.rfind("\xE2\x96\x81", 0) == 0 && (t.empty() || t[0] != ' ')) t = " " + t;
  return t;
}

namespace {

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s%016llx%08llx", prefix, static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng() & 0xffffffffULL));
  return buf;
}

std::string dump(const json& j) {
  // Model output may hold invalid UTF-8 only as U+FFFD (StreamDecoder), but be safe.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json bytes_of(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(static_cast<int>(c));
  return a;
}

// One choice: an engine request and what has been made of its events so far.
struct Choice {
  Choice(const Tokenizer& tok, std::vector<std::string> stops)
      : dec(tok), prompt_dec(tok), stop(std::move(stops)) {}
  std::shared_ptr<RequestStream> stream;
  std::vector<int32_t> prompt;
  bool first_of_prompt = true;  // usage counts each prompt once, however many choices it has
  StreamDecoder dec;
  StreamDecoder prompt_dec;  // echo: the prompt tokens' pieces of the echoed text
  StopMatcher stop;
  std::string text;          // all text shown so far (after the echo prefix)
  std::string pending_text;  // not yet sent (streaming)
  int64_t pending_tokens = 0;  // generated tokens not yet sent (streaming)
  json lp_pending = json::array();  // logprob entries not yet sent (streaming)
  json lp_all = json::array();      // every logprob entry (non-streaming)
  int64_t generated = 0;
  bool done = false, error = false, sent_final = false;
  size_t prompt_seen = 0;          // echo: prompt token events so far
  int64_t prompt_offset = 0;       // echo: bytes of the echoed text before the next prompt token
  std::string finish_reason, error_message;
  int64_t text_offset = 0;         // bytes of the text (echo included) before the next token
};

class Session {
 public:
  Session(const ServeState& st, GenSpec spec) : st_(st), spec_(std::move(spec)) {
    id_ = random_id(spec_.chat ? "chatcmpl-" : "cmpl-");
    created_ = static_cast<int64_t>(std::time(nullptr));
    notifier_ = std::make_shared<Notifier>();
  }
  ~Session() { cancel_all(); }

  // Submits n choices of every prompt (choice index: prompt * n + j, as vLLM numbers
  // them); throws ApiError when the engine refuses.
  void submit() {
    std::vector<EngineRequest> reqs;
    std::vector<int32_t> stop_ids = spec_.stop_token_ids;
    if (spec_.chat) stop_ids.insert(stop_ids.end(), st_.chat_stop_ids.begin(), st_.chat_stop_ids.end());
    for (const auto& p : spec_.prompts)
      for (int64_t j = 0; j < spec_.n; ++j) {
        auto c = std::make_unique<Choice>(*st_.tok, spec_.stop);
        c->stream = std::make_shared<RequestStream>(notifier_);
        c->prompt = p;
        c->first_of_prompt = j == 0;
        EngineRequest r;
        r.prompt = p;
        r.sampling = spec_.sampling;
        if (j < static_cast<int64_t>(spec_.seeds.size())) r.sampling.seed = spec_.seeds[j];
        r.max_tokens = spec_.max_tokens;
        r.ignore_eos = spec_.ignore_eos;
        r.stop_ids = stop_ids;
        r.logprobs = spec_.logprobs;
        r.prompt_logprobs = spec_.echo && spec_.logprobs >= 0;
        r.stream = c->stream;
        reqs.push_back(std::move(r));
        choices_.push_back(std::move(c));
      }
    std::string why;
    switch (st_.engine->submit(std::move(reqs), &why)) {
      case Engine::Submit::Ok: break;
      case Engine::Submit::QueueFull:
        for (auto& c : choices_) c->stream->finish(FinishReason::Cancelled);
        throw ApiError(429, "the server is at capacity (admission queue full); retry later",
                       "rate_limit_error", "queue_full");
      case Engine::Submit::Invalid:
        for (auto& c : choices_) c->stream->finish(FinishReason::Cancelled);
        throw ApiError(400, why, "invalid_request_error", "invalid_value");
      case Engine::Submit::Stopped:
        for (auto& c : choices_) c->stream->finish(FinishReason::Cancelled);
        throw ApiError(503, "the server is shutting down", "server_error", "unavailable");
    }
    if (spec_.echo) {
      for (auto& c : choices_) {
        std::string p = st_.tok->decode(c->prompt, true);
        c->text = p;
        c->pending_text = p;
        c->text_offset = static_cast<int64_t>(p.size());
      }
    }
  }

  // Waits up to `wait` for news, folds it into the choices; true when all are done.
  bool poll(std::chrono::milliseconds wait) {
    std::vector<std::vector<TokenEvent>> evs(choices_.size());
    std::vector<bool> fin(choices_.size());
    {
      std::unique_lock<std::mutex> lk(notifier_->mu);
      auto ready = [&] {
        for (auto& c : choices_)
          if (!c->done && (c->stream->finished() || has_events(*c))) return true;
        return false;
      };
      if (!ready()) notifier_->cv.wait_for(lk, wait, ready);
      for (size_t i = 0; i < choices_.size(); ++i) {
        if (choices_[i]->done) continue;
        fin[i] = choices_[i]->stream->drain(evs[i]);
      }
    }
    bool all = true;
    for (size_t i = 0; i < choices_.size(); ++i) {
      Choice& c = *choices_[i];
      if (c.done) continue;
      for (const TokenEvent& ev : evs[i]) on_event(c, ev);
      if (!c.done && fin[i]) on_finish(c);
      all = all && c.done;
    }
    return all;
  }

  void cancel_all() {
    for (auto& c : choices_)
      if (c->stream) c->stream->cancel();
  }

  bool any_error(std::string* msg) const {
    for (const auto& c : choices_)
      if (c->error) {
        *msg = c->error_message;
        return true;
      }
    return false;
  }

  json full_response() const {
    json choices = json::array();
    int64_t completion = 0, prompt = 0;
    for (size_t i = 0; i < choices_.size(); ++i) {
      const Choice& c = *choices_[i];
      completion += c.generated;
      if (c.first_of_prompt) prompt += static_cast<int64_t>(c.prompt.size());
      json ch{{"index", i}, {"finish_reason", c.finish_reason}};
      if (spec_.chat) {
        ch["message"] = {{"role", "assistant"}, {"content", c.text}};
        ch["logprobs"] = spec_.logprobs >= 0 ? json{{"content", c.lp_all}} : json(nullptr);
      } else {
        ch["text"] = c.text;
        ch["logprobs"] = spec_.logprobs >= 0 ? completion_logprobs(c.lp_all) : json(nullptr);
      }
      choices.push_back(std::move(ch));
    }
    return {{"id", id_},
            {"object", spec_.chat ? "chat.completion" : "text_completion"},
            {"created", created_},
            {"model", st_.model_name},
            {"choices", choices},
            {"usage", usage(prompt, completion)}};
  }

  // SSE chunks for whatever is pending; the role chunk first for chat.
  std::string take_stream_chunks() {
    std::string out;
    if (spec_.chat && !sent_role_) {
      sent_role_ = true;
      for (size_t i = 0; i < choices_.size(); ++i)
        out += sse(chunk(i, json{{"role", "assistant"}, {"content", ""}}, json(nullptr), nullptr));
    }
    for (size_t i = 0; i < choices_.size(); ++i) {
      Choice& c = *choices_[i];
      // A chunk per batch of new tokens even when their text is still incomplete
      // UTF-8 (empty): clients measuring inter-token latency see every step.
      if (!c.pending_text.empty() || !c.lp_pending.empty() || c.pending_tokens > 0) {
        json lp = json(nullptr);
        if (spec_.logprobs >= 0)
          lp = spec_.chat ? json{{"content", c.lp_pending}} : completion_logprobs(c.lp_pending);
        json delta = spec_.chat ? json{{"content", c.pending_text}} : json(c.pending_text);
        out += sse(chunk(i, delta, lp, nullptr));
        c.pending_text.clear();
        c.pending_tokens = 0;
        c.lp_pending = json::array();
      }
      if (c.done && !c.sent_final && !c.error) {
        c.sent_final = true;
        out += sse(chunk(i, spec_.chat ? json::object() : json(""), json(nullptr), &c.finish_reason));
      }
    }
    return out;
  }

  // The stream cut short by a shutdown: what was generated so far, then an error
  // event and [DONE], so that a client sees the end rather than a dropped connection.
  std::string shutdown_tail() {
    cancel_all();
    std::string out = take_stream_chunks();
    out += sse(error_json("the server is shutting down; the stream was cut short", "server_error",
                          "server_shutdown"));
    return out + "data: [DONE]\n\n";
  }

  std::string stream_tail() const {
    std::string out;
    std::string err;
    if (any_error(&err))
      out += sse(error_json(err, "server_error", "internal_error"));
    else if (spec_.include_usage) {
      int64_t completion = 0, prompt = 0;
      for (const auto& c : choices_) {
        completion += c->generated;
        if (c->first_of_prompt) prompt += static_cast<int64_t>(c->prompt.size());
      }
      out += sse({{"id", id_},
                  {"object", spec_.chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", created_},
                  {"model", st_.model_name},
                  {"choices", json::array()},
                  {"usage", usage(prompt, completion)}});
    }
    return out + "data: [DONE]\n\n";
  }

 private:
  static bool has_events(const Choice& c) { return c.stream->has_events(); }

  static std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

  json usage(int64_t prompt, int64_t completion) const {
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
  }

  json chunk(size_t index, const json& delta, const json& lp, const std::string* finish) const {
    json ch{{"index", index}, {"logprobs", lp}};
    ch["finish_reason"] = finish ? json(*finish) : json(nullptr);
    if (spec_.chat) ch["delta"] = delta;
    else ch["text"] = delta;
    return {{"id", id_},
            {"object", spec_.chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", st_.model_name},
            {"choices", json::array({ch})}};
  }

  // Entries are {"token", "logprob" (null for the first prompt token), "top": [[text, lp]...],
  // "offset"}; the two APIs format them differently.
  json completion_logprobs(const json& entries) const {
    json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
    for (const json& e : entries) {
      tokens.push_back(e["token"]);
      lps.push_back(e["logprob"]);
      offs.push_back(e["offset"]);
      if (e["logprob"].is_null()) {
        tops.push_back(nullptr);
      } else {
        json d = json::object();
        for (const json& t : e["top"]) d[t[0].get<std::string>()] = t[1];
        tops.push_back(d);
      }
    }
    return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
  }

  json chat_logprob(const std::string& text, float lp, const std::vector<std::pair<int32_t, float>>& top) const {
    json tl = json::array();
    for (const auto& [id, v] : top) {
      std::string t = token_text(*st_.tok, id);
      tl.push_back({{"token", t}, {"logprob", v}, {"bytes", bytes_of(t)}});
    }
    return {{"token", text}, {"logprob", lp}, {"bytes", bytes_of(text)}, {"top_logprobs", tl}};
  }

  // `piece`: the token's exact slice of the returned text (echoed prompt tokens);
  // otherwise the token's own text.
  void add_logprob(Choice& c, const TokenEvent& ev, int64_t offset, const std::string* piece = nullptr) {
    if (spec_.logprobs < 0) return;
    const std::string text = piece ? *piece : token_text(*st_.tok, ev.id);
    json e;
    if (spec_.chat) {
      e = chat_logprob(text, ev.lp.logprob, ev.lp.top);
    } else {
      json top = json::array();
      for (const auto& [id, v] : ev.lp.top) top.push_back({token_text(*st_.tok, id), v});
      e = {{"token", text}, {"top", top}, {"offset", offset}};
      e["logprob"] = ev.has_logprob ? json(ev.lp.logprob) : json(nullptr);
    }
    c.lp_pending.push_back(e);
    c.lp_all.push_back(std::move(e));
  }

  void on_event(Choice& c, const TokenEvent& ev) {
    if (ev.is_prompt) {
      // Echo: each prompt token is shown as its piece of the echoed text (decode of the
      // prompt: no BOS, no SentencePiece space the text does not hold), so that the
      // offsets slice the text into exactly the tokens shown. Bytes of a character
      // split over several tokens belong to its last token.
      std::string piece = c.prompt_dec.push(ev.id);
      if (++c.prompt_seen == c.prompt.size()) piece += c.prompt_dec.finish();
      add_logprob(c, ev, c.prompt_offset, &piece);
      c.prompt_offset += static_cast<int64_t>(piece.size());
      return;
    }
    c.generated++;
    c.pending_tokens++;
    add_logprob(c, ev, c.text_offset);
    // A stop_token_ids token ends the choice (the engine finishes it) and, as in vLLM,
    // its text is not part of the output.
    if (std::find(spec_.stop_token_ids.begin(), spec_.stop_token_ids.end(), ev.id) != spec_.stop_token_ids.end())
      return;
    const std::string piece = c.dec.push(ev.id);
    c.text_offset += static_cast<int64_t>(piece.size());  // where the next token's text starts
    std::string shown = c.stop.push(piece);
    c.text += shown;
    c.pending_text += shown;
    if (c.stop.stopped()) {
      c.stream->cancel();  // the engine frees the sequence at its next step
      c.done = true;
      c.finish_reason = "stop";
    }
  }

  void on_finish(Choice& c) {
    c.done = true;
    FinishReason r = c.stream->finish_reason();
    if (r == FinishReason::Error || r == FinishReason::Cancelled) {
      c.error = true;
      c.error_message = c.stream->error().empty() ? "the request was cancelled" : c.stream->error();
      c.finish_reason = "error";
      return;
    }
    std::string shown = c.stop.push(c.dec.finish());
    if (!c.stop.stopped()) shown += c.stop.flush();
    c.text += shown;
    c.pending_text += shown;
    c.finish_reason = c.stop.stopped() ? "stop" : finish_reason_name(r);
  }

  const ServeState& st_;
  GenSpec spec_;
  std::string id_;
  int64_t created_;
  std::shared_ptr<Notifier> notifier_;
  std::vector<std::unique_ptr<Choice>> choices_;
  bool sent_role_ = false;
};

}  // namespace

void run_generation(const ServeState& st, GenSpec spec, const httplib::Request& req,
                    httplib::Response& res, const std::atomic<bool>& cancel) {
  using namespace std::chrono_literals;
  const bool stream = spec.stream;
  auto session = std::make_shared<Session>(st, std::move(spec));
  session->submit();
  auto watch = std::make_shared<ConnectionWatch>(req);
  if (!stream) {
    while (!session->poll(50ms)) {
      if (watch->peer_closed()) {
        session->cancel_all();
        res.status = 499;  // client closed request (nginx's code); nobody reads it
        return;
      }
      if (cancel.load()) {
        session->cancel_all();
        throw ApiError(503, "the server is shutting down; the request was cancelled", "server_error",
                       "server_shutdown");
      }
    }
    std::string err;
    if (session->any_error(&err)) throw ApiError(500, err, "server_error", "internal_error");
    res.set_content(dump(session->full_response()), "application/json");
    return;
  }
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [session, watch, &cancel](size_t, httplib::DataSink& sink) {
        const bool all = session->poll(50ms);
        std::string out = session->take_stream_chunks();
        if (!out.empty() && !sink.write(out.data(), out.size())) {
          session->cancel_all();
          return false;
        }
        if (all) {
          std::string tail = session->stream_tail();
          sink.write(tail.data(), tail.size());
          sink.done();
          return true;
        }
        if (cancel.load()) {
          std::string tail = session->shutdown_tail();
          sink.write(tail.data(), tail.size());
          sink.done();
          return true;
        }
        if (watch->peer_closed()) {
          session->cancel_all();
          return false;
        }
        return true;
      },
      [session](bool) { session->cancel_all(); });
}

}  // namespace spear::server
