// Compacter and Compacter++ against AdapterHub's `adapters` (CompacterConfig,
// CompacterPlusPlusConfig and every PHM option, tests/fixtures/make_adapters.py): the same
// base weights, AdapterHub's saved adapters read through the importer, the same inputs — on the
// real MiniLM and the tiny GPT-2, Mistral (LLaMA family) and T5; and the reverse: a folder we
// save loads in `adapters` and gives our outputs.
#include "adapterhub_parity.h"

#include "runtime/method_stack.h"

#include <cmath>

using namespace tessera;
using test::adapters_fixture;
using test::adapters_reference;

CATCH_TEST_CASE("compacter equals AdapterHub's on MiniLM: Compacter, Compacter++ and every PHM option", "[plugins][compacter][minilm][parity]") {
  auto& ref = adapters_reference();
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  for (const std::string c : {"compacter", "compacterpp", "compacter_own_rule", "compacter_full_w", "compacter_shared_w"}) {
    CATCH_INFO("config " << c);
    auto model = test::load_minilm();
    auto a = test::attach_adapterhub("minilm_" + c, *model, "compacter");
    CATCH_CHECK(model->token_wise_only());  // per-token modules: the unpadded fast path stays
    at::NoGradGuard no_grad;
    const Tensor out = model->forward(ids, mask).hidden;
    TESSERA_CHECK_PARITY(test::parity(out, ref, "minilm_" + c, mask));
    a->detach(*model);
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, out, mask) > 1e-3);  // the adapters really act (a rank-one rule of two small factors: 6e-3)
  }
}

CATCH_TEST_CASE("compacter equals AdapterHub's on GPT-2, Mistral of the LLaMA family and T5 with cross-attention", "[plugins][compacter][decoder][t5][parity]") {
  auto& ref = adapters_reference();
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  for (const std::string arch : {"gpt2", "mistral"}) {
    CATCH_INFO(arch);
    auto model = test::load_for_adapterhub(test::fixture("decoders/" + arch));
    auto a = test::attach_adapterhub(arch + "_compacter", *model, "compacter");
    at::NoGradGuard no_grad;
    auto& d = static_cast<DecoderModel&>(*model);
    TESSERA_CHECK_PARITY(test::parity(d.logits(d.forward(dec["input_ids"], dec["attention_mask"])), ref, arch + "_compacter", dec["attention_mask"]));
  }
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  auto model = test::load_for_adapterhub("t5:" + test::fixture("seq2seq/t5"));
  auto a = test::attach_adapterhub("t5_compacter", *model, "compacter");
  at::NoGradGuard no_grad;
  auto& t5 = static_cast<T5Model&>(*model);
  TESSERA_CHECK_PARITY(test::parity(t5.logits(t5.decode(s2s["t5.decoder_input_ids"], t5.encode(s2s["input_ids"], s2s["attention_mask"]))), ref, "t5_compacter"));
}

CATCH_TEST_CASE("a compacter Tessera saves loads in AdapterHub and gives the same outputs", "[plugins][compacter][parity]") {
  struct Case {
    std::string name, model;   // model: "minilm", "t5:<folder>" or a causal-LM folder
    std::string fixture;       // AdapterHub's tensors loaded under another name, or empty: our own
    std::map<std::string, ParamValue> params;  // (without a fixture) with random tensors
  };
  const std::vector<Case> cases = {
      // GPT-2's shared rule lives under its base prefix: transformer.shared_parameters.mine.phm_rule
      {"gpt2 compacter", test::fixture("decoders/gpt2"), "gpt2_compacter", {}},
      {"own rule", "minilm", "minilm_compacter_own_rule", {}},
      {"compacter++ shared W", "minilm", "", {{"config", std::string("compacter++")}, {"shared_W_phm", true}, {"phm_rank", std::int64_t{2}}}},
      {"t5 cross", "t5:" + test::fixture("seq2seq/t5"), "", {{"bottleneck_size", std::int64_t{8}}, {"cross_adapter", true}}},
  };
  for (const Case& c : cases) {
    CATCH_INFO("case " << c.name);
    auto model = test::load_for_adapterhub(c.model);
    auto inst = test::attach_fixture_or_random("compacter", *model, c.fixture, {}, c.params, 6);
    test::check_loads_in_adapterhub(*inst, *model, c.model, "compacter-" + std::to_string(&c - cases.data()));
  }
}

