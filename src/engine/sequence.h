#pragma once
// The engine's state for one request: its tokens so far, how many of them have K/V
// in the paged cache, its sampler, and its place in the queues.
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/paged_kv.h"
#include "engine/request.h"
#include "engine/sampler.h"

namespace spear {

struct Sequence {
  Sequence(EngineRequest r, BlockPool& pool, uint64_t order, double now)
      : req(std::move(r)), tokens(req.prompt), n_prompt(static_cast<int64_t>(req.prompt.size())),
        kv(pool), sampler(req.sampling), arrival_order(order), t_arrival(now) {}

  EngineRequest req;
  std::vector<int32_t> tokens;  // prompt, then generated ids
  int64_t n_prompt;
  int64_t n_computed = 0;       // leading tokens whose K/V are in the cache
  int64_t n_generated = 0;
  int64_t prompt_lp_done = 0;   // prompt tokens already emitted with logprobs (echo)
  PagedSequence kv;
  Sampler sampler;
  uint64_t arrival_order;       // FCFS order; a preempted sequence keeps its place
  double t_arrival;
  double t_first_token = 0, t_last_token = 0;
  int64_t n_preemptions = 0;

  // Tokens still to run through the model: the whole prompt (or, after a
  // preemption, everything so far) while prefilling; 1 while decoding.
  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - n_computed; }
  bool prefilling() const { return pending() > 1; }
  // Whether this request needs logits for every row of its prompt chunks.
  bool needs_prompt_rows() const { return req.prompt_logprobs && prompt_lp_done < n_prompt; }
};

}  // namespace spear
