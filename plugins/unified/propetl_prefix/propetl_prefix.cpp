// ProPETL over prefix tuning (Zeng, Zhang and Lu 2023, "One Network, Many Masks: Towards More
// Parameter-Efficient Transfer Learning", arXiv:2305.17682), as the authors' code runs it
// (SharePrefixTuning in their AdapterHub fork): one prototype prefix shared by every layer —
// Li & Liang's reparameterisation, giving each of the P tokens one key and one value — and per
// layer a binary mask over the prototype's entries, learned through real-valued scores (top-k
// of their magnitudes, straight-through gradient). The math and every key: README.md beside this.
//
//   Z   = W2 tanh(E W1ᵀ + b1) + b2                  (P, 2d): [keys | values] of every token
//   layer l:  [K_l | V_l] = Z ⊙ M_l,  M_l = top_k(|S_l|) over its P·2d entries
//   backward: ∂L/∂S_l = ∂L/∂(Z ⊙ M_l) ⊙ Z ⊙ sign(S_l),  ∂L/∂Z = Σ_l ∂L/∂(Z ⊙ M_l) ⊙ M_l
//
// d = key/value heads × head dim. The tokens keep their positions by default (shift_positions =
// false: AdapterHub's prefix, which the authors' code is).
#include "../propetl_mask.h"

#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace {

using tessera::Tensor;

