#include "train/pass_streams.h"

#include "train/resume.h"

#include <stdexcept>
#include <string>

namespace tessera {

PassStreams::PassStreams(Session& s, std::int64_t passes) : s_(s) {
  for (std::int64_t k = 1; k < passes; ++k) kept_.push_back(rank_generators(s));
}

void PassStreams::run(std::size_t k, const std::function<void()>& pass) {
  if (k == 0) return pass();
  at::Tensor& mine = kept_.at(k - 1);
  const at::Tensor home = rank_generators(s_);  // stream 0's, after its pass of this step
  set_rank_generators(s_, mine);
  try {
    pass();
  } catch (...) {
    set_rank_generators(s_, home);
    throw;
  }
  mine = rank_generators(s_);
  set_rank_generators(s_, home);
}

std::vector<at::Tensor> PassStreams::states() const {
  std::vector<at::Tensor> out{rank_generators(s_)};
  out.insert(out.end(), kept_.begin(), kept_.end());
  return out;
}

void PassStreams::restore(std::vector<at::Tensor> kept) {
  if (kept.size() != kept_.size())
    throw std::logic_error("PassStreams::restore: " + std::to_string(kept.size()) + " states for " + std::to_string(kept_.size()) + " streams");
  kept_ = std::move(kept);
}

}  // namespace tessera
