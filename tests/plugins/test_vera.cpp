// VeRA against peft's VeraConfig: the shared random matrices our key draws are the ones peft
// saved with its adapter; with peft's vectors, peft's outputs unmerged and merged; an adapter
// whose matrices another key drew is refused.
#include "support.h"
#include "plugins/gradient_parity.h"
#include "plugins/trained_loads_in_peft.h"

#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

using namespace tessera;

CATCH_TEST_CASE("VeRA draws peft's shared matrices from its key and equals peft, unmerged and merged", "[plugins][vera][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  const auto dir = test::fixture("vera");
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  CATCH_CHECK(mc.plugin == "vera");
  CATCH_CHECK(mc.checked.integer("projection_prng_key") == 3);
  auto vera = test::attach_peft_adapter(dir, *model);  // peft's vectors; the matrices checked against ours
  // Our A and B, drawn from the key alone (loading only checks them), are peft's, bit for bit.
  const auto theirs = test::read_tensors(dir + "/adapter_model.safetensors");
  auto ours = vera->call("state", [](Method& m) { return m.state(); });
  for (const char* k : {"base_model.vera_A", "base_model.vera_B"}) {
    CATCH_INFO(k);
    CATCH_REQUIRE(theirs.count(k) == 1);
    CATCH_CHECK(at::equal(ours.at(k).to(at::kCPU), theirs.at(k).to(at::kCPU)));
  }
  test::check_merge_parity(*vera, *model, ref, "vera");
  test::check_gradient_parity(*vera, *model, ref, "vera");  // and every trained tensor's gradient
  // Another key's matrices: refused, the key named.
  auto other = theirs;
  other["base_model.vera_A"] = other["base_model.vera_A"] * 1.5;
  CATCH_CHECK_THROWS_WITH(vera->call("load_state", [&](Method& m) { m.load_state(other); }), Catch::Contains("is not what projection_prng_key = 3"));
}

CATCH_TEST_CASE("a VeRA adapter Tessera trained loads in PeftModel.from_pretrained with equal outputs", "[plugins][vera][minilm][parity]") {
  // Our key and rank: peft must draw the same shared matrices from them (and finds them saved).
  test::check_trained_loads_in_peft("vera", {"attn.q", "attn.v", "mlp.up"}, {{"r", std::int64_t{32}}, {"projection_prng_key", std::int64_t{11}}}, 1e-1);
}
