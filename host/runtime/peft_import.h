// Reads a Hugging Face PEFT adapter directory (adapter_config.json +
// adapter_model.safetensors) as a Tessera method instance: the plugin is the lower-cased
// `peft_type` ("LORA" -> "lora"), the targets are `target_modules`, and every key of the
// plugin's schema that the JSON holds becomes a parameter (a JSON bool given to a string
// parameter reads as "true"/"false"). Keys the schema lacks are PEFT's own and ignored.
#pragma once

#include "runtime/config.h"

#include <string>

namespace tessera {

MethodConfig method_from_peft_dir(const std::string& dir, const PluginRegistry& registry, const std::string& instance);

}  // namespace tessera
