#pragma once
// Predicts how long one engine step takes, so that the scheduler can size prefill
// chunks to keep running requests within their time-per-output-token SLO.
//
// A step runs T token rows of S sequence chunks; attention reads A (query, key)
// pairs in all (a decode row at position p reads p+1 keys; a prefill chunk of n rows
// from position s reads n*s + n(n+1)/2). The dense part of a step is modelled as
//     t_dense = c0 + c1*T + c2*S + c3*(A/1024)          (seconds, c >= 0)
// measured per backend: a short profile of the loaded model at startup, then refit
// online from every measured step (least squares over a sliding window, anchored to
// the profile so that a burst of noise cannot run it away).
//
// Error Compensators add work the dense terms do not see coming: each EC module is
// a low-rank pair (r x in, out x r) run beside its base layer, costing a fixed
// per-call overhead plus per-row work that depends on its placement and rank. The
// EC term is measured separately with the same low-rank shapes on this backend:
//     t_ec = n_ec_calls * e0 + T * e1
// An EC-aware model predicts t_dense + t_ec; an EC-blind one (the baseline in the
// benchmark) predicts t_dense alone from the profile and never refits, which is
// what a scheduler calibrated on the base artifact would do.
#include <array>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace spear {

class LlamaModel;
struct LlamaWeights;
class StepModel;

struct StepShape {
  int64_t tokens = 0;  // T: rows through the linear layers
  int64_t seqs = 0;    // S: chunks (sequences) in the step
  int64_t attn = 0;    // A: (query, key) pairs of attention
};

// Attention pairs of a chunk of n rows starting at position s.
inline int64_t attn_pairs(int64_t start, int64_t n) { return n * start + n * (n + 1) / 2; }

// EC modules of a model: every module with an Error Compensator, its shape and rank
// (a typed question to the model, never a parse of its display strings).
struct EcModule {
  int64_t in = 0, out = 0, rank = 0;
};
struct EcInventory {
  std::vector<EcModule> modules;
  int64_t total_rank_work() const;  // sum of r*(in+out): multiply-adds per token
};
EcInventory ec_inventory(const LlamaWeights& w);   // from the model description
EcInventory ec_inventory(const LlamaModel& model);  // from the CPU engine's modules

class CostModel {
 public:
  static constexpr int kFeatures = 4;
  using Vec = std::array<double, kFeatures>;

  CostModel();
  // Replaces the coefficients and the prior (profile) samples.
  void set_profile(const std::vector<std::pair<StepShape, double>>& samples);
  void set_ec_cost(int64_t n_calls, double per_call_s, double per_token_s);
  void set_ec_aware(bool on) { ec_aware_ = on; }
  void set_refit(bool on) { refit_ = on; }
  bool ec_aware() const { return ec_aware_; }

  double predict(const StepShape& s) const;  // seconds
  double predict_ec(const StepShape& s) const;  // the EC part alone
  // Records a measured step; refits when enabled.
  void observe(const StepShape& s, double seconds);

  const Vec& coefficients() const { return coef_; }
  double ec_per_call() const { return ec_call_s_; }
  double ec_per_token() const { return ec_token_s_; }
  int64_t ec_calls() const { return ec_calls_; }
  int64_t observations() const { return n_obs_; }
  double mean_abs_rel_error() const;  // over the recent window, of predictions made before refit
  std::string describe() const;       // one line for logs

 private:
  static Vec features(const StepShape& s);
  void refit();
  Vec coef_{};
  std::vector<std::pair<Vec, double>> prior_;  // profile samples (features, dense seconds)
  std::deque<std::pair<Vec, double>> window_;  // recent online samples
  std::deque<double> rel_err_;
  double ec_call_s_ = 0, ec_token_s_ = 0;
  int64_t ec_calls_ = 0;
  bool ec_aware_ = true, refit_ = true;
  int64_t n_obs_ = 0;
};

// Fits `model` to the loaded model on this backend: runs a small grid of decode
// batches and prefill chunks on scratch KV memory (median of a few repetitions
// each) and measures the EC modules' low-rank work. Takes well under a second for
// small models; max_len bounds the positions used.
void profile_cost_model(StepModel& model, int64_t max_len, CostModel& cm, int64_t block_size = 16);
// The ECs' cost measured on the CPU: each EC shape's two low-rank products timed at
// M = 1 and M = 64 (what CpuStepModel::profile_ec does).
void profile_ec_cpu(const EcInventory& inv, CostModel& cm);

}  // namespace spear
