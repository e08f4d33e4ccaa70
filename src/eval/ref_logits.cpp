#include "eval/ref_logits.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/sha256.h"

namespace spear {

namespace {

constexpr char kMagic[8] = {'S', 'P', 'E', 'A', 'R', 'L', 'P', '1'};
constexpr int64_t kMaxHeader = 1 << 20;

int64_t row_bytes(const RefLogitsHeader& h) {
  return h.top_k == 0 ? h.vocab_size * 4 : h.top_k * 8 + 4;
}

}  // namespace

void log_softmax_row(const float* z, int64_t n, float* out) {
  double m = z[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, static_cast<double>(z[i]));
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(z[i]) - m);
  const double lse = m + std::log(s);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(z[i]) - lse);
}

RefRows RefRows::from_logits(const float* logits, int64_t positions, int64_t vocab) {
  RefRows r;
  r.vocab = vocab;
  r.positions = positions;
  r.logprobs.resize(static_cast<size_t>(positions * vocab));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < positions; ++t) log_softmax_row(logits + t * vocab, vocab, &r.logprobs[t * vocab]);
  return r;
}

RefRows RefRows::top(int64_t k) const {
  SPEAR_CHECK(top_k == 0, "RefRows::top: the rows are already top-k");
  SPEAR_CHECK(k >= 1 && k <= vocab, "--save-top-k must be between 1 and the vocabulary size (" +
                                        std::to_string(vocab) + "), or 0 for full rows");
  RefRows r;
  r.vocab = vocab;
  r.top_k = k;
  r.positions = positions;
  r.logprobs.resize(static_cast<size_t>(positions * k));
  r.ids.resize(static_cast<size_t>(positions * k));
  r.tail.resize(static_cast<size_t>(positions));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < positions; ++t) {
    const float* row = &logprobs[t * vocab];
    std::vector<int32_t> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    double rest = 0;
    for (int64_t i = k; i < vocab; ++i) rest += std::exp(static_cast<double>(row[order[i]]));
    for (int64_t i = 0; i < k; ++i) {
      r.ids[t * k + i] = order[i];
      r.logprobs[t * k + i] = row[order[i]];
    }
    r.tail[t] = rest > 0 ? static_cast<float>(std::log(rest)) : -std::numeric_limits<float>::infinity();
  }
  return r;
}

PositionCompare compare_position(const RefRows& ref, int64_t t, const float* q) {
  const int64_t V = ref.vocab;
  int64_t model_top = 0;
  for (int64_t i = 1; i < V; ++i)
    if (q[i] > q[model_top]) model_top = i;
  PositionCompare c;
  double kl = 0;
  if (ref.top_k == 0) {
    const float* p = &ref.logprobs[t * V];
    int64_t ref_top = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (p[i] > p[ref_top]) ref_top = i;
      const double lp = p[i];
      if (std::isinf(lp)) continue;  // p = 0 contributes nothing
      kl += std::exp(lp) * (lp - static_cast<double>(q[i]));
    }
    c.top1_agree = ref_top == model_top;
  } else {
    const int64_t K = ref.top_k;
    const int32_t* ids = &ref.ids[t * K];
    const float* p = &ref.logprobs[t * K];
    double q_in = 0;
    for (int64_t i = 0; i < K; ++i) {
      const double lq = q[ids[i]];
      q_in += std::exp(lq);
      const double lp = p[i];
      if (!std::isinf(lp)) kl += std::exp(lp) * (lp - lq);
    }
    const double lp_tail = ref.tail[t];
    if (!std::isinf(lp_tail)) {
      // The model's mass outside the K, summed directly (1 - q_in loses it when small).
      double q_out = 0;
      for (int64_t i = 0; i < V; ++i) q_out += std::exp(static_cast<double>(q[i]));
      q_out = std::max(q_out - q_in, 0.0);
      kl += std::exp(lp_tail) * (lp_tail - std::log(q_out));
    }
    c.top1_agree = ids[0] == model_top;
  }
  c.kl = std::max(kl, 0.0);
  return c;
}

RefLogitsHeader ref_logits_header(const std::string& text, const std::vector<int32_t>& ids, int64_t ctx,
                                  int64_t windows, int64_t vocab_size) {
  SPEAR_CHECK(windows * ctx <= static_cast<int64_t>(ids.size()), "ref logits: more windows than tokens");
  RefLogitsHeader h;
  h.vocab_size = vocab_size;
  h.ctx = ctx;
  h.windows = windows;
  h.tokens_in_file = static_cast<int64_t>(ids.size());
  h.data_sha256 = sha256_hex(text.data(), text.size());
  h.tokens_sha256 = sha256_hex(ids.data(), static_cast<size_t>(windows * ctx) * sizeof(int32_t));
  return h;
}

