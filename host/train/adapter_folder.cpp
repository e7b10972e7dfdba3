#include "train/adapter_folder.h"

#include "formats/json_file.h"
#include "formats/safetensors.h"
#include "train/run_dir.h"

#include <nlohmann/json.hpp>

#include <filesystem>

namespace tessera {
namespace fs = std::filesystem;

void save_adapter(const std::string& dir, MethodStack& methods, const NamedTensors& head, const AdapterManifest& now) {
  replace_folder(dir, [&](const std::string& out) {
    nlohmann::json manifest = {{"format", "tessera-adapter"}, {"version", 1}, {"labels", now.labels},
                               {"pooling", now.pooling}, {"architecture", now.architecture}, {"task", now.task}};
    manifest["methods"] = nlohmann::json::array();
    for (std::size_t i = 0; i < methods.size(); ++i) {
      const auto& mc = methods.config(i);
      fs::path sub = fs::path(out) / mc.name;
      fs::create_directories(sub);
      auto tensors = methods[i].call("state", [](Method& x) { return x.state(); });
      save_safetensors((sub / methods.weights_file(i)).string(), tensors, {{"format", "pt"}});
      write_file_atomic((sub / "adapter_config.json").string(), methods[i].call("adapter_config_json", [](Method& x) { return x.adapter_config_json(); }) + "\n");
      // Where the plugin came from: `tessera eval` names it when it is not found again.
      manifest["methods"].push_back({{"plugin", mc.plugin}, {"name", mc.name}, {"targets", mc.targets}, {"dir", mc.name},
                                     {"plugin_version", methods.plugin(i).version}, {"plugin_file", methods.plugin(i).path}});
    }
    // The groups' gates (runtime/composition.h), "<group>.<instance>.<site>.weight" …
    if (const auto gates = methods.group_state(); !gates.empty()) save_safetensors((fs::path(out) / "groups.safetensors").string(), gates, {{"format", "pt"}});
    if (!head.empty()) save_safetensors((fs::path(out) / "head.safetensors").string(), head, {{"format", "pt"}});
    write_file_atomic((fs::path(out) / "tessera.json").string(), manifest.dump(2) + "\n");
  });
}

namespace {

std::string list(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
  return "[" + out + "]";
}

// The manifest's methods against the run's, as "name (plugin)".
void same_methods(const nlohmann::json& j, const JsonFields& f, const std::vector<MethodConfig>& methods) {
  std::vector<std::string> was, now;
  if (f.has("methods")) {
    const auto& listed = j.at("methods");  // by reference: errors then name their place, "(/methods/0/name)"
    if (!listed.is_array()) f.fail("methods", "must be a list, got " + listed.dump());
    for (const auto& m : listed) was.push_back(m.at("name").get<std::string>() + " (" + m.at("plugin").get<std::string>() + ")");
  }
  for (const auto& m : methods) now.push_back(m.name + " (" + m.plugin + ")");
  if (was != now) f.fail("methods", "are " + list(was) + ", but the run's config has " + list(now));
}

}  // namespace

// Loading an adapter into another setup would not always fail on a shape: a label set of
// the same size in another order reads the head's rows as other classes.
void check_adapter(const std::string& dir, const AdapterManifest& now, const std::vector<MethodConfig>& methods) {
  const std::string path = (fs::path(dir) / "tessera.json").string();
  if (!fs::exists(path)) throw std::runtime_error(path + ": missing (an adapter folder written by `tessera train` has one)");
  const nlohmann::json j = read_json_file(path);
  const JsonFields f(j, path);
  auto quoted = [](const std::string& x) { return "\"" + x + "\""; };
  if (f.string_or("format", "") != "tessera-adapter") f.fail("format", "must be \"tessera-adapter\"");
  auto same = [&](const char* key, const std::string& is, const char* what) {
    const std::string was = f.string_or(key, is);
    if (was != is) f.fail(key, "is " + quoted(was) + ", but " + what + " is " + quoted(is));
  };
  same("task", now.task, "the run's task");
  same("architecture", now.architecture, "the model's architecture");
  try {
    const auto labels = j.value("labels", std::vector<std::string>{});
    if (labels != now.labels)
      f.fail("labels", "are " + list(labels) + ", but the data now gives " + list(now.labels) + ": the head would read them as other classes");
    same_methods(j, f, methods);
  } catch (...) {
    rethrow_naming(path);
  }
}

void load_adapter(const std::string& dir, MethodStack& methods, const AdapterManifest& now) {
  check_adapter(dir, now, methods.configs());
  for (std::size_t i = 0; i < methods.size(); ++i)
    methods.load_state(i, methods.state_file((fs::path(dir) / methods.config(i).name).string(), i));
  if (!methods.group_state().empty()) methods.load_group_state((fs::path(dir) / "groups.safetensors").string());
}

void refuse_missing_plugins(const std::string& run, const std::vector<MethodConfig>& methods, const PluginRegistry& registry) {
  const fs::path manifest = fs::path(run) / "adapter" / "tessera.json";
  for (const auto& m : methods) {
    if (registry.find(m.plugin) != nullptr) continue;
    std::string was, dir = "DIR";
    if (fs::exists(manifest)) try {
        const auto j = read_json_file(manifest.string());
        for (const auto& e : j.value("methods", nlohmann::json::array()))
          if (e.is_object() && e.value("name", "") == m.name && e.contains("plugin_file")) {
            const std::string file = e.value("plugin_file", std::string());
            was = " (at training time version " + e.value("plugin_version", std::string("?")) + " from " + file + ")";
            dir = fs::path(file).parent_path().string();
          }
      } catch (...) {
        rethrow_naming(manifest.string());
      }
    throw std::runtime_error(run + ": method '" + m.name + "' needs plugin '" + m.plugin + "'" + was +
                             ", which is not among the plugins found: pass --plugin-dir " + dir + " (before `eval`), or set TESSERA_PLUGIN_PATH");
  }
}

Config load_run_config(const std::string& run_dir, const PluginRegistry& registry) {
  const std::string config_path = (fs::path(run_dir) / "config.toml").string();
  if (!fs::exists(config_path) || !fs::is_directory(fs::path(run_dir) / "adapter"))
    throw std::runtime_error(run_dir + " is not a run directory of `tessera train` (it needs config.toml and adapter/)");
  Config config = load_config(config_path);
  // The adapter folder holds the trained state: where a method started (`load`) is history.
  for (auto& m : config.methods) m.load.clear();
  refuse_missing_plugins(run_dir, config.methods, registry);
  check_methods(config, registry);
  return config;
}

}  // namespace tessera
