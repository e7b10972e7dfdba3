// LoRA against peft: the same base weights, the same A and B (peft's saved adapter),
// the same inputs; unmerged, merged and unmerged again.
#include "support.h"
#include "plugins/trained_loads_in_peft.h"

#include "runtime/peft_import.h"

#include <tessera/dropout.h>

#include <nlohmann/json.hpp>

using namespace tessera;

CATCH_TEST_CASE("LoRA equals peft, unmerged and merged", "[plugins][lora][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  for (const std::string variant : {"lora_basic", "lora_rs_patterns", "lora_dora"}) {
    CATCH_INFO("variant " << variant);
    auto model = test::load_minilm();
    const auto dir = test::fixture(variant);
    MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
    CATCH_CHECK(mc.plugin == "lora");
    auto lora = test::attach_peft_adapter(dir, *model);  // our state in exactly peft's keys and shapes
    test::check_merge_parity(*lora, *model, ref, variant);
    lora->detach(*model);
  }
}

CATCH_TEST_CASE("DoRA's gradients equal peft's: A, B and the magnitudes, the norm detached", "[plugins][lora][minilm]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  const auto dir = test::fixture("lora_dora");
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  CATCH_CHECK(mc.checked.flag("use_dora"));
  auto dora = test::registry().create("lora", "adapter");
  dora->attach(*model, mc.targets, mc.checked);
  dora->call("load_state", [&](Method& m) { m.load_state(test::read_tensors(dir + "/adapter_model.safetensors")); });
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  (model->forward(ids, mask).hidden * ref["lora_dora.direction"] * mask.unsqueeze(-1)).sum().backward();
  const auto state = dora->call("state", [](Method& m) { return m.state(); });  // the trained tensors, by peft's keys
  std::size_t compared = 0;
  for (const auto& [k, t] : state) {
    CATCH_INFO(k);
    CATCH_REQUIRE(t.grad().defined());
    const Tensor theirs = ref.at("lora_dora.grad." + k).to(at::kDouble);
    const double err = (t.grad().to(at::kDouble) - theirs).abs().max().item<double>() / theirs.abs().max().item<double>();
    CATCH_CHECK(err < 2e-3);
    ++compared;
  }
  CATCH_CHECK(compared == 3 * 18);  // A, B, m on q, v and intermediate.dense of six layers
  // A plain LoRA refuses a DoRA file, saying so.
  auto plain = test::registry().create("lora", "plain");
  Params p = mc.checked;
  p.set("use_dora", false);
  plain->attach(*model, mc.targets, p);
  CATCH_CHECK_THROWS_WITH(plain->call("load_state", [&](Method& m) { m.load_state(test::read_tensors(dir + "/adapter_model.safetensors")); }),
                          Catch::Contains("it is a DoRA adapter (use_dora = true)"));
}

