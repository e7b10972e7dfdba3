// `tessera merge`'s combinations against peft's add_weighted_adapter (tests/fixtures/
// make_merge.py): every combination type on two LoRA adapters of MiniLM (one rsLoRA, a
// negative weight, modules only one of them has), mixed ranks for cat and svd, TIES's two
// sign elections, DARE's masks from the same seed in the model's module order. The factors of
// the deterministic kinds equal peft's; an svd result's product B·A equals peft's (its
// factors' signs are the SVD's choice); bad input names the folder and the key.
#include "support.h"

#include "runtime/adapter_deltas.h"
#include "runtime/weighted_merge.h"

#include <nlohmann/json.hpp>

using namespace tessera;

namespace {

std::string dir(const std::string& name) { return test::fixture("merge/" + name); }

NamedTensors& reference() { return test::cached_tensors(test::fixture("merge/reference.safetensors")); }

std::vector<std::string> module_order() {
  static const std::vector<std::string> order = [] {
    auto model = test::load_minilm();
    std::vector<std::string> o;
    for (auto* s : model->linear_sites()) o.push_back(s->hf_path());
    return o;
  }();
  return order;
}

}  // namespace

CATCH_TEST_CASE("tessera merge equals peft's add_weighted_adapter for every combination type", "[runtime][merge][minilm]") {
  struct Case {
    std::string name, kind;
    std::vector<std::string> adapters;
    std::optional<std::int64_t> svd_rank;
    std::optional<double> svd_clamp;
    std::string sign = "total";
  };
  std::vector<Case> cases;
  for (const char* k : {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"})
    cases.push_back({k, k, {"a", "b"}, {}, {}});
  cases.push_back({"cat_mixed", "cat", {"a", "c"}, {}, {}});
  cases.push_back({"svd_mixed", "svd", {"a", "c"}, 5, 0.9});
  cases.push_back({"ties_frequency", "ties", {"a", "b"}, {}, {}, "frequency"});
  for (const auto& c : cases) {
    CATCH_INFO("combination " << c.name);
    WeightedMerge how;
    for (const auto& a : c.adapters) how.adapters.push_back(dir(a));
    how.weights = {0.7, -0.4};
    how.combination = c.kind;
    how.density = 0.5;
    how.svd_rank = c.svd_rank;
    how.svd_clamp = c.svd_clamp;
    how.majority_sign = c.sign;
    how.seed = 1234;
    how.module_order = module_order();
    const MergedAdapter got = weighted_merge(how);
    std::size_t n = 0;
    const bool svd = c.kind.size() >= 3 && c.kind.compare(c.kind.size() - 3, 3, "svd") == 0;
    for (const auto& [key, want] : reference()) {
      if (key.rfind(c.name + "/", 0) != 0) continue;
      ++n;
      const std::string k = key.substr(c.name.size() + 1);
      CATCH_INFO(k);
      CATCH_REQUIRE(got.tensors.count(k) == 1);
      CATCH_REQUIRE(got.tensors.at(k).sizes() == want.sizes());
      if (!svd) {
        CATCH_CHECK(test::max_abs_diff(got.tensors.at(k), want) <= 1e-6 * std::max(1.0, want.abs().max().item<double>()));
        CATCH_CHECK(at::equal(got.tensors.at(k).eq(0), want.eq(0)));  // the same entries pruned
      } else if (k.find("lora_A") != std::string::npos) {  // B·A: the factors' signs are the SVD's choice
        const std::string kb = k.substr(0, k.size() - std::string("lora_A.weight").size()) + "lora_B.weight";
        const Tensor ours = at::matmul(got.tensors.at(kb), got.tensors.at(k)), theirs = at::matmul(reference().at(c.name + "/" + kb), want);
        CATCH_CHECK(test::max_abs_diff(ours, theirs) <= 1e-5 * std::max(1e-3, theirs.abs().max().item<double>()));
        if (!c.svd_clamp) CATCH_CHECK(test::max_abs_diff(ours, theirs) <= 1e-5 * theirs.abs().max().item<double>());
      }
    }
    CATCH_CHECK(n == got.tensors.size());
    CATCH_CHECK(n > 0);
    const auto cfg = nlohmann::json::parse(got.config_json);
    CATCH_CHECK(cfg["r"] == got.rank);
    CATCH_CHECK(cfg["lora_alpha"] == got.rank);
  }
}

CATCH_TEST_CASE("tessera merge: cat is exactly the weighted sum of the updates, and bad input is named", "[runtime][merge]") {
  WeightedMerge how;
  how.adapters = {dir("a"), dir("c")};
  how.weights = {0.7, -0.4};
  how.combination = "cat";
  const MergedAdapter got = weighted_merge(how);
  CATCH_CHECK(got.rank == 10);
  // query: 0.7·(8/4)·B_a A_a − 0.4·(12/6)·B_c A_c, from the input files themselves
  const auto a = test::read_tensors(dir("a") + "/adapter_model.safetensors"), c = test::read_tensors(dir("c") + "/adapter_model.safetensors");
  const std::string q = "base_model.model.encoder.layer.3.attention.self.query.lora_";
  const Tensor want = at::matmul(a.at(q + "B.weight"), a.at(q + "A.weight")).to(at::kDouble) * 1.4 -
                      at::matmul(c.at(q + "B.weight"), c.at(q + "A.weight")).to(at::kDouble) * 0.8;
  CATCH_CHECK(test::max_abs_diff(at::matmul(got.tensors.at(q + "B.weight"), got.tensors.at(q + "A.weight")), want) <= 1e-5 * want.abs().max().item<double>());

  auto refused = [&](WeightedMerge w, const std::string& why) {
    CATCH_INFO(why);
    CATCH_CHECK_THROWS_WITH(weighted_merge(w), Catch::Contains(why));
  };
  WeightedMerge bad = how;
  bad.combination = "linear";
  refused(bad, "needs adapters of one rank: " + dir("a") + " has r = 4, " + dir("c") + " r = 6");
  bad = how, bad.combination = "ties";
  refused(bad, "combination ties needs a density");
  bad = how, bad.combination = "dare_linear", bad.density = 0.5;
  refused(bad, "give the model (--model)");
  bad = how, bad.combination = "dare_ties", bad.density = 0.0, bad.module_order = {"x"};
  refused(bad, "with density 0 keeps nothing and divides by 0");
  bad = how, bad.weights = {1.0};
  refused(bad, "1 weights for 2 adapters");
  bad = how, bad.combination = "average";
  refused(bad, "combination 'average' is none of");
  bad = how, bad.combination = "svd", bad.svd_rank = 500;
  refused(bad, "svd rank 500 exceeds min(out, in) = 384 of module 'encoder.layer.0.attention.self.query'");
  bad = how, bad.adapters = {dir("a"), test::fixture("merge")};
  refused(bad, test::fixture("merge") + ": no adapter_config.json");
  bad = how, bad.adapters = {dir("a"), test::fixture("loha")};
  refused(bad, "a 'LOHA' adapter's update is no pair of LoRA factors: its plugin computes it on the base model (give the model, --model)");
}

CATCH_TEST_CASE("tessera merge combines LoHa, LoKr, VeRA, AdaLoRA and DoRA adapters with a LoRA through their updates, as peft merges each", "[runtime][merge][minilm]") {
  auto model = test::load_minilm();
  const std::vector<std::pair<std::string, double>> inputs = {
      {test::fixture("loha"), 0.7}, {test::fixture("lokr"), -0.4}, {test::fixture("vera"), 0.5},
      {test::fixture("adalora/trained"), 0.3}, {test::fixture("lora_dora"), 0.6}, {test::fixture("lora_basic"), 0.8}};
  WeightedMerge how;
  for (const auto& [d, w] : inputs) {
    how.adapters.push_back(d), how.weights.push_back(w);
    if (d != test::fixture("lora_basic")) how.deltas[d] = linear_weight_deltas(d, *model, test::registry());  // each by its own plugin
  }
  // The model is as it was: every update taken back.
  {
    at::NoGradGuard no_grad;
    auto& ref = test::cached_tensors(test::fixture("reference.safetensors"));
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ref["input_ids"], ref["attention_mask"]).hidden, ref["hidden"], ref["attention_mask"]) < 1e-5);
  }
  how.combination = "svd";
  how.svd_rank = 384;  // min(out, in) of every module: the sum itself, no truncation
  const MergedAdapter got = weighted_merge(how);
  // peft: each folder merged by peft into the encoder, the updates summed with the same weights.
  const auto out = test::temp_dir("merge-any") / "peft.safetensors";
  std::string cmd = test::python() + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/peft_merged_deltas.py " + test::model_dir() + " " + out.string();
  for (const auto& [d, w] : inputs) cmd += " " + d + " " + std::to_string(w);
  CATCH_REQUIRE(std::system(cmd.c_str()) == 0);
  const auto theirs = test::read_tensors(out.string());
  CATCH_CHECK(theirs.size() == 3 * 6);  // query, value, intermediate.dense of six layers
  CATCH_CHECK(got.tensors.size() == 2 * theirs.size());
  for (const auto& [module, delta] : theirs) {
    CATCH_INFO(module);
    const Tensor BA = at::matmul(got.tensors.at("base_model.model." + module + ".lora_B.weight"), got.tensors.at("base_model.model." + module + ".lora_A.weight"));
    CATCH_CHECK((BA.to(at::kDouble) - delta.to(at::kDouble)).abs().max().item<double>() <= 1e-4 * delta.abs().max().item<double>());
  }
  const auto cfg = nlohmann::json::parse(got.config_json);
  CATCH_CHECK(cfg["peft_type"] == "LORA");
  CATCH_CHECK(cfg["r"] == 384);
  CATCH_CHECK(cfg["use_dora"] == false);
  // Refused, naming the folder and what to do: an update through a factor-wise kind, without a
  // rank, or without its update computed; a method whose merge changes a bias.
  how.combination = "linear";
  CATCH_CHECK_THROWS_WITH(weighted_merge(how), Catch::Contains(test::fixture("loha") + " is a LOHA adapter: combination linear combines LoRA factors"));
  how.combination = "svd";
  how.svd_rank.reset();
  CATCH_CHECK_THROWS_WITH(weighted_merge(how), Catch::Contains("give the svd rank (--svd-rank)"));
  how.svd_rank = 8;
  how.deltas.erase(test::fixture("lokr"));
  CATCH_CHECK_THROWS_WITH(weighted_merge(how), Catch::Contains("'LOKR' adapter's update is no pair of LoRA factors"));
  CATCH_CHECK_THROWS_WITH(linear_weight_deltas(test::fixture("ia3_default"), *model, test::registry()),
                          Catch::Contains("changes 'encoder.layer.0.attention.self.key.bias', which is no linear layer's weight"));
}
