// Teacher targets (compensate/teacher_targets.h, target_kl.h): the top-K KL and its
// gradient against a float64 reference built from the dense distributions (finite
// differences for the gradient), its bounds against the full KL, the memory check, and on
// the shipped tiny model: `recompute` gives exactly what `dense` gives, `topk` with K = V
// what `dense` gives up to rounding, and the mode reaches the .spear metadata via the CLI.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include <omp.h>

#include "compensate/calibrate.h"
#include "compensate/diagnostic.h"
#include "compensate/network.h"
#include "compensate/quantize_model.h"
#include "compensate/teacher_targets.h"
#include "core/error.h"
#include "model/spear_artifact.h"
#include "test_paths.h"

namespace spear {
namespace {

// One row's teacher distribution as the top-K targets hold it, built in float64 from the
// dense log-probabilities (ties to the lower id, as TeacherTargets does).
struct TopKRow {
  std::vector<int32_t> ids;
  std::vector<float> logp;
  float tail_logp = 0;
};

TopKRow top_k_of(const std::vector<float>& lp, int64_t K) {
  const int64_t V = static_cast<int64_t>(lp.size());
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return lp[a] > lp[b]; });
  TopKRow r;
  double tail = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (j < K) {
      r.ids.push_back(order[j]);
      r.logp.push_back(lp[order[j]]);
    } else {
      tail += std::exp(static_cast<double>(lp[order[j]]));
    }
  }
  r.tail_logp = tail > 0 ? static_cast<float>(std::log(tail)) : -INFINITY;
  return r;
}

// float64 softmax of z.
std::vector<double> softmax64(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  std::vector<double> q(z.size());
  double s = 0;
  for (size_t i = 0; i < z.size(); ++i) s += (q[i] = std::exp(z[i] - m));
  for (double& v : q) v /= s;
  return q;
}

// The full KL(p ‖ softmax(z)) in float64, p from the float log-probs.
double kl_full64(const std::vector<float>& lp, const std::vector<double>& z) {
  const std::vector<double> q = softmax64(z);
  double kl = 0;
  for (size_t i = 0; i < lp.size(); ++i) {
    const double p = std::exp(static_cast<double>(lp[i]));
    if (p > 0) kl += p * (lp[i] - std::log(q[i]));
  }
  return kl;
}

// The top-K KL by its definition: the KL of the two distributions coarsened to {each kept
// id} ∪ {the rest}, float64, written independently of kl_topk_rows.
double kl_topk64(const TopKRow& r, const std::vector<double>& z) {
  const std::vector<double> q = softmax64(z);
  std::vector<double> p_bucket, q_bucket;
  std::vector<bool> kept(z.size(), false);
  for (size_t k = 0; k < r.ids.size(); ++k) {
    kept[r.ids[k]] = true;
    p_bucket.push_back(std::exp(static_cast<double>(r.logp[k])));
    q_bucket.push_back(q[r.ids[k]]);
  }
  double q_rest = 0;
  for (size_t j = 0; j < z.size(); ++j)
    if (!kept[j]) q_rest += q[j];
  p_bucket.push_back(std::exp(static_cast<double>(r.tail_logp)));
  q_bucket.push_back(q_rest);
  double kl = 0;
  for (size_t b = 0; b < p_bucket.size(); ++b)
    if (p_bucket[b] > 0) kl += p_bucket[b] * std::log(p_bucket[b] / q_bucket[b]);
  return kl;
}

// Random teacher log-probs (rows, V) and student logits, spread enough that the tail of a
// small K holds a real share of the mass.
void random_rows(int64_t rows, int64_t V, uint64_t seed, std::vector<float>& teacher_lp,
                 std::vector<float>& student) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.5f);
  std::vector<float> tz(rows * V);
  for (float& v : tz) v = d(g);
  student.resize(rows * V);
  for (int64_t i = 0; i < rows * V; ++i) student[i] = 0.7f * tz[i] + d(g);
  teacher_lp.resize(rows * V);
  log_softmax_rows(tz.data(), rows, V, teacher_lp.data());
}

