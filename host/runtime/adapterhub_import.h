// Reads an adapter directory that AdapterHub's `adapters` saved (adapter_config.json +
// adapter.safetensors) as a Tessera method instance of the `bottleneck` plugin, or of the
// `compacter` plugin when its layers are PHM layers: its BnConfig becomes the plugin's
// preset, keys and targets. What the plugins do not compute (extra layer norms,
// invertible adapters, a parallel PHM adapter, another adapter
// architecture) is refused naming the key, so an import never runs other math.
#pragma once

#include "runtime/config.h"

#include <string>

namespace tessera {

MethodConfig method_from_adapterhub_dir(const std::string& dir, const PluginRegistry& registry, const std::string& instance);

}  // namespace tessera
