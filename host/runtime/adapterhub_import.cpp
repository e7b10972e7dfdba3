#include "runtime/adapterhub_import.h"

#include "formats/json_file.h"
#include "runtime/plugin_registry.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>

namespace tessera {
namespace {

// BnConfig keys whose non-default values the bottleneck and compacter plugins do not compute.
void refuse_unsupported(const nlohmann::json& c, const std::string& path) {
  auto refuse = [&](const std::string& key, const std::string& why) {
    throw std::runtime_error(path + ": config." + key + " = " + c[key].dump() + ": " + why);
  };
  const std::string arch = c.value("architecture", std::string("bottleneck"));
  if (!c.value("architecture", nlohmann::json()).is_null() && arch != "bottleneck")
    refuse("architecture", "not a bottleneck adapter (the bottleneck and compacter plugins read only those)");
  for (const char* key : {"ln_before", "ln_after", "adapter_residual_before_ln"})
    if (c.contains(key) && c[key].is_boolean() && c[key].get<bool>()) refuse(key, "not supported by the bottleneck and compacter plugins");
  if (c.contains("original_ln_after") && c["original_ln_after"] == false) refuse("original_ln_after", "not supported: the block's residual and norm always follow");
  if (c.contains("inv_adapter") && !c["inv_adapter"].is_null() && c["inv_adapter"] != "nice" && c["inv_adapter"] != "glow")
    refuse("inv_adapter", "an invertible adapter other than nice and glow");
  if (c.value("stochastic_depth", 0.0) > 0.0) refuse("stochastic_depth", "not supported");
  if (c.value("phm_layer", false) && c.value("is_parallel", false)) refuse("is_parallel", "a parallel PHM adapter is not among the compacter plugin's presets");
  if (c.contains("reduction_factor") && !c["reduction_factor"].is_number()) refuse("reduction_factor", "a per-layer mapping is not supported");
  if (c.contains("residual_before_ln") && !c["residual_before_ln"].is_boolean()) refuse("residual_before_ln", "only true or false is supported");
  if (c.contains("scaling") && c["scaling"].is_number() && c["scaling"].get<double>() <= 0.0) refuse("scaling", "a scale that silences the adapter");
}

// The preset whose wiring the config has, and its scale.
void read_preset(const nlohmann::json& c, MethodConfig& m) {
  const bool parallel = c.value("is_parallel", false), pfeiffer = c.value("original_ln_before", false);
  const auto& s = c.value("scaling", nlohmann::json(1.0));
  if (m.plugin == "compacter") m.params["config"] = std::string(pfeiffer ? "compacter++" : "compacter");
  else if (parallel) m.params["config"] = std::string(s.is_string() && s == "learned" ? "scaled_par_bn" : "par_bn");
  else m.params["config"] = std::string(pfeiffer ? "seq_bn" : "double_seq_bn");
  if (s.is_number()) {
    m.params["scaling_type"] = std::string("fixed");
    m.params["scaling"] = s.get<double>();
  } else {
    m.params["scaling_type"] = s.get<std::string>();
  }
}

// Sublayer targets from mh_adapter / output_adapter / cross_adapter, without leave_out's layers.
void read_targets(const nlohmann::json& c, const std::string& model_type, MethodConfig& m) {
  std::string kinds;
  for (const auto& [key, site] : {std::pair{"mh_adapter", "attn"}, {"output_adapter", "mlp"}, {"cross_adapter", "cross"}})
    if (c.value(key, false)) kinds += (kinds.empty() ? "" : "|") + std::string(site);
  if (kinds.empty()) throw std::runtime_error(m.pos.file + ": places no adapter: mh_adapter, output_adapter and cross_adapter are all false");
  const auto& leave_out = c.value("leave_out", nlohmann::json::array());
  if (model_type == "t5" && !leave_out.empty())  // AdapterHub numbers T5's decoder layers after its encoder's
    throw std::runtime_error(m.pos.file + ": config.leave_out on a T5 model is not supported (it numbers both stacks as one)");
  std::string skip;
  for (const auto& l : c.value("leave_out", nlohmann::json::array())) skip += (skip.empty() ? "" : "|") + std::to_string(l.get<std::int64_t>());
  m.targets.push_back("re:(.*\\.)?layers\\." + (skip.empty() ? "" : "(?!(" + skip + ")\\.)") + "[0-9]+\\.(" + kinds + ")");
}

// A PHM layer's keys (Compacter), as the compacter plugin names them. An initialisation the
// plugin does not draw is left out: a loaded adapter's tensors replace the start anyway.
void read_phm(const nlohmann::json& c, MethodConfig& m) {
  for (const char* key : {"phm_dim", "phm_rank"})
    if (c.contains(key)) m.params[key] = c[key].get<std::int64_t>();
  for (const char* key : {"factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "learn_phm", "phm_bias"})
    if (c.contains(key) && c[key].is_boolean()) m.params[key] = c[key].get<bool>();
  if (c.contains("phm_init_range") && c["phm_init_range"].is_number()) m.params["phm_init_range"] = c["phm_init_range"].get<double>();
  if (c.contains("phm_c_init") && c["phm_c_init"].is_string()) m.params["phm_c_init"] = c["phm_c_init"].get<std::string>();
  const std::string w_init = c.value("hypercomplex_nonlinearity", std::string());
  if (w_init == "glorot-uniform" || w_init == "glorot-normal" || w_init == "normal") m.params["hypercomplex_nonlinearity"] = w_init;
}

MethodConfig read(const std::string& path, const PluginRegistry& registry, const std::string& instance) {
  const nlohmann::json j = read_json_file(path);
  if (!j.contains("config") || !j["config"].is_object()) throw std::runtime_error(path + ": no \"config\" object (not an adapter AdapterHub saved)");
  const auto& c = j["config"];
  refuse_unsupported(c, path);
  MethodConfig m;
  m.pos = m.params_pos = {path, 1, 1};
  m.name = instance;
  m.plugin = c.value("phm_layer", false) ? "compacter" : "bottleneck";
  const PluginInfo* info = registry.find(m.plugin);
  if (info == nullptr) throw std::runtime_error(path + ": the " + m.plugin + " plugin is not found");
  read_preset(c, m);
  read_targets(c, j.value("model_type", std::string()), m);
  if (c.contains("reduction_factor")) m.params["reduction_factor"] = c["reduction_factor"].get<double>();
  if (m.plugin == "compacter") read_phm(c, m);  // AdapterHub's init_weights does not touch PHM layers
  else if (c.contains("init_weights") && c["init_weights"].is_string()) m.params["init_weights"] = c["init_weights"].get<std::string>();
  if (c.contains("non_linearity") && c["non_linearity"].is_string()) {  // AdapterHub lower-cases it
    std::string act = c["non_linearity"].get<std::string>();
    std::transform(act.begin(), act.end(), act.begin(), [](unsigned char ch) { return std::tolower(ch); });
    m.params["non_linearity"] = act;
  }
  for (const char* key : {"residual_before_ln", "cross_adapter"})
    if (c.contains(key)) m.params[key] = c[key].get<bool>();
  if (c.contains("dropout")) m.params["dropout"] = c["dropout"].get<double>();
  if (c.contains("use_gating") && c["use_gating"].is_boolean() && c["use_gating"].get<bool>()) m.params["use_gating"] = true;
  if (c.contains("inv_adapter") && c["inv_adapter"].is_string()) {
    m.params["inv_adapter"] = c["inv_adapter"].get<std::string>();
    if (c.contains("inv_adapter_reduction_factor") && c["inv_adapter_reduction_factor"].is_number())
      m.params["inv_adapter_reduction_factor"] = c["inv_adapter_reduction_factor"].get<double>();
    // Where Tessera saved it, whether its inverse ran before the head (AdapterHub does not say).
    const auto& ours = j.value("tessera", nlohmann::json::object());
    if (ours.contains("inv_adapter_reverse") && ours["inv_adapter_reverse"].is_boolean()) m.params["inv_adapter_reverse"] = ours["inv_adapter_reverse"].get<bool>();
  }
  try {
    m.checked = apply_schema(info->params, m.params);
  } catch (const ParamError& e) {  // a value the plugin's schema refuses (an unknown activation)
    throw std::runtime_error(path + ": " + e.what());
  }
  return m;
}

}  // namespace

MethodConfig method_from_adapterhub_dir(const std::string& dir, const PluginRegistry& registry, const std::string& instance) {
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  try {
    return read(path, registry, instance);
  } catch (...) {
    rethrow_naming(path);
  }
}

}  // namespace tessera