CATCH_TEST_CASE("PiSSA and OLoRA start from peft's A and B, and read and write peft's conversion to a plain LoRA of twice the rank", "[plugins][lora][minilm][parity]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  for (const std::string kind : {"pissa", "olora"}) {
    CATCH_INFO("init " << kind);
    auto model = test::load_minilm();
    Tensor base_out;
    {
      at::NoGradGuard no_grad;
      base_out = model->forward(ids, mask).hidden;
    }
    auto lora = test::registry().create("lora", "adapter");
    lora->attach(*model, {"query", "value"},
                 apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}, {"init_lora_weights", kind}}));
    // The start: peft's A and B (one SVD or QR of the same weight), the model still the base's.
    auto state = lora->call("state", [](Method& m) { return m.state(); });
    std::size_t compared = 0;
    for (const auto& [k, t] : state) {
      const bool is_a = k.find(".lora_A.") != std::string::npos;
      const Tensor ours = is_a ? t.narrow(0, 0, 4) : t.narrow(1, 0, 4);
      const Tensor theirs = ref.at("lora_" + kind + ".init." + k);
      CATCH_INFO(k);
      CATCH_CHECK((ours.to(at::kCPU, at::kDouble) - theirs.to(at::kDouble)).abs().max().item<double>() <= 1e-4 * theirs.abs().max().item<double>());
      ++compared;
    }
    CATCH_CHECK(compared == 2 * 12);
    {
      at::NoGradGuard no_grad;
      CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base_out, mask) < 1e-4);
    }
    // Peft's adapter after "training", converted: our outputs are peft's on its residual base.
    const auto file = test::read_tensors(test::fixture("lora_" + kind) + "/adapter_model.safetensors");
    lora->call("load_state", [&](Method& m) { m.load_state(file); });
    at::NoGradGuard no_grad;
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "lora_" + kind + ".hidden", mask));
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base_out, mask) > 1e-3);
    for (const auto& [k, t] : lora->call("state", [](Method& m) { return m.state(); })) CATCH_CHECK(at::equal(t.to(at::kCPU), file.at(k).to(at::kCPU)));
    const auto cfg = nlohmann::json::parse(lora->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
    CATCH_CHECK(cfg["r"] == 8);
    CATCH_CHECK(cfg["lora_alpha"] == 16.0);
    CATCH_CHECK(cfg["init_lora_weights"] == true);
    lora->call("merge", [](Method& m) { m.merge(); });
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "lora_" + kind + ".hidden", mask));
    lora->call("unmerge", [](Method& m) { m.unmerge(); });
    lora->detach(*model);
    // The converted folder is the plain LoRA it says it is: imported as one, the same outputs.
    MethodConfig mc = method_from_peft_dir(test::fixture("lora_" + kind), test::registry(), "plain");
    auto plain = test::registry().create("lora", "plain");
    plain->attach(*model, mc.targets, mc.checked);
    plain->call("load_state", [&](Method& m) { m.load_state(file); });
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "lora_" + kind + ".hidden", mask));
  }
  Params bad = apply_schema(test::registry().find("lora")->params, {{"init_lora_weights", std::string("pissa_niter_x")}});
  auto lora = test::registry().create("lora", "adapter");
  CATCH_CHECK_THROWS_WITH(lora->call("validate", [&](Method& m) { m.validate(bad); }), Catch::Contains("init_lora_weights must be true, gaussian"));
}

CATCH_TEST_CASE("PiSSA's fast init is torch.svd_lowrank from the same seed, on square, tall and wide weights", "[plugins][lora][minilm]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  for (const auto& [site, hf] : std::vector<std::pair<std::string, std::string>>{
           {"layers.0.attn.q", "attention.self.query"}, {"layers.0.mlp.up", "intermediate.dense"}, {"layers.0.mlp.down", "output.dense"}}) {
    CATCH_INFO(site);
    const double s = 8.0 / 4;  // lora_alpha / r
    auto lora = test::registry().create("lora", "pissa");
    at::manual_seed(31);  // the fixture's seed before torch.svd_lowrank(W, q = 4, niter = 2)
    lora->attach(*model, {site}, apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}, {"init_lora_weights", std::string("pissa_niter_2")}}));
    const auto state = lora->call("state", [](Method& m) { return m.state(); });
    const std::string key = "base_model.model.encoder.layer.0." + hf;
    // PEFT's PiSSA from svd_lowrank's (U, S, V): A = √(S/s) Vᵀ (r, in), B = U √(S/s) (out, r).
    const Tensor root = (ref.at("svd_lowrank." + hf + ".S").to(at::kDouble) / s).sqrt();
    const Tensor A = root.unsqueeze(1) * ref.at("svd_lowrank." + hf + ".V").to(at::kDouble).t();
    const Tensor B = ref.at("svd_lowrank." + hf + ".U").to(at::kDouble) * root.unsqueeze(0);
    // The saved file is PEFT's conversion ([A; A₀], [B, −B₀]): at the start both halves are the init.
    const Tensor ours_A = state.at(key + ".lora_A.weight").narrow(0, 0, 4).to(at::kCPU, at::kDouble);
    const Tensor ours_B = state.at(key + ".lora_B.weight").narrow(1, 0, 4).to(at::kCPU, at::kDouble);
    CATCH_CHECK((ours_A - A).abs().max().item<double>() <= 1e-4 * A.abs().max().item<double>());
    CATCH_CHECK((ours_B - B).abs().max().item<double>() <= 1e-4 * B.abs().max().item<double>());
    lora->detach(*model);
  }
}

