#include "model/llama.h"

#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <set>

#include <omp.h>

#include "core/error.h"
#include "model/load_hf.h"
#include "model/ops.h"

namespace spear {

// ---- building -------------------------------------------------------------------

std::unique_ptr<Linear> make_dense_linear(const ModuleWeights& m) {
  SPEAR_CHECK(!m.quantized(), "this model has quantized modules: build it with build_cpu_model (quant/cpu_model.h)");
  return std::make_unique<DenseLinear>(m.dense);
}

std::unique_ptr<LlamaModel> LlamaModel::build(const LlamaWeights& w, const LinearMaker& make) {
  w.validate("model");
  const ModelConfig& c = w.config;
  std::vector<LayerWeights> layers(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = layers[l];
    L.attn_norm = w.layers[l].attn_norm.to_f32();
    L.ffn_norm = w.layers[l].ffn_norm.to_f32();
    for (Module m : kAllModules) L.modules[m] = make(w.at(l, m));
  }
  return std::make_unique<LlamaModel>(c, w.embed.to_f32(), std::move(layers), w.final_norm.to_f32(),
                                      w.lm_head.empty() ? std::vector<float>{} : w.lm_head.to_f32());
}

std::unique_ptr<LlamaModel> LlamaModel::load(const std::string& dir) { return build(load_hf_weights(dir)); }

LlamaModel::LlamaModel(ModelConfig cfg, std::vector<float> embed, std::vector<LayerWeights> layers,
                       std::vector<float> final_norm, std::vector<float> lm_head)
    : cfg_(std::move(cfg)),
      embed_(std::move(embed)),
      layers_(std::move(layers)),
      final_norm_(std::move(final_norm)),
      lm_head_(std::move(lm_head)),
      rope_(cfg_.rope, cfg_.head_dim) {
  SPEAR_CHECK(static_cast<int64_t>(embed_.size()) == cfg_.vocab_size * cfg_.hidden_size,
              "model: embedding size does not match the config");
  SPEAR_CHECK(static_cast<int64_t>(layers_.size()) == cfg_.num_layers,
              "model: layer count does not match the config");
  SPEAR_CHECK(lm_head_.empty() ||
                  static_cast<int64_t>(lm_head_.size()) == cfg_.vocab_size * cfg_.hidden_size,
              "model: lm_head size does not match the config");
  rope_.reserve(cfg_.max_position_embeddings);
}

int64_t LlamaModel::weight_bytes() const {
  int64_t b = static_cast<int64_t>(embed_.size() + final_norm_.size() + lm_head_.size()) * 4;
  for (const LayerWeights& L : layers_) {
    b += static_cast<int64_t>(L.attn_norm.size() + L.ffn_norm.size()) * 4;
    for (const auto& m : L.modules) b += m->weight_bytes();
  }
  return b;
}

// ---- forward -----------------------------------------------------------------

void LlamaModel::forward(std::span<const SeqChunk> chunks, float* logits) const {
  const int64_t D = cfg_.hidden_size, HD = cfg_.head_dim, NH = cfg_.num_heads,
                NKV = cfg_.num_kv_heads, QD = cfg_.q_dim(), KVD = cfg_.kv_dim(),
                FF = cfg_.intermediate_size, V = cfg_.vocab_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);

  // Token rows of all chunks, concatenated. row_seq/row_pos say where each row
  // belongs; every chunk must fit its KV store.
  int64_t T = 0, max_pos = 0;
  for (const SeqChunk& c : chunks) {
    SPEAR_CHECK(c.kv && c.n_tokens > 0 && c.start_pos >= 0, "forward: empty or invalid chunk");
    SPEAR_CHECK(c.start_pos + c.n_tokens <= c.kv->capacity(),
                "forward: sequence of " + std::to_string(c.start_pos + c.n_tokens) +
                    " tokens exceeds its KV capacity of " + std::to_string(c.kv->capacity()));
    for (int64_t i = 0; i < c.n_tokens; ++i)
      SPEAR_CHECK(c.tokens[i] >= 0 && c.tokens[i] < V,
                  "forward: token id " + std::to_string(c.tokens[i]) + " is outside the vocabulary");
    T += c.n_tokens;
    max_pos = std::max(max_pos, c.start_pos + c.n_tokens);
  }
  if (T == 0) return;
  rope_.reserve(max_pos);
  std::vector<int32_t> row_chunk(T);
  std::vector<int64_t> row_pos(T);
  for (int64_t ci = 0, r = 0; ci < static_cast<int64_t>(chunks.size()); ++ci)
    for (int64_t i = 0; i < chunks[ci].n_tokens; ++i, ++r) {
      row_chunk[r] = static_cast<int32_t>(ci);
      row_pos[r] = chunks[ci].start_pos + i;
    }

  std::vector<float> x(T * D);       // (T, dim) residual stream
  std::vector<float> xn(T * D);      // (T, dim) normed input of a block
  std::vector<float> q(T * QD);      // (T, n_heads*head_dim)
  std::vector<float> kbuf(T * KVD);  // (T, n_kv_heads*head_dim)
  std::vector<float> vbuf(T * KVD);  // (T, n_kv_heads*head_dim)
  std::vector<float> att(T * QD);    // (T, n_heads*head_dim) attention output
  std::vector<float> proj(T * D);    // (T, dim) o_proj / down_proj output
  std::vector<float> gate(T * FF);   // (T, hidden)
  std::vector<float> up(T * FF);     // (T, hidden)
  std::vector<float> kpanel, vpanel;  // per chunk: (n_kv_heads, n_ctx, head_dim)

