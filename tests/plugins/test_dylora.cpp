// DyLoRA against a plain PyTorch rendering of the paper's equations (tests/fixtures/make_dylora.py)
// on the real MiniLM: the same A and B, the same inputs; the outputs at every rank b, merged and
// unmerged; the gradients of A and B of a fixed loss at each rank the steps draw, in both
// training modes — which entries get one and their values. Then the rank draws themselves (in
// [r_min, r], a function of the seed alone), the refusals, and the files.
#include "support.h"

#include "runtime/peft_import.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>

using namespace tessera;

namespace {

NamedTensors& reference() { return test::cached_tensors(test::fixture("dylora/reference.safetensors")); }
NamedTensors& adapter_file() { return test::cached_tensors(test::fixture("dylora/adapter_model.safetensors")); }
const std::vector<std::string> kTargets = {"query", "value", "intermediate.dense"};

std::int64_t ref_rank() { return reference().at("r").item<std::int64_t>(); }

Params dylora_params(std::map<std::string, ParamValue> given) {
  given.emplace("r", ref_rank());
  given.emplace("alpha", reference().at("alpha").item<double>());
  return apply_schema(test::registry().find("dylora")->params, given);
}

std::unique_ptr<MethodInstance> attach_reference(ModelView& model, std::map<std::string, ParamValue> given) {
  auto inst = test::registry().create("dylora", "dylora");
  inst->attach(model, kTargets, dylora_params(std::move(given)));
  inst->call("load_state", [](Method& m) { m.load_state(adapter_file()); });
  return inst;
}

// The same MiniLM with its dropout off (make_dylora.py), so a training-mode forward compares.
std::unique_ptr<BertModel> load_minilm_without_dropout() {
  auto m = BertModel::load(test::fixture("dylora/minilm_nodrop"), test::options());
  test::perturb_if_asked(*m);
  return m;
}

// One training step's forward and backward of the reference's loss, its rank drawn by on_step.
void step(MethodInstance& inst, BertModel& model, std::int64_t i) {
  const auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor mask = enc.at("attention_mask");
  for (auto& [k, t] : inst.call("trainable", [](Method& m) { return m.trainable(); })) t.mutable_grad().reset();
  const StepInfo info{i, 100, 1e-3};
  inst.call("on_step", [&](Method& m) { m.on_step(info); });
  model.train(true);
  const Tensor h = model.forward(enc.at("input_ids"), mask).hidden;  // (B, T, H)
  (h * reference().at("direction").to(h.device()) * mask.unsqueeze(-1).to(h.scalar_type())).sum().backward();
  model.train(false);
}

// The rank of the last step, read from which columns of B got a gradient: the highest is b's.
std::int64_t rank_of_step(MethodInstance& inst) {
  const auto state = inst.call("state", [](Method& m) { return m.state(); });
  for (const auto& [k, t] : state) {
    if (k.find(".lora_B.") == std::string::npos) continue;
    CATCH_REQUIRE(t.grad().defined());
    const Tensor touched = t.grad().ne(0).any(0).nonzero();  // (columns with a gradient, 1)
    CATCH_REQUIRE(touched.numel() > 0);
    return touched.max().item<std::int64_t>() + 1;
  }
  throw std::runtime_error("no lora_B in the state");
}

}  // namespace

CATCH_TEST_CASE("DyLoRA equals the paper's equations: outputs at every rank, merged and unmerged", "[plugins][dylora][minilm][parity]") {
  const auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc.at("input_ids"), mask = enc.at("attention_mask");
  auto model = test::load_minilm();
  at::NoGradGuard no_grad;
  for (std::int64_t b = 1; b <= ref_rank(); ++b) {
    CATCH_INFO("eval_rank " << b);
    const std::string key = "hidden.b" + std::to_string(b);
    auto inst = attach_reference(*model, {{"eval_rank", b}});
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), key, mask));
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, enc.at("hidden"), mask) > 1e-2);  // the update shows
    inst->call("merge", [](Method& m) { m.merge(); });
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), key, mask));
    inst->call("unmerge", [](Method& m) { m.unmerge(); });
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), key, mask));
    inst->detach(*model);
  }
  // Ranks differ: rank 1's output is not rank r's.
  CATCH_CHECK(test::max_abs_diff_tokens(reference().at("hidden.b1"), reference().at("hidden.b" + std::to_string(ref_rank())), mask) > 1e-2);
}