void check_ref_logits_compatible(const RefLogitsHeader& s, const RefLogitsHeader& now, const std::string& path) {
  const std::string p = "--ref-logits " + path + ": ";
  SPEAR_CHECK(s.data_sha256 == now.data_sha256,
              p + "made from different data (text SHA-256 " + s.data_sha256.substr(0, 12) + "..., --data is " +
                  now.data_sha256.substr(0, 12) + "...)");
  SPEAR_CHECK(s.ctx == now.ctx, p + "made with --ctx " + std::to_string(s.ctx) + ", this run uses --ctx " +
                                    std::to_string(now.ctx));
  SPEAR_CHECK(s.windows == now.windows, p + "holds " + std::to_string(s.windows) +
                                            " windows, this run scores " + std::to_string(now.windows) +
                                            " (--max-windows must match)");
  SPEAR_CHECK(s.vocab_size == now.vocab_size, p + "vocabulary of " + std::to_string(s.vocab_size) +
                                                  ", the model has " + std::to_string(now.vocab_size));
  SPEAR_CHECK(s.tokens_in_file == now.tokens_in_file && s.tokens_sha256 == now.tokens_sha256,
              p + "the same text tokenizes differently here: made with a different tokenizer");
}

RefLogitsWriter::RefLogitsWriter(const std::string& path, const RefLogitsHeader& header)
    : path_(path), tmp_(path + ".tmp." + std::to_string(::getpid())), header_(header) {
  SPEAR_CHECK(header_.top_k >= 0 && header_.top_k <= header_.vocab_size,
              "--save-top-k must be between 1 and the vocabulary size (" + std::to_string(header_.vocab_size) +
                  "), or 0 for full rows");
  out_.open(tmp_, std::ios::binary | std::ios::trunc);
  SPEAR_CHECK(out_.good(), "--save-logits: cannot create " + tmp_);
  nlohmann::json j{{"format", "spear-ref-logprobs"},
                   {"version", 1},
                   {"vocab_size", header_.vocab_size},
                   {"top_k", header_.top_k},
                   {"ctx", header_.ctx},
                   {"windows", header_.windows},
                   {"positions_per_window", header_.ctx - 1},
                   {"tokens_in_file", header_.tokens_in_file},
                   {"data_sha256", header_.data_sha256},
                   {"tokens_sha256", header_.tokens_sha256},
                   {"ref_model", header_.ref_model}};
  const std::string h = j.dump();
  const uint64_t n = h.size();
  out_.write(kMagic, 8);
  out_.write(reinterpret_cast<const char*>(&n), 8);
  out_.write(h.data(), static_cast<std::streamsize>(n));
}

