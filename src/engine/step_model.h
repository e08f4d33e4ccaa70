#pragma once
// What the serving engine runs each step: one batched forward over chunks of sequences
// whose K/V live in the engine's paged pool (engine/paged_kv.h). The engine owns the
// block bookkeeping (admission, preemption, freeing); a backend stores K/V where it
// computes: the CPU model in the pool's own float storage, the GPU engine in device
// memory addressed by the same block ids. So one scheduler and one HTTP server serve
// either backend (`spear serve --device cpu|cuda`).
#include <cstdint>
#include <span>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "engine/cost_model.h"
#include "engine/sampler.h"
#include "model/llama.h"

namespace spear {

class StepModel {
 public:
  virtual ~StepModel() = default;
  virtual const ModelConfig& config() const = 0;
  int64_t vocab_size() const { return config().vocab_size; }
  // Logits rows (host memory): per chunk n_tokens rows (all_logits) or one row.
  // Every chunk's kv is a PagedSequence of the engine's pool.
  virtual void forward(std::span<const SeqChunk> chunks, float* logits) = 0;
  // Next tokens without logits on the host: the forward, then per chunk a token drawn from
  // its last row as Sampler::sample_at(row, V, draws[i].draw) would (greedy, temperature,
  // min-p, top-k, top-p; no penalties) into ids. A backend that can do this where the
  // logits are (the GPU) says so; the engine then uses it for steps whose sequences all
  // want their last row only, without logprobs or penalties.
  struct DrawSpec {
    SamplingParams params;  // penalties must be off
    uint64_t draw = 0;      // the sequence's output length (which draw of its seed)
  };
  virtual bool has_forward_sample() const { return false; }
  virtual void forward_sample(std::span<const SeqChunk> chunks, std::span<const DrawSpec> draws, int32_t* ids) {
    (void)chunks;
    (void)draws;
    (void)ids;
    throw Error("this backend has no forward_sample");
  }
  // The model's Error Compensators (what the cost model charges for).
  virtual EcInventory ec_inventory() const = 0;
  // true: the BlockPool must hold K/V floats (the CPU engine reads them from it).
  virtual bool host_kv() const = 0;
  // Blocks (of the engine's block size) the backend holds K/V for; 0 = the engine decides.
  virtual int64_t kv_blocks() const { return 0; }
  // Measures the ECs' share of a step on this backend into cm (set_ec_cost).
  virtual void profile_ec(const EcInventory& inv, CostModel& cm) = 0;
  virtual std::string device() const = 0;  // "cpu", "cuda: NVIDIA H200"
  // Bytes the backend holds, by use ("weights", "ec", "kv_cache", "activations"); a
  // backend with host_kv() leaves the KV cache to the engine's pool.
  virtual std::vector<std::pair<std::string, int64_t>> memory_by_use() const = 0;
  // Where the last forward's time went on a device backend: seconds the device ran it, and
  // seconds copying its logits to the host (-1: not measured, e.g. on the CPU).
  struct ForwardTimes {
    double device_s = -1, copy_s = -1;
  };
  virtual ForwardTimes last_forward_times() const { return {}; }
};

// The CPU engine (LlamaModel) as a StepModel.
class CpuStepModel final : public StepModel {
 public:
  explicit CpuStepModel(const LlamaModel& m) : m_(m) {}  // m must outlive this
  explicit CpuStepModel(std::unique_ptr<LlamaModel> m) : owned_(std::move(m)), m_(*owned_) {}
  const ModelConfig& config() const override { return m_.config(); }
  void forward(std::span<const SeqChunk> chunks, float* logits) override { m_.forward(chunks, logits); }
  EcInventory ec_inventory() const override { return ::spear::ec_inventory(m_); }
  bool host_kv() const override { return true; }
  void profile_ec(const EcInventory& inv, CostModel& cm) override;
  std::string device() const override { return "cpu"; }
  std::vector<std::pair<std::string, int64_t>> memory_by_use() const override {
    return {{"weights", m_.weight_bytes()}};
  }

 private:
  std::unique_ptr<LlamaModel> owned_;
  const LlamaModel& m_;
};

}  // namespace spear
