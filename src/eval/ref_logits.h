#pragma once
// Reference next-token distributions for spear ppl --ref-model / --save-logits /
// --ref-logits: the rows a reference model gives on the scored positions, how one
// position is compared with the model (KL(ref || model), top-1 agreement), and the file
// they are saved in.
//
// File format (little-endian), version 1:
//   8 bytes  magic "SPEARLP1"
//   u64      length H of the header
//   H bytes  header, one JSON object: format "spear-ref-logprobs", version 1, vocab_size,
//            top_k (0 = full rows), ctx, windows, positions_per_window (ctx - 1),
//            tokens_in_file, data_sha256 (the text file's bytes), tokens_sha256 (the
//            windows' int32 token ids as scored), ref_model (informational)
//   windows * (ctx - 1) records, window by window, position t predicting token t + 1:
//     top_k = 0: vocab_size float32, the natural-log probabilities (log-softmax)
//     top_k = K: K int32 token ids, most probable first (ties: lower id first), then
//                their K float32 log-probabilities, then one float32: the log of the
//                probability mass outside the K (-inf when there is none)
// The file size is checked against the header: a truncated file is refused.
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace spear {

// Rows of log-probabilities for `positions` consecutive positions.
struct RefRows {
  int64_t vocab = 0, top_k = 0, positions = 0;
  std::vector<float> logprobs;  // positions x (top_k ? top_k : vocab)
  std::vector<int32_t> ids;     // positions x top_k (top-k rows only)
  std::vector<float> tail;      // positions: log of the mass outside the top k (top-k only)

  // log-softmax of each logit row (computed in double, stored as float32).
  static RefRows from_logits(const float* logits, int64_t positions, int64_t vocab);
  // The k most probable entries of each full row and the log of the rest's mass.
  RefRows top(int64_t k) const;
};

// log-softmax of one row of n logits, in double, rounded to float32 into out.
void log_softmax_row(const float* logits, int64_t n, float* out);

// One position compared: KL(ref || model) in nats and whether the argmaxes agree.
// model_logprobs: the model's log_softmax_row over the vocabulary. For top-k rows the
// KL is over the K entries plus one "rest" bucket: a lower bound of the full KL (equal
// when the reference puts no mass outside the K). Ties in an argmax go to the lower id.
struct PositionCompare {
  double kl = 0;
  bool top1_agree = false;
};
PositionCompare compare_position(const RefRows& ref, int64_t t, const float* model_logprobs);

struct RefLogitsHeader {
  int64_t vocab_size = 0, top_k = 0, ctx = 0, windows = 0, tokens_in_file = 0;
  std::string data_sha256, tokens_sha256, ref_model;
};

// Header for a run over `text`, encoded to `ids`, scored in `windows` windows of ctx.
RefLogitsHeader ref_logits_header(const std::string& text, const std::vector<int32_t>& ids, int64_t ctx,
                                  int64_t windows, int64_t vocab_size);

// Throws spear::Error naming what differs (data, tokenizer, ctx, windows, vocabulary)
// when a saved file cannot stand in for a reference run described by `now`.
void check_ref_logits_compatible(const RefLogitsHeader& saved, const RefLogitsHeader& now,
                                 const std::string& path);

// Writes to "<path>.tmp.<pid>", renamed onto path by commit(); the temporary file is
// removed when the writer is destroyed uncommitted.
class RefLogitsWriter {
 public:
  RefLogitsWriter(const std::string& path, const RefLogitsHeader& header);
  ~RefLogitsWriter();
  RefLogitsWriter(const RefLogitsWriter&) = delete;
  RefLogitsWriter& operator=(const RefLogitsWriter&) = delete;
  int64_t top_k() const { return header_.top_k; }
  // One window's ctx-1 rows, full (reduced to the header's top_k here when it is set).
  void write_window(const RefRows& full_rows);
  void commit();

 private:
  std::string path_, tmp_;
  RefLogitsHeader header_;
  std::ofstream out_;
  int64_t windows_written_ = 0;
  bool committed_ = false;
};

class RefLogitsReader {
 public:
  explicit RefLogitsReader(const std::string& path);  // reads and checks the header and size
  const RefLogitsHeader& header() const { return header_; }
  RefRows read_window();  // the next window's ctx-1 rows

 private:
  std::string path_;
  RefLogitsHeader header_;
  std::ifstream in_;
  int64_t windows_read_ = 0;
};

}  // namespace spear
