// Full fine-tuning as a method: every parameter of the base trains. It is the row every
// PEFT figure reads against (the review's tables quote each method's trainable share,
// memory and speed as a part of full fine-tuning's), and a baseline `tessera assess` runs
// like any other setup. The math and every key: README.md beside this.
//
//   θ' = θ + δ     for every parameter tensor θ of the model; δ starts at 0
//
// A dense delta on each parameter site, as the partial methods: the base is never written
// but by merge(), so `--disable full` evaluates the pretrained model again. `targets` keeps
// the tensors of the modules they name; `embeddings = false` leaves the embedding tables
// frozen (their rows are most of a small encoder's parameters). Files: the tuned tensors'
// full values under `base_model.model.<HF name>`: a whole checkpoint's worth.
#include "../parameter_deltas.h"

#include <tessera/plugin.h>

#include <nlohmann/json.hpp>

namespace {

std::string file_key(const tessera::ParameterSite& p) { return "base_model.model." + p.hf_name(); }

// The lookup tables (word, position, token type; a T5's shared table and its relative-position
// buckets) and a separate LM head: the sites every architecture names embed.<table>.weight,
// <stack>.position_bias.weight and head.*; not embed.norm.
bool embedding(const tessera::ParameterSite& p) {
  const std::string& n = p.name();
  return n.rfind("head.", 0) == 0 || n.find("position_bias.") != std::string::npos || (n.rfind("embed.", 0) == 0 && n.find("norm") == std::string::npos);
}

class Full final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"embeddings", tessera::ParamType::Bool, true, "train the embedding tables too (word, position, token type)", std::nullopt, std::nullopt, {}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    owner_ = &ctx.owner;
    const bool embeddings = ctx.params.flag("embeddings");
    for (auto* p : ctx.model.parameter_sites()) {
      const std::string module = p->name().substr(0, p->name().rfind('.')), hf = p->hf_name().substr(0, p->hf_name().rfind('.'));
      if (!ctx.targets.empty() && !tessera::matches_any(ctx.targets, module, hf)) continue;
      if (!embeddings && embedding(*p)) continue;
      deltas_.add(p, ctx.model.info().param_options);
    }
    if (deltas_.empty()) throw std::runtime_error("full fine-tuning found no parameter tensor to train" + std::string(ctx.targets.empty() ? "" : " among the targets"));
    deltas_.install(*owner_);
  }

  bool mergeable() const override { return true; }
  void merge() override { deltas_.merge(*owner_); }
  void unmerge() override { deltas_.unmerge(*owner_); }

  tessera::NamedTensors trainable() override { return deltas_.trainable(); }
  tessera::NamedTensors state() override { return deltas_.values(); }  // the tuned tensors' values
  void load_state(const tessera::NamedTensors& tensors) override { deltas_.load(tensors, "this full fine-tuning's tensors"); }

  std::string adapter_config_json() const override {
    nlohmann::json names = nlohmann::json::array();
    for (const auto& e : deltas_.entries()) names.push_back(e.site->hf_name());
    return nlohmann::json{{"peft_type", "FULL"}, {"tessera", {{"tensors", names}}}}.dump(2);
  }

 private:
  const tessera::Owner* owner_ = nullptr;
  tessera::ParameterDeltas deltas_{file_key, ".full_delta"};
};

}  // namespace

TESSERA_PLUGIN(Full, "full", "1.0.0", "partial", "Full fine-tuning: every parameter of the base trains (as deltas on it), the baseline PEFT is measured against",
               "Howard & Ruder 2018, Universal Language Model Fine-tuning for Text Classification, arXiv:1801.06146; Devlin et al. 2019, BERT, arXiv:1810.04805")
