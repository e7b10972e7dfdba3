#include "runtime/adapter_deltas.h"

#include "architectures/site_model.h"
#include "formats/safetensors.h"
#include "runtime/peft_import.h"
#include "runtime/plugin_registry.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <stdexcept>
#include <vector>

namespace tessera {

std::map<std::string, at::Tensor> linear_weight_deltas(const std::string& peft_dir, SiteModel& model, const PluginRegistry& registry) {
  at::NoGradGuard no_grad;
  const MethodConfig mc = method_from_peft_dir(peft_dir, registry, "merge-input");
  auto inst = registry.create(mc.plugin, "merge-input");
  inst->attach(model, mc.targets, mc.checked);
  struct Detach {  // the model is left as it was whatever throws below
    MethodInstance& inst;
    SiteModel& model;
    bool merged = false;
    ~Detach() {
      try {
        if (merged) inst.call("unmerge", [](Method& m) { m.unmerge(); });
        inst.detach(model);
      } catch (...) {
      }
    }
  } guard{*inst, model};
  inst->call("load_state", [&](Method& m) { m.load_state(read_safetensors(peft_dir + "/adapter_model.safetensors")); });
  if (!inst->call("mergeable", [](Method& m) { return m.mergeable(); }))
    throw std::runtime_error(peft_dir + ": the " + mc.plugin + " plugin does not merge into the weights, so its update cannot be combined");
  std::vector<std::pair<ParameterSite*, at::Tensor>> before;
  for (auto* p : model.parameter_sites()) before.emplace_back(p, p->base().to(at::kFloat).clone());
  inst->call("merge", [](Method& m) { m.merge(); });
  guard.merged = true;
  std::map<const ParameterSite*, std::string> weight_of;  // a linear layer's weight -> its module path
  for (auto* l : model.linear_sites()) weight_of[&l->weight()] = l->hf_path();
  std::map<std::string, at::Tensor> deltas;
  for (auto& [p, w] : before) {
    at::Tensor d = p->base().to(at::kFloat) - w;
    if (!d.any().item<bool>()) continue;
    const auto it = weight_of.find(p);
    if (it == weight_of.end())
      throw std::runtime_error(peft_dir + ": merging this " + mc.plugin + " adapter changes '" + p->hf_name() + "', which is no linear layer's weight: a LoRA cannot hold that update");
    deltas[it->second] = d;
  }
  if (deltas.empty()) throw std::runtime_error(peft_dir + ": this " + mc.plugin + " adapter changes no linear weight (an update of zero)");
  return deltas;
}

}  // namespace tessera