  for (int64_t r = 0, ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci)
    for (int64_t i = 0; i < chunks[ci].n_tokens; ++i, ++r)
      std::copy_n(&embed_[static_cast<int64_t>(chunks[ci].tokens[i]) * D], D, &x[r * D]);
  trace("hidden.0", x.data(), T, D);

  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  const int64_t group = NH / NKV;
  std::string pre;
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& L = layers_[l];
    if (trace_) pre = "layers." + std::to_string(l) + ".";

    // --- attention block
    rmsnorm(x.data(), L.attn_norm.data(), xn.data(), T, D, eps);
    trace(pre + "attn_norm", xn.data(), T, D);
    L.at(Module::Q).forward(xn.data(), T, q.data());
    L.at(Module::K).forward(xn.data(), T, kbuf.data());
    L.at(Module::V).forward(xn.data(), T, vbuf.data());
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < T; ++r) {
      rope_.apply(&q[r * QD], NH, row_pos[r]);
      rope_.apply(&kbuf[r * KVD], NKV, row_pos[r]);
      KVStore* kv = chunks[row_chunk[r]].kv;
      std::copy_n(&kbuf[r * KVD], KVD, kv->key(l, row_pos[r]));
      std::copy_n(&vbuf[r * KVD], KVD, kv->value(l, row_pos[r]));
    }
    trace(pre + "q", q.data(), T, QD);
    trace(pre + "k", kbuf.data(), T, KVD);
    trace(pre + "v", vbuf.data(), T, KVD);

    // Causal attention: row r attends to positions [0, row_pos[r]] of its own sequence.
    // Each chunk's keys and values are first gathered per kv head into contiguous
    // (n_ctx, head_dim) panels, so the inner loops run over plain memory whatever
    // the KV store's layout (contiguous or paged).
    for (int64_t ci = 0, row0 = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
      const SeqChunk& c = chunks[ci];
      const int64_t n_ctx_max = c.start_pos + c.n_tokens;
      kpanel.resize(NKV * n_ctx_max * HD);  // (n_kv_heads, n_ctx, head_dim)
      vpanel.resize(NKV * n_ctx_max * HD);  // (n_kv_heads, n_ctx, head_dim)
#pragma omp parallel for schedule(static)
      for (int64_t j = 0; j < n_ctx_max; ++j) {
        const float* kr = c.kv->key(l, j);
        const float* vr = c.kv->value(l, j);
        for (int64_t g = 0; g < NKV; ++g) {
          std::copy_n(kr + g * HD, HD, &kpanel[(g * n_ctx_max + j) * HD]);
          std::copy_n(vr + g * HD, HD, &vpanel[(g * n_ctx_max + j) * HD]);
        }
      }
#pragma omp parallel
      {
        std::vector<float> scores(n_ctx_max);
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < c.n_tokens; ++i)
          for (int64_t h = 0; h < NH; ++h) {
            const int64_t r = row0 + i, n_ctx = c.start_pos + i + 1, kvh = h / group;
            const float* qh = &q[r * QD + h * HD];
            const float* kp = &kpanel[kvh * n_ctx_max * HD];
            const float* vp = &vpanel[kvh * n_ctx_max * HD];
            for (int64_t j = 0; j < n_ctx; ++j) scores[j] = dot(qh, kp + j * HD, HD) * scale;
            softmax(scores.data(), n_ctx);
            float* out = &att[r * QD + h * HD];
            std::fill_n(out, HD, 0.0f);
            for (int64_t j = 0; j < n_ctx; ++j) axpy(scores[j], vp + j * HD, out, HD);
          }
      }
      row0 += c.n_tokens;
    }
    trace(pre + "attn_out", att.data(), T, QD);
    L.at(Module::O).forward(att.data(), T, proj.data());
    for (int64_t i = 0; i < T * D; ++i) x[i] += proj[i];

    // --- SwiGLU block
    rmsnorm(x.data(), L.ffn_norm.data(), xn.data(), T, D, eps);
    trace(pre + "ffn_norm", xn.data(), T, D);
    L.at(Module::Gate).forward(xn.data(), T, gate.data());
    L.at(Module::Up).forward(xn.data(), T, up.data());
    silu_mul(gate.data(), up.data(), T * FF);
    trace(pre + "mlp.down_proj.in", gate.data(), T, FF);
    L.at(Module::Down).forward(gate.data(), T, proj.data());
    for (int64_t i = 0; i < T * D; ++i) x[i] += proj[i];
    if (trace_ && l + 1 < cfg_.num_layers) trace("hidden." + std::to_string(l + 1), x.data(), T, D);
  }

  // Final norm and head, only for the rows whose logits were asked for.
  std::vector<int64_t> rows;
  for (int64_t r = 0, ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
    const SeqChunk& c = chunks[ci];
    for (int64_t i = 0; i < c.n_tokens; ++i, ++r)
      if (c.all_logits || i + 1 == c.n_tokens) rows.push_back(r);
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<float> h(R * D);  // (R, dim)
  for (int64_t i = 0; i < R; ++i) std::copy_n(&x[rows[i] * D], D, &h[i * D]);
  rmsnorm(h.data(), final_norm_.data(), h.data(), R, D, eps);
  if (trace_) trace("hidden." + std::to_string(cfg_.num_layers), h.data(), R, D);
  if (logits) matmul_nt(h.data(), lm_head_.empty() ? embed_.data() : lm_head_.data(), logits, R, D, V);
}

std::vector<float> LlamaModel::forward(const int32_t* tokens, int64_t n, KVStore& kv,
                                       int64_t start_pos, bool all_logits) const {
  SeqChunk c{&kv, tokens, n, start_pos, all_logits};
  std::vector<float> logits((all_logits ? n : 1) * cfg_.vocab_size);
  forward(std::span<const SeqChunk>(&c, 1), logits.data());
  return logits;
}

}  // namespace spear
