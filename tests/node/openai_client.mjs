// Drives a running `spear serve` with the official openai Node SDK: a client we did
// not write, so its expectations (shapes, SSE framing, error objects) are checked.
// Usage: node openai_client.mjs BASE_URL MODEL   (BASE_URL like http://127.0.0.1:PORT/v1)
// Prints one JSON line with what it saw; exits non-zero on any failure.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60_000 });
const out = {};
const check = (cond, what) => {
  if (!cond) throw new Error("check failed: " + what);
};

const models = await client.models.list();
out.models = models.data.map((m) => m.id);
check(out.models.includes(model), "model listed");

const c = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 12, temperature: 0 });
check(c.object === "text_completion" && c.choices.length === 1, "completion shape");
check(typeof c.choices[0].text === "string" && c.choices[0].text.length > 0, "completion text");
check(c.usage.completion_tokens > 0, "completion usage");
out.completion = c.choices[0].text;

const ids = await client.completions.create({ model, prompt: [1, 403, 407], max_tokens: 1, echo: true, logprobs: 1, temperature: 0 });
check(ids.choices[0].logprobs.token_logprobs.length === 4, "echo logprobs length");
check(ids.choices[0].logprobs.token_logprobs[0] === null, "first prompt logprob is null");
out.echo_logprobs = ids.choices[0].logprobs.token_logprobs;

const stream = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 12, temperature: 0, stream: true });
let streamed = "";
for await (const chunk of stream) streamed += chunk.choices[0]?.text ?? "";
check(streamed === out.completion, "streamed completion equals the non-streamed one");

const chat = await client.chat.completions.create({ model, messages: [{ role: "user", content: "Hi" }], max_tokens: 8 });
check(chat.object === "chat.completion" && chat.choices[0].message.role === "assistant", "chat shape");
out.chat = chat.choices[0].message.content;

const cstream = await client.chat.completions.create({
  model, messages: [{ role: "system", content: "Be nice." }, { role: "user", content: "Hi" }],
  max_tokens: 8, stream: true, stream_options: { include_usage: true },
});
let chatText = "", finish = null, usage = null;
for await (const chunk of cstream) {
  if (chunk.usage) usage = chunk.usage;
  for (const ch of chunk.choices) {
    chatText += ch.delta?.content ?? "";
    if (ch.finish_reason) finish = ch.finish_reason;
  }
}
check(finish === "length" || finish === "stop", "chat stream finish_reason");
check(usage && usage.completion_tokens > 0, "chat stream usage");
out.chat_stream = chatText;

try {
  await client.completions.create({ model, prompt: "x", max_tokens: -1 });
  throw new Error("a bad request was accepted");
} catch (e) {
  check(e instanceof OpenAI.APIError && e.status === 400, "400 surfaces as APIError: " + e);
  check(typeof e.message === "string" && e.code === "invalid_value", "error code passed through: " + e.code);
  out.error = { status: e.status, code: e.code };
}
try {
  await client.completions.create({ model: "no-such-model", prompt: "x", max_tokens: 1 });
  throw new Error("an unknown model was accepted");
} catch (e) {
  check(e instanceof OpenAI.NotFoundError, "404 surfaces as NotFoundError: " + e);
}
// n > 1 (choice i samples with seed + i, as vLLM's n), seeds, penalties and vLLM's
// extra sampling fields (passed through the SDK's body), on both endpoints.
const nreq = { model, prompt: "Once upon a time", max_tokens: 8, n: 3, seed: 42, temperature: 1, ignore_eos: true };
const nres = await client.completions.create(nreq);
check(nres.choices.length === 3 && nres.choices.map((c) => c.index).join() === "0,1,2", "n choices and their indexes");
check(nres.usage.completion_tokens === 24, "usage counts every choice's tokens");
const seeded = await client.completions.create({ ...nreq, n: 1, seed: 43 });
check(seeded.choices[0].text === nres.choices[1].text, "choice 1 samples with seed + 1");
const again = await client.completions.create(nreq);
check(again.choices.map((c) => c.text).join("|") === nres.choices.map((c) => c.text).join("|"), "a seed reproduces");
out.n = nres.choices.map((c) => c.text);
const pen = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Hi" }], max_tokens: 8, n: 2, seed: 1,
  presence_penalty: 0.5, frequency_penalty: 0.5, repetition_penalty: 1.2, min_p: 0.05, top_k: 20, stop_token_ids: [],
});
check(pen.choices.length === 2 && pen.choices[1].index === 1, "chat n with penalties");
const nstream = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Hi" }], max_tokens: 6, n: 2, seed: 5, stream: true,
});
const finished = new Set();
for await (const chunk of nstream) for (const ch of chunk.choices) if (ch.finish_reason) finished.add(ch.index);
check(finished.size === 2, "each streamed choice finishes");
// Without a seed every sampled request draws its own: identical requests differ.
const unseeded = [];
for (let i = 0; i < 4; ++i)
  unseeded.push((await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 16, temperature: 1 })).choices[0].text);
