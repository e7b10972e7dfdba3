// LoKr against peft's LoKrConfig: the same base, the same factors (peft's saved adapters, all
// random), the same inputs; unmerged, merged and unmerged again, for each shape PEFT picks (W2
// a low-rank pair; both factors pairs under decompose_both with a factor; both full, KronA);
// our own files loaded by peft, which computes what we compute; bad settings refused by key.
#include "support.h"
#include "plugins/gradient_parity.h"

#include "formats/safetensors.h"
#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>

using namespace tessera;

namespace {

// The file-key suffixes of a state: lokr_w1, lokr_w2_a, … (one site's worth tells the shape).
std::set<std::string> suffixes(const NamedTensors& state) {
  std::set<std::string> out;
  for (const auto& [k, t] : state) out.insert(k.substr(k.rfind('.') + 1));
  return out;
}

void check_peft_variant(const std::string& variant, const std::set<std::string>& parts) {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  const auto dir = test::fixture(variant);
  auto lokr = test::attach_peft_adapter(dir, *model);  // peft's factors, our state in its keys and shapes
  CATCH_CHECK(suffixes(lokr->call("state", [](Method& m) { return m.state(); })) == parts);
  test::check_merge_parity(*lokr, *model, ref, variant);
  test::check_gradient_parity(*lokr, *model, ref, variant);  // and every trained tensor's gradient
}

}  // namespace