TEST(TeacherTargets, TopKKlMatchesFloat64ReferenceAndBoundsTheFullKl) {
  const int64_t rows = 6, V = 53;
  std::vector<float> lp, z;
  random_rows(rows, V, 1, lp, z);
  for (int64_t K : {int64_t{1}, int64_t{5}, int64_t{20}, V}) {
    std::vector<int32_t> ids;
    std::vector<float> klp, tail;
    double ref = 0, full = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> row(lp.begin() + r * V, lp.begin() + (r + 1) * V);
      const std::vector<double> zr(z.begin() + r * V, z.begin() + (r + 1) * V);
      const TopKRow t = top_k_of(row, K);
      ids.insert(ids.end(), t.ids.begin(), t.ids.end());
      klp.insert(klp.end(), t.logp.begin(), t.logp.end());
      tail.push_back(t.tail_logp);
      const double kr = kl_topk64(t, zr), kf = kl_full64(row, zr);
      ref += kr;
      full += kf;
      // 0 ≤ KL − KL_K ≤ p_T · log(p_K · q_T / (p_T · min_tail q)) (target_kl.h).
      EXPECT_LE(kr, kf + 1e-12) << "K " << K;
      if (K < V) {
        const std::vector<double> q = softmax64(zr);
        std::vector<bool> kept(V, false);
        for (int32_t i : t.ids) kept[i] = true;
        double q_tail = 0, q_min = 1;
        for (int64_t j = 0; j < V; ++j)
          if (!kept[j]) {
            q_tail += q[j];
            q_min = std::min(q_min, q[j]);
          }
        const double p_tail = std::exp(static_cast<double>(t.tail_logp)),
                     p_k = std::exp(static_cast<double>(t.logp.back()));
        EXPECT_LE(kf - kr, p_tail * std::log(p_k * q_tail / (p_tail * q_min)) + 1e-12) << "K " << K;
        EXPECT_GT(kf - kr, 0.0) << "K " << K;  // these tails are not proportional
      }
    }
    const double got = kl_topk_rows(z.data(), ids.data(), klp.data(), tail.data(), rows, V, K, 0.0f, nullptr);
    EXPECT_NEAR(got, ref, 1e-6 * ref) << "K " << K;
    if (K == V) {
      // Nothing left out: the top-K KL is the dense KL.
      EXPECT_NEAR(got, full, 1e-6 * full);
      EXPECT_NEAR(got, kl_rows(z.data(), lp.data(), rows, V, 0.0f, nullptr), 1e-6 * full);
    }
  }
}

// The KL sums are the same double whatever the thread count: the row KLs are added in
// row order (an OpenMP reduction adds per-thread partials in the order threads finish).
TEST(TeacherTargets, KlSumsAreDeterministicAcrossThreadCounts) {
  const int64_t rows = 67, V = 41, K = 7;
  std::vector<float> lp, z;
  random_rows(rows, V, 5, lp, z);
  std::vector<int32_t> ids;
  std::vector<float> klp, tail;
  for (int64_t r = 0; r < rows; ++r) {
    const TopKRow t = top_k_of(std::vector<float>(lp.begin() + r * V, lp.begin() + (r + 1) * V), K);
    ids.insert(ids.end(), t.ids.begin(), t.ids.end());
    klp.insert(klp.end(), t.logp.begin(), t.logp.end());
    tail.push_back(t.tail_logp);
  }
  // The reference: one row per call, added in row order.
  double dense_ref = 0, topk_ref = 0;
  for (int64_t r = 0; r < rows; ++r) {
    dense_ref += kl_rows(&z[r * V], &lp[r * V], 1, V, 0.0f, nullptr);
    topk_ref += kl_topk_rows(&z[r * V], &ids[r * K], &klp[r * K], &tail[r], 1, V, K, 0.0f, nullptr);
  }
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    EXPECT_EQ(kl_rows(z.data(), lp.data(), rows, V, 0.0f, nullptr), dense_ref) << threads << " threads";
    EXPECT_EQ(kl_topk_rows(z.data(), ids.data(), klp.data(), tail.data(), rows, V, K, 0.0f, nullptr), topk_ref)
        << threads << " threads";
  }
  omp_set_num_threads(saved);
}

