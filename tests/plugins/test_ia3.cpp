// (IA)³ against peft's IA3: the same base weights, the same vectors (peft's saved adapter),
// the same inputs; unmerged, merged and unmerged again; our files in peft's layout.
#include "support.h"

#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

using namespace tessera;

CATCH_TEST_CASE("(IA)3 equals peft's IA3, unmerged and merged, with its default and custom targets", "[plugins][ia3][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  for (const std::string variant : {"ia3_default", "ia3_custom"}) {
    CATCH_INFO("variant " << variant);
    auto model = test::load_minilm();
    const auto dir = test::fixture(variant);
    MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
    CATCH_CHECK(mc.plugin == "ia3");
    auto ia3 = test::attach_peft_adapter(dir, *model);  // the same sites, keys and shapes, feed-forward ones included
    test::check_merge_parity(*ia3, *model, ref, variant);
    ia3->detach(*model);
  }
}

CATCH_TEST_CASE("(IA)3 starts at the base model, writes peft's config, and refuses a misshapen vector by name", "[plugins][ia3][minilm]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const Tensor before = model->forward(ref["input_ids"], ref["attention_mask"]).hidden;
  auto ia3 = test::registry().create("ia3", "ia3");
  ia3->attach(*model, {}, apply_schema(test::registry().find("ia3")->params, {}));
  CATCH_CHECK(at::equal(model->forward(ref["input_ids"], ref["attention_mask"]).hidden, before));  // every l = 1
  const auto cfg = nlohmann::json::parse(ia3->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["peft_type"] == "IA3");
  CATCH_CHECK(cfg["target_modules"].size() == 6 * 4);      // key, value, attention.output.dense, output.dense per layer
  CATCH_CHECK(cfg["feedforward_modules"].size() == 6 * 2);  // both output.dense, by suffix (as peft)
  auto state = ia3->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(state.at("base_model.model.encoder.layer.0.attention.self.key.ia3_l").sizes() == at::IntArrayRef({384, 1}));
  CATCH_CHECK(state.at("base_model.model.encoder.layer.0.output.dense.ia3_l").sizes() == at::IntArrayRef({1, 1536}));
  state["base_model.model.encoder.layer.0.output.dense.ia3_l"] = at::ones({1536, 1});
  CATCH_CHECK_THROWS_WITH(ia3->call("load_state", [&](Method& m) { m.load_state(state); }),
                          Catch::Contains("encoder.layer.0.output.dense.ia3_l' has shape [1536, 1], expected [1, 1536] (a feed-forward target"));
}