CATCH_TEST_CASE("LoKr equals peft, unmerged and merged: W1 full, W2 a rank-4 pair", "[plugins][lokr][minilm][parity]") {
  const auto dir = test::fixture("lokr");
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  CATCH_CHECK(mc.plugin == "lokr");
  CATCH_CHECK(mc.checked.integer("r") == 4);
  CATCH_CHECK(mc.checked.integer("decompose_factor") == -1);
  CATCH_CHECK(mc.checked.text("init_weights") == "false");
  check_peft_variant("lokr", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"});
}

CATCH_TEST_CASE("LoKr equals peft, unmerged and merged: decompose_both with decompose_factor 8", "[plugins][lokr][minilm][parity]") {
  MethodConfig mc = method_from_peft_dir(test::fixture("lokr_both"), test::registry(), "adapter");
  CATCH_CHECK(mc.checked.flag("decompose_both"));
  CATCH_CHECK(mc.checked.integer("decompose_factor") == 8);
  check_peft_variant("lokr_both", {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"});
}

CATCH_TEST_CASE("KronA (LoKr with both factors full) equals peft, unmerged and merged", "[plugins][lokr][minilm][parity]") {
  check_peft_variant("krona", {"lokr_w1", "lokr_w2"});
}

CATCH_TEST_CASE("LoKr's own adapter folder is peft's: peft loads it and computes our outputs, and it imports back", "[plugins][lokr][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = ref["input_ids"], mask = ref["attention_mask"];
  auto model = test::load_minilm();
  const std::vector<std::string> targets = {"attn.k", "attn.o", "mlp.down"};
  // 384 = 4 · 96, 1536 = 4 · 384: W1 (4, 4) stays full under decompose_both (2r ≥ 4), W2 a pair.
  const Params params = apply_schema(test::registry().find("lokr")->params, {{"r", std::int64_t{4}},
                                                                             {"alpha", 6.0},
                                                                             {"decompose_both", true},
                                                                             {"decompose_factor", std::int64_t{4}},
                                                                             {"init_weights", std::string("lycoris")}});
  auto lokr = test::registry().create("lokr", "lokr");
  lokr->attach(*model, targets, params);
  {
    at::NoGradGuard no_grad;
    at::manual_seed(12);
    for (auto& [k, t] : lokr->call("trainable", [](Method& m) { return m.trainable(); })) t.add_(at::randn(t.sizes(), t.options()) * 0.05);  // off the zero start
  }
  const auto state = lokr->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(suffixes(state) == std::set<std::string>{"lokr_w1", "lokr_w2_a", "lokr_w2_b"});
  CATCH_CHECK(state.count("base_model.model.encoder.layer.5.attention.output.dense.lokr_w2_b"));
  CATCH_CHECK(state.at("base_model.model.encoder.layer.5.output.dense.lokr_w2_a").sizes() == at::IntArrayRef({96, 4}));  // out 384 = 4 · 96
  CATCH_CHECK(state.at("base_model.model.encoder.layer.5.output.dense.lokr_w2_b").sizes() == at::IntArrayRef({4, 384}));  // in 1536 = 4 · 384
  const auto cfg_text = lokr->call("cfg", [](Method& m) { return m.adapter_config_json(); });
  const auto cfg = nlohmann::json::parse(cfg_text);
  CATCH_CHECK(cfg["peft_type"] == "LOKR");
  CATCH_CHECK(cfg["init_weights"] == "lycoris");
  CATCH_CHECK(cfg["decompose_factor"] == 4);
  Tensor ours;
  {
    at::NoGradGuard no_grad;
    ours = model->forward(ids, mask).hidden;
  }
  CATCH_CHECK(test::max_abs_diff_tokens(ours, ref["hidden"], mask) > 1e-2);  // the adapter is not a no-op
  std::filesystem::path dir;
  TESSERA_CHECK_PARITY(test::parity(ours, test::peft_outputs(*lokr, "encoder", test::model_dir(), test::fixture("reference.safetensors"), &dir), "out", mask));

  // And back: the folder imports as the same method with the same settings and tensors.
  MethodConfig mc = method_from_peft_dir(dir.string(), test::registry(), "again");
  CATCH_CHECK(mc.plugin == "lokr");
  for (const char* k : {"r", "decompose_factor"}) CATCH_CHECK(mc.checked.integer(k) == params.integer(k));
  CATCH_CHECK(mc.checked.number("alpha") == 6.0);
  CATCH_CHECK(mc.checked.flag("decompose_both"));
  CATCH_CHECK(mc.checked.text("init_weights") == "lycoris");
  auto model2 = BertModel::load(test::model_dir(), test::options());
  auto again = test::registry().create("lokr", "again");
  again->attach(*model2, mc.targets, mc.checked);
  again->call("load_state", [&](Method& m) { m.load_state(test::read_tensors((dir / "adapter_model.safetensors").string())); });
  at::NoGradGuard no_grad;
  test::perturb_if_asked(*model2);
  CATCH_CHECK(test::max_abs_diff_tokens(model2->forward(ids, mask).hidden, ours, mask) == 0);
}

CATCH_TEST_CASE("LoKr's inits start at the base model, and module dropout 1 skips the update in training", "[plugins][lokr][minilm]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = ref["input_ids"], mask = ref["attention_mask"];
  const auto& schema = test::registry().find("lokr")->params;
  at::NoGradGuard no_grad;
  // "true": W1 zero; "lycoris": W2b zero (W2 a pair at r = 8: 2r < 24); the other factor random.
  for (const std::string init : {"true", "lycoris"}) {
    CATCH_INFO("init_weights = " << init);
    auto lokr = test::registry().create("lokr", "init_" + init);
    lokr->attach(*model, {"attn.q", "mlp.up"}, apply_schema(schema, {{"init_weights", init}}));
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, ref["hidden"], mask) < 1e-5);
    for (auto& [k, t] : lokr->call("trainable", [](Method& m) { return m.trainable(); })) {
      CATCH_INFO("tensor " << k);
      const bool zero = init == "true" ? k.size() > 8 && k.substr(k.size() - 8) == ".lokr_w1" : k.size() > 10 && k.substr(k.size() - 10) == ".lokr_w2_b";
      CATCH_CHECK((t.abs().max().item<double>() == 0) == zero);
    }
    lokr->detach(*model);
  }
  // module_dropout = 1: in training the update is skipped (PEFT keeps it when rand > p), so its
  // factors are not in the graph at all; in evaluation it applies.
  auto skipped = test::registry().create("lokr", "skipped");
  skipped->attach(*model, {"attn.q"}, apply_schema(schema, {{"init_weights", std::string("false")}, {"module_dropout", 1.0}}));
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, ref["hidden"], mask) > 1e-2);
  at::AutoGradMode grad(true);
  model->train(true);
  const Tensor trained = model->forward(ids, mask).hidden;
  model->train(false);
  CATCH_CHECK_FALSE(trained.requires_grad());  // no factor entered the graph
}

