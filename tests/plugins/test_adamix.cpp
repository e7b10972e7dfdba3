// AdaMix against its equations: in training each forward pass runs one expert per mixture,
// drawn at random (every output is one of the dense adapters its experts make, and every one
// appears); at inference the adapter of the experts' mean weights; the consistency term the
// symmetric KL that ATen's kl_div computes. The dense adapters are the `bottleneck` plugin's,
// itself equal to AdapterHub's. On the tiny Mistral checkpoint, which has no dropout, so that
// a training forward differs from an evaluation one by the routing alone.
#include "support.h"

#include <tessera/extensions.h>

#include "architectures/decoder.h"

#include <regex>
#include <set>

using namespace tessera;

namespace {

struct Mistral {
  std::unique_ptr<DecoderModel> model = DecoderModel::load(test::fixture("decoders/mistral"), test::options());
  NamedTensors& ref = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  Tensor out() {
    at::NoGradGuard no_grad;
    return model->logits(model->forward(ref["input_ids"], ref["attention_mask"]));
  }
};

// AdaMix's state with every tensor drawn 0.2 · N(0, 1).
NamedTensors randomize(MethodInstance& inst) {
  at::manual_seed(8);
  NamedTensors random;
  for (const auto& [k, t] : inst.call("state", [](Method& m) { return m.state(); })) random[k] = at::randn_like(t) * 0.2;
  inst.call("load_state", [&](Method& m) { m.load_state(random); });
  return random;
}

// A dense adapter at layer 0's feed-forward block with AdaMix's wiring (Houlsby's there, GELU,
// r = 4) and the given down and up weights and biases.
Tensor dense_adapter_out(Mistral& m, const std::vector<Tensor>& down, const std::vector<Tensor>& up) {
  auto inst = test::registry().create("bottleneck", "d");
  inst->attach(*m.model, {"layers.0.mlp"},
               apply_schema(test::registry().find("bottleneck")->params,
                            {{"config", std::string("double_seq_bn")}, {"bottleneck_size", std::int64_t{4}}, {"non_linearity", std::string("gelu")}}));
  const std::string k = "model.layers.0.output_adapters.adapters.d.";
  inst->call("load_state", [&](Method& x) {
    x.load_state({{k + "adapter_down.0.weight", down[0]}, {k + "adapter_down.0.bias", down[1]}, {k + "adapter_up.weight", up[0]}, {k + "adapter_up.bias", up[1]}});
  });
  const Tensor out = m.out();
  inst->detach(*m.model);
  return out;
}

}  // namespace

CATCH_TEST_CASE("AdaMix routes each training pass through one expert pair drawn at random, and infers with the experts' mean", "[plugins][adamix][decoder]") {
  Mistral m;
  const auto params = apply_schema(test::registry().find("adamix")->params, {{"num_experts", std::int64_t{2}}, {"share_up", false}});
  auto inst = test::registry().create("adamix", "a");
  inst->attach(*m.model, {"layers.0.mlp"}, params);
  const auto w = randomize(*inst);
  inst->detach(*m.model);  // while the dense adapters below are measured alone
  const std::string k = "model.layers.0.output_adapters.adapters.a.";
  auto expert = [&](const std::string& side, int i) {
    const std::string p = k + (side == "down" ? "adapter_down.0" : "adapter_up") + ".experts." + std::to_string(i) + ".";
    return std::vector<Tensor>{w.at(p + "weight"), w.at(p + "bias")};
  };
  // The four dense adapters of the expert pairs, and the one of the means.
  std::vector<Tensor> pairs;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) pairs.push_back(dense_adapter_out(m, expert("down", i), expert("up", j)));
  auto mean = [&](const std::string& side) { return std::vector<Tensor>{(expert(side, 0)[0] + expert(side, 1)[0]) / 2, (expert(side, 0)[1] + expert(side, 1)[1]) / 2}; };
  const Tensor averaged = dense_adapter_out(m, mean("down"), mean("up"));
  inst = test::registry().create("adamix", "a");
  inst->attach(*m.model, {"layers.0.mlp"}, params);
  inst->call("load_state", [&](Method& x) { x.load_state(w); });

  m.model->train(false);
  CATCH_CHECK((m.out() - averaged).abs().max().item<double>() < 1e-5);
  m.model->train(true);
  std::set<int> seen;
  for (int pass = 0; pass < 24; ++pass) {
    const Tensor out = m.out();
    int match = -1;
    for (int c = 0; c < 4; ++c)
      if ((out - pairs[c]).abs().max().item<double>() < 1e-5) match = c;
    CATCH_CHECK(match >= 0);
    seen.insert(match);
  }
  CATCH_CHECK(seen.size() == 4);
  m.model->train(false);
  for (int c = 0; c < 4; ++c) CATCH_CHECK((averaged - pairs[c]).abs().max().item<double>() > 1e-3);  // the experts differ
}

