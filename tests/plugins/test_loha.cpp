// LoHa against peft's LoHaConfig: the same base, the same four factors (peft's saved
// adapter, all random), the same inputs; unmerged, merged and unmerged again; our files in
// peft's keys and shapes; a config peft's importer maps back to us.
#include "support.h"
#include "plugins/gradient_parity.h"
#include "plugins/trained_loads_in_peft.h"

#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

using namespace tessera;

CATCH_TEST_CASE("LoHa equals peft, unmerged and merged, its files in peft's layout", "[plugins][loha][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  const auto dir = test::fixture("loha");
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  CATCH_CHECK(mc.plugin == "loha");
  CATCH_CHECK(mc.checked.integer("r") == 4);
  auto loha = test::attach_peft_adapter(dir, *model);  // peft's factors, our state in its keys and shapes
  test::check_merge_parity(*loha, *model, ref, "loha");
  test::check_gradient_parity(*loha, *model, ref, "loha");  // and every trained tensor's gradient
  const auto cfg = nlohmann::json::parse(loha->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["peft_type"] == "LOHA");
  CATCH_CHECK(cfg["r"] == 4);
  // A wrong shape is refused naming the tensor.
  auto bad = test::read_tensors(dir + "/adapter_model.safetensors");
  bad.begin()->second = at::zeros({3, 3});
  CATCH_CHECK_THROWS_WITH(loha->call("load_state", [&](Method& m) { m.load_state(bad); }), Catch::Contains("has shape [3, 3], expected"));
}

CATCH_TEST_CASE("LoHa's default init starts at the base model", "[plugins][loha]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto& mask = ref["attention_mask"];
  auto loha = test::registry().create("loha", "adapter");
  loha->attach(*model, {"attn.q"}, apply_schema(test::registry().find("loha")->params, {}));
  at::NoGradGuard no_grad;
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ref["input_ids"], mask).hidden, ref["hidden"], mask) < 1e-5);  // W2b = 0
  CATCH_CHECK(loha->call("trainable", [](Method& m) { return m.trainable(); }).size() == 4 * 6);
  // Per-target alphas (same shapes, another scale) are refused, not loaded at the wrong scale.
  auto patterned = test::registry().create("loha", "patterned");
  CATCH_CHECK_THROWS_WITH(
      patterned->attach(*model, {"attn.q"}, apply_schema(test::registry().find("loha")->params, {{"alpha_pattern", NumberTable{{"query", 4.0}}}})),
      Catch::Contains("alpha_pattern is not supported"));
}

CATCH_TEST_CASE("a LoHa adapter Tessera trained loads in PeftModel.from_pretrained with equal outputs", "[plugins][loha][minilm][parity]") {
  // Our own settings and factors, not peft's: alpha ≠ r, a subset of sites, three SGD steps.
  test::check_trained_loads_in_peft("loha", {"attn.q", "attn.v", "mlp.down"}, {{"r", std::int64_t{4}}, {"alpha", 12.0}}, 1e-2);
}
