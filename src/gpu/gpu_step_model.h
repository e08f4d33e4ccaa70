#pragma once
// The GPU engine as the serving engine's backend (engine/step_model.h): the engine's
// paged pool hands out block ids, the GPU holds the K/V of those blocks, and each step
// runs GpuModel::forward with the sequences' block tables; logits come back to the host
// for sampling. `spear serve --device cuda`.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpu/gpu_model.h"
#include "engine/step_model.h"
#include "model/weights.h"

namespace spear::cuda {

struct GpuServeOptions {
  int max_batch = 32;             // running sequences at most (>= the scheduler's)
  int max_tokens = 2048;          // token rows per step at most (>= the scheduler's budget)
  int max_len = 2048;             // the engine's max_model_len
  int block_size = 16;            // the engine's block size
  double gpu_memory_fraction = 0.9;
  EcPath ec_path = EcPath::kDispatch;
  bool autotune = false;          // GpuOptions::autotune (the table is saved for later runs)
};

class GpuStepModel final : public StepModel {
 public:
  // The weights are only read here (uploaded); they may be dropped afterwards.
  GpuStepModel(const LlamaWeights& w, const GpuServeOptions& opt);
  const ModelConfig& config() const override { return gpu_->config(); }
  void forward(std::span<const SeqChunk> chunks, float* logits) override;
  ForwardTimes last_forward_times() const override { return times_; }
  // Tokens drawn on the GPU (cuda/sampling.h), only the ids cross to the host.
  bool has_forward_sample() const override { return true; }
  void forward_sample(std::span<const SeqChunk> chunks, std::span<const DrawSpec> draws, int32_t* ids) override;
  EcInventory ec_inventory() const override { return inv_; }
  bool host_kv() const override { return false; }
  int64_t kv_blocks() const override { return gpu_->kv_blocks_total(); }
  // The ECs' share measured on the GPU: decode steps of 1 and 32 sequences and a 64-token
  // prefill, timed with ECs on and off.
  void profile_ec(const EcInventory& inv, CostModel& cm) override;
  std::string device() const override;
  std::vector<std::pair<std::string, int64_t>> memory_by_use() const override;
  const GpuMemory& memory() const { return gpu_->memory(); }

 private:
  EcInventory inv_;
  std::unique_ptr<GpuModel> gpu_;
  ForwardTimes times_;
  std::string name_;
};

}  // namespace spear::cuda
