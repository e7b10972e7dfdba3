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
#include "../prune_at_init.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <memory>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

using tessera::prune_at_init::Sparse;

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
    tessera::prune_at_init::prune(order_, pruner_, sparsity_, batches_, c, *model_, *owner_, "SparseAdapter",
                                  "an adapter that starts silent, such as init_weights = \"mam_adapter\"");
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