CATCH_TEST_CASE("DoRA with dropout is peft's form: the base product of the dropped input, scaled by m over n minus 1", "[plugins][lora][minilm]") {
  if (!test::device().is_cpu()) return;  // the mask is recovered from its seed on the CPU path
  auto model = test::load_minilm();
  const double p = 0.3, s = 12.0 / 4;  // lora_dropout; lora_alpha / r
  auto dora = test::registry().create("lora", "dora");
  dora->attach(*model, {"layers.0.attn.q"},
               apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 12.0}, {"use_dora", true}, {"lora_dropout", p}}));
  // B away from its zero start and m away from n, or the dropped branch would add nothing.
  auto moved = dora->call("state", [](Method& m) { return m.state(); });
  at::manual_seed(3);
  for (auto& [k, t] : moved) t = k.find("magnitude") != std::string::npos ? t * (1 + 0.2 * at::randn_like(t)) : 0.1 * at::randn_like(t);
  dora->call("load_state", [&](Method& m) { m.load_state(moved); });
  auto& site = LinearSiteImpl::of(*model->match_linear({"layers.0.attn.q"}).at(0));
  const Tensor x = at::randn({2, 7, site.in_features()}, test::options());  // (B, T, in)
  const Tensor G = at::randn({2, 7, site.out_features()}, test::options());
  model->train(true);
  at::manual_seed(11);
  const Tensor y = site.forward(x);
  (y * G).sum().backward();
  model->train(false);
  // The mask: tessera::dropout's draw from the same seed, of ones of x's shape (0 or 1/(1 − p)).
  at::manual_seed(11);
  const Tensor keep = tessera::dropout(at::ones_like(x), p, true).to(at::kDouble);
  CATCH_REQUIRE((keep == 0).any().item<bool>());
  // PEFT's DoRA while dropout trains (tuners/lora/dora.py with base_result = None), in float64,
  // the row norm n = ‖W + s·B A‖ detached: W x + b + (m/n − 1) ⊙ W h + (m/n) ⊙ s·B A h, h = drop(x).
  const auto state = dora->call("state", [](Method& m) { return m.state(); });
  const std::string key = "base_model.model.encoder.layer.0.attention.self.query.";
  const auto leaf = [&](const std::string& k) { return state.at(key + k).detach().to(at::kCPU, at::kDouble).set_requires_grad(true); };
  const Tensor A = leaf("lora_A.weight"), B = leaf("lora_B.weight"), m = leaf("lora_magnitude_vector");
  const Tensor W = site.weight().base().to(at::kCPU, at::kDouble), b = site.bias()->value().to(at::kCPU, at::kDouble);
  const Tensor x64 = x.to(at::kCPU, at::kDouble), h = x64 * keep.to(at::kCPU);
  const Tensor n = at::linalg_vector_norm(W + s * at::matmul(B, A), 2, {1}).detach();
  const Tensor g = m / n;
  const Tensor expected = at::linear(x64, W, b) + (g - 1) * at::linear(h, W) + g * s * at::linear(at::linear(h, A), B);
  (expected * G.to(at::kCPU, at::kDouble)).sum().backward();
  const auto rel = [](const Tensor& ours, const Tensor& truth) {
    return (ours.to(at::kCPU, at::kDouble) - truth).abs().max().item<double>() / truth.abs().max().item<double>();
  };
  CATCH_CHECK(rel(y.detach(), expected.detach()) < 1e-5);
  // Without the mask (the undropped input), the outputs differ: the test sees the dropout.
  CATCH_CHECK(rel(y.detach(), (at::linear(x64, W, b) + (g - 1) * at::linear(x64, W) + g * s * at::linear(at::linear(x64, A), B)).detach()) > 1e-2);
  for (const auto& [name, truth] : std::vector<std::pair<std::string, Tensor>>{{"lora_A.weight", A}, {"lora_B.weight", B}, {"lora_magnitude_vector", m}}) {
    CATCH_INFO(name);
    CATCH_REQUIRE(state.at(key + name).grad().defined());
    CATCH_CHECK(rel(state.at(key + name).grad(), truth.grad()) < 1e-4);
  }
}

CATCH_TEST_CASE("a DoRA adapter Tessera trained loads in PeftModel.from_pretrained with equal outputs", "[plugins][lora][minilm][parity]") {
  // A small step: far from the base, the trained model would hide parity_can_fail's perturbation.
  test::check_trained_loads_in_peft("lora", {"attn.q", "attn.v", "mlp.up"}, {{"r", std::int64_t{4}}, {"lora_alpha", 12.0}, {"use_dora", true}}, 1e-3);
}

