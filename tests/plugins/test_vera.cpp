// VeRA against peft's VeraConfig: the shared random matrices our key draws are the ones peft
// saved with its adapter; with peft's vectors, peft's outputs unmerged and merged; an adapter
// whose matrices another key drew is refused.
#include "support.h"

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
  auto vera = test::registry().create("vera", "adapter");
  vera->attach(*model, mc.targets, mc.checked);
  auto theirs = test::read_tensors(dir + "/adapter_model.safetensors");
  // Before loading: our A and B, from the key alone, are peft's, bit for bit.
  auto ours = vera->call("state", [](Method& m) { return m.state(); });
  for (const char* k : {"base_model.vera_A", "base_model.vera_B"}) {
    CATCH_INFO(k);
    CATCH_REQUIRE(theirs.count(k) == 1);
    CATCH_CHECK(at::equal(ours.at(k).to(at::kCPU), theirs.at(k).to(at::kCPU)));
  }
  vera->call("load_state", [&](Method& m) { m.load_state(theirs); });
  at::NoGradGuard no_grad;
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "vera.hidden", mask));
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, ref["hidden"], mask) > 1e-2);
  vera->call("merge", [](Method& m) { m.merge(); });
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "vera.merged_hidden", mask));
  vera->call("unmerge", [](Method& m) { m.unmerge(); });
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "vera.hidden", mask));
  // Another key's matrices: refused, the key named.
  auto other = theirs;
  other["base_model.vera_A"] = other["base_model.vera_A"] * 1.5;
  CATCH_CHECK_THROWS_WITH(vera->call("load_state", [&](Method& m) { m.load_state(other); }), Catch::Contains("is not what projection_prng_key = 3"));
}
