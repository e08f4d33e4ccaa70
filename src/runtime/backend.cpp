#include "runtime/backend.h"

#include <algorithm>

#include "core/error.h"
#include "quant/cpu_model.h"
#ifdef SPEAR_WITH_CUDA
#include "gpu/gpu_model.h"
#include "gpu/gpu_step_model.h"
#endif

namespace spear {

namespace {

class CpuRunner final : public SequenceRunner {
 public:
  explicit CpuRunner(const LlamaWeights& w) : m_(build_cpu_model(w)) {}
  const ModelConfig& config() const override { return m_->config(); }
  PplResult perplexity(const std::vector<int32_t>& ids, const PplOptions& opt) override {
    return ::spear::perplexity(*m_, ids, opt);
  }
  GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt) override {
    return ::spear::generate(*m_, prompt, opt);
  }

 private:
  std::unique_ptr<LlamaModel> m_;
};

// Throws the one message every command gives when the device is missing.
void require(Device d) {
  std::string why;
  SPEAR_CHECK(device_available(d, &why),
              "--device " + std::string(device_name(d)) + ": no usable device (" + why + ")");
}

#ifdef SPEAR_WITH_CUDA
// fp16 activations, fp32 residual stream; perplexity's NLL is reduced on the device per
// window, so no (ctx, vocab) logits cross to the host.
class GpuRunner final : public SequenceRunner {
 public:
  GpuRunner(const LlamaWeights& w, const SequenceOptions& so) : cfg_(w.config) {
    cuda::GpuOptions go;
    go.max_batch = 1;
    const int64_t len = so.max_len > 0 ? std::min(so.max_len, cfg_.max_position_embeddings)
                                       : cfg_.max_position_embeddings;
    go.max_len = static_cast<int>(len);
    go.max_tokens = static_cast<int>(std::max<int64_t>(so.max_tokens > 0 ? std::min(so.max_tokens, len) : len, 1));
    go.graphs = so.graphs;
    go.autotune = so.autotune;
    gm_ = cuda::GpuModel::create(w, go);
  }
  const ModelConfig& config() const override { return cfg_; }
  PplResult perplexity(const std::vector<int32_t>& ids, const PplOptions& opt) override {
    std::vector<int32_t> targets;
    WindowScorer score = [&](const int32_t* win, int64_t n) {
      gm_->reset(0);
      cuda::GpuChunk c{0, win, static_cast<int>(n), 0, true};
      gm_->forward(std::span<const cuda::GpuChunk>(&c, 1));
      targets.assign(win + 1, win + n);
      targets.push_back(-1);  // the last position has no next token in the window
      return gm_->nll_last(targets);
    };
    return perplexity_with(score, gm_->options().max_len, ids, opt);
  }
  GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt) override {
    gm_->reset(0);
    StepFn step = [&](const int32_t* t, int64_t n, int64_t start, float* logits) {
      cuda::GpuChunk c{0, t, static_cast<int>(n), static_cast<int>(start), false};
      gm_->forward(std::span<const cuda::GpuChunk>(&c, 1));
      gm_->logits_to_host(logits);
    };
    return generate_with(cfg_, step, prompt, opt);
  }
  std::string memory_report() const override { return gm_->memory().str(); }

 private:
  ModelConfig cfg_;
  std::unique_ptr<cuda::GpuModel> gm_;
};
#endif

}  // namespace

std::unique_ptr<SequenceRunner> make_sequence_runner(const LlamaWeights& w, Device d,
                                                     const SequenceOptions& opt) {
  if (d == Device::Cpu) return std::make_unique<CpuRunner>(w);
  require(d);
#ifdef SPEAR_WITH_CUDA
  return std::make_unique<GpuRunner>(w, opt);
#else
  return nullptr;  // unreachable: require() threw
#endif
}

std::unique_ptr<StepModel> make_step_model(const LlamaWeights& w, Device d, const ServeDeviceOptions& opt) {
  if (d == Device::Cpu) return std::make_unique<CpuStepModel>(build_cpu_model(w));
  require(d);
#ifdef SPEAR_WITH_CUDA
  cuda::GpuServeOptions g;
  g.max_batch = opt.max_batch;
  g.max_tokens = opt.max_tokens;
  g.max_len = opt.max_len;
  g.block_size = opt.block_size;
  g.gpu_memory_fraction = opt.gpu_memory_fraction;
  g.autotune = opt.autotune;
  return std::make_unique<cuda::GpuStepModel>(w, g);
#else
  return nullptr;
#endif
}

}  // namespace spear
