// ProPETL's binary masks (Zeng, Zhang and Lu 2023, arXiv:2305.17682) as the authors' GetSubnet
// computes them: 1 on the k largest |S| of a score tensor, k = n − ⌊(1 − keep)·n⌋ (their
// "sparsity" is the share kept), and in backward the gradient of |S| passed straight through,
// ∂L/∂S = ∂L/∂M ⊙ sign(S). The adapter, LoRA and prefix forms share it.
//
// Scores are kept as u = S / ratio: the authors draw S with nn.Linear's Kaiming-uniform,
// U(±1/√fan_in), and train it `ratio` times faster than the prototype; a mask reads only the
// ranking of |S|, so u drawn U(±1/(ratio·√fan_in)) at the run's rate takes Adam's steps of
// about lr in u, which are steps of ratio · lr in S.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>

namespace tessera::propetl {

// u (any shape) -> M, 0/1 exactly, with the gradient of |u|.
inline at::Tensor topk_mask(const at::Tensor& u, double keep) {
  const at::Tensor magnitude = u.abs();
  const auto n = magnitude.numel();
  const auto k = std::max<std::int64_t>(1, n - static_cast<std::int64_t>(std::floor((1.0 - keep) * static_cast<double>(n))));
  at::Tensor hard;
  {
    at::NoGradGuard no_grad;
    hard = at::zeros({n}, magnitude.options()).index_fill_(0, std::get<1>(magnitude.flatten().topk(k)), 1.0).view(magnitude.sizes());
  }
  return hard + (magnitude - magnitude.detach());  // exactly 0/1 (the bracket: 1 + m − m would round)
}

// Fresh scores u = S / ratio for a tensor whose Kaiming fan-in is fan_in, trainable.
inline at::Tensor draw_scores(at::IntArrayRef shape, double fan_in, double ratio, const at::TensorOptions& opts) {
  at::Tensor u = at::empty(shape, opts);
  {
    at::NoGradGuard no_grad;
    const double bound = 1.0 / (ratio * std::sqrt(fan_in));
    u.uniform_(-bound, bound);
  }
  return u.set_requires_grad(true);
}

}  // namespace tessera::propetl