CATCH_TEST_CASE("a PiSSA or OLoRA adapter Tessera trained loads in PeftModel.from_pretrained, converted, with equal outputs", "[plugins][lora][minilm][parity]") {
  for (const std::string init : {"pissa", "olora"}) {
    CATCH_INFO("init " << init);  // the folder holds peft's conversion: a plain LoRA of twice the rank on the untouched base
    test::check_trained_loads_in_peft("lora", {"attn.q", "attn.v", "mlp.down"}, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}, {"init_lora_weights", init}}, 1e-3);
  }
}

CATCH_TEST_CASE("LoRA-FA equals peft's LoraFAOptimizer: A frozen, B after three steps on the projected gradient", "[plugins][lora][minilm][parity]") {
  // tests/fixtures/make_lorafa.py: peft's optimizer (its float32 arithmetic) from peft's
  // initial LoRA on the query and value projections. The Adam update here is the one that
  // optimizer runs (transformers' AdamW: step size lr·√(1 − β2ᵗ)/(1 − β1ᵗ), ε = 1e-6 outside
  // the root), so what is compared is the plugin's part: the projection of B's gradient.
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto ref = test::read_tensors(test::fixture("lorafa/reference.safetensors"));
  const Tensor ids = enc["input_ids"], mask = enc["attention_mask"];
  auto model = test::load_minilm();
  const std::string dir = test::fixture("lorafa/initial");
  MethodConfig mc = method_from_peft_dir(dir, test::registry(), "adapter");
  auto lora = test::registry().create("lora", "fa");
  auto given = mc.params;
  given["lora_fa"] = true;
  lora->attach(*model, mc.targets, apply_schema(test::registry().find("lora")->params, given));
  const auto tensors = test::read_tensors(dir + "/adapter_model.safetensors");
  lora->call("load_state", [&](Method& m) { m.load_state(tensors); });
  auto params = lora->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_REQUIRE(params.size() == 12);  // B of q and v in six layers: A is not trained
  std::map<std::string, std::string> hf;
  for (auto* s : model->linear_sites()) hf[s->name() + ".lora_B"] = s->hf_path() + ".lora_B.weight";
  std::map<std::string, Tensor> m1, m2;
  for (auto& [k, p] : params) m1[k] = at::zeros_like(p), m2[k] = at::zeros_like(p);
  const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-6;
  for (int step = 0; step < 3; ++step) {
    for (auto& [k, p] : params) p.mutable_grad().reset();
    const Tensor h = model->forward(ids, mask).hidden;
    ((h * ref.at("direction") * mask.unsqueeze(-1)).sum() / mask.sum()).backward();
    std::map<std::string, Tensor> raw;
    for (auto& [k, p] : params) raw[k] = p.grad().clone();
    lora->call("after_backward", [](Method& m) { m.after_backward(); });
    at::NoGradGuard no_grad;
    // The projection against its formula in float64: (1/s²) ∂B (A Aᵀ + 1e-8 I)⁻¹, s = 2.
    for (auto& [k, p] : params) {
      const std::string a_key = "base_model.model." + hf.at(k).substr(0, hf.at(k).size() - std::string(".lora_B.weight").size()) + ".lora_A.weight";
      const Tensor A = tensors.at(a_key).to(at::kDouble);
      const Tensor want = at::matmul(raw[k].to(at::kDouble), at::inverse(at::matmul(A, A.t()) + at::eye(A.size(0), A.options()) * 1e-8)) / 4.0;
      CATCH_INFO("step " << step << ", " << k);
      CATCH_CHECK(test::max_abs_diff(p.grad(), want) <= 1e-5 * want.abs().max().item<double>());
    }
    const double t = step + 1, size = lr * std::sqrt(1 - std::pow(b2, t)) / (1 - std::pow(b1, t));
    for (auto& [k, p] : params) {
      m1[k].mul_(b1).add_(p.grad(), 1 - b1);
      m2[k].mul_(b2).addcmul_(p.grad(), p.grad(), 1 - b2);
      p.sub_(m1[k] / (m2[k].sqrt() + eps) * size);
      const Tensor want = ref.at("B." + std::to_string(step) + "." + hf.at(k));
      CATCH_INFO("step " << step << ", " << k);
      // Adam's first steps divide by √v: where a gradient is near 0 its float32 rounding moves
      // B by up to ~lr·δg/3e-5, so B is compared to 0.5% of its largest entry.
      CATCH_CHECK(test::max_abs_diff(p, want) <= 5e-3 * want.abs().max().item<double>());
    }
  }
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, "hidden_after", mask));
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, enc["hidden"], mask) > 1e-3);  // B moved the output
  // The file is a plain LoRA's, A as it was loaded.
  const auto state = lora->call("state", [](Method& m) { return m.state(); });
  for (const auto& [k, t] : tensors)
    if (k.find("lora_A") != std::string::npos) CATCH_CHECK(at::equal(state.at(k), t));
  auto dora = test::registry().create("lora", "fa_dora");
  const Params both = apply_schema(test::registry().find("lora")->params, {{"lora_fa", true}, {"use_dora", true}});
  CATCH_CHECK_THROWS_WITH(dora->call("validate", [&](Method& m) { m.validate(both); }), Catch::Contains("lora_fa with use_dora is not supported"));
}