RefLogitsWriter::~RefLogitsWriter() {
  if (!committed_) {
    out_.close();
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void RefLogitsWriter::write_window(const RefRows& full) {
  SPEAR_CHECK(full.top_k == 0 && full.vocab == header_.vocab_size && full.positions == header_.ctx - 1,
              "RefLogitsWriter: rows do not match the header");
  SPEAR_CHECK(windows_written_ < header_.windows, "RefLogitsWriter: more windows than the header says");
  if (header_.top_k == 0) {
    out_.write(reinterpret_cast<const char*>(full.logprobs.data()),
               static_cast<std::streamsize>(full.logprobs.size() * 4));
  } else {
    const RefRows r = full.top(header_.top_k);
    const int64_t K = r.top_k;
    for (int64_t t = 0; t < r.positions; ++t) {
      out_.write(reinterpret_cast<const char*>(&r.ids[t * K]), static_cast<std::streamsize>(K * 4));
      out_.write(reinterpret_cast<const char*>(&r.logprobs[t * K]), static_cast<std::streamsize>(K * 4));
      out_.write(reinterpret_cast<const char*>(&r.tail[t]), 4);
    }
  }
  SPEAR_CHECK(out_.good(), "--save-logits: writing " + tmp_ + " failed (disk full?)");
  ++windows_written_;
}

void RefLogitsWriter::commit() {
  SPEAR_CHECK(windows_written_ == header_.windows, "RefLogitsWriter: " + std::to_string(windows_written_) +
                                                       " of " + std::to_string(header_.windows) + " windows written");
  out_.flush();
  SPEAR_CHECK(out_.good(), "--save-logits: writing " + tmp_ + " failed (disk full?)");
  out_.close();
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  SPEAR_CHECK(!ec, "--save-logits: cannot rename " + tmp_ + " to " + path_ + ": " + ec.message());
  committed_ = true;
}

RefLogitsReader::RefLogitsReader(const std::string& path) : path_(path) {
  const std::string p = "--ref-logits " + path + ": ";
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  SPEAR_CHECK(!ec, p + "cannot open (" + ec.message() + ")");
  in_.open(path, std::ios::binary);
  SPEAR_CHECK(in_.good(), p + "cannot open");
  char magic[8] = {};
  uint64_t hlen = 0;
  in_.read(magic, 8);
  in_.read(reinterpret_cast<char*>(&hlen), 8);
  SPEAR_CHECK(in_.good() && std::memcmp(magic, kMagic, 8) == 0,
              p + "not a spear reference log-probability file (written by spear ppl --save-logits)");
  SPEAR_CHECK(hlen > 0 && static_cast<int64_t>(hlen) <= kMaxHeader && 16 + hlen <= size, p + "corrupt header");
  std::string h(hlen, '\0');
  in_.read(h.data(), static_cast<std::streamsize>(hlen));
  SPEAR_CHECK(in_.good(), p + "corrupt header");
  nlohmann::json j = nlohmann::json::parse(h, nullptr, false);
  SPEAR_CHECK(j.is_object() && j.value("format", "") == "spear-ref-logprobs", p + "corrupt header");
  SPEAR_CHECK(j.value("version", 0) == 1, p + "format version " + j.value("version", nlohmann::json()).dump() +
                                              " (this spear reads version 1)");
  try {
    header_.vocab_size = j.at("vocab_size").get<int64_t>();
    header_.top_k = j.at("top_k").get<int64_t>();
    header_.ctx = j.at("ctx").get<int64_t>();
    header_.windows = j.at("windows").get<int64_t>();
    header_.tokens_in_file = j.at("tokens_in_file").get<int64_t>();
    header_.data_sha256 = j.at("data_sha256").get<std::string>();
    header_.tokens_sha256 = j.at("tokens_sha256").get<std::string>();
    header_.ref_model = j.value("ref_model", "");
  } catch (const nlohmann::json::exception&) {
    throw Error(p + "corrupt header (a field is missing or has the wrong type)");
  }
  SPEAR_CHECK(header_.vocab_size > 0 && header_.vocab_size < (1 << 24) && header_.top_k >= 0 &&
                  header_.top_k <= header_.vocab_size && header_.ctx >= 2 && header_.ctx < (1 << 24) &&
                  header_.windows > 0 && header_.windows < (int64_t(1) << 32),
              p + "corrupt header (values out of range)");
  const long double want = 16.0L + hlen + static_cast<long double>(header_.windows) * (header_.ctx - 1) *
                                              row_bytes(header_);
  SPEAR_CHECK(static_cast<long double>(size) == want,
              p + "is " + std::to_string(size) + " bytes, the header describes " +
                  std::to_string(static_cast<uint64_t>(want)) + " (truncated or not written to the end)");
}

RefRows RefLogitsReader::read_window() {
  SPEAR_CHECK(windows_read_ < header_.windows, "--ref-logits " + path_ + ": no more windows");
  RefRows r;
  r.vocab = header_.vocab_size;
  r.top_k = header_.top_k;
  r.positions = header_.ctx - 1;
  if (r.top_k == 0) {
    r.logprobs.resize(static_cast<size_t>(r.positions * r.vocab));
    in_.read(reinterpret_cast<char*>(r.logprobs.data()), static_cast<std::streamsize>(r.logprobs.size() * 4));
  } else {
    const int64_t K = r.top_k;
    r.logprobs.resize(static_cast<size_t>(r.positions * K));
    r.ids.resize(static_cast<size_t>(r.positions * K));
    r.tail.resize(static_cast<size_t>(r.positions));
    for (int64_t t = 0; t < r.positions && in_.good(); ++t) {
      in_.read(reinterpret_cast<char*>(&r.ids[t * K]), static_cast<std::streamsize>(K * 4));
      in_.read(reinterpret_cast<char*>(&r.logprobs[t * K]), static_cast<std::streamsize>(K * 4));
      in_.read(reinterpret_cast<char*>(&r.tail[t]), 4);
    }
    for (int32_t id : r.ids)
      SPEAR_CHECK(id >= 0 && id < r.vocab, "--ref-logits " + path_ + ": token id " + std::to_string(id) +
                                               " outside the vocabulary (corrupt file)");
  }
  SPEAR_CHECK(in_.good(), "--ref-logits " + path_ + ": read failed");
  ++windows_read_;
  return r;
}

}  // namespace spear
