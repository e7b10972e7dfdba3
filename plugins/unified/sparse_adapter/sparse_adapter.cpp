// SparseAdapter (He, Ding, Dong, Zhang and Tao 2022, "SparseAdapter: An Easy Approach for
// Improving the Parameter-Efficiency of Adapters", arXiv:2210.04284): bottleneck adapters
// pruned once at initialisation, before the first step, to a target sparsity by a
// pruning-at-initialisation score (SNIP, GraSP, magnitude or random), one global threshold
// over every adapter weight of the model; then trained with the mask fixed. The math and
// every key: README.md beside this.
//
//   score:  SNIP |θ ⊙ Σ_b ∇θ L_b|,  GraSP θ ⊙ (Σ_b H_b) g with g = Σ_b ∇θ L_b,  magnitude |θ|
//   M = 0 on the ⌈s·N⌉ lowest scores of all N adapter weights, 1 elsewhere
//   y = x (W ⊙ M)ᵀ + b      only the kept entries of W train (and are counted as trainable)
//
// The adapter's placement and wiring are AdapterHub's (../../additive/adapterhub_bn.h): its
// files load in `adapters` as a dense bottleneck adapter whose pruned weights are 0.
#include "../../additive/adapterhub_bn.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <map>
#include <memory>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

// One pruned weight: what trains is `kept`, its entries at the flat indices `index`.
struct Sparse {
  Tensor dense;   // (out, in): the weight as saved, 0 where pruned; refreshed from `kept`
  Tensor mask;    // (out, in) uint8: 1 where kept
  Tensor index;   // (k) int64: flat indices of the kept entries
  Tensor kept;    // (k): the trained values
  // (out, in) from the trained values, differentiable in them.
  Tensor weight() const { return at::zeros({dense.numel()}, kept.options()).scatter(0, index, kept).view(dense.sizes()); }
  void keep(const Tensor& m) {  // m: (out, in) bool or 0/1
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

class SparseAdapter final : public tessera::adapterhub_bn::Wiring {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    std::vector<tessera::ParamSpec> keys = tessera::adapterhub_bn::bottleneck_preset_keys();
    keys.push_back({"sparsity", ParamType::Float, 0.4, "s: the share of adapter weights pruned at initialisation (the paper's recommended 40%)", 0.0, 0.99, {}});
    keys.push_back({"pruner", ParamType::String, std::string("snip"),
                    "the score: snip |θ ⊙ ∇θL|, grasp θ ⊙ Hg (lowest pruned), magnitude |θ|, random", std::nullopt, std::nullopt,
                    {"snip", "grasp", "magnitude", "random"}});
    keys.push_back({"prune_batches", ParamType::Int, std::int64_t{10}, "calibration batches the SNIP and GraSP scores sum over (the authors': 320 examples)", 1, std::nullopt, {}});
    for (auto& k : wiring_keys()) keys.push_back(std::move(k));
    return {keys};
  }

  // Only the kept entries of each weight train; biases and a learned scale as ever.
  NamedTensors trainable() override {
    NamedTensors out = Wiring::trainable();
    for (const auto& [k, t] : Wiring::state())
      if (const auto it = sparse_.find(t.unsafeGetTensorImpl()); it != sparse_.end()) out[k] = it->second->kept;
    return out;
  }

  // AdapterHub's keys with each weight 0 where pruned, and its mask beside it as `<key>_mask`
  // (uint8), which AdapterHub's loader passes over.
  NamedTensors state() override {
    NamedTensors out = Wiring::state();
    for (const auto& [k, t] : NamedTensors(out))
      if (const auto it = sparse_.find(t.unsafeGetTensorImpl()); it != sparse_.end()) {
        it->second->refresh();
        out[k + "_mask"] = it->second->mask;
      }
    return out;
  }

  void load_state(const NamedTensors& tensors) override {
    for (const auto& [k, t] : tensors)
      if (k.size() > 5 && k.compare(k.size() - 5, 5, "_mask") == 0 && !(t.eq(0) | t.eq(1)).all().item<bool>())
        throw std::runtime_error("tensor '" + k + "' is not a mask: it holds values other than 0 and 1");
    Wiring::load_state(tensors);  // into each weight's dense copy and its mask
    for (auto& [impl, s] : sparse_) s->keep(s->mask.clone());
  }

  // The one-shot pruning: scores over every adapter weight from the calibration batches (the
  // model in evaluation mode), one global threshold, the masks fixed from here on.
  void prepare(const tessera::Calibration& c) override {
    for (auto& [impl, s] : sparse_) s->keep(at::ones_like(s->mask));  // score every entry, as at initialisation
    std::vector<Tensor> scores;
    if (pruner_ == "magnitude" || pruner_ == "random") {
      for (const auto& s : order_) scores.push_back(pruner_ == "magnitude" ? s->kept.detach().abs() : at::rand_like(s->kept));
    } else {
      const auto n = std::min(batches_, c.batches);
      if (n <= 0) throw std::runtime_error("SparseAdapter's " + pruner_ + " scores need calibration batches, and the host offers none");
      scores = pruner_ == "snip" ? snip(c, n) : grasp(c, n);
    }
    const Tensor all = at::cat(scores);
    if (!at::isfinite(all).all().item<bool>()) throw std::runtime_error("the " + pruner_ + " scores are not finite (a calibration loss overflowed): no mask chosen");
    if (pruner_ != "random" && all.abs().max().item<double>() == 0.0)
      throw std::runtime_error("every " + pruner_ + " score is 0 (an adapter that starts silent, such as init_weights = \"mam_adapter\"): no mask to choose");
    // Exactly ⌈s·N⌉ pruned: the lowest scores, ties broken by position (a stable sort).
    const auto N = all.numel();
    const auto pruned = std::min<std::int64_t>(N - 1, static_cast<std::int64_t>(std::ceil(sparsity_ * static_cast<double>(N) - 1e-9)));
    Tensor keep = at::ones({N}, at::kBool);
    keep.index_fill_(0, std::get<1>(all.sort(/*stable=*/true, 0, false)).slice(0, 0, pruned), false);
    std::int64_t offset = 0;
    for (const auto& s : order_) {
      const auto size = s->dense.numel();
      s->keep(keep.slice(0, offset, offset + size).view(s->dense.sizes()));
      offset += size;
    }
  }

  std::string adapter_config_json() const override {
    auto j = nlohmann::json::parse(Wiring::adapter_config_json());
    std::int64_t kept = 0, total = 0;
    for (const auto& s : order_) kept += s->index.numel(), total += s->dense.numel();
    j["tessera"]["sparse_adapter"] = {{"sparsity", sparsity_}, {"pruner", pruner_}, {"kept_weights", kept}, {"adapter_weights", total}};
    return j.dump(2);
  }

 protected:
  const std::map<std::string, Preset>& presets() const override { return tessera::adapterhub_bn::bottleneck_presets(); }
  const char* kind() const override { return "sparse adapter"; }

  // A score that reads the weights cannot prune an adapter whose up-projection starts at 0:
  // every SNIP and GraSP score is 0 and magnitude would prune that projection first.
  void validate_projections(const tessera::Params& p) const override {
    const std::string init = p.text("init_weights").empty() ? presets().at(p.text("config")).init : p.text("init_weights");
    if (init == "mam_adapter" && p.text("pruner") != "random")
      throw tessera::ParamError("init_weights", "the " + p.text("pruner") + " pruner cannot score an adapter that starts silent (mam_adapter's up-projection is 0): set init_weights = \"bert\" or \"houlsby\"");
  }

  void read_projections(const tessera::Params& p, std::int64_t) override {
    if (!p.text("init_weights").empty()) init_ = p.text("init_weights");
    sparsity_ = p.number("sparsity");
    pruner_ = p.text("pruner");
    batches_ = p.integer("prune_batches");
  }

  NamedTensors make(std::int64_t in, std::int64_t out, const std::string& position) override {
    auto p = tessera::adapterhub_bn::dense_projection(in, out, position, init_, model_->info().param_options);
    auto s = std::make_shared<Sparse>();
    s->dense = p.at("weight");
    s->keep(at::ones({out, in}, at::kByte));
    sparse_[s->dense.unsafeGetTensorImpl()] = s;
    order_.push_back(s);
    p.at("bias").set_requires_grad(true);
    return p;
  }

  // y = x (W ⊙ M)ᵀ + b, W ⊙ M rebuilt from the kept values at each call (they change at prepare()).
  tessera::adapterhub_bn::Projection project(const NamedTensors& p, const std::string&, c10::ScalarType dtype) const override {
    const std::shared_ptr<Sparse> s = sparse_.at(p.at("weight").unsafeGetTensorImpl());
    const Tensor b = p.at("bias");
    return [=](const Tensor& x) { return at::linear(x, s->weight().to(dtype), b.to(dtype)); };
  }

 private:
  std::vector<Tensor> values() const {
    std::vector<Tensor> v;
    for (const auto& s : order_) v.push_back(s->kept);
    return v;
  }

  // ∇θ L for the adapter weights alone (no other tensor's .grad is touched); 0 for a weight the
  // loss does not reach.
  std::vector<Tensor> gradient(const Tensor& loss, bool create_graph) const {
    const auto v = values();
    auto g = torch::autograd::grad({loss}, v, {}, create_graph, create_graph, /*allow_unused=*/true);
    for (std::size_t i = 0; i < g.size(); ++i)
      if (!g[i].defined()) g[i] = at::zeros_like(v[i]);
    return g;
  }

  // Σ_b ∇θ L_b over the first n calibration batches.
  std::vector<Tensor> gradient_sum(const tessera::Calibration& c, std::int64_t n) const {
    std::vector<Tensor> sum;
    for (std::int64_t b = 0; b < n; ++b) {
      const auto g = gradient(c.loss(b), false);
      if (sum.empty()) sum = g;
      else
        for (std::size_t i = 0; i < g.size(); ++i) sum[i].add_(g[i]);
    }
    return sum;
  }

  // SNIP (Lee et al. 2019): the loss's sensitivity to each connection, |θ ⊙ Σ_b ∇θ L_b|.
  std::vector<Tensor> snip(const tessera::Calibration& c, std::int64_t n) const {
    auto g = gradient_sum(c, n);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = (order_[i]->kept.detach() * g[i]).abs();
    return g;
  }

  // GraSP (Wang et al. 2020): θ ⊙ H g with g = Σ_b ∇θ L_b and H g = Σ_b ∇θ (gᵀ ∇θ L_b), a
  // Hessian-gradient product by double backward; the lowest scores are pruned (removing them
  // reduces the gradient flow least).
  std::vector<Tensor> grasp(const tessera::Calibration& c, std::int64_t n) const {
    // torch's fused attention kernels have no second derivative (on the CPU: "derivative for
    // _scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). An identity
    // score hook sends every attention through its plain product-softmax-product path, which
    // has one; the hooks go (this owner holds nothing else at attention sites) however it ends.
    struct PlainAttention {
      std::vector<tessera::AttentionSite*> sites;
      const tessera::Owner& owner;
      ~PlainAttention() {
        for (auto* a : sites) a->remove(owner);
      }
    } plain{model_->attention_sites(), *owner_};
    for (auto* a : plain.sites) a->add_score_hook(*owner_, [](const Tensor& scores) { return scores; });
    const auto g = gradient_sum(c, n);
    const auto v = values();
    std::vector<Tensor> hg;
    for (const auto& t : v) hg.push_back(at::zeros_like(t));
    for (std::int64_t b = 0; b < n; ++b) {
      const auto grads = gradient(c.loss(b), true);  // ∇θ L_b with its graph
      Tensor z = at::zeros({}, v.front().options());
      for (std::size_t i = 0; i < v.size(); ++i) z = z + (g[i] * grads[i]).sum();
      if (!z.requires_grad()) continue;  // this batch reaches no adapter weight
      const auto h = gradient(z, false);
      for (std::size_t i = 0; i < v.size(); ++i) hg[i].add_(h[i]);
    }
    for (std::size_t i = 0; i < v.size(); ++i) hg[i] = v[i].detach() * hg[i];
    return hg;
  }

  double sparsity_ = 0.4;
  std::string pruner_;
  std::int64_t batches_ = 10;
  std::map<const c10::TensorImpl*, std::shared_ptr<Sparse>> sparse_;  // by each weight's dense copy
  std::vector<std::shared_ptr<Sparse>> order_;                        // in the order the weights were made
};

}  // namespace

TESSERA_PLUGIN(SparseAdapter, "sparse_adapter", "1.0.0", "unified",
               "SparseAdapter: bottleneck adapters pruned at initialisation (SNIP, GraSP, magnitude or random) to a target sparsity, trained with the mask fixed",
               "He et al. 2022, arXiv:2210.04284")