namespace {

// A host's tessera.host.training whose step_output and forward_again hand out the queued
// logits in the order they are asked for.
std::vector<Tensor>& queued() {
  static std::vector<Tensor> q;
  return q;
}
std::vector<std::string>& asked() {
  static std::vector<std::string> a;
  return a;
}
void hand_out(const char* what, Tensor* loss, Tensor* logits) {
  asked().push_back(what);
  *loss = at::zeros({});
  *logits = queued().empty() ? Tensor() : queued().front();
  if (!queued().empty()) queued().erase(queued().begin());
}
tessera_host_training_v2 fake_training{{sizeof(tessera_host_training_v2), 2}, nullptr, [](void*, const char*) {},
                                       [](void*, Tensor* loss, Tensor* logits) { hand_out("again", loss, logits); },
                                       [](void*, Tensor* loss, Tensor* logits) { hand_out("step", loss, logits); }};

}  // namespace

CATCH_TEST_CASE("AdaMix's consistency term is w times the symmetric KL of the step's pass and one more, each against the other held fixed", "[plugins][adamix][decoder]") {
  Mistral m;
  m.model->set_extension(TESSERA_EXT_HOST_TRAINING, &fake_training);
  auto inst = test::registry().create("adamix", "a");
  inst->attach(*m.model, {}, apply_schema(test::registry().find("adamix")->params, {{"consistency_weight", 0.5}}));
  at::manual_seed(3);
  const Tensor a = at::randn({5, 3}).set_requires_grad(true), b = at::randn({5, 3}).set_requires_grad(true);
  m.model->train(true);
  queued() = {a, b};
  asked().clear();
  const Tensor extra = inst->call("extra_loss", [](Method& x) { return x.extra_loss(); });
  CATCH_CHECK(asked() == std::vector<std::string>{"step", "again"});  // the step's own pass and one more: two in all, as the authors
  const Tensor pa = at::softmax(a.detach(), -1), pb = at::softmax(b.detach(), -1);
  const Tensor expected = 0.5 * 0.5 * (at::kl_div(at::log_softmax(b, -1), pa, at::Reduction::Sum) / 5 + at::kl_div(at::log_softmax(a, -1), pb, at::Reduction::Sum) / 5);
  CATCH_CHECK(std::abs(extra.item<double>() - expected.item<double>()) < 1e-6);
  // Its gradient reaches each pass through its own log-softmax (the other side held fixed).
  extra.backward();
  const Tensor ga = a.grad().clone();
  a.mutable_grad().reset(), b.mutable_grad().reset();
  expected.backward();
  CATCH_CHECK((ga - a.grad()).abs().max().item<double>() < 1e-6);
  // No logits (a language-model task): refused with what to do; not in evaluation.
  queued().clear();
  CATCH_CHECK_THROWS_WITH(inst->call("extra_loss", [](Method& x) { return x.extra_loss(); }), Catch::Contains("set consistency_weight = 0"));
  m.model->train(false);
  CATCH_CHECK_FALSE(inst->call("extra_loss", [](Method& x) { return x.extra_loss(); }).defined());
  inst->detach(*m.model);
  m.model->set_extension(TESSERA_EXT_HOST_TRAINING, nullptr);
}

