// Reading an AdapterHub adapter directory: its BnConfig becomes the bottleneck (or, with PHM
// layers, the compacter) plugin's preset, keys and targets; what the plugins do not compute
// is refused naming the key.
#include "support.h"

#include "runtime/adapterhub_import.h"

#include <fstream>

using namespace tessera;

namespace {

std::string import_result(const std::string& config_json, MethodConfig* out = nullptr, const std::string& model_type = "bert") {
  const auto dir = test::temp_dir("adapterhub-import");
  std::ofstream(dir / "adapter_config.json") << R"({"config": )" << config_json << R"(, "model_type": ")" << model_type
                                             << R"(", "name": "a", "version": "adapters.1.3.0"})";
  try {
    MethodConfig m = method_from_adapterhub_dir(dir.string(), test::registry(), "a");
    if (out != nullptr) *out = m;
  } catch (const std::exception& e) {
    const std::string s = e.what();
    return s.substr(s.find("adapter_config.json"));
  }
  return "(loaded)";
}

}  // namespace

CATCH_TEST_CASE("an AdapterHub config becomes the bottleneck plugin's preset, keys and targets", "[runtime][adapterhub]") {
  MethodConfig m;
  CATCH_REQUIRE(import_result(R"({"mh_adapter": true, "output_adapter": true, "original_ln_before": false, "is_parallel": false,
                                  "reduction_factor": 8, "non_linearity": "gelu", "scaling": 1.0, "leave_out": [0, 3]})", &m) == "(loaded)");
  CATCH_CHECK(m.plugin == "bottleneck");
  CATCH_CHECK(m.checked.text("config") == "double_seq_bn");
  CATCH_CHECK(m.checked.number("reduction_factor") == 8);
  CATCH_CHECK(m.checked.text("non_linearity") == "gelu");
  CATCH_REQUIRE(m.targets.size() == 1);
  for (const char* site : {"layers.1.attn", "layers.2.mlp", "layers.5.attn"}) CATCH_CHECK(matches(m.targets[0], site));
  for (const char* site : {"layers.0.attn", "layers.3.mlp", "layers.1.cross", "layers.1.attn.q"}) CATCH_CHECK_FALSE(matches(m.targets[0], site));

  CATCH_REQUIRE(import_result(R"({"output_adapter": true, "is_parallel": true, "scaling": "learned"})", &m) == "(loaded)");
  CATCH_CHECK(m.checked.text("config") == "scaled_par_bn");
  CATCH_CHECK(m.checked.text("scaling_type") == "learned");
  CATCH_REQUIRE(import_result(R"({"output_adapter": true, "non_linearity": "ReLU", "scaling": 2.5})", &m) == "(loaded)");
  CATCH_CHECK(m.checked.text("non_linearity") == "relu");
  CATCH_CHECK(m.checked.text("scaling_type") == "fixed");
  CATCH_CHECK(m.checked.number("scaling") == 2.5);

  // PHM layers: the compacter plugin, its keys; an initialisation it does not draw is left out.
  CATCH_REQUIRE(import_result(R"({"mh_adapter": true, "output_adapter": true, "original_ln_before": false, "phm_layer": true, "phm_dim": 2,
                                  "phm_rank": 3, "shared_phm_rule": false, "factorized_phm_rule": true, "learn_phm": false, "phm_c_init": "uniform",
                                  "phm_init_range": 0.5, "hypercomplex_nonlinearity": "phm", "phm_bias": false, "init_weights": "bert"})", &m) == "(loaded)");
  CATCH_CHECK(m.plugin == "compacter");
  CATCH_CHECK(m.checked.text("config") == "compacter");
  CATCH_CHECK(m.checked.integer("phm_dim") == 2);
  CATCH_CHECK(m.checked.integer("phm_rank") == 3);
  CATCH_CHECK_FALSE(m.checked.flag("shared_phm_rule"));
  CATCH_CHECK(m.checked.flag("factorized_phm_rule"));
  CATCH_CHECK_FALSE(m.checked.flag("learn_phm"));
  CATCH_CHECK_FALSE(m.checked.flag("phm_bias"));
  CATCH_CHECK(m.checked.text("phm_c_init") == "uniform");
  CATCH_CHECK(m.checked.number("phm_init_range") == 0.5);
  CATCH_CHECK(m.checked.text("hypercomplex_nonlinearity") == "glorot-uniform");
  CATCH_REQUIRE(import_result(R"({"output_adapter": true, "original_ln_before": true, "phm_layer": true})", &m) == "(loaded)");
  CATCH_CHECK(m.checked.text("config") == "compacter++");
  CATCH_CHECK_FALSE(m.checked.flag("use_gating"));
  CATCH_REQUIRE(import_result(R"({"output_adapter": true, "use_gating": true})", &m) == "(loaded)");
  CATCH_CHECK(m.checked.flag("use_gating"));
}

CATCH_TEST_CASE("an AdapterHub config the bottleneck plugin cannot compute is refused naming the file and the key", "[runtime][adapterhub]") {
  CATCH_CHECK(import_result(R"({"architecture": "lora", "output_adapter": true})") ==
              "adapter_config.json: config.architecture = \"lora\": not a bottleneck adapter (the bottleneck and compacter plugins read only those)");
  CATCH_CHECK(import_result(R"({"output_adapter": true, "ln_after": true})") == "adapter_config.json: config.ln_after = true: not supported by the bottleneck and compacter plugins");
  CATCH_CHECK(import_result(R"({"output_adapter": true, "phm_layer": true, "is_parallel": true})") ==
              "adapter_config.json: config.is_parallel = true: a parallel PHM adapter is not among the compacter plugin's presets");
  CATCH_CHECK(import_result(R"({"output_adapter": true, "reduction_factor": {"default": 16}})") ==
              "adapter_config.json: config.reduction_factor = {\"default\":16}: a per-layer mapping is not supported");
  CATCH_CHECK(import_result(R"({"mh_adapter": false, "output_adapter": false})") ==
              "adapter_config.json: places no adapter: mh_adapter, output_adapter and cross_adapter are all false");
  CATCH_CHECK(import_result(R"({"output_adapter": true, "leave_out": [1]})", nullptr, "t5") ==
              "adapter_config.json: config.leave_out on a T5 model is not supported (it numbers both stacks as one)");
  CATCH_CHECK(import_result(R"({"output_adapter": true, "scaling": 0.0})") == "adapter_config.json: config.scaling = 0.0: a scale that silences the adapter");
  CATCH_CHECK_THAT(import_result(R"({"output_adapter": true, "non_linearity": "softsign"})"),
                   Catch::StartsWith("adapter_config.json: ") && Catch::Contains("softsign"));
  CATCH_CHECK_THAT(import_result(R"({"output_adapter": "yes"})"), Catch::StartsWith("adapter_config.json: ") && Catch::Contains("type must be boolean"));
}
