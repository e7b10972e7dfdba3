// ProPETL against its equations on the real MiniLM: each layer's adapter is the prototype's
// weights masked by the top-k of that layer's |S| — the output of dense adapters built so (the
// `bottleneck` plugin's, itself equal to AdapterHub's) — and the gradients are the
// straight-through ones: ∂L/∂S_l = ∂L/∂W_l ⊙ W ⊙ sign(S_l), ∂L/∂W = Σ_l ∂L/∂W_l ⊙ M_l.
#include "support.h"

#include <nlohmann/json.hpp>

using namespace tessera;

namespace {

// The top-k of |s| as 0/1, k = numel − ⌊(1 − keep)·numel⌋.
Tensor top_mask(const Tensor& s, double keep) {
  const auto n = s.numel(), k = n - static_cast<std::int64_t>(std::floor((1.0 - keep) * static_cast<double>(n)));
  const double kth = std::get<0>(s.abs().flatten().topk(k)).min().item<double>();
  return s.abs().ge(kth).to(s.dtype());
}

}  // namespace

CATCH_TEST_CASE("ProPETL's layers run the shared prototype masked by the top of their scores, with straight-through gradients", "[plugins][propetl][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"], &dir = base["grad.direction"];
  auto model = test::load_minilm();
  const double keep = 0.3;
  auto p = test::registry().create("propetl", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl")->params, {{"keep", keep}}));
  at::manual_seed(12);
  NamedTensors w;
  for (const auto& [k, t] : p->call("state", [](Method& m) { return m.state(); })) w[k] = at::randn_like(t) * 0.2;
  p->call("load_state", [&](Method& m) { m.load_state(w); });
  auto loss = [&] { return (model->forward(ids, mask).hidden * dir * mask.unsqueeze(-1).to(dir.dtype())).sum(); };
  const Tensor ours = loss();
  ours.backward();
  const auto trained = p->call("trainable", [](Method& m) { return m.trainable(); });
  p->detach(*model);

  // The same forward from dense Pfeiffer adapters whose layer-l weights are W ⊙ M_l.
  const std::string shared = "shared_parameters.p.";
  auto d = test::registry().create("bottleneck", "d");
  d->attach(*model, {}, apply_schema(test::registry().find("bottleneck")->params, {}));
  NamedTensors dense, masks;
  for (int l = 0; l < 6; ++l)
    for (const std::string side : {"down", "up"}) {
      const std::string mine = "encoder.layer." + std::to_string(l) + ".output.adapters.";
      const std::string in_p = mine + "p.adapter_" + (side == "down" ? "down.0" : "up") + ".mask_scores";
      const std::string in_d = mine + "d.adapter_" + (side == "down" ? "down.0" : "up") + ".";
      masks[in_d + "weight"] = top_mask(w.at(in_p), keep);
      dense[in_d + "weight"] = w.at(shared + "adapter_" + side + ".weight") * masks[in_d + "weight"];
      dense[in_d + "bias"] = w.at(shared + "adapter_" + side + ".bias");
    }
  d->call("load_state", [&](Method& m) { m.load_state(dense); });
  const Tensor theirs = loss();
  CATCH_CHECK(std::abs(ours.item<double>() - theirs.item<double>()) < 1e-4 * std::abs(theirs.item<double>()));
  theirs.backward();
  const auto g = d->call("trainable", [](Method& m) { return m.trainable(); });  // the dense weights' ∂L/∂W_l
  for (const std::string side : {"down", "up"}) {
    Tensor proto_grad = at::zeros_like(w.at(shared + "adapter_" + side + ".weight")), bias_grad;
    for (int l = 0; l < 6; ++l) {
      const std::string mine = "encoder.layer." + std::to_string(l) + ".output.adapters.";
      const std::string in_d = mine + "d.adapter_" + (side == "down" ? "down.0" : "up") + ".";
      const std::string in_p = mine + "p.adapter_" + (side == "down" ? "down.0" : "up") + ".mask_scores";
      const Tensor G = g.at(in_d + "weight").grad();
      const Tensor expected = G * w.at(shared + "adapter_" + side + ".weight") * w.at(in_p).sign();
      CATCH_INFO(in_p);
      CATCH_CHECK((trained.at(in_p).grad() - expected).abs().max().item<double>() < 1e-4 * expected.abs().max().item<double>());
      proto_grad += G * masks.at(in_d + "weight");
      bias_grad = bias_grad.defined() ? bias_grad + g.at(in_d + "bias").grad() : g.at(in_d + "bias").grad();
    }
    const Tensor ours_w = trained.at(shared + "adapter_" + side + ".weight").grad(), ours_b = trained.at(shared + "adapter_" + side + ".bias").grad();
    CATCH_CHECK((ours_w - proto_grad).abs().max().item<double>() < 1e-4 * proto_grad.abs().max().item<double>());
    CATCH_CHECK((ours_b - bias_grad).abs().max().item<double>() < 1e-4 * bias_grad.abs().max().item<double>());
  }
  d->detach(*model);
}

