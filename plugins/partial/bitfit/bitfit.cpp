// BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
// Transformer-based Masked Language-models", ACL 2022, arXiv:2106.10199). The math and every
// key: README.md beside this.
//
//   b' = b + δ_b     for every targeted bias; δ starts at 0, the weights stay frozen
//
// `subset = "all"`: every bias of the model (linear layers' and norms'); "paper": the
// paper's §4.2 subset, the query projections' and the feed-forward block's first (the
// intermediate) projection's. A delta on the parameter sites: the base is never written
// but by merge(). Files: the tuned biases' full values under `base_model.model.<HF name>`.
#include "../parameter_deltas.h"

#include <tessera/plugin.h>

#include <nlohmann/json.hpp>

#include <set>

namespace {

std::string file_key(const tessera::ParameterSite& p) { return "base_model.model." + p.hf_name(); }

class BitFit final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"subset", tessera::ParamType::String, std::string("all"),
              "all: every bias; paper: the query and intermediate (feed-forward up) projections' biases, the paper's subset", std::nullopt, std::nullopt,
              {"all", "paper"}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    subset_ = ctx.params.text("subset");
    std::vector<std::string> targets = ctx.targets;
    if (targets.empty() && subset_ == "paper") targets = {"attn.q", "mlp.up"};
    std::set<std::string> unmatched(targets.begin(), targets.end());
    for (auto* p : ctx.model.parameter_sites()) {
      const auto& n = p->name();
      if (n.size() < 5 || n.compare(n.size() - 5, 5, ".bias") != 0) continue;
      const std::string module = n.substr(0, n.size() - 5), hf = p->hf_name().substr(0, p->hf_name().rfind('.'));
      if (!targets.empty() && !tessera::matches_any(targets, module, hf)) continue;
      deltas_.add(p, ctx.model.info().param_options);
      for (const auto& t : targets)
        if (tessera::matches(t, module) || tessera::matches(t, hf)) unmatched.erase(t);
    }
    const auto& arch = ctx.model.info().architecture;
    // The paper's subset, whole or refused: GPT-2 keeps its query bias inside the fused c_attn's.
    if (subset_ == "paper" && ctx.targets.empty() && !unmatched.empty())
      throw std::runtime_error("BitFit's paper subset needs the " + *unmatched.begin() + " bias, which this " + arch +
                               " model has not as a tensor of its own: use subset = \"all\" or name the biases in targets");
    if (deltas_.empty())
      throw std::runtime_error("BitFit trains biases, and this " + arch + " model has none" + (targets.empty() ? std::string() : " among the targets") +
                               (arch == "llama" || arch == "mistral" || arch == "t5" ? " (its linear layers and norms are bias-free)" : ""));
    deltas_.install(*owner_);
  }

  bool mergeable() const override { return true; }
  void merge() override { deltas_.merge(*owner_); }
  void unmerge() override { deltas_.unmerge(*owner_); }

  tessera::NamedTensors trainable() override { return deltas_.trainable(); }
  tessera::NamedTensors state() override { return deltas_.values(); }  // the tuned biases' values
  void load_state(const tessera::NamedTensors& tensors) override { deltas_.load(tensors, "this BitFit's biases"); }

  std::string adapter_config_json() const override {
    nlohmann::json names = nlohmann::json::array();
    for (const auto& e : deltas_.entries()) names.push_back(e.site->hf_name());
    return nlohmann::json{{"peft_type", "BITFIT"}, {"tessera", {{"subset", subset_}, {"biases", names}}}}.dump(2);
  }

 private:
  const tessera::Owner* owner_ = nullptr;
  std::string subset_;
  tessera::ParameterDeltas deltas_{file_key, ".bitfit_delta"};
};

}  // namespace

TESSERA_PLUGIN(BitFit, "bitfit", "1.0.0", "partial", "The model's bias terms only, trained as deltas on the frozen base (BitFit)",
               "Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models, arXiv:2106.10199")
