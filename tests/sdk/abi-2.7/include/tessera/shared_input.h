// Branches of linear sites that read one input (LinearSite::input_group(), SDK 2.6: an
// attention's q, k and v), computed as one: the first member called with an input computes
// every member's output for it, and the others take theirs when the host calls them with
// that same tensor. A member called with another tensor, or a second time, starts over, so
// the outputs are always those of the input each member is given; only the work is shared.
// Outputs are held until taken, and nothing is held between forward passes.
//
//   tessera::SharedInput group(3, [&](const Tensor& x) { return low_rank_group(x, …); });
//   q->add_branch(owner, [&](const Tensor& x) { return group(0, x); });   // k: group(1, x) …
//
// Header-only. Not thread-safe: a model runs one forward pass at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tessera {

class SharedInput {
 public:
  // x ↦ one output per member, in member order
  using Compute = std::function<std::vector<at::Tensor>(const at::Tensor& x)>;

  SharedInput(std::size_t members, Compute compute) : compute_(std::move(compute)), out_(members) {}

  // Member `member`'s output for x.
  at::Tensor operator()(std::size_t member, const at::Tensor& x) {
    if (!(x_.defined() && x_.is_same(x) && version_ == version(x) && out_.at(member).defined())) start(x);
    at::Tensor y = std::move(out_[member]);
    out_[member] = at::Tensor();
    bool pending = false;
    for (const auto& o : out_) pending |= o.defined();
    if (!pending) x_ = at::Tensor();  // every member served: hold nothing until the next pass
    return y;
  }

  std::size_t computed() const { return computed_; }  // how many times compute ran (tests)

 private:
  // In-place writes bump a tensor's version; inference tensors have none (and cannot be
  // written outside inference mode), so identity is enough for them.
  static std::int64_t version(const at::Tensor& x) { return x.is_inference() ? 0 : static_cast<std::int64_t>(x._version()); }

  void start(const at::Tensor& x) {
    std::vector<at::Tensor> out = compute_(x);
    if (out.size() != out_.size()) throw std::logic_error("SharedInput: compute returned " + std::to_string(out.size()) + " outputs for " + std::to_string(out_.size()) + " members");
    out_ = std::move(out);
    x_ = x;  // held, so that no other tensor can take its place in memory while outputs wait
    version_ = version(x);
    ++computed_;
  }

  Compute compute_;
  std::vector<at::Tensor> out_;  // per member; undefined once taken
  at::Tensor x_;                 // the input the waiting outputs belong to
  std::int64_t version_ = 0;
  std::size_t computed_ = 0;
};

}  // namespace tessera