CATCH_TEST_CASE("ProPETL shares one prototype, keeps the asked share per mask, and writes no AdapterHub config", "[plugins][propetl][minilm]") {
  auto model = test::load_minilm();
  auto p = test::registry().create("propetl", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl")->params, {{"reduction_factor", 6.0}}));
  const auto s = p->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(s.size() == 4 + 6 * 2);  // the prototype's four tensors, two score tensors per layer
  CATCH_CHECK(s.at("shared_parameters.p.adapter_down.weight").sizes() == at::IntArrayRef({64, 384}));
  CATCH_CHECK(s.at("encoder.layer.5.output.adapters.p.adapter_up.mask_scores").sizes() == at::IntArrayRef({384, 64}));
  CATCH_CHECK(top_mask(s.at("encoder.layer.5.output.adapters.p.adapter_up.mask_scores"), 0.5).sum().item<double>() == 384 * 32);
  const auto cfg = nlohmann::json::parse(p->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK_FALSE(cfg.contains("config"));
  CATCH_CHECK(cfg["tessera"]["propetl"]["keep"] == 0.5);
  p->detach(*model);
}

// ProPETL-LoRA (the `propetl_lora` plugin) against its equations: each layer's query and value
// run LoRA with the prototype's A and B masked by the top of that layer's scores — the output
// of the `lora` plugin (itself equal to peft's) given those masked factors — and the gradients
// are the straight-through ones: ∂L/∂S_l = ∂L/∂A_l ⊙ A ⊙ sign(S_l), ∂L/∂A = Σ_l ∂L/∂A_l ⊙ M_l
// (B likewise), one prototype per module (query's, value's) shared by the six layers.
CATCH_TEST_CASE("ProPETL-LoRA's layers run each module's shared prototype masked by the top of their scores, with straight-through gradients",
                "[plugins][propetl][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"], &dir = base["grad.direction"];
  auto model = test::load_minilm();
  const double keep = 0.3;
  auto p = test::registry().create("propetl_lora", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl_lora")->params, {{"keep", keep}, {"r", std::int64_t{8}}, {"lora_alpha", 12.0}}));
  at::manual_seed(13);
  NamedTensors w;
  for (const auto& [k, t] : p->call("state", [](Method& m) { return m.state(); })) w[k] = at::randn_like(t) * 0.2;  // B ≠ 0: every gradient flows
  CATCH_CHECK(w.size() == 2 * 2 + 12 * 2);  // two prototypes (q, v) of two factors, two score tensors per site
  p->call("load_state", [&](Method& m) { m.load_state(w); });
  auto loss = [&] { return (model->forward(ids, mask).hidden * dir * mask.unsqueeze(-1).to(dir.dtype())).sum(); };
  const Tensor ours = loss();
  ours.backward();
  const auto trained = p->call("trainable", [](Method& m) { return m.trainable(); });
  p->detach(*model);

  // The same forward from plain LoRA whose layer-l factors are A ⊙ M_A,l and B ⊙ M_B,l.
  auto d = test::registry().create("lora", "d");
  d->attach(*model, {"attn.q", "attn.v"}, apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{8}}, {"lora_alpha", 12.0}}));
  NamedTensors dense, masks;
  for (int l = 0; l < 6; ++l)
    for (const std::string m : {"query", "value"})
      for (const std::string f : {"A", "B"}) {
        const std::string path = "encoder.layer." + std::to_string(l) + ".attention.self." + m;
        const std::string proto = std::string("prototype.attn.") + (m == "query" ? "q" : "v") + ".lora_" + f;
        masks[path + f] = top_mask(w.at(path + ".lora_" + f + ".mask_scores"), keep);
        dense["base_model.model." + path + ".lora_" + f + ".weight"] = w.at(proto) * masks[path + f];
      }
  d->call("load_state", [&](Method& m) { m.load_state(dense); });
  const Tensor theirs = loss();
  CATCH_CHECK(std::abs(ours.item<double>() - theirs.item<double>()) < 1e-4 * std::abs(theirs.item<double>()));
  theirs.backward();
  const auto g = d->call("state", [](Method& m) { return m.state(); });  // the masked factors (PEFT's keys), their ∂L/∂A_l, ∂L/∂B_l
  for (const std::string m : {"query", "value"})
    for (const std::string f : {"A", "B"}) {
      const std::string proto = std::string("prototype.attn.") + (m == "query" ? "q" : "v") + ".lora_" + f;
      Tensor proto_grad = at::zeros_like(w.at(proto));
      for (int l = 0; l < 6; ++l) {
        const std::string path = "encoder.layer." + std::to_string(l) + ".attention.self." + m;
        const std::string scores = path + ".lora_" + f + ".mask_scores";
        const Tensor G = g.at("base_model.model." + path + ".lora_" + f + ".weight").grad();
        const Tensor expected = G * w.at(proto) * w.at(scores).sign();
        CATCH_INFO(scores);
        CATCH_CHECK((trained.at(scores).grad() - expected).abs().max().item<double>() < 1e-4 * expected.abs().max().item<double>());
        proto_grad += G * masks.at(path + f);
      }
      CATCH_INFO(proto);
      CATCH_CHECK((trained.at(proto).grad() - proto_grad).abs().max().item<double>() < 1e-4 * proto_grad.abs().max().item<double>());
    }
  d->detach(*model);
}