CATCH_TEST_CASE("compacter defaults: r = H // 32, the paper's parameter count, one rule for all layers, Glorot-uniform factors", "[plugins][compacter][minilm]") {
  const auto* info = test::registry().find("compacter");
  auto model = test::load_minilm();
  auto a = test::registry().create("compacter", "x");
  a->attach(*model, {}, apply_schema(info->params, {}));
  const auto s = a->call("state", [](Method& m) { return m.state(); });
  // Houlsby's placement: 6 layers × (attn, mlp); per projection n·(in/n·k + k·out/n) + out.
  const std::int64_t H = 384, r = 12, n = 4, k = 1;
  const std::int64_t per_adapter = (n * (H / n * k + k * r / n) + r) + (n * (r / n * k + k * H / n) + H);
  std::int64_t total = 0;
  for (const auto& [key, t] : s) total += t.numel();
  CATCH_CHECK(total == 12 * per_adapter + n * n * n);
  CATCH_CHECK(s.size() == 12 * 6 + 1);
  const Tensor rule = s.at("shared_parameters.x.phm_rule");  // N(0, phm_init_range = 1e-4)
  CATCH_CHECK(rule.sizes() == at::IntArrayRef({4, 4, 4}));
  CATCH_CHECK(std::abs(rule.std().item<double>() - 1e-4) < 3e-5);
  const Tensor left = s.at("encoder.layer.3.attention.output.adapters.x.adapter_down.0.W_left");  // (n, H/n, k): U(±√(6 / (H/n + k)))
  CATCH_CHECK(left.sizes() == at::IntArrayRef({4, 96, 1}));
  const double bound = std::sqrt(6.0 / 97.0);
  CATCH_CHECK(left.abs().max().item<double>() <= bound);
  CATCH_CHECK(left.abs().max().item<double>() > 0.8 * bound);
  CATCH_CHECK(s.at("encoder.layer.3.output.adapters.x.adapter_up.b").abs().max().item<double>() == 0);
  const auto cfg = nlohmann::json::parse(a->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["config"]["phm_layer"] == true);
  CATCH_CHECK(cfg["config"]["reduction_factor"] == 32.0);
  CATCH_CHECK(cfg["config"]["mh_adapter"] == true);
  CATCH_CHECK(cfg["config"]["non_linearity"] == "gelu");
  a->detach(*model);

  // A fixed rule (learn_phm = false) is saved but does not train.
  auto f = test::registry().create("compacter", "f");
  f->attach(*model, {}, apply_schema(info->params, {{"config", std::string("compacter++")}, {"learn_phm", false}}));
  const auto trainable = f->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(f->call("state", [](Method& m) { return m.state(); }).count("shared_parameters.f.phm_rule") == 1);
  CATCH_CHECK(trainable.count("shared_parameters.f.phm_rule") == 0);
  CATCH_CHECK(trainable.size() == 6 * 6);
  f->detach(*model);
}

CATCH_TEST_CASE("compacter refuses an r that phm_dim does not divide with the key's place, and a missing shared rule by name", "[plugins][compacter][minilm]") {
  auto model = test::load_minilm();
  const auto dir = test::temp_dir("compacter-cfg");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"compacter\"\n[methods.params]\n"
                         "bottleneck_size = 10\nphm_dim = 4\n";
  Config c = load_config(path);
  check_methods(c, test::registry());
  CATCH_CHECK_THROWS_WITH(MethodStack(test::registry(), c.methods, *model, c.model),
                          Catch::Contains("run.toml:9:") && Catch::Contains("phm_dim 4 does not divide the bottleneck r = 10"));

  auto a = test::registry().create("compacter", "x");
  a->attach(*model, {}, apply_schema(test::registry().find("compacter")->params, {}));
  auto t = a->call("state", [](Method& m) { return m.state(); });
  t.erase("shared_parameters.x.phm_rule");
  CATCH_CHECK_THROWS_WITH(a->call("load_state", [&](Method& m) { m.load_state(t); }), Catch::Contains("adapter lacks tensor 'shared_parameters.x.phm_rule'"));
  a->detach(*model);
}
