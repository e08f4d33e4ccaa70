#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/{request,chat_template,spear,
safetensors_index,http_framer}/ (the older targets' seeds are copies of real files).
Deterministic: running it again rewrites the same bytes.  python3 fuzz/make_seeds.py"""
import gzip
import hashlib
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def js(o):
    return json.dumps(o, separators=(",", ":"), ensure_ascii=False)


# --- request: bodies of /v1/completions, /v1/chat/completions, /tokenize, /detokenize ---
req = {
    "completion_text": {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 8},
    "completion_sampling": {"prompt": "Lily had a cat", "max_tokens": 5, "temperature": 0.8, "top_p": 0.9,
                            "top_k": 20, "min_p": 0.05, "seed": 42, "n": 2, "presence_penalty": 0.5,
                            "frequency_penalty": -0.5, "repetition_penalty": 1.2, "stop": ["\n", "."],
                            "stop_token_ids": [2, 13], "user": "u"},
    "completion_list": {"prompt": ["One day", "The sun"], "max_tokens": 3, "best_of": 1, "n": 1},
    "completion_ids": {"prompt": [[1, 400, 29], [1, 7]], "max_tokens": 2, "ignore_eos": True},
    "completion_echo": {"prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 2},
    "completion_stream": {"prompt": [1, 2, 3], "stream": True, "stream_options": {"include_usage": True},
                          "max_tokens": 4, "logit_bias": {}, "suffix": ""},
    "chat_simple": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "chat_system": {"model": "m", "messages": [{"role": "system", "content": "Hi"},
                                                {"role": "user", "content": "Go"},
                                                {"role": "assistant", "content": "Once"},
                                                {"role": "user", "content": "More"}],
                    "max_completion_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
                    "seed": -7, "n": 3},
    "chat_parts": {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Rules"}]},
                                {"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]}],
                   "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
                   "response_format": {"type": "text"}, "stream": True},
    "chat_tool_role": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None},
                                    {"role": "tool", "content": "y"}], "stop": "\n"},
    "tokenize_prompt": {"model": "m", "prompt": "Hello world", "add_special_tokens": False,
                        "return_token_strs": True},
    "tokenize_messages": {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
    "detokenize": {"tokens": [1, 400, 29, 2]},
}
for name, body in req.items():
    put("request", name + ".json", js(body))

# --- chat_template: the real templates of tests/data/chat_templates, some with messages ---
tdir = os.path.join(ROOT, "..", "tests", "data", "chat_templates")
msgs = [
    None,
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
    [{"role": "user", "content": "only"}],
]
for i, name in enumerate(sorted(f for f in os.listdir(tdir) if f.endswith(".jinja"))):
    src = open(os.path.join(tdir, name), "rb").read()
    m = msgs[i % len(msgs)]
    put("chat_template", name, src if m is None else src + b"\0" + js(m).encode())
# Constructs no real template uses: loop variables, filters, slices, dicts, namespace.
put("chat_template", "features.jinja",
    "{%- set ns = namespace(n=0, s='') -%}{% for m in messages | selectattr('role', 'equalto', 'user') %}"
    "{% set ns.n = ns.n + 1 %}{{ loop.index }}/{{ loop.length }}:{{ m.content | trim | upper }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}{{ ns.n }}{{ messages[::-1][0]['role'] }}"
    "{{ {'a': [1, none, true]} | tojson }}{{ range(3) | list | join('-') }}{{ 'x' ~ 7 // 2 ~ 7 % 3 }}"
    "{% for k, v in {'k': 'v'}.items() %}{{ k }}={{ v }}{% endfor %}"
    "{{ messages | map(attribute='content') | join('|') }}{{ 'abc'[1:] | replace('b', 'B') }}"
    "{% if add_generation_prompt is defined and add_generation_prompt %}<gen>{% endif %}"
    "{# a comment #}{{ bos_token if messages | length > 1 else eos_token }}"
    "\0" + js(msgs[1]))

# --- spear: a tiny .spear artifact (1 layer, hidden 8, vocab 16) ---
def safetensors(tensors, metadata):
    """tensors: list of (name, dtype, shape, bytes) in file order."""
    header, off = {}, 0
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    header["__metadata__"] = metadata
    h = js(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def f16(vals):
    return struct.pack("<%de" % len(vals), *vals)


def f32(vals):
    return struct.pack("<%df" % len(vals), *vals)


def tiny_spear(with_ec, with_texts, bits, group, symmetric):
    V, D, H, KVH, HD, I = 16, 8, 2, 1, 4, 8
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": H,
           "num_key_value_heads": KVH, "head_dim": HD, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "float16"}
    t = [("spear.config_json", "U8", None, js(cfg).encode())]
    if with_texts:
        t.append(("spear.tokenizer_json", "U8", None, b'{"version":"1.0","model":{"type":"BPE","vocab":{}}}'))
        t.append(("spear.tokenizer_config_json", "U8", None, js({
            "bos_token": "<s>", "eos_token": {"content": "</s>"},
            "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}"}).encode()))
        t.append(("spear.generation_config_json", "U8", None,
                  js({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 32, "do_sample": True}).encode()))
    t = [(n, d, [len(b)], b) for n, d, _, b in t]
    t.append(("model.embed_tokens.weight", "F16", [V, D], f16([((i * 7) % 11 - 5) / 8 for i in range(V * D)])))
    t.append(("model.layers.0.input_layernorm.weight", "F16", [D], f16([1.0] * D)))
    t.append(("model.layers.0.post_attention_layernorm.weight", "F16", [D], f16([1.0] * D)))
    t.append(("model.norm.weight", "F16", [D], f16([1.0] * D)))
    shapes = {"self_attn.q_proj": (H * HD, D), "self_attn.k_proj": (KVH * HD, D),
              "self_attn.v_proj": (KVH * HD, D), "self_attn.o_proj": (D, H * HD),
              "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    ecs = {"self_attn.o_proj": (2, True), "mlp.down_proj": (1, False)} if with_ec else {}
    mods = []
    for mod, (N, K) in shapes.items():
        p = "model.layers.0." + mod
        gs = K if group <= 0 else group
        G = (K + gs - 1) // gs
        row = (K * bits + 7) // 8
        t.append((p + ".qweight", "U8", [N, row], bytes((i * 37) % 256 for i in range(N * row))))
        t.append((p + ".scales", "F32", [N, G], f32([0.01 * (1 + i % 5) for i in range(N * G)])))
        zero = float(1 << (bits - 1)) if symmetric else None
        t.append((p + ".zeros", "F32", [N, G],
                  f32([zero if symmetric else float(i % (1 << bits)) for i in range(N * G)])))
        r, gated = ecs.get(mod, (0, False))
        if r:
            t.append((p + ".ec.A", "F16", [r, K], f16([0.01 * ((i % 7) - 3) for i in range(r * K)])))
            t.append((p + ".ec.B", "F16", [N, r], f16([0.02 * ((i % 5) - 2) for i in range(N * r)])))
            if gated:
                t.append((p + ".ec.G", "F16", [r, r], f16([0.5, -0.25, 0.125, 1.0][: r * r])))
                t.append((p + ".ec.c", "F16", [r], f16([0.1] * r)))
        mods.append({"layer": 0, "module": mod, "bits": bits, "group": group, "symmetric": symmetric,
                     "ec_rank": r, "ec_gated": gated})
    h = hashlib.sha256()
    for name, _, _, data in sorted(t, key=lambda x: x[0]):
        h.update(data)
    meta = {"source_model": "/fuzz/tiny", "spear_version": "0", "quantizer": {"method": "rtn"},
            "modules": mods}
    return safetensors(t, {"format": "spear", "format_version": "1", "spear": js(meta),
                           "tensors_sha256": h.hexdigest()})


put("spear", "tiny_ec_w4g4.spear", tiny_spear(True, True, 4, 4, False))
put("spear", "tiny_plain_w3_sym.spear", tiny_spear(False, False, 3, -1, True))

# --- safetensors_index: indexes over the fixture of fuzz_entry.h's IndexFixture ---
put("safetensors_index", "two_shards.json", json.dumps(
    {"metadata": {"total_size": 26}, "weight_map": {"a.x": "a.safetensors", "a.y": "a.safetensors",
                                                    "b.z": "sub/b.safetensors"}}, indent=2))
put("safetensors_index", "links.json", js({"weight_map": {"a.x": "link-in.safetensors",
                                                          "o.w": "link-out.safetensors"}}))
put("safetensors_index", "bad_and_dir.json", js({"weight_map": {"a.x": "./a.safetensors",
                                                                "q": "bad.safetensors",
                                                                "r": "dir.safetensors"}}))
put("safetensors_index", "hf_style.json", json.dumps(
    {"metadata": {"total_size": 2471645608},
     "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                    "model.layers.0.input_layernorm.weight": "model-00001-of-00002.safetensors",
                    "model.norm.weight": "model-00002-of-00002.safetensors"}}, indent=2))

# --- http_framer: byte 0 picks the piece size, the rest is a connection's stream ---
body = js({"prompt": "Once upon a time", "max_tokens": 4}).encode()


def post(extra=b"", b=body, path=b"/v1/completions"):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(b)).encode() + b"\r\n\r\n" + b)


def chunked(b, sizes, trailer=b""):
    out, i = b"", 0
    for s in sizes:
        out += b"%x\r\n" % s + b[i:i + s] + b"\r\n"
        i += s
    if i < len(b):
        out += b"%x;ext=1\r\n" % (len(b) - i) + b[i:] + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


put("http_framer", "content_length", b"\x03" + post())
put("http_framer", "pipelined", b"\x05" + post() + b"\r\n" + post(b"Authorization: Bearer k\r\n") +
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
put("http_framer", "chunked_trailer", b"\x07" + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [5, 9]) .replace(b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n"))
gz = gzip.compress(body, mtime=0)
put("http_framer", "gzip", b"\x00" + post(b"Content-Encoding: gzip\r\n", gz))
put("http_framer", "deflate_chunked_continue", b"\x02" + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Expect: 100-continue\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n" +
    chunked(zlib.compress(body), [3]))
put("http_framer", "http10_get", b"\x01GET /v1/models HTTP/1.0\r\n\r\n")
