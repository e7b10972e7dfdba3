// The method instances of a run, attached to one model in config order and detached when
// the stack goes: what `tessera train`, `eval` and `generate` all hold. The plugin each
// came from is kept for the adapter's manifest.
#pragma once

#include "architectures/site_model.h"
#include "runtime/composition.h"
#include "runtime/config.h"
#include "runtime/plugin_registry.h"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

class MethodStack {
 public:
  // Each config must have passed check_methods against `registry`, and the groups
  // check_groups. Creates every instance, runs the storage stage — [model] quantize and
  // what methods ask for through tessera.method.storage (architectures/weight_storage.h) —
  // then attaches them in order (the config's, with each group's members together:
  // groups.h attach_order), reads the state of those with a `load` folder, and puts the
  // groups on them (composition.h).
  MethodStack(const PluginRegistry& registry, std::vector<MethodConfig> configs, SiteModel& model, const ModelConfig& storage,
              std::vector<GroupConfig> groups = {});
  ~MethodStack();  // detaches every method (a failure is logged, not thrown)
  MethodStack(const MethodStack&) = delete;
  MethodStack& operator=(const MethodStack&) = delete;

  std::size_t size() const { return instances_.size(); }
  MethodInstance& operator[](std::size_t i) { return *instances_[i]; }
  const MethodConfig& config(std::size_t i) const { return configs_[i]; }
  const std::vector<MethodConfig>& configs() const { return configs_; }
  const PluginInfo& plugin(std::size_t i) const { return plugins_[i]; }

  std::vector<Tensor> trainable();  // every instance's trainable tensors, in order, then the groups' gates
  // The same tensors in the same order, named "<instance>/<tensor>" (gates: "groups/<tensor>").
  std::vector<std::pair<std::string, Tensor>> named_trainable();
  std::int64_t trainable_count();
  // Reads one instance's state from a safetensors file (its weights_file(i)).
  void load_state(std::size_t i, const std::string& file);
  // The name of that file in the instance's adapter folder: adapter_model.safetensors, or
  // what the method names (tessera.method.files: AdapterHub's adapter.safetensors).
  std::string weights_file(std::size_t i) const;
  // The file to read instance i's state from in folder `dir`: its weights_file, or, when only
  // that was saved without safetensors, AdapterHub's pytorch_adapter.bin / PEFT's
  // adapter_model.bin (torch.save's format; load_state reads a ".bin" as that).
  std::string state_file(const std::string& dir, std::size_t i) const;
  // Folds every instance into the weights; refuses, before folding any, when one cannot
  // (a member of a gated or route group among them: its effect differs by sample).
  void merge();
  // The groups' own trainable tensors (gates) and reading them back (an adapter's groups.safetensors).
  NamedTensors group_state() const { return composition_ ? composition_->trainable() : NamedTensors{}; }
  void load_group_state(const std::string& file);
  const std::vector<GroupConfig>& groups() const { return groups_; }
  // --disable NAME, --scale NAME=F: an instance, or every instance of a group.
  void disable(const std::string& name);
  void rescale(const std::string& name, double factor);
  // Runs f with every instance switched off (the base model alone), each restored after.
  void base_only(const std::function<void()>& f);
  // After each optimizer update of a training run: every instance offering
  // tessera.method.after_step, in config order.
  void after_step(const StepInfo& info);

 private:
  // Linear site -> the storage methods asked for; refuses two methods asking differently.
  std::map<std::string, std::string> storage_requests(SiteModel& model);
  SiteModel& model_;
  std::vector<MethodConfig> configs_;
  std::vector<PluginInfo> plugins_;
  std::vector<std::unique_ptr<MethodInstance>> instances_;
  std::vector<GroupConfig> groups_;
  std::unique_ptr<Composition> composition_;
  std::map<std::string, OwnerImpl*> owners() const;
};

}  // namespace tessera
