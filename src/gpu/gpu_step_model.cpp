#include "gpu/gpu_step_model.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "engine/paged_kv.h"

namespace spear::cuda {

GpuStepModel::GpuStepModel(const LlamaWeights& w, const GpuServeOptions& so) : inv_(::spear::ec_inventory(w)) {
  GpuOptions o;
  o.max_batch = std::max(so.max_batch, 32);  // the cost-model profile runs 32 decodes at once
  o.max_tokens = std::max({so.max_tokens, 256, o.max_batch});
  o.max_len = so.max_len;
  o.block_size = so.block_size;
  o.gpu_memory_fraction = so.gpu_memory_fraction;
  o.ec_path = so.ec_path;
  o.autotune = so.autotune;
  gpu_ = GpuModel::create(w, o);
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, o.device);
  name_ = std::string("cuda: ") + p.name;
}

std::string GpuStepModel::device() const { return name_; }

std::vector<std::pair<std::string, int64_t>> GpuStepModel::memory_by_use() const {
  const GpuMemory& m = gpu_->memory();
  return {{"weights", m.weights}, {"ec", m.ec}, {"kv_cache", m.kv_cache}, {"activations", m.activations}};
}

namespace {
// The engine's chunks as the GPU model's (the engine's block tables, its pool's ids).
std::vector<GpuChunk> gpu_chunks(std::span<const SeqChunk> chunks) {
  std::vector<GpuChunk> gc;
  gc.reserve(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    const SeqChunk& c = chunks[i];
    const auto* ps = dynamic_cast<const PagedSequence*>(c.kv);
    SPEAR_CHECK(ps, "GPU backend: a sequence's KV is not in the engine's paged pool");
    GpuChunk g;
    g.slot = static_cast<int>(i);
    g.tokens = c.tokens;
    g.n_tokens = static_cast<int>(c.n_tokens);
    g.start_pos = static_cast<int>(c.start_pos);
    g.all_logits = c.all_logits;
    g.blocks = ps->blocks().data();
    g.n_blocks = static_cast<int>(ps->blocks().size());
    gc.push_back(g);
  }
  return gc;
}
}  // namespace

void GpuStepModel::forward(std::span<const SeqChunk> chunks, float* logits) {
  const std::vector<GpuChunk> gc = gpu_chunks(chunks);
  gpu_->forward(gc);
  gpu_->synchronize();  // the forward done: what follows is the logits' copy alone
  const auto t0 = std::chrono::steady_clock::now();
  gpu_->logits_to_host(logits);
  times_.copy_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  times_.device_s = gpu_->last_forward_device_seconds();
}

void GpuStepModel::forward_sample(std::span<const SeqChunk> chunks, std::span<const DrawSpec> draws, int32_t* ids) {
  SPEAR_CHECK(draws.size() == chunks.size(), "GPU backend: forward_sample takes one draw per chunk");
  std::vector<RowSampling> rows(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    SPEAR_CHECK(!chunks[i].all_logits, "GPU backend: forward_sample takes chunks that want their last row only");
    const SamplingParams& p = draws[i].params;
    SPEAR_CHECK(!p.has_penalties(), "GPU backend: penalties are applied on the host (logits path)");
    rows[i].temperature = p.temperature;
    rows[i].top_p = p.top_p;
    rows[i].min_p = p.min_p;
    rows[i].top_k = static_cast<int32_t>(std::min<int64_t>(p.top_k, INT32_MAX));
    rows[i].seed = p.seed;
    rows[i].draw = draws[i].draw;
  }
  const std::vector<GpuChunk> gc = gpu_chunks(chunks);
  gpu_->forward(gc);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> got = gpu_->sample_last(rows);  // one row per chunk; waits for the forward
  times_.device_s = gpu_->last_forward_device_seconds();
  times_.copy_s = std::max(0.0, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() -
                                    times_.device_s);
  SPEAR_CHECK(got.size() == chunks.size(), "GPU backend: sampled rows do not match the chunks");
  std::copy(got.begin(), got.end(), ids);
}

void GpuStepModel::profile_ec(const EcInventory& inv, CostModel& cm) {
  if (inv.modules.empty()) {
    cm.set_ec_cost(0, 0, 0);
    return;
  }
  // Scratch sequences on the GPU's own slots (the engine's pool is not in use yet).
  const int ctx = std::min(128, gpu_->options().max_len - 1);
  auto time_decode = [&](int B) {
    for (int b = 0; b < B; ++b) gpu_->fake_context(b, ctx);
    std::vector<double> t;
    for (int i = 0; i < 8; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      gpu_->decode_step_bench(B, 1);
      gpu_->synchronize();
      if (i >= 2) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    for (int b = 0; b < B; ++b) gpu_->reset(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  const double on1 = time_decode(1), on32 = time_decode(32);
  gpu_->set_ec_enabled(false);
  const double off1 = time_decode(1), off32 = time_decode(32);
  gpu_->set_ec_enabled(true);
  const double d1 = std::max(0.0, on1 - off1), d32 = std::max(0.0, on32 - off32);
  const double per_token = std::max(0.0, (d32 - d1) / 31.0);
  const double per_call = std::max(0.0, d1 - per_token);
  const int64_t n = static_cast<int64_t>(inv.modules.size());
  cm.set_ec_cost(n, per_call / n, per_token);
}

}  // namespace spear::cuda