TEST(TeacherTargets, TopKGradientMatchesFiniteDifferences) {
  const int64_t rows = 3, V = 41;
  std::vector<float> lp, z;
  random_rows(rows, V, 2, lp, z);
  for (int64_t K : {int64_t{1}, int64_t{6}, V}) {
    std::vector<int32_t> ids;
    std::vector<float> klp, tail;
    std::vector<TopKRow> trow;
    for (int64_t r = 0; r < rows; ++r) {
      trow.push_back(top_k_of(std::vector<float>(lp.begin() + r * V, lp.begin() + (r + 1) * V), K));
      ids.insert(ids.end(), trow.back().ids.begin(), trow.back().ids.end());
      klp.insert(klp.end(), trow.back().logp.begin(), trow.back().logp.end());
      tail.push_back(trow.back().tail_logp);
    }
    const float scale = 0.37f;
    std::vector<float> grad(rows * V);
    kl_topk_rows(z.data(), ids.data(), klp.data(), tail.data(), rows, V, K, scale, grad.data());
    // In place (dlogits == logits), as train_e2e calls it: the same gradient.
    std::vector<float> inplace = z;
    kl_topk_rows(inplace.data(), ids.data(), klp.data(), tail.data(), rows, V, K, scale, inplace.data());
    for (int64_t i = 0; i < rows * V; ++i) ASSERT_EQ(inplace[i], grad[i]) << i;
    // Central differences of the float64 reference loss (its own implementation).
    const double h = 1e-5;
    double max_abs = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < V; ++j) {
        std::vector<double> zr(z.begin() + r * V, z.begin() + (r + 1) * V);
        zr[j] += h;
        const double up = kl_topk64(trow[r], zr);
        zr[j] -= 2 * h;
        const double down = kl_topk64(trow[r], zr);
        const double fd = scale * (up - down) / (2 * h);
        EXPECT_NEAR(grad[r * V + j], fd, 2e-6) << "K " << K << " row " << r << " id " << j;
        max_abs = std::max(max_abs, std::fabs(fd));
      }
    EXPECT_GT(max_abs, 1e-2);  // the check compared real gradients
    if (K == V) {
      std::vector<float> dense(rows * V);
      kl_rows(z.data(), lp.data(), rows, V, scale, dense.data());
      for (int64_t i = 0; i < rows * V; ++i) EXPECT_NEAR(grad[i], dense[i], 1e-6) << i;
    }
  }
}

// A teacher whose whole mass is inside the kept ids (tail −inf): no tail term, and the tail
// ids get the plain q gradient.
TEST(TeacherTargets, TopKWithZeroTailMass) {
  const int64_t V = 4, K = 2;
  const std::vector<float> z = {0.5f, -1.0f, 2.0f, 0.0f};
  const std::vector<int32_t> ids = {2, 0};
  const std::vector<float> logp = {std::log(0.75f), std::log(0.25f)};
  const float tail = -INFINITY;
  std::vector<float> grad(V);
  const double kl = kl_topk_rows(z.data(), ids.data(), logp.data(), &tail, 1, V, K, 1.0f, grad.data());
  const std::vector<double> q = softmax64({0.5, -1.0, 2.0, 0.0});
  const double ref = 0.75 * std::log(0.75 / q[2]) + 0.25 * std::log(0.25 / q[0]);
  EXPECT_NEAR(kl, ref, 1e-6);
  EXPECT_NEAR(grad[2], q[2] - 0.75, 1e-6);
  EXPECT_NEAR(grad[0], q[0] - 0.25, 1e-6);
  EXPECT_NEAR(grad[1], q[1], 1e-6);
  EXPECT_NEAR(grad[3], q[3], 1e-6);
}

TEST(TeacherTargets, ModesRoundTripAndFootprints) {
  EXPECT_EQ(TargetOptions{}.mode, TargetMode::Recompute);  // the default (teacher_targets.h)
  for (TargetMode m : {TargetMode::Dense, TargetMode::TopK, TargetMode::Recompute})
    EXPECT_EQ(parse_target_mode(target_mode_name(m)), m);
  try {
    parse_target_mode("full");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("accepted: dense, topk, recompute"), std::string::npos) << e.what();
  }
  // 256 windows x 512 tokens of a 128256 vocabulary: 62.6 GiB dense, 0.26 GiB at K = 64.
  const int64_t N = 256 * 512;
  EXPECT_EQ(target_bytes(TargetMode::Dense, 64, N, 128256), N * 128256 * 4);
  EXPECT_EQ(target_bytes(TargetMode::TopK, 64, N, 128256), N * (64 * 8 + 4));
  EXPECT_EQ(target_bytes(TargetMode::TopK, 64, N, 40), N * (40 * 8 + 4));  // K clamped to V
  EXPECT_EQ(target_bytes(TargetMode::Recompute, 64, N, 128256), 0);
}

// The tiny model, its RTN W4 quantization and a few calibration windows.
struct Tiny {
  std::string dir = test::tiny_model_dir();
  SpearArtifact q;
  CalibData data;
  Tiny(int64_t windows, int64_t ctx) {
    QuantizeOptions qo;
    qo.verbose = false;
    q = quantize_model(dir, qo);
    Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
    CalibOptions co;
    co.file = test::data_dir() + "/tinystories/tinystories_val.txt";
    co.windows = windows;
    co.ctx = ctx;
    co.offset = 300000;
    data = load_calib(tok, co);
  }
};

