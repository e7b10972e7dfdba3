// ProPETL-LoRA (Zeng, Zhang and Lu 2023, "One Network, Many Masks: Towards More Parameter-Efficient
// Transfer Learning", arXiv:2305.17682), the LoRA form as the authors' code runs it: one
// prototype LoRA (A, B) per targeted module (one for every layer's query, one for every
// layer's value), and per layer a binary mask over each of A and B, learned through real-valued
// scores (top-k of their magnitudes, straight-through gradient). The math and every key:
// README.md beside this.
//
//   site l of module m:  y = W x + b + s · (B_m ⊙ M_B,l)(A_m ⊙ M_A,l) drop(x),   s = lora_alpha / r
//   M = 1 on the k largest |S| of its matrix,  k = n − ⌊(1 − keep)·n⌋
//   backward:  ∂L/∂S_l = ∂L/∂(A ⊙ M_l) ⊙ A ⊙ sign(S_l)   (M passed straight through; B likewise)
#include "../propetl_mask.h"

#include <tessera/dropout.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <regex>

namespace {

using tessera::Tensor;

// A site's own tensors: the scores of its masks over the prototype's A and B (kept as S / ratio).
struct Layer {
  tessera::LinearSite* site;
  std::string module;  // the prototype it masks: the site's name without its layer ("attn.q")
  Tensor score_a;      // (r, in)
  Tensor score_b;      // (out, r)
  Tensor folded;       // while merged
};

struct Prototype {
  Tensor A;  // (r, in), Kaiming-uniform as nn.Linear's (the authors' "lora" init)
  Tensor B;  // (out, r), zeros
};

class ProPETLLoRA final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{32}, "rank of the prototype LoRA (the authors' 32)", 1, 65536, {}},
        {"lora_alpha", ParamType::Float, 48.0, "the update's scale is lora_alpha / r (the authors' 48 / 32)", 1e-6, 1e9, {}},
        {"lora_dropout", ParamType::Float, 0.0, "dropout on the branch's input, training only (the authors' 0)", 0, 0.999, {}},
        {"keep", ParamType::Float, 0.1, "the share of each prototype matrix a layer's mask keeps (the authors' 0.1 for LoRA)", 0.01, 1.0, {}},
        {"mask_lr_ratio", ParamType::Float, 300.0, "the mask scores' learning rate over the prototype's (the authors': 3e-2 / 1e-4)", 1e-3, 1e4, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    r_ = ctx.params.integer("r");
    scaling_ = ctx.params.number("lora_alpha") / static_cast<double>(r_);
    dropout_ = ctx.params.number("lora_dropout");
    keep_ = ctx.params.number("keep");
    ratio_ = ctx.params.number("mask_lr_ratio");
    // The authors' places by default: every layer's query and value.
    auto sites = ctx.model.match_linear(ctx.targets.empty() ? std::vector<std::string>{"attn.q", "attn.v"} : ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    for (auto* s : sites) {
      const std::string module = module_of(s->name());
      auto [it, made] = prototypes_.try_emplace(module);
      if (made) {
        it->second = {uniform({r_, s->in_features()}, 1.0 / std::sqrt(static_cast<double>(s->in_features())), opts), at::zeros({s->out_features(), r_}, opts)};
      } else if (it->second.A.size(1) != s->in_features() || it->second.B.size(0) != s->out_features()) {
        throw std::runtime_error("linear site " + s->name() + " is (" + std::to_string(s->out_features()) + ", " + std::to_string(s->in_features()) +
                                 "), not the shape of the other '" + module + "' sites that share its prototype");
      }
      // u = S / ratio as ../propetl_mask.h draws it (the authors' Kaiming-uniform S).
      Tensor score_a = tessera::propetl::draw_scores({r_, s->in_features()}, static_cast<double>(s->in_features()), ratio_, opts);
      Tensor score_b = tessera::propetl::draw_scores({s->out_features(), r_}, static_cast<double>(r_), ratio_, opts);
      layers_.push_back({s, module, score_a, score_b, {}});
    }
    for (auto& [_, p] : prototypes_) p.A.set_requires_grad(true), p.B.set_requires_grad(true);
    install();
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& l : layers_) {
      l.site->remove(*owner_);
      const auto [a, b] = masked(l);
      l.folded = (scaling_ * at::matmul(b, a)).to(l.site->weight().base().scalar_type());
      l.site->weight().fold(l.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& l : layers_) l.site->weight().fold(-l.folded), l.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override { return state(); }

  // prototype.<module>.lora_{A,B} once, and <site's HF path>.lora_{A,B}.mask_scores per site (u = S / ratio).
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& [m, p] : prototypes_) out["prototype." + m + ".lora_A"] = p.A, out["prototype." + m + ".lora_B"] = p.B;
    for (const auto& l : layers_) out[l.site->hf_path() + ".lora_A.mask_scores"] = l.score_a, out[l.site->hf_path() + ".lora_B.mask_scores"] = l.score_b;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    tessera::load_exact(state(), tensors, "this ProPETL-LoRA", "its rank and targets");
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& l : layers_) targets.push_back(l.site->hf_path());
    return nlohmann::json{{"tessera", {{"propetl_lora", {{"r", r_}, {"scaling", scaling_}, {"keep", keep_}, {"mask_lr_ratio", ratio_}, {"lora_dropout", dropout_}}}}},
                          {"target_modules", targets}}
        .dump(2);
  }

 private:
  // "layers.3.attn.q" -> "attn.q"; T5's "encoder.layers.3.attn.q" -> "encoder.attn.q".
  static std::string module_of(const std::string& site) { return std::regex_replace(site, std::regex(R"((^|\.)layers\.\d+\.)"), "$1"); }

  static Tensor uniform(at::IntArrayRef shape, double bound, const at::TensorOptions& opts) { return at::empty(shape, opts).uniform_(-bound, bound); }

  // The site's A ⊙ M_A and B ⊙ M_B.
  std::pair<Tensor, Tensor> masked(const Layer& l) const {
    const auto& p = prototypes_.at(l.module);
    return {p.A * tessera::propetl::topk_mask(l.score_a, keep_), p.B * tessera::propetl::topk_mask(l.score_b, keep_)};
  }

  void install() {
    for (auto& l : layers_) {
      const Layer* lp = &l;  // layers_ does not grow after attach
      l.site->add_branch(*owner_, [this, lp](const Tensor& x) {  // (..., in) -> (..., out)
        const auto [a, b] = masked(*lp);
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        return tessera::low_rank(h, a, b, scaling_);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  std::int64_t r_ = 32;
  double scaling_ = 1.5, dropout_ = 0.0, keep_ = 0.1, ratio_ = 300.0;
  std::map<std::string, Prototype> prototypes_;
  std::vector<Layer> layers_;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(ProPETLLoRA, "propetl_lora", "1.0.0", "unified",
               "ProPETL-LoRA: one prototype LoRA per module shared by every layer, each layer a learned binary mask over its A and B",
               "Zeng, Zhang and Lu 2023, arXiv:2305.17682")
