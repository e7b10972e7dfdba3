// AdaLoRA against peft's AdaLoraModel (tests/fixtures/make_adalora.py): from the same
// starting adapter, eight plain SGD steps on the same loss with the same regulariser, the
// allocation after each step (tessera.method.after_step) — warm-up, shrinking budget, forced
// final pattern, fixed pattern — give peft's Λ after every step, its final rank pattern, its
// hidden states and its saved files; peft's saved subset loads here with its outputs.
#include "support.h"

#include "runtime/peft_import.h"

#include <tessera/extensions.h>

#include <nlohmann/json.hpp>

using namespace tessera;

namespace {

NamedTensors& reference() { return test::cached_tensors(test::fixture("adalora/reference.safetensors")); }

std::map<std::string, std::string> hf_paths(ModelView& model) {  // site name -> HF module path
  std::map<std::string, std::string> out;
  for (auto* s : model.linear_sites()) out[s->name()] = s->hf_path();
  return out;
}

std::unique_ptr<MethodInstance> load_folder(const std::string& dir, ModelView& model) {  // peft's folder as `tessera eval` reads it
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  auto inst = test::registry().create(mc.plugin, "adapter");
  inst->attach(model, mc.targets, mc.checked);
  const auto tensors = test::read_tensors(dir + "/adapter_model.safetensors");
  inst->call("load_state", [&](Method& m) { m.load_state(tensors); });
  return inst;
}

}  // namespace

CATCH_TEST_CASE("AdaLoRA equals peft through eight SGD steps: Λ after each step, the rank pattern, outputs and files", "[plugins][adalora][minilm][parity]") {
  auto model = test::load_minilm();
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = enc["input_ids"], mask = enc["attention_mask"];
  {
    // peft's trained folder (sites resized to their kept triplets, some to none) here.
    auto model2 = test::load_minilm();
    auto loaded = load_folder(test::fixture("adalora/trained"), *model2);
    TESSERA_CHECK_PARITY(test::parity(model2->forward(ids, mask).hidden, reference(), "hidden_after", mask));
    // Saved again, it is what peft saved, its pattern k of init_r per site.
    const auto peft_saved = test::read_tensors(test::fixture("adalora/trained/adapter_model.safetensors"));
    const auto again = loaded->call("state", [](Method& m) { return m.state(); });
    for (const auto& [k, t] : peft_saved) CATCH_CHECK((again.count(k) == 1 && again.at(k).sizes() == t.sizes()));
    const auto cfg2 = nlohmann::json::parse(loaded->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
    for (const auto& [name, t] : reference()) {
      if (name.rfind("pattern.", 0) != 0) continue;
      std::int64_t n = 0, len = 0;
      for (const auto& b : cfg2["rank_pattern"][name.substr(8)]) n += b.get<bool>() ? 1 : 0, ++len;
      CATCH_CHECK(n == t.sum().item<std::int64_t>());
      CATCH_CHECK(len == 4);
    }
  }
  const std::string initial = test::fixture("adalora/initial");
  MethodConfig mc = method_from_peft_dir(initial, test::registry(), "adapter");
  CATCH_CHECK(mc.plugin == "adalora");
  CATCH_CHECK(mc.checked.integer("init_r") == 4);
  CATCH_CHECK(mc.checked.integer("total_step") == 8);
  auto ada = test::attach_peft_adapter(initial, *model);
  const auto* ext = ada->extension<tessera_method_after_step_v1>(TESSERA_EXT_METHOD_AFTER_STEP, 1);
  CATCH_REQUIRE(ext != nullptr);
  const auto paths = hf_paths(*model);
  const Tensor direction = reference()["direction"];
  const double lr = 0.1;
  auto params = ada->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_REQUIRE(params.size() == 3 * 18);
  for (std::int64_t step = 0; step < 8; ++step) {
    for (auto& [k, p] : params) p.mutable_grad().reset();
    const Tensor h = model->forward(ids, mask).hidden;
    Tensor loss = (h * direction * mask.unsqueeze(-1)).sum() / mask.sum();
    if (step == 0) {
      const Tensor task = loss.detach();
      loss = loss + ada->call("extra_loss", [](Method& m) { return m.extra_loss(); });
      const double reg = (loss.detach() - task).item<double>();
      CATCH_CHECK(reg > 0);  // the orthogonality term is there
      CATCH_CHECK(std::abs(loss.item<double>() - reference()["loss0"].item<double>()) <= 1e-5 * std::abs(reference()["loss0"].item<double>()));
    } else {
      loss = loss + ada->call("extra_loss", [](Method& m) { return m.extra_loss(); });
    }
    loss.backward();
    {
      at::NoGradGuard no_grad;
      for (auto& [k, p] : params) p.sub_(lr * p.grad());
    }
    const StepInfo info{step, 8, lr};
    ada->call("after_step", [&](Method&) { ext->after_step(ext->method, &info); });
    for (const auto& [k, p] : params) {
      if (k.size() < 7 || k.compare(k.size() - 7, 7, ".lora_E") != 0) continue;
      const std::string site = k.substr(0, k.size() - 7);
      const Tensor want = reference()["E." + std::to_string(step) + "." + paths.at(site) + ".lora_E"];
      CATCH_INFO("step " << step << ", " << site);
      CATCH_CHECK(test::max_abs_diff(p.reshape({-1}), want) <= 1e-4 * std::max(1.0, want.abs().max().item<double>()));
      CATCH_CHECK(at::equal(p.reshape({-1}).eq(0).cpu(), want.eq(0)));  // the same triplets masked
    }
  }
  // The final pattern, as peft writes it into adapter_config.json.
  const auto cfg = nlohmann::json::parse(ada->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["peft_type"] == "ADALORA");
  std::int64_t kept = 0;
  for (const auto& [name, t] : reference()) {
    if (name.rfind("pattern.", 0) != 0) continue;
    const std::string key = name.substr(8);
    CATCH_REQUIRE(cfg["rank_pattern"].contains(key));
    std::vector<std::int64_t> bits;
    for (const auto& b : cfg["rank_pattern"][key]) bits.push_back(b.get<bool>() ? 1 : 0);
    CATCH_CHECK(at::equal(at::tensor(bits), t));
    kept += t.sum().item<std::int64_t>();
  }
  CATCH_CHECK(kept == 2 * 18);  // the target budget: target_r per site on average
  at::NoGradGuard no_grad;
  // Eight steps carry each side's float32 rounding into the weights: after them the
  // two trainings agree to ~3e-4 relative (the exact comparison is peft's weights, below).
  const Tensor truth = reference()["hidden_after"];
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, truth, mask) <= 2e-3 * truth.abs().max().item<double>());
  // Our saved tensors are peft's: the kept triplets only.
  const auto peft_saved = test::read_tensors(test::fixture("adalora/trained/adapter_model.safetensors"));
  const auto ours = ada->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(ours.size() == peft_saved.size());
  for (const auto& [k, t] : peft_saved) {
    CATCH_INFO(k);
    CATCH_REQUIRE(ours.count(k) == 1);
    CATCH_REQUIRE(ours.at(k).sizes() == t.sizes());
    if (t.numel() > 0) CATCH_CHECK(test::max_abs_diff(ours.at(k), t) <= 2e-3 * std::max(1.0, t.abs().max().item<double>()));
  }
  // Merged equals unmerged.
  const Tensor unmerged = model->forward(ids, mask).hidden;
  ada->call("merge", [](Method& m) { m.merge(); });
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, unmerged, mask) < 1e-4);
  ada->call("unmerge", [](Method& m) { m.unmerge(); });
}