TEST(TeacherTargets, MemoryCheckNamesTheModeAndItsFootprint) {
  Tiny t(2, 32);
  Network net = Network::load_fp(t.dir);
  Runner run(net);
  TargetOptions o;
  o.mode = TargetMode::Dense;
  o.max_gib = 1e-6;  // ~1 KiB: the dense targets (2 x 32 x 512 floats = 128 KiB) do not fit
  try {
    TeacherTargets tt(run, t.data, o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--targets dense holds 2 windows x 32 tokens x 512 vocabulary"), std::string::npos) << m;
    EXPECT_NE(m.find("--targets recompute"), std::string::npos) << m;
  }
  o.mode = TargetMode::TopK;
  o.top_k = 8;  // 2 x 32 x 68 bytes = 4.25 KiB: still over
  try {
    TeacherTargets tt(run, t.data, o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--targets topk holds 2 windows x 32 tokens x (8 x 8 + 4) bytes"),
              std::string::npos) << e.what();
  }
  o.mode = TargetMode::Recompute;  // nothing stored: always fits
  TeacherTargets tt(run, t.data, o);
  EXPECT_EQ(tt.stored_bytes(), 0);
}

// recompute holds nothing yet gives bit for bit what dense gives: the same placement,
// the same trained ECs, the same reported KLs. topk with K = V (nothing left out) gives
// the same up to rounding, and a small K a different, nearby result.
TEST(TeacherTargets, RecomputeCalibratesExactlyAsDense) {
  Tiny t(6, 64);
  CalibrateOptions o;
  o.budget = 0.05;
  o.epochs = 1;
  o.batch = 2;
  o.stat_windows = 3;
  o.guard_windows = 2;
  o.probe_windows = 2;
  o.report_windows = 3;
  o.verbose = false;
  auto run_mode = [&](TargetMode m, int64_t k) {
    CalibrateOptions om = o;
    om.targets.mode = m;
    om.targets.top_k = k;
    return calibrate(t.dir, t.q, t.data, om);
  };
  const CalibrateResult dense = run_mode(TargetMode::Dense, 64);
  const CalibrateResult rec = run_mode(TargetMode::Recompute, 64);
  ASSERT_GT(dense.placement.size(), 0u);
  EXPECT_EQ(dense.report["targets"]["stored_bytes"].get<int64_t>(), 6 * 64 * 512 * 4);
  EXPECT_EQ(rec.report["targets"]["stored_bytes"].get<int64_t>(), 0);
  EXPECT_EQ(rec.report["settings"]["targets"], "recompute");
  for (const char* k : {"calib_kl_w4", "calib_kl_static", "calib_kl_trained", "probe_kl_w4"})
    EXPECT_EQ(dense.report[k].get<double>(), rec.report[k].get<double>()) << k;
  EXPECT_EQ(dense.report["module_gains"], rec.report["module_gains"]);
  EXPECT_EQ(dense.report["placement"], rec.report["placement"]);
  EXPECT_EQ(dense.report["training"]["epochs"][0]["train_kl"], rec.report["training"]["epochs"][0]["train_kl"]);
  ASSERT_EQ(dense.trained_ecs.size(), rec.trained_ecs.size());
  for (size_t i = 0; i < dense.trained_ecs.size(); ++i) {
    ASSERT_EQ(dense.trained_ecs[i].has_value(), rec.trained_ecs[i].has_value()) << i;
    if (!dense.trained_ecs[i]) continue;
    EXPECT_EQ(dense.trained_ecs[i]->A, rec.trained_ecs[i]->A) << i;
    EXPECT_EQ(dense.trained_ecs[i]->B, rec.trained_ecs[i]->B) << i;
    EXPECT_EQ(dense.trained_ecs[i]->G, rec.trained_ecs[i]->G) << i;
  }

  const CalibrateResult all = run_mode(TargetMode::TopK, 512);  // K = V
  EXPECT_EQ(all.report["targets"]["top_k"].get<int64_t>(), 512);
  EXPECT_EQ(all.report["targets"]["mean_tail_mass"].get<double>(), 0.0);
  EXPECT_EQ(all.report["calib_kl_w4"].get<double>(), dense.report["calib_kl_w4"].get<double>());
  // The same placement (its gains agree up to rounding).
  ASSERT_EQ(all.placement.size(), dense.placement.size());
  for (size_t i = 0; i < all.placement.size(); ++i) {
    EXPECT_EQ(all.placement[i].layer, dense.placement[i].layer) << i;
    EXPECT_EQ(all.placement[i].module, dense.placement[i].module) << i;
    EXPECT_EQ(all.placement[i].rank, dense.placement[i].rank) << i;
    EXPECT_NEAR(all.placement[i].restore_gain, dense.placement[i].restore_gain, 1e-9) << i;
  }
  const double d_tr = dense.report["calib_kl_trained"].get<double>();
  EXPECT_NEAR(all.report["calib_kl_trained"].get<double>(), d_tr, 1e-4 * d_tr);

  const CalibrateResult k4 = run_mode(TargetMode::TopK, 4);
  EXPECT_EQ(k4.report["targets"]["stored_bytes"].get<int64_t>(), 6 * 64 * (4 * 8 + 4));
  EXPECT_GT(k4.report["targets"]["mean_tail_mass"].get<double>(), 0.0);
  // Its reported KLs are exact (recomputed), so the quantized model's is dense's.
  EXPECT_EQ(k4.report["calib_kl_w4"].get<double>(), dense.report["calib_kl_w4"].get<double>());
  EXPECT_LT(k4.report["calib_kl_trained"].get<double>(), k4.report["calib_kl_w4"].get<double>());
  // The probe KL is the top-K KL: a lower bound of the exact one.
  EXPECT_LT(k4.report["probe_kl_w4"].get<double>(), dense.report["probe_kl_w4"].get<double>());
}

// The diagnostic's entropy weighting, KL and restoration gains do not depend on how the
// targets are held when nothing is left out.
TEST(TeacherTargets, DiagnoseRecomputeMatchesDense) {
  Tiny t(2, 64);
  DiagnoseOptions o;
  o.probe_windows = 1;
  o.verbose = false;
  o.targets.mode = TargetMode::Dense;
  const Diagnosis dense = diagnose(t.dir, t.q, t.data, o);
  o.targets.mode = TargetMode::Recompute;
  const Diagnosis rec = diagnose(t.dir, t.q, t.data, o);
  EXPECT_EQ(dense.kl_w4, rec.kl_w4);
  EXPECT_GT(dense.kl_w4, 0.0);
  ASSERT_EQ(dense.modules.size(), rec.modules.size());
  for (size_t i = 0; i < dense.modules.size(); ++i) {
    EXPECT_EQ(dense.modules[i].damage[1], rec.modules[i].damage[1]) << i;  // entropy-weighted
    EXPECT_EQ(dense.modules[i].restore_gain, rec.modules[i].restore_gain) << i;
  }
  EXPECT_EQ(rec.targets["mode"], "recompute");
}

// Through the CLI: --targets topk --target-top-k K reaches the report and the .spear.
TEST(TeacherTargets, CliWritesTheModeIntoReportAndArtifact) {
  test::TempDir dir("teacher_targets");
  const std::string w4 = (dir.path / "w4.spear").string(), ec = (dir.path / "ec.spear").string(),
                    rep = (dir.path / "rep.json").string();
  const std::string cli = test::cli_path();
  const std::string data = test::data_dir() + "/tinystories/tinystories_val.txt";
  ASSERT_EQ(std::system((cli + " quantize --model " + test::tiny_model_dir() + " --out " + w4 + " >/dev/null 2>&1").c_str()), 0);
  ASSERT_EQ(std::system((cli + " calibrate --model " + test::tiny_model_dir() + " --quantized " + w4 +
                         " --calib " + data + " --calib-offset 300000 --calib-ctx 64 --calib-windows 4 "
                         "--stat-windows 2 --epochs 1 --budget 0.05 --targets topk --target-top-k 16 -q --out " +
                         ec + " --report-json " + rep + " >/dev/null 2>&1").c_str()), 0);
  const nlohmann::json r = nlohmann::json::parse(std::ifstream(rep));
  EXPECT_EQ(r["settings"]["targets"], "topk");
  EXPECT_EQ(r["settings"]["target_top_k"], 16);
  EXPECT_EQ(r["targets"]["stored_bytes"].get<int64_t>(), 4 * 64 * (16 * 8 + 4));
  const SpearArtifact a = read_spear(ec);
  EXPECT_EQ(a.meta["calibration"]["settings"]["targets"], "topk");
  EXPECT_EQ(a.meta["calibration"]["targets"]["top_k"], 16);
}

}  // namespace
}  // namespace spear