namespace {

// Layer 0's query with plain LoRA (the `lora` plugin, itself equal to peft's) of factors A, B at
// AdaMix-LoRA's scale.
Tensor lora_out(Mistral& m, const Tensor& A, const Tensor& B) {
  auto inst = test::registry().create("lora", "l");
  inst->attach(*m.model, {"layers.0.attn.q"}, apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 32.0}}));
  const std::string k = "base_model.model.model.layers.0.self_attn.q_proj.";
  inst->call("load_state", [&](Method& x) { x.load_state({{k + "lora_A.weight", A}, {k + "lora_B.weight", B}}); });
  const Tensor out = m.out();
  inst->detach(*m.model);
  return out;
}

}  // namespace

CATCH_TEST_CASE("AdaMix-LoRA routes each training pass through one A and one B expert drawn at random, and infers with their means",
                "[plugins][adamix][decoder]") {
  Mistral m;
  const auto params = apply_schema(test::registry().find("adamix_lora")->params,
                                   {{"num_experts", std::int64_t{2}}, {"share_B", false}, {"lora_dropout", 0.0}, {"consistency_weight", 0.0}});
  auto inst = test::registry().create("adamix_lora", "a");
  inst->attach(*m.model, {"layers.0.attn.q"}, params);
  const auto w = randomize(*inst);
  CATCH_CHECK(w.size() == 4);
  inst->detach(*m.model);  // while plain LoRA is measured alone
  const std::string k = "model.layers.0.self_attn.q_proj.experts_lora_";
  std::vector<Tensor> pairs;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) pairs.push_back(lora_out(m, w.at(k + "A." + std::to_string(i)), w.at(k + "B." + std::to_string(j))));
  const Tensor averaged = lora_out(m, (w.at(k + "A.0") + w.at(k + "A.1")) / 2, (w.at(k + "B.0") + w.at(k + "B.1")) / 2);
  inst = test::registry().create("adamix_lora", "a");
  inst->attach(*m.model, {"layers.0.attn.q"}, params);
  inst->call("load_state", [&](Method& x) { x.load_state(w); });

  m.model->train(false);
  CATCH_CHECK((m.out() - averaged).abs().max().item<double>() < 1e-5);
  m.model->train(true);
  std::set<int> seen;
  for (int pass = 0; pass < 24; ++pass) {
    const Tensor out = m.out();
    int match = -1;
    for (int c = 0; c < 4; ++c)
      if ((out - pairs[c]).abs().max().item<double>() < 1e-5) match = c;
    CATCH_CHECK(match >= 0);
    seen.insert(match);
  }
  CATCH_CHECK(seen.size() == 4);
  m.model->train(false);
  for (int c = 0; c < 4; ++c) CATCH_CHECK((averaged - pairs[c]).abs().max().item<double>() > 1e-3);  // the experts differ
  // Merged: s · B̄ Ā in the weight, the same outputs as the averaged branch.
  inst->call("merge", [](Method& x) { x.merge(); });
  CATCH_CHECK((m.out() - averaged).abs().max().item<double>() < 1e-4);
  inst->call("unmerge", [](Method& x) { x.unmerge(); });
  inst->detach(*m.model);
}

CATCH_TEST_CASE("AdaMix-LoRA starts its A experts as one draw and its B at zero (the base model), the authors' 8 A experts and one B",
                "[plugins][adamix][decoder]") {
  Mistral m;
  const Tensor before = m.out();
  auto inst = test::registry().create("adamix_lora", "a");
  inst->attach(*m.model, {}, apply_schema(test::registry().find("adamix_lora")->params, {}));
  const auto s = inst->call("state", [](Method& x) { return x.state(); });
  const std::string k = "model.layers.1.self_attn.v_proj.experts_lora_";
  CATCH_CHECK(s.count(k + "A.7") == 1);
  CATCH_CHECK(s.count(k + "B.0") == 1);
  CATCH_CHECK(s.count(k + "B.1") == 0);
  CATCH_CHECK(at::equal(s.at(k + "A.0"), s.at(k + "A.5")));
  m.model->train(true);
  CATCH_CHECK(at::equal(m.out(), before));
  inst->detach(*m.model);
}
