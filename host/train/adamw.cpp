#include "train/adamw.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

namespace tessera {

FusedAdamW::FusedAdamW(std::vector<Group> groups, double beta1, double beta2, double eps)
    : groups_(std::move(groups)), state_(groups_.size()), beta1_(beta1), beta2_(beta2), eps_(eps) {}

void FusedAdamW::step() {
  at::NoGradGuard no_grad;
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    auto& group = groups_[g];
    auto& state = state_[g];
    if (state.empty())
      for (const auto& p : group.params)
        state.push_back({at::zeros_like(p, at::MemoryFormat::Preserve), at::zeros_like(p, at::MemoryFormat::Preserve),
                         at::zeros({}, p.options().dtype(at::kFloat))});
    // One kernel call per (device, dtype): the fused kernel takes tensors of one kind.
    struct Lists {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    };
    std::map<std::tuple<std::string, at::ScalarType>, Lists> by_kind;
    for (std::size_t i = 0; i < group.params.size(); ++i) {
      const auto& p = group.params[i];
      if (!p.grad().defined()) continue;
      auto& l = by_kind[{p.device().str(), p.scalar_type()}];
      l.params.push_back(p), l.grads.push_back(p.grad()), l.exp_avgs.push_back(state[i].exp_avg);
      l.exp_avg_sqs.push_back(state[i].exp_avg_sq), l.steps.push_back(state[i].step);
    }
    for (auto& [_, l] : by_kind) {
      at::_foreach_add_(l.steps, 1);  // the kernel reads t already counted (1 at the first update)
      at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, {}, l.steps, group.lr, beta1_, beta2_, group.weight_decay, eps_,
                        /*amsgrad=*/false, /*maximize=*/false);
    }
  }
}

void FusedAdamW::replace(std::size_t g, std::vector<at::Tensor> params) {
  auto& group = groups_.at(g);
  auto& state = state_[g];
  std::vector<State> kept;
  if (!state.empty()) {
    std::map<const void*, State> by_tensor;
    for (std::size_t i = 0; i < group.params.size(); ++i) by_tensor[group.params[i].unsafeGetTensorImpl()] = state[i];
    for (const auto& p : params) {
      auto it = by_tensor.find(p.unsafeGetTensorImpl());
      kept.push_back(it != by_tensor.end() ? it->second
                                           : State{at::zeros_like(p, at::MemoryFormat::Preserve), at::zeros_like(p, at::MemoryFormat::Preserve),
                                                   at::zeros({}, p.options().dtype(at::kFloat))});
    }
  }
  group.params = std::move(params);
  state = std::move(kept);  // empty before the first step: made then, as for any group
}

void FusedAdamW::set_state(std::size_t g, std::vector<State> state) {
  if (!state.empty() && state.size() != groups_.at(g).params.size())
    throw std::invalid_argument("optimizer group " + std::to_string(g) + ": " + std::to_string(state.size()) + " moments for " +
                                std::to_string(groups_[g].params.size()) + " parameters");
  state_.at(g) = std::move(state);
}

void FusedAdamW::zero_grad() {
  for (auto& g : groups_)
    for (auto& p : g.params)
      if (p.grad().defined()) p.mutable_grad().reset();
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return at::zeros({});
  at::Tensor total = at::linalg_vector_norm(at::stack(at::_foreach_norm(grads)), 2);  // ‖(‖g_1‖, …, ‖g_n‖)‖ = ‖g‖
  at::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  at::_foreach_mul_(grads, coef);
  return total;
}

}  // namespace tessera
