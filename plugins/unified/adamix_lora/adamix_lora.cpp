// AdaMix-LoRA (Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model
// Tuning", arXiv:2205.12410), the LoRA form as the authors' code runs it: at every targeted
// linear site a LoRA whose A is a mixture of M experts (B one shared expert, as theirs), one
// expert of each mixture drawn at random per site and forward pass in training (stochastic
// routing, no router), the consistency regulariser between two routings, and at inference the
// experts averaged — A's and B's each — into one LoRA. The math and every key: README.md.
//
//   training:   y = W x + b + s · B_j A_i drop(x)     i, j ~ U{1..M} per site and pass
//   inference:  y = W x + b + s · B̄ Ā x               Ā = (1/M) Σ A_i, B̄ likewise; merge folds s·B̄Ā
//   loss:       L(z₁) + w · ½ [KL(sg p₁ ‖ p₂) + KL(sg p₂ ‖ p₁)]   (../adamix_consistency.h)
#include "../adamix_consistency.h"

#include <tessera/dropout.h>
#include <tessera/extensions.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace {

using tessera::Tensor;

struct Site {
  tessera::LinearSite* site;
  std::vector<Tensor> A;  // experts (r, in): M, or one when shared
  std::vector<Tensor> B;  // experts (out, r)
  Tensor folded;          // while merged
};

class AdaMixLoRA final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{4}, "rank of every expert (the authors' 4)", 1, 65536, {}},
        {"lora_alpha", ParamType::Float, 32.0, "the update's scale is lora_alpha / r (the authors' 32 / 4)", 1e-6, 1e9, {}},
        {"lora_dropout", ParamType::Float, 0.1, "dropout on the branch's input, training only (the authors' 0.1)", 0, 0.999, {}},
        {"num_experts", ParamType::Int, std::int64_t{8}, "M: experts per mixture (the authors' 8)", 1, 64, {}},
        {"share_A", ParamType::Bool, false, "one A for all experts", std::nullopt, std::nullopt, {}},
        {"share_B", ParamType::Bool, true, "one B for all experts (the authors' setting)", std::nullopt, std::nullopt, {}},
        {"consistency_weight", ParamType::Float, 1.0,
         "w: the symmetric KL between two routings' predicted distributions, added to the loss (0: none, and no extra pass)", 0.0, std::nullopt, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    training_ = tessera::host_extension<tessera_host_training_v2>(ctx.model, TESSERA_EXT_HOST_TRAINING, 2);
    const auto& p = ctx.params;
    r_ = p.integer("r");
    scaling_ = p.number("lora_alpha") / static_cast<double>(r_);
    dropout_ = p.number("lora_dropout");
    experts_ = p.integer("num_experts");
    weight_ = p.number("consistency_weight");
    const auto a_count = p.flag("share_A") ? 1 : experts_, b_count = p.flag("share_B") ? 1 : experts_;
    mixed_ = a_count > 1 || b_count > 1;
    // The authors' places by default: every layer's query and value.
    auto sites = ctx.model.match_linear(ctx.targets.empty() ? std::vector<std::string>{"attn.q", "attn.v"} : ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    for (auto* s : sites) {
      // As the authors' deepcopy of one LoRA: every A expert starts as the same Kaiming-uniform
      // draw (nn.Linear's, U(±1/√in)), every B as zeros; routing and training set them apart.
      const double bound = 1.0 / std::sqrt(static_cast<double>(s->in_features()));
      const Tensor a0 = at::empty({r_, s->in_features()}, opts).uniform_(-bound, bound);
      Site site{s, {}, {}, {}};
      for (std::int64_t i = 0; i < a_count; ++i) site.A.push_back(a0.clone().set_requires_grad(true));
      for (std::int64_t j = 0; j < b_count; ++j) site.B.push_back(at::zeros({s->out_features(), r_}, opts).set_requires_grad(true));
      sites_.push_back(std::move(site));
    }
    install();
  }

  Tensor extra_loss() override {
    if (weight_ == 0.0 || !model_->training() || !mixed_) return {};
    return tessera::adamix::consistency(training_, weight_);
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& s : sites_) {
      s.site->remove(*owner_);
      s.folded = (scaling_ * at::matmul(mean(s.B), mean(s.A))).to(s.site->weight().base().scalar_type());
      s.site->weight().fold(s.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& s : sites_) s.site->weight().fold(-s.folded), s.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override { return state(); }

  // <HF path>.experts_lora_A.<i> and .experts_lora_B.<j> (the authors' names).
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& s : sites_) {
      for (std::size_t i = 0; i < s.A.size(); ++i) out[s.site->hf_path() + ".experts_lora_A." + std::to_string(i)] = s.A[i];
      for (std::size_t j = 0; j < s.B.size(); ++j) out[s.site->hf_path() + ".experts_lora_B." + std::to_string(j)] = s.B[j];
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    tessera::load_exact(state(), tensors, "this AdaMix-LoRA", "its rank, experts and targets");
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& s : sites_) targets.push_back(s.site->hf_path());
    return nlohmann::json{{"tessera",
                           {{"adamix_lora",
                             {{"r", r_}, {"scaling", scaling_}, {"num_experts", experts_}, {"lora_dropout", dropout_}, {"consistency_weight", weight_},
                              {"inference", "the experts' A and B averaged"}}}}},
                          {"target_modules", targets}}
        .dump(2);
  }

 private:
  static Tensor mean(const std::vector<Tensor>& experts) { return experts.size() == 1 ? experts[0] : at::stack(experts).mean(0); }

  // One expert drawn uniformly per call in training; the experts' mean otherwise.
  Tensor pick(const std::vector<Tensor>& experts) const {
    if (experts.size() == 1 || !model_->training()) return mean(experts);
    return experts[at::randint(static_cast<std::int64_t>(experts.size()), {1}, at::kLong).item<std::int64_t>()];
  }

  void install() {
    for (auto& s : sites_) {
      const Site* sp = &s;  // sites_ does not grow after attach
      s.site->add_branch(*owner_, [this, sp](const Tensor& x) {  // (..., in) -> (..., out)
        const Tensor a = pick(sp->A), b = pick(sp->B);
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        return tessera::low_rank(h, a, b, scaling_);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  const tessera_host_training_v2* training_ = nullptr;
  std::int64_t r_ = 4, experts_ = 8;
  double scaling_ = 8.0, dropout_ = 0.1, weight_ = 1.0;
  bool mixed_ = true, merged_ = false;
  std::vector<Site> sites_;
};

}  // namespace

TESSERA_PLUGIN(AdaMixLoRA, "adamix_lora", "1.0.0", "unified",
               "AdaMix-LoRA: a mixture of LoRA experts with stochastic routing in training, a consistency regulariser between routings, and the experts averaged into one LoRA at inference",
               "Wang et al. 2022, arXiv:2205.12410")
