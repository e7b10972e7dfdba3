// LN-tuning (Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for
// Pre-trained Language Models", arXiv:2211.08682). The math and every key: README.md beside this.
//
//   γ' = γ + δ_γ,   β' = β + δ_β       for every targeted LayerNorm / RMSNorm; δ starts at 0
//
// A partial method: the norms' own gains and biases train, the rest of the model is frozen.
// The base stays bit for bit as it was — the trained part is a delta on the parameter sites,
// folded in only by merge(). Files in PEFT's LN_TUNING layout: the tuned copies' full values,
// `base_model.model.<module>.ln_tuning_layers.{weight,bias}`, with PEFT's default targets
// per architecture (every LayerNorm for BERT/RoBERTa, which PEFT has no default for).
#include "../parameter_deltas.h"

#include <tessera/plugin.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>

namespace {

// PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING for the architectures
// Tessera loads, and every LayerNorm of the BERT family (PEFT has none: give targets there).
const std::map<std::string, std::vector<std::string>>& defaults() {
  static const std::map<std::string, std::vector<std::string>> d = {
      {"bert", {"LayerNorm"}},
      {"roberta", {"LayerNorm"}},
      {"gpt2", {"ln_1", "ln_2", "ln_f"}},
      {"llama", {"input_layernorm", "post_attention_layernorm", "norm"}},
      {"mistral", {"input_layernorm", "post_attention_layernorm", "norm"}},
      {"qwen2", {"post_attention_layernorm"}},
      {"t5", {"layer_norm", "final_layer_norm"}},
  };
  return d;
}

std::string module_of(const std::string& name) { return name.substr(0, name.rfind('.')); }
std::string leaf_of(const std::string& name) { return name.substr(name.rfind('.') + 1); }

// PEFT's key of a tuned norm parameter: base_model.model.<module>.ln_tuning_layers.<weight|bias>
std::string peft_key(const tessera::ParameterSite& p) { return "base_model.model." + module_of(p.hf_name()) + ".ln_tuning_layers." + leaf_of(p.hf_name()); }

class LnTuning final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override { return {{}}; }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    const auto& arch = ctx.model.info().architecture;
    auto targets = ctx.targets;
    if (targets.empty()) {
      const auto d = defaults().find(arch);
      if (d == defaults().end()) throw std::runtime_error("LN-tuning has no default norms for a " + arch + " model: give targets");
      targets = d->second;
    }
    // A norm: a module whose weight is a vector (a linear layer's bias is a vector beside a
    // matrix; a target naming a linear layer's path selects nothing here).
    std::map<std::string, bool> vector_weight;
    for (auto* p : ctx.model.parameter_sites())
      if (leaf_of(p->hf_name()) == "weight") vector_weight[module_of(p->hf_name())] = p->base().dim() == 1;
    for (auto* p : ctx.model.parameter_sites()) {
      const std::string leaf = leaf_of(p->hf_name()), module = module_of(p->hf_name());
      if ((leaf != "weight" && leaf != "bias") || !vector_weight[module]) continue;
      if (tessera::matches_any(targets, module_of(p->name()), module)) deltas_.add(p, ctx.model.info().param_options);
    }
    if (deltas_.empty()) throw std::runtime_error("no norm of this " + arch + " model matches the targets");
    deltas_.install(*owner_);
  }

  // The base becomes the tuned norm (PEFT swaps its copy in); unmerge takes the fold back.
  bool mergeable() const override { return true; }
  void merge() override { deltas_.merge(*owner_); }
  void unmerge() override { deltas_.unmerge(*owner_); }

  tessera::NamedTensors trainable() override { return deltas_.trainable(); }
  tessera::NamedTensors state() override { return deltas_.values(); }  // PEFT's file: the tuned copies' values
  void load_state(const tessera::NamedTensors& tensors) override { deltas_.load(tensors, "this LN-tuning's norms"); }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& e : deltas_.entries()) {
      const auto m = module_of(e.site->hf_name());
      if (std::find(targets.begin(), targets.end(), m) == targets.end()) targets.push_back(m);
    }
    return nlohmann::json{{"peft_type", "LN_TUNING"}, {"target_modules", targets}, {"exclude_modules", nullptr},
                          {"modules_to_save", nullptr}, {"task_type", nullptr},   {"inference_mode", true}}
        .dump(2);
  }

 private:
  const tessera::Owner* owner_ = nullptr;
  tessera::ParameterDeltas deltas_{peft_key, ".ln_tuning_delta"};
};

}  // namespace

TESSERA_PLUGIN(LnTuning, "ln_tuning", "1.0.0", "partial", "The layer norms' own gains and biases, trained as deltas on the frozen base (LN-tuning)",
               "Qi et al. 2022, Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models, arXiv:2211.08682")
