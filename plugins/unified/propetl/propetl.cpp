// ProPETL (Zeng, Zhang and Lu 2023, "One Network, Many Masks: Towards More Parameter-Efficient
// Transfer Learning", arXiv:2305.17682), its adapter form as the authors' code runs it: one
// prototype adapter shared by every layer, and per layer a binary mask over the prototype's
// weights, learned through real-valued scores (top-k of their magnitudes, straight-through
// gradient). The math and every key: README.md beside this.
//
//   layer l:   W_l = W ⊙ M_l,   M_l = top_k(|S_l|)     (k = keep · numel, per matrix)
//   backward:  ∂L/∂S_l = ∂L/∂W_l ⊙ W ⊙ sign(S_l)       (M_l passed straight through)
//   adapter:   Pfeiffer's wiring after the feed-forward block; biases shared, never masked
//
// The placement and wiring are AdapterHub's (../../additive/adapterhub_bn.h).
#include "../../additive/adapterhub_bn.h"
#include "../propetl_mask.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <map>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

class ProPETL final : public tessera::adapterhub_bn::Wiring {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    std::vector<tessera::ParamSpec> keys = tessera::adapterhub_bn::bottleneck_preset_keys();
    keys.push_back({"keep", ParamType::Float, 0.5, "the share of the prototype's weights each layer's mask keeps (the authors' 0.5)", 0.01, 1.0, {}});
    keys.push_back({"mask_lr_ratio", ParamType::Float, 10.0,
                    "the mask scores' learning rate over the run's (the authors': 10 on T5, 3e-3 / 1e-4 = 30 on RoBERTa)", 1e-3, 1e3, {}});
    for (auto& k : wiring_keys()) keys.push_back(std::move(k));
    return {keys};
  }

  // Not AdapterHub's layout: one shared adapter, masks per layer.
  std::string adapter_config_json() const override {
    return own_layout_config("propetl", {{"keep", keep_}, {"mask_lr_ratio", ratio_}, {"non_linearity", act_}, {"init_weights", init_}});
  }

 protected:
  const std::map<std::string, Preset>& presets() const override { return tessera::adapterhub_bn::bottleneck_presets(); }
  const char* kind() const override { return "ProPETL adapter"; }

  // The prototype: one adapter's weights and biases, drawn once, shared by every layer.
  void read_projections(const tessera::Params& p, std::int64_t H) override {
    if (!p.text("init_weights").empty()) init_ = p.text("init_weights");
    keep_ = p.number("keep");
    ratio_ = p.number("mask_lr_ratio");
    prototype_.clear();
    for (const auto& [position, in, out] : {std::tuple<const char*, std::int64_t, std::int64_t>{"down", H, r_}, {"up", r_, H}})
      for (auto& [n, t] : tessera::adapterhub_bn::dense_projection(in, out, position, init_, model_->info().param_options))
        prototype_[std::string("adapter_") + position + "." + n] = t.set_requires_grad(true);
  }

  // A layer's own tensors: the mask scores of one projection, (out, in) as its weight, each layer
  // drawn on its own, u = S / ratio as ../propetl_mask.h draws it.
  NamedTensors make(std::int64_t in, std::int64_t out, const std::string&) override {
    return {{"mask_scores", tessera::propetl::draw_scores({out, in}, static_cast<double>(in), ratio_, model_->info().param_options)}};
  }

  // y = x (W ⊙ M)ᵀ + b with M the top-k of |S|, passed straight through to S.
  tessera::adapterhub_bn::Projection project(const NamedTensors& own, const std::string& position, c10::ScalarType dtype) const override {
    const Tensor u = own.at("mask_scores"), w = prototype_.at("adapter_" + position + ".weight"), b = prototype_.at("adapter_" + position + ".bias");
    const double keep = keep_;
    return [=](const Tensor& x) { return at::linear(x, (w * tessera::propetl::topk_mask(u, keep)).to(dtype), b.to(dtype)); };
  }

  NamedTensors shared() const override { return prototype_; }

 private:
  double keep_ = 0.5, ratio_ = 10.0;
  NamedTensors prototype_;
};

}  // namespace

TESSERA_PLUGIN(ProPETL, "propetl", "1.0.0", "unified",
               "ProPETL: one prototype adapter shared by every layer, each layer a learned binary mask over its weights",
               "Zeng, Zhang and Lu 2023, arXiv:2305.17682")
