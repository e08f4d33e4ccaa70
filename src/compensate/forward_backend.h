#pragma once
// The forward-only operations that the calibration's measurements are written against
// (mean_kl, restoration_gains, the teacher targets they compare to), so that the same
// algorithm runs on the CPU (CpuForward, over Runner) or on a GPU (calib_gpu/GpuRunner,
// issue 12) without being written twice. Training's gradient (the backward pass) is a
// GradBackend (compensate/grad_backend.h) that a backend makes with gradients().
//
// Activations live where the backend computes (host memory for the CPU, device memory
// for the GPU) behind the opaque Acts; the algorithms only embed, copy rows, run layers
// and ask for the KL of a window's final hidden states against its teacher targets.
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "compensate/calib_data.h"
#include "compensate/grad_backend.h"
#include "compensate/network.h"
#include "compensate/static_control.h"
#include "compensate/teacher_targets.h"

namespace spear {

class ForwardBackend {
 public:
  virtual ~ForwardBackend() = default;

  // Activations (rows, dim) held where the backend computes.
  class Acts {
   public:
    virtual ~Acts() = default;
    int64_t rows = 0;
  };
  // One window's teacher targets, held where the backend needs them.
  class WindowTargets {
   public:
    virtual ~WindowTargets() = default;
  };

  virtual const Network& net() const = 0;
  virtual std::string_view device() const = 0;  // "cpu" | "cuda"
  // x (rows, dim) = embeddings of tokens (rows).
  virtual std::unique_ptr<Acts> embed(const int32_t* tokens, int64_t rows) const = 0;
  // A new Acts holding rows [row0, row0 + rows) of x.
  virtual std::unique_ptr<Acts> copy_rows(const Acts& x, int64_t row0, int64_t rows) const = 0;
  // One decoder layer in place on rows [row0, row0 + B*T) of x (B windows of T tokens).
  // lv's weight pointers are the Network's own (fp or q of `layer`) or any host matrix.
  virtual void layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                             int64_t T) const = 0;
  // Window w's targets (Recompute: the full-precision forward of the window runs now, on
  // this backend).
  virtual std::unique_ptr<WindowTargets> window_targets(const CalibData& data,
                                                        const TeacherTargets& targets,
                                                        int64_t w) const = 0;
  // Σ over the T rows [row0, row0 + T) of x (final hidden states, before the final norm) of
  // KL(P_fp ‖ softmax(head(norm(x)))) against t (TopK targets: the top-K KL).
  virtual double window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const = 0;
  // −Σ_{t < T−1} log softmax(head(norm(x_t)))[tokens[t+1]] over the T rows [row0, row0 + T)
  // of x (final hidden states): the window's next-token NLL; tokens (T) host.
  virtual double window_nll(const Acts& x, int64_t row0, int64_t T, const int32_t* tokens) const = 0;

  // The static control's statistics (calibrate): second moments of one layer's site inputs,
  // held where the backend computes. Bit s of `sites` is Site s.
  class Moments {
   public:
    virtual ~Moments() = default;
    unsigned sites = 0;
    int64_t tokens = 0;
  };
  // Runs the full-precision layer `layer` on xf and the quantized one (with ecs; nullptr:
  // none) on xq, in place, window by window (nw windows of T rows from row 0), and returns
  // the sums of x_q x_qᵀ, x_fp x_qᵀ, x_fp x_fpᵀ over all rows at each site in `sites`.
  virtual std::unique_ptr<Moments> layer_moments(int64_t layer, Acts& xf, Acts& xq, int64_t nw, int64_t T,
                                                 const std::vector<std::optional<ECParams>>* ecs,
                                                 unsigned sites) const = 0;
  // The static fits (fit_static, whitening with `damp` shared by the site) of the modules
  // `mods` of `layer`, all at site `s` of `mo`, each up to its max rank; the Network's fp
  // and q weights. In the order of mods.
  virtual std::vector<StaticFit> fit_site(const Moments& mo, int64_t layer, Site s,
                                          const std::vector<std::pair<Module, int64_t>>& mods, double damp,
                                          StaticMode mode) const = 0;

  // The e2e objective's gradient on this backend (train_e2e); it keeps a reference to the
  // backend, which must outlive it.
  virtual std::unique_ptr<GradBackend> gradients() const = 0;
};

// Makes the backend of a calibration run from its Network (which must outlive it).
using ForwardFactory = std::function<std::unique_ptr<ForwardBackend>(const Network&)>;

// The CPU backend: Runner's forward, the values of the Runner-based code bit for bit.
class CpuForward final : public ForwardBackend {
 public:
  explicit CpuForward(const Runner& run) : run_(run) {}
  const Network& net() const override { return run_.net(); }
  std::string_view device() const override { return "cpu"; }
  std::unique_ptr<Acts> embed(const int32_t* tokens, int64_t rows) const override;
  std::unique_ptr<Acts> copy_rows(const Acts& x, int64_t row0, int64_t rows) const override;
  void layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                     int64_t T) const override;
  std::unique_ptr<WindowTargets> window_targets(const CalibData& data, const TeacherTargets& targets,
                                                int64_t w) const override;
  double window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const override;
  double window_nll(const Acts& x, int64_t row0, int64_t T, const int32_t* tokens) const override;
  std::unique_ptr<Moments> layer_moments(int64_t layer, Acts& xf, Acts& xq, int64_t nw, int64_t T,
                                         const std::vector<std::optional<ECParams>>* ecs,
                                         unsigned sites) const override;
  std::vector<StaticFit> fit_site(const Moments& mo, int64_t layer, Site s,
                                  const std::vector<std::pair<Module, int64_t>>& mods, double damp,
                                  StaticMode mode) const override;
  std::unique_ptr<GradBackend> gradients() const override { return std::make_unique<CpuGrad>(run_); }

 private:
  const Runner& run_;
};

}  // namespace spear
