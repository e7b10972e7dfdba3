// The adapter folder a run writes and `tessera eval` / `generate --run` read back:
//   tessera.json                          what it was trained for (task, architecture, labels, methods and their plugins)
//   head.safetensors                      the task head, when the task has one
//   groups.safetensors                    the gates of gated groups, when the run has one
//   <name>/adapter_config.json            per method instance, in HF PEFT's layout (or the
//   <name>/adapter_model.safetensors      method's own: AdapterHub's adapter.safetensors)
// Saving, checking and loading all live here.
#pragma once

#include "runtime/method_stack.h"

#include <string>
#include <vector>

namespace tessera {

// What tessera.json records of the run, beside its methods.
struct AdapterManifest {
  std::string task, architecture, pooling;
  std::vector<std::string> labels;
};

// Written whole beside `dir`, then swapped in: the previous adapter survives a failed
// save, and no method folder of an earlier layout lingers.
void save_adapter(const std::string& dir, MethodStack& methods, const NamedTensors& head, const AdapterManifest& manifest);

// Refuses, naming tessera.json and the key, an adapter trained for another task,
// architecture, label set or list of methods than `now` and `methods`.
void check_adapter(const std::string& dir, const AdapterManifest& now, const std::vector<MethodConfig>& methods);

// check_adapter, then each method's state from <dir>/<name>/<its weights file>
// (the head is the task's to load).
void load_adapter(const std::string& dir, MethodStack& methods, const AdapterManifest& now);

// A run's method whose plugin is not found now: refused with where it came from at
// training time (tessera.json), so the fix is plain — a plugin outside the directory
// beside the binary needs --plugin-dir (or TESSERA_PLUGIN_PATH) again.
void refuse_missing_plugins(const std::string& run_dir, const std::vector<MethodConfig>& methods, const PluginRegistry& registry);

// The resolved config.toml of the run in `run_dir`, its methods checked against the plugins
// found now (refuse_missing_plugins, check_methods): what `eval`, `export` and `generate
// --run` reload. Refuses a directory without config.toml and adapter/.
Config load_run_config(const std::string& run_dir, const PluginRegistry& registry);

}  // namespace tessera
