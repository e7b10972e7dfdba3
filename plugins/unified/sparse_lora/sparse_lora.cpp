// SparseAdapter's LoRA form (He, Ding, Dong, Zhang and Tao 2022, "SparseAdapter: An Easy
// Approach for Improving the Parameter-Efficiency of Adapters", arXiv:2210.04284, whose
// experiments include LoRA): LoRA factors pruned once at initialisation, before the first step,
// by a pruning-at-initialisation score (SNIP, magnitude or random) with one global
// threshold over every A and B entry of the instance, then trained with the masks fixed. The
// math and every key: README.md beside this.
//
//   y = W x + b + s · (B ⊙ M_B)(A ⊙ M_A) dropout(x),   s = lora_alpha / r
//   M = 0 on the ⌈s·N⌉ lowest scores of all N factor entries (../prune_at_init.h), 1 elsewhere
#include "../prune_at_init.h"

#include <tessera/dropout.h>
#include <tessera/low_rank.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <memory>

namespace {

using tessera::NamedTensors;
using tessera::Tensor;
using tessera::prune_at_init::Sparse;

struct Site {
  tessera::LinearSite* site;
  std::shared_ptr<Sparse> A;  // (r, in)
  std::shared_ptr<Sparse> B;  // (out, r)
  Tensor folded;              // while merged
};

class SparseLoRA final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{8}, "rank of A and B", 1, 65536, {}},
        {"lora_alpha", ParamType::Float, 16.0, "the update's scale is lora_alpha / r", 1e-6, 1e9, {}},
        {"lora_dropout", ParamType::Float, 0.0, "dropout on the branch's input, training only", 0, 0.999, {}},
        {"init", ParamType::String, std::string("bert"),
         "bert: A and B ~ N(0, 0.02) (the authors' code: a scored pruner needs both non-zero); lora: A Kaiming-uniform, B = 0 (random pruner only)",
         std::nullopt, std::nullopt, {"bert", "lora"}},
        {"sparsity", ParamType::Float, 0.4, "s: the share of factor entries pruned at initialisation (the paper's recommended 40%)", 0.0, 0.99, {}},
        // GraSP is not offered: its Hessian-gradient product needs second derivatives through the
        // LoRA product, and tessera::low_rank's own backward has none.
        {"pruner", ParamType::String, std::string("snip"), "the score: snip |θ ⊙ ∇θL|, magnitude |θ|, random", std::nullopt, std::nullopt,
         {"snip", "magnitude", "random"}},
        {"prune_batches", ParamType::Int, std::int64_t{10}, "calibration batches the SNIP and GraSP scores sum over (the authors': 320 examples)", 1,
         std::nullopt, {}},
    }};
  }

  // LoRA's own start (B = 0) leaves every SNIP and GraSP score of A at 0 and B's magnitudes at 0.
  void validate(const tessera::Params& p) const override {
    if (p.text("init") == "lora" && p.text("pruner") != "random")
      throw tessera::ParamError("init", "the " + p.text("pruner") + " pruner cannot score a LoRA that starts silent (init = \"lora\": B = 0): set init = \"bert\" or pruner = \"random\"");
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    model_ = &ctx.model;
    const auto& p = ctx.params;
    r_ = p.integer("r");
    scaling_ = p.number("lora_alpha") / static_cast<double>(r_);
    dropout_ = p.number("lora_dropout");
    sparsity_ = p.number("sparsity");
    pruner_ = p.text("pruner");
    batches_ = p.integer("prune_batches");
    init_ = p.text("init");
    // The authors' places by default: every layer's query and value.
    auto sites = ctx.model.match_linear(ctx.targets.empty() ? std::vector<std::string>{"attn.q", "attn.v"} : ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    for (auto* s : sites) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(s->in_features()));
      Tensor a = init_ == "bert" ? at::empty({r_, s->in_features()}, opts).normal_(0, 0.02) : at::empty({r_, s->in_features()}, opts).uniform_(-bound, bound);
      Tensor b = init_ == "bert" ? at::empty({s->out_features(), r_}, opts).normal_(0, 0.02) : at::zeros({s->out_features(), r_}, opts);
      sites_.push_back({s, sparse(a), sparse(b), {}});
      order_.push_back(sites_.back().A), order_.push_back(sites_.back().B);
    }
    install();
  }

  // The one-shot pruning (the model in evaluation mode, the trainer's first batches).
  void prepare(const tessera::Calibration& c) override {
    tessera::prune_at_init::prune(order_, pruner_, sparsity_, batches_, c, *model_, *owner_, "sparse_lora", "a LoRA that starts silent");
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& s : sites_) {
      s.site->remove(*owner_);
      s.folded = (scaling_ * at::matmul(s.B->weight(), s.A->weight())).to(s.site->weight().base().scalar_type());
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

  // Only the kept entries train (and count).
  NamedTensors trainable() override {
    NamedTensors out;
    for (const auto& s : sites_) out[s.site->name() + ".lora_A.kept"] = s.A->kept, out[s.site->name() + ".lora_B.kept"] = s.B->kept;
    return out;
  }

  // PEFT's keys for the factors, 0 where pruned, and each mask beside its factor as `<key>_mask` (uint8).
  NamedTensors state() override {
    for (const auto& w : order_) w->refresh();
    return state_views();
  }

  void load_state(const NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    for (const auto& [k, t] : tensors)
      if (k.size() > 5 && k.compare(k.size() - 5, 5, "_mask") == 0 && !(t.eq(0) | t.eq(1)).all().item<bool>())
        throw std::runtime_error("tensor '" + k + "' is not a mask: it holds values other than 0 and 1");
    tessera::load_exact(state_views(), tensors, "this sparse LoRA", "its rank and targets");
    for (auto& s : order_) s->keep(s->mask.clone());
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& s : sites_) targets.push_back(s.site->hf_path());
    std::int64_t kept = 0, total = 0;
    for (const auto& w : order_) kept += w->index.numel(), total += w->dense.numel();
    return nlohmann::json{{"tessera",
                           {{"sparse_lora",
                             {{"r", r_},
                              {"scaling", scaling_},
                              {"lora_dropout", dropout_},
                              {"init", init_},
                              {"sparsity", sparsity_},
                              {"pruner", pruner_},
                              {"kept_weights", kept},
                              {"factor_weights", total}}}}},
                          {"target_modules", targets}}
        .dump(2);
  }

 private:
  static std::shared_ptr<Sparse> sparse(const Tensor& dense) {
    auto s = std::make_shared<Sparse>();
    s->dense = dense;
    s->keep(at::ones(dense.sizes(), at::kByte));
    return s;
  }

  // state()'s keys over the live dense factors and masks, which load_exact writes into.
  NamedTensors state_views() const {
    NamedTensors out;
    for (const auto& s : sites_)
      for (const auto& [name, w] : {std::pair<const char*, const std::shared_ptr<Sparse>&>{"lora_A", s.A}, {"lora_B", s.B}}) {
        const std::string k = "base_model.model." + s.site->hf_path() + "." + name + ".weight";
        out[k] = w->dense, out[k + "_mask"] = w->mask;
      }
    return out;
  }

  void install() {
    for (auto& s : sites_) {
      s.site->add_branch(*owner_, [this, A = s.A, B = s.B](const Tensor& x) {  // (..., in) -> (..., out)
        const Tensor h = dropout_ > 0 ? tessera::dropout(x, dropout_, model_->training()) : x;
        return tessera::low_rank(h, A->weight(), B->weight(), scaling_);
      });
    }
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  std::int64_t r_ = 8, batches_ = 10;
  double scaling_ = 2.0, dropout_ = 0.0, sparsity_ = 0.4;
  std::string pruner_ = "snip", init_ = "bert";
  std::vector<Site> sites_;
  tessera::prune_at_init::Weights order_;  // A, B of each site in site order: the scores' order
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(SparseLoRA, "sparse_lora", "1.0.0", "unified",
               "SparseAdapter's LoRA form: LoRA factors pruned at initialisation (SNIP, GraSP, magnitude or random) to a target sparsity, trained with the masks fixed",
               "He et al. 2022, arXiv:2210.04284")