check(new Set(unseeded).size > 1, "no seed: identical sampled requests differ: " + JSON.stringify(unseeded));
out.unseeded = unseeded;
// A seed reproduces a chat too, choice by choice.
const chatSeeded = { model, messages: [{ role: "user", content: "Tell me a story" }], max_tokens: 12, n: 2, seed: 7, temperature: 1 };
const cs1 = await client.chat.completions.create(chatSeeded);
const cs2 = await client.chat.completions.create(chatSeeded);
check(cs1.choices.map((c) => c.message.content).join("|") === cs2.choices.map((c) => c.message.content).join("|"),
      "a seed reproduces a chat");
// n on a streamed completion: every choice's text arrives and each finishes once.
const nCompletionStream = await client.completions.create({ ...nreq, stream: true });
const nStreamed = ["", "", ""], cfinished = [0, 0, 0];
for await (const chunk of nCompletionStream)
  for (const ch of chunk.choices) {
    nStreamed[ch.index] += ch.text;
    if (ch.finish_reason) cfinished[ch.index]++;
  }
check(cfinished.join() === "1,1,1", "each streamed completion choice finishes once");
check(nStreamed.join("|") === nres.choices.map((c) => c.text).join("|"), "streamed n choices match the unstreamed ones");
// best_of equal to n is accepted; larger is refused as unsupported.
const bo = await client.completions.create({ ...nreq, n: 2, best_of: 2 });
check(bo.choices.length === 2, "best_of = n");
try {
  await client.completions.create({ ...nreq, n: 1, best_of: 3 });
  throw new Error("best_of > n was accepted");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === "best_of", "best_of > n refused: " + e);
}
// Penalties change what is generated: greedy text with and without each penalty.
const greedy = { model, prompt: "Once upon a time", max_tokens: 48, temperature: 0, ignore_eos: true };
const plainText = (await client.completions.create(greedy)).choices[0].text;
out.penalties = { none: plainText };
for (const [k, v] of [["frequency_penalty", 2], ["presence_penalty", 2], ["repetition_penalty", 1.5]]) {
  const t = (await client.completions.create({ ...greedy, [k]: v })).choices[0].text;
  check(t !== plainText, k + " changes the greedy text");
  const t2 = (await client.completions.create({ ...greedy, [k]: v })).choices[0].text;
  check(t2 === t, k + " is deterministic under greedy decoding");
  out.penalties[k] = t;
}
try {
  await client.completions.create({ model, prompt: "x", max_tokens: 1, repetition_penalty: 0 });
  throw new Error("repetition_penalty 0 was accepted");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === "repetition_penalty", "repetition_penalty range: " + e);
}
try {
  await client.completions.create({ model, prompt: "x", max_tokens: 1, presence_penalty: 3 });
  throw new Error("an out-of-range penalty was accepted");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === "presence_penalty", "penalty range: " + e);
}

// vLLM's /tokenize and /detokenize (outside /v1), with plain fetch.
const root = baseURL.replace(/\/v1\/?$/, "");
const post = async (path, body) => {
  const r = await fetch(root + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  check(r.status === 200, path + " status " + r.status);
  return r.json();
};
const tok = await post("/tokenize", { model, prompt: "Once upon a time", return_token_strs: true });
check(tok.count === tok.tokens.length && tok.count > 1 && tok.token_strs.length === tok.count, "tokenize shape");
check(tok.count === c.usage.prompt_tokens, "tokenize counts what the completion counted");
const detok = await post("/detokenize", { model, tokens: tok.tokens.slice(1) });
check(detok.prompt === "Once upon a time", "detokenize inverts tokenize: " + JSON.stringify(detok));
const chatTok = await post("/tokenize", { model, messages: [{ role: "user", content: "Hi" }] });
check(chatTok.count === chat.usage.prompt_tokens, "chat tokenize counts what chat counted");
// add_special_tokens: false drops the BOS; the empty text is the BOS alone (as Hugging Face).
const noBos = await post("/tokenize", { model, prompt: "Once upon a time", add_special_tokens: false });
check(noBos.count === tok.count - 1 && noBos.tokens.join() === tok.tokens.slice(1).join(), "add_special_tokens: false");
const empty = await post("/tokenize", { model, prompt: "" });
check(empty.count === 1 && empty.tokens[0] === tok.tokens[0], "the empty text is the BOS alone: " + JSON.stringify(empty));
const emptyCompletion = await client.completions.create({ model, prompt: "", max_tokens: 2 });
check(emptyCompletion.usage.prompt_tokens === 1, "an empty prompt is the BOS alone in the API too");
// Token ids from /tokenize are a valid prompt, and score the same as the text.
const byIds = await client.completions.create({ model, prompt: tok.tokens, max_tokens: 4, temperature: 0 });
const byText = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 4, temperature: 0 });
check(byIds.choices[0].text === byText.choices[0].text, "tokenize ids as the prompt give the text's completion");
const version = await (await fetch(root + "/version")).json();
check(typeof version.version === "string", "version");
out.tokenize = tok.tokens;
out.tokenize_empty = empty.tokens;

console.log(JSON.stringify(out));
