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