CATCH_TEST_CASE("LoKr refuses, naming the key, a factor that does not divide, per-target patterns and another adapter's tensors", "[plugins][lokr][minilm]") {
  auto model = test::load_minilm();
  const auto& schema = test::registry().find("lokr")->params;
  auto refusal = [&](const std::vector<std::string>& targets, std::map<std::string, ParamValue> given) {
    auto lokr = test::registry().create("lokr", "refused");
    try {
      lokr->attach(*model, targets, apply_schema(schema, std::move(given)));
    } catch (const std::exception& e) {
      CATCH_CHECK_FALSE(model->linear_sites().front()->has_interventions());  // nothing left behind
      return std::string(e.what());
    }
    return std::string("(attached)");
  };
  // 5 divides neither 384 nor 1536: PEFT would take 4 x 96 without a word.
  CATCH_CHECK_THAT(refusal({"attn.q"}, {{"decompose_factor", std::int64_t{5}}}),
                   Catch::Contains("decompose_factor = 5 does not divide out_features = 384 of layers.0.attn.q") && Catch::Contains("4 x 96"));
  // 256 divides mlp.up's 1536 outputs but not its 384 inputs.
  CATCH_CHECK_THAT(refusal({"mlp.up"}, {{"decompose_factor", std::int64_t{256}}}), Catch::Contains("decompose_factor = 256 does not divide in_features = 384"));
  CATCH_CHECK_THAT(refusal({"attn.q"}, {{"decompose_factor", std::int64_t{0}}}), Catch::Contains("decompose_factor must be -1 or a positive divisor"));
  CATCH_CHECK_THROWS_WITH(apply_schema(schema, {{"decompose_factor", std::int64_t{-2}}}), Catch::Contains("'decompose_factor' = -2 is outside"));
  CATCH_CHECK_THROWS_WITH(apply_schema(schema, {{"init_weights", std::string("gaussian")}}), Catch::Contains("'init_weights' = \"gaussian\" is not one of"));
  CATCH_CHECK_THAT(refusal({"attn.q"}, {{"rank_pattern", NumberTable{{"query", 2.0}}}}), Catch::Contains("rank_pattern is not supported"));
  CATCH_CHECK_THAT(refusal({"attn.q"}, {{"alpha_pattern", NumberTable{{"query", 4.0}}}}), Catch::Contains("alpha_pattern is not supported"));
  CATCH_CHECK(refusal({"attn.q"}, {{"decompose_factor", std::int64_t{16}}}) == "(attached)");  // 384 = 16 · 24

  // peft's KronA tensors (two full factors per site) into a LoKr of r = 4 (W2 a pair): refused.
  auto lokr = test::registry().create("lokr", "r4");
  lokr->attach(*model, {"attn.q", "attn.v", "mlp.up"}, apply_schema(schema, {{"r", std::int64_t{4}}}));
  const auto krona = test::read_tensors(test::fixture("krona/adapter_model.safetensors"));
  CATCH_CHECK_THROWS_WITH(lokr->call("load_state", [&](Method& m) { m.load_state(krona); }), Catch::Contains("this LoKr has 54"));
  auto bad = lokr->call("state", [](Method& m) { return m.state(); });
  bad.begin()->second = at::zeros({3, 3});
  CATCH_CHECK_THROWS_WITH(lokr->call("load_state", [&](Method& m) { m.load_state(bad); }), Catch::Contains("has shape [3, 3], expected"));
}