CATCH_TEST_CASE("LoRA's default init starts at the base model and writes peft's config", "[plugins][lora][minilm][parity]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  auto lora = test::registry().create("lora", "l");
  const auto* info = test::registry().find("lora");
  lora->attach(*model, {"attn.q", "attn.v"}, apply_schema(info->params, {{"r", std::int64_t{4}}, {"use_rslora", true}, {"lora_alpha", 8.0}}));
  auto trainable = lora->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(trainable.size() == 24);
  for (const auto& [k, t] : trainable) {
    CATCH_CHECK(t.requires_grad());
    if (k.find("lora_B") != std::string::npos) CATCH_CHECK(t.abs().sum().item<double>() == 0);  // B = 0
    // Kaiming bound, as float32 holds it: the bound itself rounds up (0.0510310382 against
    // 0.0510310363), and a draw at it is legal (seen with MKL_CBWR=COMPATIBLE).
    if (k.find("lora_A") != std::string::npos) CATCH_CHECK(t.abs().max().item<double>() <= static_cast<float>(1.0 / std::sqrt(384.0)));
  }
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(ref["input_ids"], ref["attention_mask"]).hidden, ref, "hidden", ref["attention_mask"]));
  auto cfg = nlohmann::json::parse(lora->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["peft_type"] == "LORA");
  CATCH_CHECK(cfg["r"] == 4);
  CATCH_CHECK(cfg["use_rslora"] == true);
  CATCH_CHECK(cfg["target_modules"].size() == 12);
  lora->detach(*model);
}

CATCH_TEST_CASE("LoRA trains on RoBERTa through the same sites: the loss falls", "[plugins][lora]") {
  auto model = BertModel::load(test::fixture("tiny_roberta"), test::options());
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto& ids = ref["roberta.input_ids"];
  const auto& mask = ref["roberta.attention_mask"];
  at::manual_seed(3);  // LoRA's A init draws from the global generator
  auto lora = test::registry().create("lora", "l");
  const auto* info = test::registry().find("lora");
  lora->attach(*model, {"attn.q", "attn.v", "mlp.up", "mlp.down"}, apply_schema(info->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}}));
  auto params = lora->call("trainable", [](Method& m) { return m.trainable(); });
  Tensor target = at::randn({ids.size(0), 32}).to(test::device());  // pooled outputs to reach: (B, H)
  auto loss_fn = [&] {
    Tensor h = model->forward(ids, mask).hidden;  // (B, T, H)
    Tensor m = mask.unsqueeze(-1).to(h.dtype());
    return ((h * m).sum(1) / m.sum(1) - target).pow(2).mean();
  };
  const double first = loss_fn().item<double>();
  for (int step = 0; step < 30; ++step) {
    Tensor loss = loss_fn();
    for (auto& [k, t] : params)
      if (t.grad().defined()) t.mutable_grad().zero_();
    loss.backward();
    at::NoGradGuard ng;
    for (auto& [k, t] : params) t.sub_(t.grad() * 0.5);
  }
  const double last = loss_fn().item<double>();
  CATCH_INFO("loss " << first << " -> " << last);
  CATCH_CHECK(last < 0.9 * first);
  lora->detach(*model);
}

CATCH_TEST_CASE("LoRA targets that match no site are refused with the targets and the model named", "[plugins][lora]") {
  auto model = BertModel::load(test::fixture("tiny_roberta"), test::options());
  auto lora = test::registry().create("lora", "l");
  const auto* info = test::registry().find("lora");
  CATCH_CHECK_THROWS_WITH(lora->attach(*model, {"c_attn", "q_proj"}, apply_schema(info->params, {})),
                          Catch::Contains("no linear site of this roberta model matches the targets [c_attn, q_proj]"));
}