CATCH_TEST_CASE("AdaLoRA refuses a schedule without a budget phase, a target above the start, ranks beyond a site", "[plugins][adalora]") {
  const auto& schema = test::registry().find("adalora")->params;
  auto model = test::load_minilm();
  auto check = [&](std::map<std::string, ParamValue> given, const std::string& key, const std::string& why) {
    auto inst = test::registry().create("adalora", "a");
    try {
      inst->attach(*model, {"attn.q"}, apply_schema(schema, std::move(given)));
      CATCH_FAIL("accepted");
    } catch (const ParamError& e) {
      CATCH_CHECK(e.key() == key);
      CATCH_CHECK_THAT(std::string(e.what()), Catch::Contains(why));
    }
  };
  check({{"tinit", std::int64_t{6}}, {"tfinal", std::int64_t{2}}, {"total_step", std::int64_t{8}}}, "tfinal", "leave no budget phase in 8 steps");
  check({{"init_r", std::int64_t{4}}, {"target_r", std::int64_t{6}}}, "target_r", "above init_r 4");
  check({{"init_r", std::int64_t{400}}}, "init_r", "exceeds min(in, out) = 384");
  check({{"beta1", 1.0}}, "beta1", "strictly between 0 and 1");
  // A saved subset larger than init_r is refused naming the tensor.
  auto inst = test::registry().create("adalora", "b");
  inst->attach(*model, {"layers.0.attn.q"}, apply_schema(schema, {{"init_r", std::int64_t{2}}, {"target_r", std::int64_t{1}}}));
  auto state = inst->call("state", [](Method& m) { return m.state(); });
  state.at("base_model.model.encoder.layer.0.attention.self.query.lora_A") = at::zeros({3, 384});
  CATCH_CHECK_THROWS_WITH(inst->call("load_state", [&](Method& m) { m.load_state(state); }),
                          Catch::Contains("'base_model.model.encoder.layer.0.attention.self.query.lora_A' has shape [3, 384], expected k ≤ init_r = 2"));
}
