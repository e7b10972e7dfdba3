#include "runtime/method_stack.h"

#include "formats/safetensors.h"

#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

namespace tessera {

MethodStack::MethodStack(const PluginRegistry& registry, std::vector<MethodConfig> configs, ModelView& model)
    : model_(model), configs_(std::move(configs)) {
  for (const auto& m : configs_) {
    auto inst = registry.create(m.plugin, m.name);
    inst->attach(model, m.targets, m.checked);
    instances_.push_back(std::move(inst));
    plugins_.push_back(*registry.find(m.plugin));
  }
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
  for (auto& m : instances_)
    for (auto& [_, t] : m->call("trainable", [](Method& x) { return x.trainable(); })) out.push_back(t);
  return out;
}

std::int64_t MethodStack::trainable_count() {
  std::int64_t n = 0;
  for (const auto& t : trainable()) n += t.numel();
  return n;
}

void MethodStack::load_state(std::size_t i, const std::string& file) {
  at::NoGradGuard no_grad;
  const NamedTensors state = read_safetensors(file);
  instances_[i]->call("load_state", [&](Method& m) { m.load_state(state); });
}

void MethodStack::merge() {
  for (std::size_t i = 0; i < size(); ++i)
    if (!instances_[i]->call("mergeable", [](Method& m) { return m.mergeable(); }))
      throw std::runtime_error("method '" + configs_[i].name + "' (" + configs_[i].plugin + ") cannot be folded into the weights");
  for (auto& m : instances_) m->call("merge", [](Method& x) { x.merge(); });
}

}  // namespace tessera