CATCH_TEST_CASE("DyLoRA's gradients equal the paper's at each drawn rank: the b-th part alone (last) or the first b (all)", "[plugins][dylora][minilm][parity]") {
  auto model = load_minilm_without_dropout();
  for (const std::string mode : {"last", "all"}) {
    CATCH_INFO("train_parts " << mode);
    auto inst = attach_reference(*model, {{"train_parts", mode}, {"seed", std::int64_t{11}}});
    std::set<std::int64_t> seen;
    for (std::int64_t i = 0; i < 64 && static_cast<std::int64_t>(seen.size()) < ref_rank(); ++i) {
      step(*inst, *model, i);
      const std::int64_t b = rank_of_step(*inst);
      CATCH_INFO("step " << i << ", rank " << b);
      CATCH_REQUIRE((b >= 1 && b <= ref_rank()));
      if (!seen.insert(b).second) continue;  // each rank compared once
      std::size_t compared = 0;
      for (const auto& [k, t] : inst->call("state", [](Method& m) { return m.state(); })) {
        CATCH_INFO(k);
        const std::string ref_key = "grad." + mode + ".b" + std::to_string(b) + "." + k;
        const Tensor& theirs = reference().at(ref_key);
        CATCH_REQUIRE(t.grad().defined());
        // Which entries got a gradient: exactly the reference's (the rest exactly zero).
        CATCH_CHECK(at::equal(t.grad().ne(0).cpu(), theirs.ne(0).cpu()));
        // A gradient summed over every token of the batch through the whole backward: a floor of
        // 64 float32 steps of its size, not the outputs' 16 (docs/testing.md).
        TESSERA_CHECK_PARITY(test::parity(ref_key, t.grad(), theirs, reference().at(ref_key + ".f64"), {}, 4 * test::kParityFloor));
        ++compared;
      }
      CATCH_CHECK(compared == 2 * 18);  // A and B on query, value, intermediate.dense of six layers
    }
    CATCH_CHECK(static_cast<std::int64_t>(seen.size()) == ref_rank());  // every rank drawn (and checked)
    inst->detach(*model);
  }
}

CATCH_TEST_CASE("DyLoRA's ranks stay in [r_min, r] and follow the seed alone", "[plugins][dylora][minilm]") {
  auto model = load_minilm_without_dropout();
  // The ranks of n steps of a fresh instance (last mode: the one column of B with a gradient).
  auto ranks = [&](std::int64_t seed, int n) {
    auto inst = test::registry().create("dylora", "dylora");
    inst->attach(*model, {"layers.0.attn.q"},
                 apply_schema(test::registry().find("dylora")->params, {{"r", std::int64_t{6}}, {"r_min", std::int64_t{3}}, {"seed", seed}}));
    std::vector<std::int64_t> out;
    for (int i = 0; i < n; ++i) {
      at::manual_seed(1000 + i);  // torch's generator moved between steps: the draws must not follow it
      at::randn({17});
      step(*inst, *model, i);
      out.push_back(rank_of_step(*inst));
      const auto state = inst->call("state", [](Method& m) { return m.state(); });
      for (const auto& [k, t] : state)  // last mode: one row of A and one column of B
        CATCH_CHECK(t.grad().ne(0).any(k.find(".lora_A.") != std::string::npos ? 1 : 0).sum().item<std::int64_t>() <= 1);
    }
    inst->detach(*model);
    return out;
  };
  const auto a = ranks(5, 40);
  std::set<std::int64_t> values(a.begin(), a.end());
  CATCH_CHECK(*values.begin() >= 3);
  CATCH_CHECK(*values.rbegin() <= 6);
  CATCH_CHECK(values == std::set<std::int64_t>{3, 4, 5, 6});  // uniform on [3, 6]: 40 draws see every value
  CATCH_CHECK(ranks(5, 40) == a);                              // the same seed, the same ranks
  CATCH_CHECK(ranks(6, 40) != a);                              // another seed, others
  // seed = -1: drawn from torch's generator at attach, so the run's seed fixes the ranks.
  at::manual_seed(42);
  const auto c = ranks(-1, 12);
  at::manual_seed(42);
  CATCH_CHECK(ranks(-1, 12) == c);
}

CATCH_TEST_CASE("DyLoRA outside training uses eval_rank whatever the steps drew", "[plugins][dylora][minilm]") {
  const auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc.at("input_ids"), mask = enc.at("attention_mask");
  auto model = load_minilm_without_dropout();
  auto inst = attach_reference(*model, {{"eval_rank", std::int64_t{2}}, {"seed", std::int64_t{3}}});
  Tensor before;
  {
    at::NoGradGuard no_grad;
    before = model->forward(ids, mask).hidden;
  }
  for (std::int64_t i = 0; i < 4; ++i) step(*inst, *model, i);  // no optimizer: A and B unchanged
  at::NoGradGuard no_grad;
  CATCH_CHECK(at::equal(model->forward(ids, mask).hidden, before));
  // The training forward at rank b is the evaluation at rank b (no dropout: the same products).
  inst->call("on_step", [](Method& m) { m.on_step(StepInfo{4, 100, 1e-3}); });
  model->train(true);
  const Tensor trained = model->forward(ids, mask).hidden;
  model->train(false);
  bool matched = false;
  for (std::int64_t b = 1; b <= ref_rank(); ++b) matched |= test::max_abs_diff_tokens(trained, reference().at("hidden.b" + std::to_string(b)), mask) < 1e-4;
  CATCH_CHECK(matched);
}

