#include "runtime/method_stack.h"

#include "architectures/weight_storage.h"
#include "runtime/groups.h"
#include "formats/safetensors.h"
#include "formats/torch_pickle.h"

#include <tessera/extensions.h>

#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include <filesystem>

namespace tessera {
namespace fs = std::filesystem;

namespace {

std::vector<MethodConfig> in_attach_order(std::vector<MethodConfig> configs, const std::vector<GroupConfig>& groups) {
  if (groups.empty()) return configs;
  Config c;
  c.methods = std::move(configs);
  c.groups = groups;
  std::vector<MethodConfig> out;
  for (std::size_t i : attach_order(c)) out.push_back(c.methods[i]);
  return out;
}

}  // namespace

MethodStack::MethodStack(const PluginRegistry& registry, std::vector<MethodConfig> configs, SiteModel& model, const ModelConfig& storage,
                         std::vector<GroupConfig> groups)
    : model_(model), configs_(in_attach_order(std::move(configs), groups)), groups_(std::move(groups)) {
  for (const auto& m : configs_) {
    instances_.push_back(registry.create(m.plugin, m.name));
    plugins_.push_back(*registry.find(m.plugin));
  }
  store_weights(model, storage.quantize, storage.double_quant, storage_requests(model), storage.path, storage.quantize_targets);
  for (std::size_t i = 0; i < size(); ++i) {
    const auto& m = configs_[i];
    try {
      instances_[i]->attach(model, m.targets, m.checked);
    } catch (const ParamError& e) {  // a key that does not suit this model (a bottleneck wider than its hidden size)
      throw ConfigError(m.param_pos.count(e.key()) ? m.param_pos.at(e.key()) : m.params_pos,
                        "method '" + m.name + "' (plugin '" + m.plugin + "'): " + e.what());
    }
  }
  for (std::size_t i = 0; i < size(); ++i) {
    if (configs_[i].load.empty()) continue;
    try {
      load_state(i, state_file(configs_[i].load, i));
    } catch (const std::exception& e) {
      throw ConfigError(configs_[i].load_pos, "method '" + configs_[i].name + "': load = \"" + configs_[i].load + "\": " + e.what());
    }
  }
  if (!groups_.empty()) composition_ = std::make_unique<Composition>(configs_, groups_, owners(), model);
}

std::map<std::string, OwnerImpl*> MethodStack::owners() const {
  std::map<std::string, OwnerImpl*> out;
  for (std::size_t i = 0; i < size(); ++i) out[configs_[i].name] = &instances_[i]->owner();
  return out;
}

void MethodStack::disable(const std::string& name) { disable_named(name, configs_, groups_, owners()); }
void MethodStack::rescale(const std::string& name, double factor) { rescale_named(name, factor, configs_, groups_, owners()); }

void MethodStack::base_only(const std::function<void()>& f) {
  std::vector<std::pair<OwnerImpl*, bool>> was;
  for (const auto& [name, o] : owners()) was.emplace_back(o, o->enabled()), o->set_enabled(false);
  auto restore = [&] {
    for (auto& [o, on] : was) o->set_enabled(on);
  };
  try {
    f();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

void MethodStack::load_group_state(const std::string& file) {
  if (!composition_) return;
  composition_->load_state(read_safetensors(file));
}

std::map<std::string, std::string> MethodStack::storage_requests(SiteModel& model) {
  std::map<std::string, std::pair<std::string, std::string>> asked;  // site -> storage, instance
  for (std::size_t i = 0; i < size(); ++i) {
    const auto* ext = instances_[i]->extension<tessera_method_storage_v1>(TESSERA_EXT_METHOD_STORAGE, 1);
    if (ext == nullptr) continue;
    const auto& mc = configs_[i];
    for (auto* site : model.linear_sites()) {
      const char* format = instances_[i]->call("storage_for", [&](Method&) {
        return ext->storage_for(ext->method, mc.checked, mc.targets, site->name().c_str(), site->hf_path().c_str());
      });
      if (format == nullptr) continue;
      const auto [it, fresh] = asked.emplace(site->name(), std::make_pair(std::string(format), mc.name));
      if (!fresh && it->second.first != format)
        throw std::runtime_error("method '" + it->second.second + "' asks for " + it->second.first + " storage of " + site->name() +
                                 "'s weight, method '" + mc.name + "' for " + format);
    }
  }
  std::map<std::string, std::string> out;
  for (const auto& [site, request] : asked) out[site] = request.first;
  return out;
}

MethodStack::~MethodStack() {
  for (auto& m : instances_) {
    try {
      m->detach(model_);
    } catch (const std::exception& e) {
      spdlog::warn("{}", e.what());
    }
  }
}

std::vector<Tensor> MethodStack::trainable() {
  std::vector<Tensor> out;
  for (auto& [_, t] : named_trainable()) out.push_back(t);
  return out;
}

std::vector<std::pair<std::string, Tensor>> MethodStack::named_trainable() {
  std::vector<std::pair<std::string, Tensor>> out;
  for (std::size_t i = 0; i < instances_.size(); ++i)
    for (auto& [k, t] : instances_[i]->call("trainable", [](Method& x) { return x.trainable(); })) out.emplace_back(configs_[i].name + "/" + k, t);
  for (auto& [k, t] : group_state()) out.emplace_back("groups/" + k, t);
  return out;
}

std::int64_t MethodStack::trainable_count() {
  std::int64_t n = 0;
  for (const auto& t : trainable()) n += t.numel();
  return n;
}

std::string MethodStack::weights_file(std::size_t i) const {
  const auto* ext = instances_[i]->extension<tessera_method_files_v1>(TESSERA_EXT_METHOD_FILES, 1);
  if (ext == nullptr || ext->weights_file == nullptr) return "adapter_model.safetensors";
  const std::string name = ext->weights_file;
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
    throw PluginError("plugin '" + configs_[i].plugin + "' (instance '" + configs_[i].name + "'): weights file name '" + name + "' is not a plain file name");
  return name;
}

std::string MethodStack::state_file(const std::string& dir, std::size_t i) const {
  const std::string name = weights_file(i);
  const fs::path preferred = fs::path(dir) / name;
  if (fs::exists(preferred)) return preferred.string();
  // Saved without safetensors: AdapterHub's and PEFT's torch.save names for the same tensors.
  const std::string pickled = name == "adapter.safetensors" ? "pytorch_adapter.bin" : name == "adapter_model.safetensors" ? "adapter_model.bin" : "";
  if (!pickled.empty() && fs::exists(fs::path(dir) / pickled)) return (fs::path(dir) / pickled).string();
  return preferred.string();  // missing: reading it names it
}

void MethodStack::load_state(std::size_t i, const std::string& file) {
  at::NoGradGuard no_grad;
  const bool pickled = file.size() > 4 && file.compare(file.size() - 4, 4, ".bin") == 0;
  const NamedTensors state = pickled ? read_torch_pickle(file) : read_safetensors(file);
  instances_[i]->call("load_state", [&](Method& m) { m.load_state(state); });
}

void MethodStack::after_step(const StepInfo& info) {
  for (auto& m : instances_)
    if (const auto* ext = m->extension<tessera_method_after_step_v1>(TESSERA_EXT_METHOD_AFTER_STEP, 1))
      m->call("after_step", [&](Method&) { ext->after_step(ext->method, &info); });
}

void MethodStack::merge() {
  for (std::size_t i = 0; i < size(); ++i) {
    if (const std::string g = composition_ ? composition_->sample_dependent_group(configs_[i].name) : ""; !g.empty())
      throw std::runtime_error("method '" + configs_[i].name + "' is in group '" + g + "', whose weight differs by sample: it cannot be folded into the weights");
    // A plugin folds its whole change: one weighed (an average group, --scale) or switched
    // off (--disable) would be folded as it is not run.
    const auto& owner = instances_[i]->owner();
    if (!owner.enabled() || owner.scale() != 1.0)
      throw std::runtime_error("method '" + configs_[i].name + "' is " + (owner.enabled() ? "weighed " + std::to_string(owner.scale()) + " (an average group or --scale)" : "disabled") +
                               ": a plugin folds its whole change, so it is not merged");
  }
  for (std::size_t i = 0; i < size(); ++i)
    if (!instances_[i]->call("mergeable", [](Method& m) { return m.mergeable(); }))
      throw std::runtime_error("plugin '" + configs_[i].plugin + "' (instance '" + configs_[i].name + "') is not mergeable: its effect cannot be folded into the weights");
  for (auto& m : instances_) m->call("merge", [](Method& x) { x.merge(); });
}

}  // namespace tessera
