// `tessera merge`'s combinations against peft's add_weighted_adapter (tests/fixtures/
// make_merge.py): every combination type on two LoRA adapters of MiniLM (one rsLoRA, a
// negative weight, modules only one of them has), mixed ranks for cat and svd, TIES's two
// sign elections, DARE's masks from the same seed in the model's module order. The factors of
// the deterministic kinds equal peft's; an svd result's product B·A equals peft's (its
// factors' signs are the SVD's choice); bad input names the folder and the key.
#include "support.h"

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
  refused(bad, "peft_type is 'LOHA'; only LoRA adapters are combined");
}