CATCH_TEST_CASE("ProPETL-LoRA starts at the base model, keeps the asked share per mask, merges its masked update, refuses targets that match nothing",
                "[plugins][propetl][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  auto model = test::load_minilm();
  at::NoGradGuard no_grad;
  const Tensor before = model->forward(ids, mask).hidden;
  auto p = test::registry().create("propetl_lora", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl_lora")->params, {}));
  CATCH_CHECK(at::equal(model->forward(ids, mask).hidden, before));  // B = 0
  auto s = p->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(s.at("prototype.attn.q.lora_A").sizes() == at::IntArrayRef({32, 384}));
  for (auto& [k, t] : s)
    if (k.rfind("prototype.", 0) == 0) t.normal_(0, 0.1);  // an update that acts
  const Tensor unmerged = model->forward(ids, mask).hidden;
  CATCH_CHECK(test::max_abs_diff(unmerged, before) > 1e-3);
  // Merged: the plugin's own masks, each keeping k = n − ⌊0.9 n⌋ entries, folded as s · (B ⊙ M_B)(A ⊙ M_A).
  LinearSite* v2 = nullptr;
  for (auto* l : model->linear_sites())
    if (l->name() == "layers.2.attn.v") v2 = l;
  const Tensor w_before = v2->weight().base().clone();
  p->call("merge", [](Method& m) { m.merge(); });
  const std::string site = "encoder.layer.2.attention.self.value.";
  const Tensor ma = top_mask(s.at(site + "lora_A.mask_scores"), 0.1), mb = top_mask(s.at(site + "lora_B.mask_scores"), 0.1);
  CATCH_CHECK(ma.sum().item<double>() == ma.numel() - std::floor(0.9 * ma.numel()));
  const Tensor expected = 1.5 * at::matmul(s.at("prototype.attn.v.lora_B") * mb, s.at("prototype.attn.v.lora_A") * ma);
  CATCH_CHECK(test::max_abs_diff(v2->weight().base() - w_before, expected) < 1e-6 * expected.abs().max().item<double>() + 1e-7);
  CATCH_CHECK(test::max_abs_diff(model->forward(ids, mask).hidden, unmerged) < 1e-4 * unmerged.abs().max().item<double>());
  p->call("unmerge", [](Method& m) { m.unmerge(); });
  CATCH_CHECK(test::max_abs_diff(model->forward(ids, mask).hidden, unmerged) < 1e-4 * unmerged.abs().max().item<double>());
  p->detach(*model);
  auto q = test::registry().create("propetl_lora", "q");
  CATCH_CHECK_THROWS_WITH(q->attach(*model, {"mlp.gate"}, apply_schema(test::registry().find("propetl_lora")->params, {})), Catch::Contains("matches the targets"));
}

// ProPETL over prefixes (the `propetl_prefix` plugin) against its equations: layer l's keys and
// values are Z ⊙ M_l, Z = W2 tanh(E W1ᵀ + b1) + b2 computed here in plain torch — the output of
// the `prefix_tuning` plugin (itself equal to peft's, and with shift_positions = false to
// AdapterHub's MAM) given that table — and the gradients are the straight-through ones:
// ∂L/∂S_l = ∂L/∂Z_l ⊙ Z ⊙ sign(S_l), and the prototype's through Z from Σ_l ∂L/∂Z_l ⊙ M_l.
CATCH_TEST_CASE("ProPETL's prefix: every layer's keys and values are the shared prototype masked by the top of its scores, with straight-through gradients",
                "[plugins][propetl][prompts][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"], &dir = base["grad.direction"];
  auto model = test::load_minilm();
  const double keep = 0.3;
  const std::int64_t P = 5, L = 6, d = 384;
  auto p = test::registry().create("propetl_prefix", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl_prefix")->params, {{"keep", keep}, {"num_virtual_tokens", P}, {"encoder_hidden_size", std::int64_t{16}}}));
  at::manual_seed(14);
  NamedTensors w;
  for (const auto& [k, t] : p->call("state", [](Method& m) { return m.state(); })) w[k] = at::randn_like(t) * 0.3;
  CATCH_CHECK(w.size() == 5 + 6);  // the prototype's five tensors, a score tensor per layer
  p->call("load_state", [&](Method& m) { m.load_state(w); });
  auto loss = [&] { return (model->forward(ids, mask).hidden * dir * mask.unsqueeze(-1).to(dir.dtype())).sum(); };
  const Tensor ours = loss();
  ours.backward();
  const auto trained = p->call("trainable", [](Method& m) { return m.trainable(); });
  p->detach(*model);

  // The table prefix_tuning reads: row p = [K_0 | V_0 | K_1 | V_1 | …], layer l's block Z ⊙ M_l.
  NamedTensors proto;
  for (const char* k : {"prefix.wte.weight", "prefix.control_trans.0.weight", "prefix.control_trans.0.bias", "prefix.control_trans.2.weight", "prefix.control_trans.2.bias"})
    proto[k] = w.at(k).clone().requires_grad_(true);
  const Tensor Z = at::linear(at::tanh(at::linear(proto["prefix.wte.weight"], proto["prefix.control_trans.0.weight"], proto["prefix.control_trans.0.bias"])),
                              proto["prefix.control_trans.2.weight"], proto["prefix.control_trans.2.bias"]);  // (P, 2d)
  std::vector<Tensor> masks, blocks;
  for (std::int64_t l = 0; l < L; ++l) {
    masks.push_back(top_mask(w.at("prefix.encoder.layer." + std::to_string(l) + ".attention.self.mask_scores"), keep));
    blocks.push_back(Z.detach() * masks.back());
  }
  auto d_inst = test::registry().create("prefix_tuning", "d");
  d_inst->attach(*model, {}, apply_schema(test::registry().find("prefix_tuning")->params, {{"num_virtual_tokens", P}, {"shift_positions", false}}));
  d_inst->call("load_state", [&](Method& m) { m.load_state({{"prompt_embeddings", at::cat(blocks, 1)}}); });
  const Tensor theirs = loss();
  CATCH_CHECK(std::abs(ours.item<double>() - theirs.item<double>()) < 1e-4 * std::abs(theirs.item<double>()));
  theirs.backward();
  const Tensor G = d_inst->call("trainable", [](Method& m) { return m.trainable(); }).begin()->second.grad();  // ∂L/∂table (P, L·2d)
  CATCH_REQUIRE(G.sizes() == at::IntArrayRef({P, L * 2 * d}));
  Tensor to_z = at::zeros_like(Z);
  for (std::int64_t l = 0; l < L; ++l) {
    const std::string scores = "prefix.encoder.layer." + std::to_string(l) + ".attention.self.mask_scores";
    const Tensor Gl = G.narrow(1, l * 2 * d, 2 * d);
    const Tensor expected = Gl * Z.detach() * w.at(scores).sign();
    CATCH_INFO(scores);
    CATCH_CHECK((trained.at(scores).grad() - expected).abs().max().item<double>() < 1e-4 * expected.abs().max().item<double>());
    to_z += Gl * masks[static_cast<std::size_t>(l)];
  }
  Z.backward(to_z);  // the prototype's gradients through the MLP, by autograd
  for (const auto& [k, t] : proto) {
    CATCH_INFO(k);
    CATCH_CHECK((trained.at(k).grad() - t.grad()).abs().max().item<double>() < 1e-4 * t.grad().abs().max().item<double>());
  }
  d_inst->detach(*model);
}

CATCH_TEST_CASE("ProPETL's prefix has the authors' shapes, keeps the asked share per layer, says its keys in its config, refuses targets", "[plugins][propetl][prompts]") {
  auto model = test::load_minilm();
  auto p = test::registry().create("propetl_prefix", "p");
  p->attach(*model, {}, apply_schema(test::registry().find("propetl_prefix")->params, {}));
  const auto s = p->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(s.at("prefix.wte.weight").sizes() == at::IntArrayRef({64, 384}));
  CATCH_CHECK(s.at("prefix.control_trans.2.weight").sizes() == at::IntArrayRef({768, 512}));
  CATCH_CHECK(top_mask(s.at("prefix.encoder.layer.5.attention.self.mask_scores"), 0.1).sum().item<double>() == 64 * 768 - std::floor(0.9 * 64 * 768));
  const auto cfg = nlohmann::json::parse(p->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["tessera"]["propetl_prefix"]["shift_positions"] == false);
  p->detach(*model);
  auto q = test::registry().create("propetl_prefix", "q");
  CATCH_CHECK_THROWS_WITH(q->attach(*model, {"attn.q"}, apply_schema(test::registry().find("propetl_prefix")->params, {})), Catch::Contains("no targets"));
}
