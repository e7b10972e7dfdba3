// (IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
// "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
// Learning", arXiv:2205.05638). The math and every key: README.md beside this.
//
//   attention keys and values (any target not feed-forward):  y = l ∘ (W x + b)    l: (out)
//   the feed-forward block's second projection:               y = W (l ∘ x) + b    l: (in)
//
// as PEFT's IA3 computes it (an output scale covers the bias; an input scale does not), with
// PEFT's default targets per architecture. Merging multiplies W's rows (and b) or columns
// by l; unmerging takes that back.
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <map>

namespace {

using tessera::Tensor;

// PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for the
// architectures Tessera loads.
struct Defaults {
  std::vector<std::string> targets, feedforward;
};
const std::map<std::string, Defaults>& defaults() {
  static const std::map<std::string, Defaults> d = {
      {"bert", {{"key", "value", "output.dense"}, {"output.dense"}}},
      {"roberta", {{"key", "value", "output.dense"}, {"output.dense"}}},
      {"gpt2", {{"c_attn", "mlp.c_proj"}, {"mlp.c_proj"}}},
      {"llama", {{"k_proj", "v_proj", "down_proj"}, {"down_proj"}}},
      {"mistral", {{"k_proj", "v_proj", "down_proj"}, {"down_proj"}}},
      {"qwen2", {{"q_proj", "v_proj", "down_proj"}, {"down_proj"}}},
      {"t5", {{"k", "v", "wo"}, {"wo"}}},
  };
  return d;
}

struct Vector {
  tessera::LinearSite* site;
  Tensor l;          // PEFT's layout: (out, 1), or (1, in) for a feed-forward target; f32 master
  bool feedforward;  // scales the input (columns of W) rather than the output (rows of W, and b)
  Tensor folded_w, folded_b;  // while merged: what merge() added to W and b
};

class Ia3 final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"feedforward_modules", ParamType::StringList, std::vector<std::string>{},
         "targets whose input is scaled (the feed-forward block's second projection); empty: PEFT's default for the architecture",
         std::nullopt, std::nullopt, {}},
        {"init_ia3_weights", ParamType::Bool, true, "true: every l starts at 1 (the base model); false: l ~ N(0, 1), as PEFT leaves it",
         std::nullopt, std::nullopt, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    const auto& arch = ctx.model.info().architecture;
    const auto d = defaults().find(arch);
    std::vector<std::string> targets = ctx.targets, feedforward = ctx.params.get<std::vector<std::string>>("feedforward_modules");
    if ((targets.empty() || feedforward.empty()) && d == defaults().end())
      throw std::runtime_error("(IA)³ has no default targets for a " + arch + " model: give targets and feedforward_modules");
    if (targets.empty()) targets = d->second.targets;
    if (feedforward.empty()) feedforward = d->second.feedforward;
    dtype_ = ctx.model.info().options.dtype().toScalarType();
    const auto& opts = ctx.model.info().param_options;
    const bool ones = ctx.params.flag("init_ia3_weights");
    for (auto* site : ctx.model.match_linear(targets)) {
      const bool ff = tessera::matches_any(feedforward, site->name(), site->hf_path());
      Tensor l = ff ? at::empty({1, site->in_features()}, opts) : at::empty({site->out_features(), 1}, opts);
      at::NoGradGuard no_grad;
      if (ones) l.fill_(1.0);
      else l.normal_();
      vectors_.push_back({site, l.set_requires_grad(true), ff});
    }
    if (vectors_.empty()) throw std::runtime_error("no linear site of this " + arch + " model matches the targets");
    install();
  }

  bool mergeable() const override { return true; }

  // W ∘ l (rows, and b) or W ∘ lᵀ (columns), as a fold of W ∘ (l − 1): the interventions it
  // replaces go. The folds are kept until unmerge: subtracting them restores W to rounding,
  // where dividing by l (PEFT's way) loses W's digits wherever l is near 0.
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& v : vectors_) {
      v.site->remove(*owner_);
      const Tensor f = v.l.detach() - 1.0;
      const Tensor w = v.site->weight().base();
      v.folded_w = w * f.to(w.scalar_type());
      v.site->weight().fold(v.folded_w);
      if (!v.feedforward && v.site->bias() != nullptr) {
        const Tensor b = v.site->bias()->base();
        v.folded_b = b * f.reshape({-1}).to(b.scalar_type());
        v.site->bias()->fold(v.folded_b);
      }
    }
    merged_ = true;
  }

  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& v : vectors_) {
      v.site->weight().fold(-v.folded_w);
      if (v.folded_b.defined()) v.site->bias()->fold(-v.folded_b);
      v.folded_w = v.folded_b = Tensor();
    }
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (const auto& v : vectors_) out[v.site->name() + ".ia3_l"] = v.l;
    return out;
  }

  // HF PEFT's file keys: base_model.model.<module path>.ia3_l
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& v : vectors_) out[key(v)] = v.l;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (tensors.size() != vectors_.size())
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this (IA)³ has " + std::to_string(vectors_.size()));
    at::NoGradGuard no_grad;
    for (auto& v : vectors_) {
      const std::string k = key(v);
      const auto it = tensors.find(k);
      if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + k + "'");
      if (it->second.sizes() != v.l.sizes())
        throw std::runtime_error("tensor '" + k + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(v.l.sizes()) +
                                 (v.feedforward ? " (a feed-forward target: one value per input)" : " (one value per output)"));
      v.l.copy_(it->second);
    }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array(), ff = nlohmann::json::array();
    for (const auto& v : vectors_) (v.feedforward ? ff : targets).push_back(v.site->hf_path());
    for (const auto& f : ff) targets.push_back(f);
    return nlohmann::json{{"peft_type", "IA3"},           {"target_modules", targets}, {"feedforward_modules", ff},
                          {"init_ia3_weights", true},      {"fan_in_fan_out", false},   {"modules_to_save", nullptr},
                          {"task_type", nullptr},          {"inference_mode", true}}
        .dump(2);
  }

 private:
  static std::string key(const Vector& v) { return "base_model.model." + v.site->hf_path() + ".ia3_l"; }

  void install() {
    for (auto& v : vectors_) {
      const Tensor l = v.l;
      const auto dtype = dtype_;
      if (v.feedforward) v.site->add_input_scale(*owner_, [l, dtype] { return l.reshape({-1}).to(dtype); });   // (in)
      else v.site->add_output_scale(*owner_, [l, dtype] { return l.reshape({-1}).to(dtype); });               // (out)
    }
  }

  const tessera::Owner* owner_ = nullptr;
  std::vector<Vector> vectors_;
  c10::ScalarType dtype_ = at::kFloat;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(Ia3, "ia3", "1.0.0", "additive",
               "Learned vectors scaling keys, values and the feed-forward block's inner activations ((IA)³)",
               "Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, arXiv:2205.05638")
