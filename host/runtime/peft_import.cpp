#include "runtime/peft_import.h"

#include "formats/json_file.h"
#include "runtime/plugin_registry.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>

namespace tessera {
namespace {

MethodConfig read_adapter_config(const std::string& path, const PluginRegistry& registry, const std::string& instance) {
  const nlohmann::json j = read_json_file(path);
  MethodConfig m;
  m.pos = {path, 1, 1};
  m.params_pos = m.pos;
  m.name = instance;
  m.plugin = j.value("peft_type", "");
  std::transform(m.plugin.begin(), m.plugin.end(), m.plugin.begin(), [](unsigned char c) { return std::tolower(c); });
  const PluginInfo* info = registry.find(m.plugin);
  if (info == nullptr) throw std::runtime_error(path + ": no plugin for peft_type '" + j.value("peft_type", "") + "'");
  if (j.contains("target_modules") && j["target_modules"].is_array())
    for (const auto& t : j["target_modules"]) m.targets.push_back(t.get<std::string>());
  else if (j.contains("target_modules") && j["target_modules"].is_string())
    m.targets.push_back("re:" + j["target_modules"].get<std::string>());  // PEFT: a string is a full-match regex
  for (const auto& spec : info->params) {
    if (!j.contains(spec.name) || j[spec.name].is_null()) continue;
    const auto& v = j[spec.name];
    auto bad = [&] { return std::runtime_error(path + ": '" + spec.name + "' does not fit the plugin's " + to_string(spec.type) + " parameter"); };
    switch (spec.type) {
      case ParamType::Bool: if (!v.is_boolean()) throw bad(); m.params[spec.name] = v.get<bool>(); break;
      case ParamType::Int: if (!v.is_number_integer()) throw bad(); m.params[spec.name] = v.get<std::int64_t>(); break;
      case ParamType::Float: if (!v.is_number()) throw bad(); m.params[spec.name] = v.get<double>(); break;
      case ParamType::String:
        if (v.is_boolean()) m.params[spec.name] = std::string(v.get<bool>() ? "true" : "false");
        else if (v.is_string()) m.params[spec.name] = v.get<std::string>();
        else throw bad();
        break;
      case ParamType::StringList: {
        std::vector<std::string> l;
        if (!v.is_array()) throw bad();
        for (const auto& e : v) l.push_back(e.get<std::string>());
        m.params[spec.name] = l;
        break;
      }
      case ParamType::NumberTable: {
        NumberTable t;
        if (!v.is_object()) throw bad();
        for (auto it = v.begin(); it != v.end(); ++it) t[it.key()] = it.value().get<double>();
        m.params[spec.name] = t;
        break;
      }
    }
  }
  m.checked = apply_schema(info->params, m.params);
  return m;
}

}  // namespace

MethodConfig method_from_peft_dir(const std::string& dir, const PluginRegistry& registry, const std::string& instance) {
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  try {
    return read_adapter_config(path, registry, instance);
  } catch (...) {
    rethrow_naming(path);
  }
}

}  // namespace tessera