CATCH_TEST_CASE("DyLoRA refuses an eval_rank or r_min outside [1, r], naming the key", "[plugins][dylora]") {
  const auto* info = test::registry().find("dylora");
  CATCH_REQUIRE(info != nullptr);
  auto inst = test::registry().create("dylora", "dylora");
  auto refused = [&](std::map<std::string, ParamValue> given) -> std::string {
    try {
      const Params p = apply_schema(info->params, std::move(given));
      inst->call("validate", [&](Method& m) { m.validate(p); });
    } catch (const ParamError& e) {
      return e.key() + ": " + e.what();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  };
  CATCH_CHECK_THAT(refused({{"r", std::int64_t{8}}, {"eval_rank", std::int64_t{9}}}), Catch::StartsWith("eval_rank: ") && Catch::Contains("outside [1, r = 8]"));
  CATCH_CHECK_THAT(refused({{"eval_rank", std::int64_t{-1}}}), Catch::Contains("eval_rank"));
  CATCH_CHECK_THAT(refused({{"r", std::int64_t{4}}, {"r_min", std::int64_t{5}}}), Catch::StartsWith("r_min: "));
  CATCH_CHECK_THAT(refused({{"train_parts", std::string("first")}}), Catch::Contains("train_parts"));
  CATCH_CHECK(refused({{"r", std::int64_t{8}}, {"eval_rank", std::int64_t{8}}, {"r_min", std::int64_t{8}}}).empty());
  CATCH_CHECK(refused({}).empty());  // eval_rank 0: r
  // attach() checks too (a folder read back by the importer skips validate()).
  auto model = test::load_minilm();
  CATCH_CHECK_THROWS_AS(inst->attach(*model, kTargets, apply_schema(info->params, {{"r", std::int64_t{2}}, {"eval_rank", std::int64_t{3}}})), ParamError);
}

CATCH_TEST_CASE("DyLoRA's files: LoRA's keys, its own config read back, and a rank-k truncation is a plain LoRA of rank k", "[plugins][dylora][minilm][parity]") {
  const auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc.at("input_ids"), mask = enc.at("attention_mask");
  auto model = test::load_minilm();
  auto inst = attach_reference(*model, {{"eval_rank", std::int64_t{2}}, {"r_min", std::int64_t{2}}});
  const auto state = inst->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(state.size() == adapter_file().size());
  for (const auto& [k, t] : adapter_file()) CATCH_CHECK((state.count(k) == 1 && at::equal(state.at(k).cpu(), t.cpu())));
  const auto cfg = nlohmann::json::parse(inst->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["peft_type"] == "DYLORA");
  CATCH_CHECK(cfg["r"] == ref_rank());
  CATCH_CHECK(cfg["eval_rank"] == 2);
  CATCH_CHECK(cfg["r_min"] == 2);
  CATCH_CHECK(cfg["target_modules"].size() == 18);

  // The folder as the trainer writes it, read back through the importer: the same method.
  const auto dir = test::temp_dir("dylora");
  std::ofstream(dir / "adapter_config.json") << cfg.dump(2);
  save_safetensors((dir / "adapter_model.safetensors").string(), state, {{"format", "pt"}});
  MethodConfig mc = method_from_peft_dir(dir.string(), test::registry(), "again");
  CATCH_CHECK(mc.plugin == "dylora");
  CATCH_CHECK(mc.checked.integer("eval_rank") == 2);
  CATCH_CHECK(mc.checked.integer("r_min") == 2);
  CATCH_CHECK(mc.checked.number("alpha") == reference().at("alpha").item<double>());
  at::NoGradGuard no_grad;
  const Tensor ours = model->forward(ids, mask).hidden;
  TESSERA_CHECK_PARITY(test::parity(ours, reference(), "hidden.b2", mask));
  inst->detach(*model);
  {
    auto again = test::registry().create(mc.plugin, "again");
    again->attach(*model, mc.targets, mc.checked);
    again->call("load_state", [&](Method& m) { m.load_state(test::read_tensors((dir / "adapter_model.safetensors").string())); });
    CATCH_CHECK(at::equal(model->forward(ids, mask).hidden, ours));
    again->detach(*model);
  }

  // Rank k = 2 as a plain LoRA: A's first k rows, B's first k columns, r = k, lora_alpha = alpha.
  NamedTensors truncated;
  for (const auto& [k, t] : adapter_file()) truncated[k] = k.find(".lora_A.") != std::string::npos ? t.narrow(0, 0, 2) : t.narrow(1, 0, 2);
  auto lora = test::registry().create("lora", "plain");
  lora->attach(*model, kTargets,
               apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{2}}, {"lora_alpha", reference().at("alpha").item<double>()}}));
  lora->call("load_state", [&](Method& m) { m.load_state(truncated); });
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, reference(), "hidden.b2", mask));
  // A wrong shape is refused naming the tensor.
  auto bad = adapter_file();
  bad.begin()->second = at::zeros({3, 3});
  auto inst2 = test::registry().create("dylora", "bad");
  inst2->attach(*model, kTargets, dylora_params({}));
  CATCH_CHECK_THROWS_WITH(inst2->call("load_state", [&](Method& m) { m.load_state(bad); }), Catch::Contains("has shape [3, 3], expected"));
}
