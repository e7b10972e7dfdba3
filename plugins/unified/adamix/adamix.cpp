// AdaMix (Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model
// Tuning", arXiv:2205.12410), its adapter form as the authors' code runs it: after every
// feed-forward block a bottleneck adapter whose down-projection is a mixture of M experts (the
// up-projection shared), one expert drawn at random per call in training (stochastic routing,
// no router), a consistency regulariser between two routings, and at inference the experts'
// weights averaged into one adapter (adaptation merging). The math and every key: README.md.
//
//   training:   h' = h + U_j(act(D_i h)),   i, j ~ U{1..M} per layer and forward pass
//   inference:  h' = h + Ū(act(D̄ h)),      D̄ = (1/M) Σ D_i (weights and biases), Ū likewise
//   loss:       L(z₁) + w · ½ [KL(sg p₁ ‖ p₂) + KL(sg p₂ ‖ p₁)]    p = softmax(z), z₁ the step's pass, z₂ one more
//
// The placement and wiring are AdapterHub's (../../additive/adapterhub_bn.h).
#include "../../additive/adapterhub_bn.h"
#include "../adamix_consistency.h"

#include <tessera/extensions.h>
#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <map>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

// The authors' placement: after the feed-forward block, on its output h, residual h (Houlsby's
// wiring there), GELU, BERT's init for every expert; r = H / 16 (48 on BERT-base, theirs).
const std::map<std::string, Preset>& adamix_presets() {
  static const std::map<std::string, Preset> p = {
      {"adamix", {false, false, 16, 1.0, "gelu", "bert", "fixed", {"mlp"}}},
  };
  return p;
}

class AdaMix final : public tessera::adapterhub_bn::Wiring {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    std::vector<tessera::ParamSpec> keys = {
        {"config", ParamType::String, std::string("adamix"), "the placement: adamix (after the feed-forward block, as the authors')", std::nullopt, std::nullopt,
         {"adamix"}},
        {"num_experts", ParamType::Int, std::int64_t{4}, "M: experts per mixture", 1, 64, {}},
        {"share_up", ParamType::Bool, true, "one up-projection for all experts (the authors' setting)", std::nullopt, std::nullopt, {}},
        {"share_down", ParamType::Bool, false, "one down-projection for all experts", std::nullopt, std::nullopt, {}},
        {"consistency_weight", ParamType::Float, 1.0,
         "w: the symmetric KL between two routings' predicted distributions, added to the loss (0: none, and no extra passes)", 0.0, std::nullopt, {}},
    };
    for (auto& k : wiring_keys()) keys.push_back(std::move(k));
    return {keys};
  }

  void attach(tessera::AttachContext& ctx) override {
    training_ = tessera::host_extension<tessera_host_training_v2>(ctx.model, TESSERA_EXT_HOST_TRAINING, 2);
    Wiring::attach(ctx);
  }

  // The consistency regulariser, as the authors run it (../adamix_consistency.h).
  Tensor extra_loss() override {
    if (weight_ == 0.0 || !model_->training() || (!mixed_down_ && !mixed_up_)) return {};
    return tessera::adamix::consistency(training_, weight_);
  }

  // Not AdapterHub's layout: a mixture per projection.
  std::string adapter_config_json() const override {
    return own_layout_config("adamix", {{"num_experts", experts_}, {"share_up", !mixed_up_}, {"share_down", !mixed_down_}, {"consistency_weight", weight_},
                                        {"non_linearity", act_}, {"inference", "the experts' weights averaged"}});
  }

 protected:
  const std::map<std::string, Preset>& presets() const override { return adamix_presets(); }
  const char* kind() const override { return "AdaMix adapter"; }

  void read_projections(const tessera::Params& p, std::int64_t) override {
    experts_ = p.integer("num_experts");
    mixed_up_ = !p.flag("share_up") && experts_ > 1;
    mixed_down_ = !p.flag("share_down") && experts_ > 1;
    weight_ = p.number("consistency_weight");
  }

  // experts.<i>.weight (out, in) and experts.<i>.bias (out), each drawn on its own (BERT's init),
  // or one expert where the side is shared.
  NamedTensors make(std::int64_t in, std::int64_t out, const std::string& position) override {
    const bool mixed = position == "down" ? mixed_down_ : mixed_up_;
    NamedTensors p;
    for (std::int64_t i = 0; i < (mixed ? experts_ : 1); ++i)
      for (auto& [n, t] : tessera::adapterhub_bn::dense_projection(in, out, position, init_, model_->info().param_options))
        p["experts." + std::to_string(i) + "." + n] = t.set_requires_grad(true);
    return p;
  }

  // Training: one expert drawn uniformly per call; otherwise the experts' mean weight and bias.
  tessera::adapterhub_bn::Projection project(const NamedTensors& p, const std::string&, c10::ScalarType dtype) const override {
    std::vector<Tensor> w, b;
    for (std::size_t i = 0; p.count("experts." + std::to_string(i) + ".weight"); ++i) {
      w.push_back(p.at("experts." + std::to_string(i) + ".weight"));
      b.push_back(p.at("experts." + std::to_string(i) + ".bias"));
    }
    tessera::ModelView* model = model_;
    return [=](const Tensor& x) {
      if (w.size() == 1) return at::linear(x, w[0].to(dtype), b[0].to(dtype));
      if (model->training()) {
        const auto i = at::randint(static_cast<std::int64_t>(w.size()), {1}, at::kLong).item<std::int64_t>();
        return at::linear(x, w[i].to(dtype), b[i].to(dtype));
      }
      return at::linear(x, at::stack(w).mean(0).to(dtype), at::stack(b).mean(0).to(dtype));
    };
  }

 private:
  const tessera_host_training_v2* training_ = nullptr;
  std::int64_t experts_ = 4;
  bool mixed_up_ = false, mixed_down_ = true;
  double weight_ = 1.0;
};

}  // namespace

TESSERA_PLUGIN(AdaMix, "adamix", "1.0.0", "unified",
               "AdaMix: a mixture of adapter experts with stochastic routing in training, a consistency regulariser between routings, and the experts averaged into one adapter at inference",
               "Wang et al. 2022, arXiv:2205.12410")
