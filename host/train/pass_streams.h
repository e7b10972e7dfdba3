// The random streams of a step's passes. A process that computes its part of each global
// batch in M micro-batches ([train] micro_batches) gives each pass a stream of its own, as a
// data-parallel run gives each rank one: pass k of rank r draws what rank r·M + k of a run
// with M times the ranks (and one micro-batch) draws. So one process with M = 2 takes the
// steps of two ranks bit for bit (the sum of two gradients is the same in either order).
//
// Pass 0 draws from the process's own generators, which the methods' step hooks also draw
// from; the other passes' states are kept here between steps.
#pragma once

#include "train/session.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace tessera {

class PassStreams {
 public:
  // `passes` streams, each where the process's generators stand now.
  PassStreams(Session& s, std::int64_t passes);
  std::int64_t passes() const { return static_cast<std::int64_t>(kept_.size()) + 1; }
  // Runs `pass` with stream k's generators in place; stream 0's are back afterwards, even when it throws.
  void run(std::size_t k, const std::function<void()>& pass);
  // Each stream's state as rank_generators() gives it, stream 0's (the process's, now) first.
  std::vector<at::Tensor> states() const;
  // The states of streams 1..M-1 (a resumed run's).
  void restore(std::vector<at::Tensor> kept);

 private:
  Session& s_;
  std::vector<at::Tensor> kept_;
};

}  // namespace tessera
