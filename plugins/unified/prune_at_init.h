// Pruning at initialisation, as SparseAdapter (He et al. 2022, arXiv:2210.04284) does it to
// added weights: every weight of an instance scored once, before the first step (SNIP, GraSP,
// magnitude or random), one global threshold over all of them, and only the kept entries
// trained from then on. Shared by the adapter form (sparse_adapter) and the LoRA form
// (sparse_lora); the scores' formulas are in sparse_adapter/README.md.
#pragma once

#include <tessera/method.h>
#include <tessera/model_view.h>
#include <tessera/owner.h>
#include <tessera/sites.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera::prune_at_init {

// One pruned weight: what trains is `kept`, its entries at the flat indices `index`.
struct Sparse {
  at::Tensor dense;  // the weight as saved, 0 where pruned; refreshed from `kept`
  at::Tensor mask;   // uint8, dense's shape: 1 where kept
  at::Tensor index;  // (k) int64: flat indices of the kept entries
  at::Tensor kept;   // (k): the trained values
  // The weight from the trained values, differentiable in them.
  at::Tensor weight() const { return at::zeros({dense.numel()}, kept.options()).scatter(0, index, kept).view(dense.sizes()); }
  void keep(const at::Tensor& m) {  // m: dense's shape, bool or 0/1
    mask = m.to(at::kByte);
    index = mask.flatten().nonzero().squeeze(1);
    kept = dense.flatten().index_select(0, index).clone().set_requires_grad(true);
    refresh();
  }
  void refresh() const {
    at::NoGradGuard no_grad;
    dense.zero_();
    dense.view({-1}).index_copy_(0, index, kept.detach());
  }
};

using Weights = std::vector<std::shared_ptr<Sparse>>;

namespace detail {

inline std::vector<at::Tensor> values(const Weights& w) {
  std::vector<at::Tensor> v;
  for (const auto& s : w) v.push_back(s->kept);
  return v;
}

// ∇θ L for the pruned weights alone (no other tensor's .grad is touched); 0 for a weight the
// loss does not reach.
inline std::vector<at::Tensor> gradient(const Weights& w, const at::Tensor& loss, bool create_graph) {
  const auto v = values(w);
  auto g = torch::autograd::grad({loss}, v, {}, create_graph, create_graph, /*allow_unused=*/true);
  for (std::size_t i = 0; i < g.size(); ++i)
    if (!g[i].defined()) g[i] = at::zeros_like(v[i]);
  return g;
}

// Σ_b ∇θ L_b over the first n calibration batches.
inline std::vector<at::Tensor> gradient_sum(const Weights& w, const Calibration& c, std::int64_t n) {
  std::vector<at::Tensor> sum;
  for (std::int64_t b = 0; b < n; ++b) {
    const auto g = gradient(w, c.loss(b), false);
    if (sum.empty()) sum = g;
    else
      for (std::size_t i = 0; i < g.size(); ++i) sum[i].add_(g[i]);
  }
  return sum;
}

// SNIP (Lee et al. 2019): the loss's sensitivity to each connection, |θ ⊙ Σ_b ∇θ L_b|.
inline std::vector<at::Tensor> snip(const Weights& w, const Calibration& c, std::int64_t n) {
  auto g = gradient_sum(w, c, n);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = (w[i]->kept.detach() * g[i]).abs();
  return g;
}

// GraSP (Wang et al. 2020): θ ⊙ H g with g = Σ_b ∇θ L_b and H g = Σ_b ∇θ (gᵀ ∇θ L_b), a
// Hessian-gradient product by double backward; the lowest scores are pruned (removing them
// reduces the gradient flow least).
inline std::vector<at::Tensor> grasp(const Weights& w, const Calibration& c, std::int64_t n, ModelView& model, const Owner& owner) {
  // torch's fused attention kernels have no second derivative (on the CPU: "derivative for
  // _scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). An identity
  // score hook sends every attention through its plain product-softmax-product path, which
  // has one; the hooks go (the owner holds nothing else at attention sites) however it ends.
  struct PlainAttention {
    std::vector<AttentionSite*> sites;
    const Owner& owner;
    ~PlainAttention() {
      for (auto* a : sites) a->remove(owner);
    }
  } plain{model.attention_sites(), owner};
  for (auto* a : plain.sites) a->add_score_hook(owner, [](const at::Tensor& scores) { return scores; });
  const auto g = gradient_sum(w, c, n);
  const auto v = values(w);
  std::vector<at::Tensor> hg;
  for (const auto& t : v) hg.push_back(at::zeros_like(t));
  for (std::int64_t b = 0; b < n; ++b) {
    const auto grads = gradient(w, c.loss(b), true);  // ∇θ L_b with its graph
    at::Tensor z = at::zeros({}, v.front().options());
    for (std::size_t i = 0; i < v.size(); ++i) z = z + (g[i] * grads[i]).sum();
    if (!z.requires_grad()) continue;  // this batch reaches no pruned weight
    const auto h = gradient(w, z, false);
    for (std::size_t i = 0; i < v.size(); ++i) hg[i].add_(h[i]);
  }
  for (std::size_t i = 0; i < v.size(); ++i) hg[i] = v[i].detach() * hg[i];
  return hg;
}

}  // namespace detail

// The one-shot pruning of `w` (in a fixed order): every entry scored as at initialisation by
// `pruner` ("snip", "grasp", "magnitude", "random"; the first two over `batches` calibration
// batches), then exactly ⌈s·N⌉ of all N entries pruned — the lowest scores, ties broken by
// position — and each mask fixed. Refuses scores that cannot choose (not finite, or all 0:
// `silent` names what starts so), naming `who`.
inline void prune(const Weights& w, const std::string& pruner, double sparsity, std::int64_t batches, const Calibration& c, ModelView& model,
                  const Owner& owner, const std::string& who, const std::string& silent) {
  for (const auto& s : w) s->keep(at::ones_like(s->mask));  // score every entry, as at initialisation
  std::vector<at::Tensor> scores;
  if (pruner == "magnitude" || pruner == "random") {
    for (const auto& s : w) scores.push_back(pruner == "magnitude" ? s->kept.detach().abs() : at::rand_like(s->kept));
  } else {
    const auto n = std::min(batches, c.batches);
    if (n <= 0) throw std::runtime_error(who + "'s " + pruner + " scores need calibration batches, and the host offers none");
    scores = pruner == "snip" ? detail::snip(w, c, n) : detail::grasp(w, c, n, model, owner);
  }
  const at::Tensor all = at::cat(scores);
  if (!at::isfinite(all).all().item<bool>()) throw std::runtime_error("the " + pruner + " scores are not finite (a calibration loss overflowed): no mask chosen");
  if (pruner != "random" && all.abs().max().item<double>() == 0.0)
    throw std::runtime_error("every " + pruner + " score is 0 (" + silent + "): no mask to choose");
  const auto N = all.numel();
  const auto pruned = std::min<std::int64_t>(N - 1, static_cast<std::int64_t>(std::ceil(sparsity * static_cast<double>(N) - 1e-9)));
  at::Tensor keep = at::ones({N}, at::kBool);
  keep.index_fill_(0, std::get<1>(all.sort(/*stable=*/true, 0, false)).slice(0, 0, pruned), false);
  std::int64_t offset = 0;
  for (const auto& s : w) {
    const auto size = s->dense.numel();
    s->keep(keep.slice(0, offset, offset + size).view(s->dense.sizes()));
    offset += size;
  }
}

}  // namespace tessera::prune_at_init
