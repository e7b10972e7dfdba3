// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) as one
// multi-tensor kernel per group and device, and gradient-norm clipping without a host
// sync. libtorch's torch::optim::AdamW loops over tensors with ~10 kernels each: a LoRA on
// every projection of a 30-layer model has 420 tensors, ~4 000 launches a step, which
// dominates a GPU step of a small model. at::_fused_adamw_ (the kernel behind
// torch.optim.AdamW(fused=True), on CPU and CUDA) does the whole update in one pass:
//   m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²,  θ ← θ − lr λ θ − lr (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε)
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace tessera {

class FusedAdamW {
 public:
  struct Group {
    std::vector<at::Tensor> params;
    double lr = 1e-3, weight_decay = 0.01;
  };
  explicit FusedAdamW(std::vector<Group> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8);

  std::vector<Group>& groups() { return groups_; }
  // A group's parameters become `params`: a tensor listed before (the same tensor, not an
  // equal one) keeps its moments and step count, a new one starts from zero.
  void replace(std::size_t group, std::vector<at::Tensor> params);
  // One update of every parameter that has a gradient (the others, and their moments and
  // step counts, stay as they are, as torch's AdamW leaves them).
  void step();
  void zero_grad();  // drops the gradients (set to none)

  struct State {
    at::Tensor exp_avg, exp_avg_sq, step;  // step: a float32 scalar on the parameter's device, as the kernel wants
  };
  // Group g's moments and step counts, one per parameter in its order; empty before the
  // group's first step. set_state takes the same (a resumed run's checkpoint).
  const std::vector<State>& state(std::size_t g) const { return state_.at(g); }
  void set_state(std::size_t g, std::vector<State> state);

 private:
  std::vector<Group> groups_;
  std::vector<std::vector<State>> state_;  // per group, per parameter; made at the first step
  double beta1_, beta2_, eps_;
};

// Scales every gradient by min(1, max_norm / (‖g‖₂ + 1e-6)) over all of them together,
// as torch.nn.utils.clip_grad_norm_ does; returns the total norm (a device scalar: no sync).
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

}  // namespace tessera