class ProPETLPrefix final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"num_virtual_tokens", ParamType::Int, std::int64_t{64}, "P, the prefix's length (the authors' 64)", 1, 4096, {}},
        {"encoder_hidden_size", ParamType::Int, std::int64_t{512}, "the prototype MLP's hidden size (the authors' 512)", 1, 65536, {}},
        {"keep", ParamType::Float, 0.1, "the share of the prototype's P·2d entries each layer's mask keeps (the authors' 0.1 for prefixes)", 0.01, 1.0, {}},
        {"mask_lr_ratio", ParamType::Float, 1.0, "the mask scores' learning rate over the prototype's (the authors': 1e-4 / 1e-4)", 1e-3, 1e4, {}},
        {"shift_positions", ParamType::Bool, false,
         "false: the tokens keep their positions (AdapterHub's prefix, the authors'); true: numbered after the prefix (peft's)", std::nullopt, std::nullopt, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    if (!ctx.targets.empty()) throw std::runtime_error("ProPETL's prefix goes to every self-attention: it has no targets");
    info_ = ctx.model.info();
    P_ = ctx.params.integer("num_virtual_tokens");
    hidden_ = ctx.params.integer("encoder_hidden_size");
    keep_ = ctx.params.number("keep");
    ratio_ = ctx.params.number("mask_lr_ratio");
    shift_ = ctx.params.flag("shift_positions");
    std::string stack;  // the prototype is evaluated once per stack's forward pass: at each stack's first site
    for (auto* a : ctx.model.attention_sites()) {
      const auto& n = a->name();
      if (n.size() <= 5 || n.compare(n.size() - 5, 5, ".attn") != 0) continue;  // self-attention only
      const std::string this_stack = n.substr(0, n.find("layers."));
      sites_.push_back({a, this_stack != stack || sites_.empty(), {}});
      stack = this_stack;
    }
    if (sites_.empty()) throw std::runtime_error("a " + info_.architecture + " model has no self-attention site for a prefix");
    heads_ = sites_[0].site->num_heads(), head_dim_ = sites_[0].site->head_dim(), d_ = heads_ * head_dim_;
    for (const auto& s : sites_)
      if (s.site->num_heads() != heads_ || s.site->head_dim() != head_dim_)
        throw std::runtime_error("attention site " + s.site->name() + " has " + std::to_string(s.site->num_heads()) + " × " + std::to_string(s.site->head_dim()) +
                                 " key/value heads, the first " + std::to_string(heads_) + " × " + std::to_string(head_dim_) + ": one prototype cannot serve both");
    const auto& opts = info_.param_options;
    {
      at::NoGradGuard no_grad;
      // nn.Embedding's N(0, 1) and nn.Linear's U(±1/√fan_in) for weights and biases, as the authors'.
      auto linear = [&](std::int64_t out, std::int64_t in) {
        const double bound = 1.0 / std::sqrt(static_cast<double>(in));
        return std::make_pair(at::empty({out, in}, opts).uniform_(-bound, bound), at::empty({out}, opts).uniform_(-bound, bound));
      };
      table_ = at::randn({P_, d_}, opts);
      std::tie(w1_, b1_) = linear(hidden_, d_);
      std::tie(w2_, b2_) = linear(2 * d_, hidden_);
    }
    for (Tensor* t : {&table_, &w1_, &b1_, &w2_, &b2_}) t->set_requires_grad(true);
    // S_l: (P, 2d), drawn as the authors' Kaiming-uniform over that shape (fan-in P·2d).
    for (auto& s : sites_) s.scores = tessera::propetl::draw_scores({P_, 2 * d_}, static_cast<double>(P_ * 2 * d_), ratio_, opts);
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      const Site* s = &sites_[i];  // sites_ does not grow after attach
      tessera::KVPrefix prefix = [this, s](std::int64_t B) {
        if (s->first || !current_.defined()) current_ = prototype();
        const Tensor z = (current_ * tessera::propetl::topk_mask(s->scores, keep_)).to(info_.options.dtype());  // (P, 2d)
        auto part = [&](std::int64_t from) { return z.narrow(1, from, d_).view({P_, heads_, head_dim_}).transpose(0, 1).unsqueeze(0).expand({B, heads_, P_, head_dim_}); };
        return std::make_pair(part(0), part(d_));  // (B, heads, P, head_dim) each
      };
      if (shift_) s->site->add_prefix(ctx.owner, std::move(prefix));
      else s->site->add_positionless_prefix(ctx.owner, std::move(prefix));
    }
  }

  void detach(tessera::ModelView&) override { current_ = Tensor(); }

  tessera::NamedTensors trainable() override { return state(); }

  // The prototype once (AdapterHub's names under prefix.) and prefix.<site's HF path>.mask_scores per layer (u = S / ratio).
  tessera::NamedTensors state() override {
    tessera::NamedTensors out{{"prefix.wte.weight", table_},
                              {"prefix.control_trans.0.weight", w1_},
                              {"prefix.control_trans.0.bias", b1_},
                              {"prefix.control_trans.2.weight", w2_},
                              {"prefix.control_trans.2.bias", b2_}};
    for (const auto& s : sites_) out["prefix." + s.site->hf_path() + ".mask_scores"] = s.scores;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    tessera::load_exact(state(), tensors, "this ProPETL prefix", "its length, hidden size and layers");
    current_ = Tensor();
  }

  std::string adapter_config_json() const override {
    return nlohmann::json{{"tessera",
                           {{"propetl_prefix",
                             {{"num_virtual_tokens", P_}, {"encoder_hidden_size", hidden_}, {"keep", keep_}, {"mask_lr_ratio", ratio_}, {"shift_positions", shift_}}}}}}
        .dump(2);
  }

 private:
  struct Site {
    tessera::AttentionSite* site;
    bool first;     // its stack's first: evaluates the prototype for the pass
    Tensor scores;  // u_l = S_l / ratio (P, 2d)
  };

  Tensor prototype() const { return at::linear(at::tanh(at::linear(table_, w1_, b1_)), w2_, b2_); }  // Z (P, 2d) f32

  tessera::ModelInfo info_;
  std::vector<Site> sites_;
  std::int64_t P_ = 64, hidden_ = 512, heads_ = 0, head_dim_ = 0, d_ = 0;
  double keep_ = 0.1, ratio_ = 1.0;
  bool shift_ = false;
  Tensor table_, w1_, b1_, w2_, b2_;  // E (P, d); W1 (h, d), b1 (h); W2 (2d, h), b2 (2d), f32 masters
  Tensor current_;                    // this pass's Z
};

}  // namespace

TESSERA_PLUGIN(ProPETLPrefix, "propetl_prefix", "1.0.0", "unified",
               "ProPETL over prefix tuning: one prototype prefix (Li & Liang's MLP) shared by every layer, each layer a learned binary mask over its keys and values",
               "Zeng, Zhang and Lu 2023, arXiv:2305.17682")
