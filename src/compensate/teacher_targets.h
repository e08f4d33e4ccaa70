#pragma once
// Teacher targets: the full-precision model's next-token distributions on the calibration
// windows, which the end-to-end objective, the restoration gains and the reported KLs
// compare the quantized model against. Three ways to hold them:
//   Dense      every log-probability of every position, windows × ctx × vocab float32
//              (4 GiB for mixlm-19m at 256 × 512; 63 GiB for a 128K vocabulary)
//   TopK       per position the K most probable ids, their log-probabilities and the log of
//              the mass outside them: windows × ctx × (8K + 4) bytes, independent of the
//              vocabulary; the KL becomes the top-K KL of compensate/target_kl.h (a lower
//              bound of the KL, exact over the kept ids)
//   Recompute  nothing stored: the full-precision forward is run again for a window each
//              time its targets are needed (exactly Dense's values; costs one FP forward
//              per window per use)
#include <cstdint>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "compensate/calib_data.h"
#include "compensate/target_kl.h"

namespace spear {

class Runner;

enum class TargetMode { Dense, TopK, Recompute };
// The spelling on the command line and in the calibration report ("dense", "topk", "recompute").
std::string_view target_mode_name(TargetMode m);
// The inverse of target_mode_name; throws spear::Error naming the accepted values.
TargetMode parse_target_mode(std::string_view s);

// The default is Recompute: bit for bit Dense's results in host memory independent of
// windows × vocabulary, for about one FP forward more per window per epoch (+60% e2e training
// time on mixlm-19m; Dense is the fastest where it fits, TopK as fast but approximate:
// docs/BENCHMARKS.md, issue 12).
struct TargetOptions {
  TargetMode mode = TargetMode::Recompute;
  int64_t top_k = 64;        // TopK: ids kept per position (at most the vocabulary)
  double max_gib = 16.0;     // stored targets above this are refused
};

// Bytes the targets of `positions` positions hold in host memory in `mode` (0 for
// Recompute, whose only buffer is one window's (ctx, vocab) float32 while it is used).
int64_t target_bytes(TargetMode mode, int64_t top_k, int64_t positions, int64_t vocab);

// One window's targets, (T, V) rows: a view of stored targets, or (Recompute) its own
// recomputed log-probabilities.
class TargetWindow {
 public:
  TargetWindow() = default;
  TargetWindow(TargetWindow&&) = default;  // own_'s buffer moves with it
  TargetWindow(const TargetWindow&) = delete;
  // Σ over the window's T rows of KL(P_fp ‖ softmax(logits)) (TopK: the top-K KL); when
  // dlogits (T, V) is given (it may be logits) it receives scale · ∂KL/∂logits.
  double kl(const float* logits, float scale, float* dlogits) const;

 private:
  friend class TeacherTargets;
  int64_t T_ = 0, V_ = 0, K_ = 0;
  const float* dense_ = nullptr;                  // (T, V) log-probs (Dense, Recompute)
  const int32_t* ids_ = nullptr;                  // (T, K) (TopK)
  const float* logp_ = nullptr;                   // (T, K) (TopK)
  const float* tail_ = nullptr;                   // (T) (TopK)
  std::vector<float> own_;                        // (T, V) Recompute's storage
};

class TeacherTargets {
 public:
  // Runs the full-precision forward over every window of `data` (not for Recompute unless
  // `entropy` is asked for) and keeps what the mode stores; throws spear::Error when that
  // exceeds opt.max_gib, naming the footprint and the alternatives. `run` and `data` must
  // outlive the targets. entropy (windows*T), when given, receives the entropy (nats) of the
  // full distribution at every position, whatever the mode.
  TeacherTargets(const Runner& run, const CalibData& data, const TargetOptions& opt,
                 std::vector<double>* entropy = nullptr);
  TeacherTargets(const TeacherTargets&) = delete;
  TeacherTargets& operator=(const TeacherTargets&) = delete;

  TargetMode mode() const { return opt_.mode; }
  int64_t top_k() const { return K_; }  // 0 unless TopK; at most the vocabulary
  int64_t windows() const { return windows_; }
  int64_t stored_bytes() const;
  // Window w's targets (Recompute: runs the FP forward of the window now).
  TargetWindow window(int64_t w) const;
  // mode, top_k, stored bytes, seconds to build, and for TopK the mean tail mass.
  nlohmann::json describe() const;

 private:
  const Runner& run_;
  const CalibData& data_;
  TargetOptions opt_;
  int64_t windows_ = 0, T_ = 0, V_ = 0, K_ = 0;
  std::vector<float> dense_;      // Dense: (windows, T, V) log-probs
  std::vector<int32_t> ids_;      // TopK: (windows, T, K) ids, most probable first
  std::vector<float> logp_;       // TopK: (windows, T, K) their log-probs
  std::vector<float> tail_logp_;  // TopK: (windows, T) log of the mass outside them
  double mean_tail_mass_ = 0, max_tail_mass_ = 0, seconds_ = 0;
};

}  // namespace spear
