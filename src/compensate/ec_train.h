#pragma once
// Training of Error Compensators with Adam and the hand-written gradients of
// network.h, against the end-to-end or the block-local objective.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "compensate/calib_data.h"
#include "compensate/forward_backend.h"
#include "compensate/grad_backend.h"
#include "compensate/network.h"
#include "compensate/teacher_targets.h"

namespace spear {

// Which gate the trained ECs get (the artifact always stores G as r×r):
//   Full  γ = 1 + tanh(G z + c), G any r×r matrix
//   Diag  γ_j = 1 + tanh(g_j z_j + c_j): G restricted to its diagonal (off-diagonal
//         gradients are dropped, so G stays diagonal from its zero start). The GPU's
//         fused kernel runs this as 2·sigmoid(2 g_j z_j + 2 c_j), the same function.
//   None  γ ≡ 1 (no G, c stored)
enum class GateKind { Full, Diag, None };
// The spelling on the command line and in the calibration report ("full", "diag", "none").
std::string_view gate_kind_name(GateKind g);
// The inverse of gate_kind_name; throws spear::Error naming the accepted values.
GateKind parse_gate_kind(std::string_view s);
// Zeroes the gate gradients that `gate` does not train (Diag: G's off-diagonal entries).
void restrict_gate_grads(std::vector<ECGrad>& grads, GateKind gate);

// Adam over the parameters of a set of ECs (bias-corrected, no weight decay).
class ECAdam {
 public:
  // lr_rel: step of A and B relative to their RMS at construction; lr_gate: absolute
  // step of G and c (which start at 0).
  ECAdam(const std::vector<std::optional<ECParams>>& ecs, double lr_rel, double lr_gate);
  // One step with gradients grads[i] (same indexing as ecs); lr_scale multiplies every
  // step size (schedule).
  void step(std::vector<std::optional<ECParams>>& ecs, const std::vector<ECGrad>& grads,
            double lr_scale);

 private:
  struct Slot {
    std::vector<float> m, v;
    double lr = 0;
  };
  std::vector<std::vector<Slot>> slots_;  // per EC: A, B, G, c
  int64_t t_ = 0;
};

struct TrainOptions {
  int64_t epochs = 3;
  int64_t batch = 4;
  double lr = 0.02, lr_gate = 0.02;
  GateKind gate = GateKind::Full;  // Diag: only G's diagonal trains
  bool verbose = true;
};

// Mean KL(P_fp ‖ P_q) per token over the first `windows` windows, with the ECs in place
// (against TopK targets: the top-K KL, a lower bound).
// On any forward backend (CPU or GPU); the Runner overload is CpuForward's.
double mean_kl(const ForwardBackend& fwd, const CalibData& data, const TeacherTargets& targets,
               const std::vector<std::optional<ECParams>>& ecs, int64_t windows);
double mean_kl(const Runner& run, const CalibData& data, const TeacherTargets& targets,
               const std::vector<std::optional<ECParams>>& ecs, int64_t windows);

// Mean next-token NLL (nats) of the real text over windows [w0, w1), T − 1 predictions
// per window, quantized path with the ECs in place. On any forward backend; the Runner
// overload is CpuForward's.
double mean_nll(const ForwardBackend& fwd, const CalibData& data,
                const std::vector<std::optional<ECParams>>& ecs, int64_t w0, int64_t w1);
double mean_nll(const Runner& run, const CalibData& data,
                const std::vector<std::optional<ECParams>>& ecs, int64_t w0, int64_t w1);

// End to end: minimizes the mean KL over all positions of all windows. Returns a JSON
// log (loss per epoch, seconds, device). The forward and backward of each window run on
// `grad`'s backend (CPU Runner or GPU); Adam runs on the host either way.
nlohmann::json train_e2e(GradBackend& grad, const CalibData& data, const TeacherTargets& targets,
                         std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt);
// The same on the CPU Runner (CpuGrad).
nlohmann::json train_e2e(const Runner& run, const CalibData& data, const TeacherTargets& targets,
                         std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt);
// Block-local: layer after layer, minimizes ‖h_q − h_fp‖² / ‖h_fp‖² of the layer's output
// given the quantized path's input (ECs of earlier layers already trained).
nlohmann::json train_block(const Runner& run, const CalibData& data,
                           std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt);

}  // namespace spear
