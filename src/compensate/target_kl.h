#pragma once
// The KL between the full-precision (teacher) next-token distribution and the quantized
// (student) model's, per row of logits, with its gradient w.r.t. the student's logits:
// against a dense teacher row (every log-probability) or against a top-K row (the K
// most probable ids, their log-probabilities and the log of the mass outside them).
//
// Top-K KL. With S the K kept ids, p_T = 1 − Σ_{i∈S} p_i the teacher's tail mass and
// q = softmax(z), q_T = Σ_{j∉S} q_j the student's, the loss is the KL of the two
// distributions coarsened to {each kept id} ∪ {one tail bucket}:
//     KL_K = Σ_{i∈S} p_i (log p_i − log q_i) + p_T (log p_T − log q_T)      (0·log 0 = 0)
// It is exact over the kept ids; for the tail, KL = KL_K + p_T · KL(p̄ ‖ q̄), where p̄, q̄
// are p and q conditioned on the tail (p̄_j = p_j / p_T, q̄_j = q_j / q_T, j ∉ S). So
//     0 ≤ KL − KL_K = p_T · KL(p̄ ‖ q̄) ≤ p_T · log( p_K · q_T / (p_T · min_{j∉S} q_j) )
// (KL_K is a lower bound, equal when the teacher's mass is all in S; the upper bound
// holds because KL(p̄ ‖ q̄) ≤ max_j log(p̄_j / q̄_j) and every tail p_j ≤ p_K, the smallest
// kept probability). The error vanishes with the tail mass p_T. The gradient of KL_K is
//     ∂KL_K/∂z_j = q_j − p_j                  for j ∈ S
//                = q_j · (1 − p_T / q_T)      for j ∉ S
// i.e. q − p̃, where p̃ spreads the teacher's tail mass over the tail in proportion to q.
// (The same coarsening as `spear ppl --ref-logits` with a top-k file, eval/ref_logits.)
#include <cstdint>

namespace spear {

// Row-wise log-softmax of logits (rows, V) into out (rows, V); out may be logits.
void log_softmax_rows(const float* logits, int64_t rows, int64_t V, float* out);

// Σ_rows KL(p_ref ‖ softmax(logits)) with p_ref given as log-probabilities ref_logp
// (rows, V); when dlogits (rows, V) is given (it may be logits) it receives
// scale · (softmax(logits) − p_ref), the gradient of scale · KL.
double kl_rows(const float* logits, const float* ref_logp, int64_t rows, int64_t V, float scale,
               float* dlogits);

// Σ_rows KL_K (above) against top-K teacher rows: ids (rows, K) distinct token ids,
// logp (rows, K) their log-probabilities, tail_logp (rows) log p_T (−inf when p_T = 0).
// When dlogits (rows, V) is given (it may be logits) it receives scale · ∂KL_K/∂z.
double kl_topk_rows(const float* logits, const int32_t* ids, const float* logp,
                    const float* tail_logp, int64_t rows, int64_t V, int64_t K, float scale,
                    float* dlogits);

}  // namespace spear
