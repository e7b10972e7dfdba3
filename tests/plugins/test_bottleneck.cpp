// Bottleneck adapters against AdapterHub's `adapters` (tests/fixtures/make_adapters.py):
// the same base weights, the same adapter tensors (AdapterHub's saved folders, read
// through the importer), the same inputs — on the real MiniLM and the tiny GPT-2, Mistral
// (LLaMA family) and T5; and the reverse: a folder we save loads in `adapters` and gives our outputs.
#include "adapterhub_parity.h"

#include "runtime/method_stack.h"

#include <nlohmann/json.hpp>

#include <regex>

using namespace tessera;
using test::adapters_fixture;
using test::adapters_reference;

namespace {

std::unique_ptr<MethodInstance> attach_adapterhub(const std::string& name, ModelView& model) { return test::attach_adapterhub(name, model, "bottleneck"); }

const char* const kPresets[] = {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"};

}  // namespace

CATCH_TEST_CASE("bottleneck adapters equal AdapterHub's on MiniLM: seq_bn, double_seq_bn, par_bn, scaled_par_bn and a custom one", "[plugins][bottleneck][minilm][parity]") {
  auto& ref = adapters_reference();
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  for (const std::string preset : {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "custom"}) {
    CATCH_INFO("preset " << preset);
    auto model = test::load_minilm();
    auto a = attach_adapterhub("minilm_" + preset, *model);
    CATCH_CHECK(model->token_wise_only());  // per-token modules: the unpadded fast path stays
    at::NoGradGuard no_grad;
    const Tensor out = model->forward(ids, mask).hidden;
    TESSERA_CHECK_PARITY(test::parity(out, ref, "minilm_" + preset, mask));
    a->detach(*model);
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, out, mask) > 1e-2);  // the adapters really act
  }
}

CATCH_TEST_CASE("bottleneck adapters equal AdapterHub's on GPT-2 and Mistral of the LLaMA family (pre-norm: the residual is the block's stream)", "[plugins][bottleneck][decoder][parity]") {
  auto& ref = adapters_reference();
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  const auto &ids = dec["input_ids"], &mask = dec["attention_mask"];
  for (const std::string arch : {"gpt2", "mistral"})
    for (const std::string preset : kPresets) {
      CATCH_INFO(arch << " " << preset);
      auto model = DecoderModel::load(test::fixture("decoders/" + arch), test::options());
      test::perturb_if_asked(*model);
      auto a = attach_adapterhub(arch + "_" + preset, *model);
      at::NoGradGuard no_grad;
      TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, arch + "_" + preset, mask));
    }
}

CATCH_TEST_CASE("bottleneck adapters equal AdapterHub's on T5: self-attention, feed-forward and cross-attention", "[plugins][bottleneck][t5][parity]") {
  auto& ref = adapters_reference();
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  for (const std::string preset : {"seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "cross"}) {
    CATCH_INFO("preset " << preset);
    auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    test::perturb_if_asked(*model);
    auto a = attach_adapterhub("t5_" + preset, *model);
    at::NoGradGuard no_grad;
    const Tensor logits = model->logits(model->decode(s2s["t5.decoder_input_ids"], model->encode(s2s["input_ids"], s2s["attention_mask"])));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, "t5_" + preset));
  }
}

CATCH_TEST_CASE("a bottleneck adapter Tessera saves loads in AdapterHub and gives the same outputs", "[plugins][bottleneck][minilm][parity]") {
  struct Case {
    std::string name, model;   // model: "minilm", "t5:<folder>" or a causal-LM folder
    std::string fixture;       // AdapterHub's tensors loaded under another name, or empty: our own
    std::map<std::string, ParamValue> params;  // (without a fixture) with random tensors
    std::vector<std::string> targets;
  };
  const std::vector<Case> cases = {
      {"custom", "minilm", "minilm_custom", {}, {}},
      {"gpt2 scaled_par_bn", test::fixture("decoders/gpt2"), "gpt2_scaled_par_bn", {}, {}},
      // r = 30 does not divide 384 (the config's reduction factor must still give 30), a fixed scale
      {"r 30", "minilm", "", {{"config", std::string("double_seq_bn")}, {"bottleneck_size", std::int64_t{30}}, {"scaling", 2.5}}, {}},
      // T5's decoder only: AdapterHub numbers its layers after the encoder's (leave_out 0, 1)
      {"t5 decoder", "t5:" + test::fixture("seq2seq/t5"), "", {{"config", std::string("seq_bn")}}, {"re:decoder\\..*"}},
  };
  for (const Case& c : cases) {
    CATCH_INFO("case " << c.name);
    auto model = test::load_for_adapterhub(c.model);
    auto inst = test::attach_fixture_or_random("bottleneck", *model, c.fixture, c.targets, c.params, 5);
    test::check_loads_in_adapterhub(*inst, *model, c.model, "bottleneck-" + std::to_string(&c - cases.data()));
  }
}

CATCH_TEST_CASE("an adapter AdapterHub saved in its default format (pytorch_adapter.bin, torch.save) loads as its safetensors twin does, from a GPU too", "[plugins][bottleneck][minilm]") {
  auto model = test::load_minilm();
  const auto dir = adapters_fixture("minilm_seq_bn_bin");
  MethodStack stack(test::registry(), {method_from_adapterhub_dir(dir, test::registry(), "a")}, *model, ModelConfig{});
  const std::string file = stack.state_file(dir, 0);
  CATCH_CHECK(file == dir + "/pytorch_adapter.bin");
  stack.load_state(0, file);
  const auto ours = stack[0].call("state", [](Method& m) { return m.state(); });
  const auto twin = test::read_tensors(adapters_fixture("minilm_seq_bn") + "/adapter.safetensors");
  CATCH_CHECK(ours.size() == twin.size());
  for (const auto& [k, t] : twin) CATCH_CHECK(at::equal(ours.at(k), t));
  // Saved from a GPU model (its storages say cuda:0): the tensors land on the CPU.
  stack.load_state(0, stack.state_file(adapters_fixture("minilm_seq_bn_bin_cuda"), 0));
  for (const auto& [k, t] : twin) CATCH_CHECK(at::equal(stack[0].call("state", [](Method& m) { return m.state(); }).at(k), t));
  CATCH_CHECK_THROWS_WITH(stack.load_state(0, adapters_fixture("minilm_seq_bn") + "/adapter_config.json.bin"), Catch::Contains("adapter_config.json.bin: cannot be read"));
}

CATCH_TEST_CASE("bottleneck defaults: AdapterHub's sizes and inits, and par_bn starting at the base model", "[plugins][bottleneck][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  const auto* info = test::registry().find("bottleneck");
  auto model = test::load_minilm();
  at::NoGradGuard no_grad;
  const Tensor before = model->forward(ids, mask).hidden;
  {
    auto a = test::registry().create("bottleneck", "x");
    a->attach(*model, {}, apply_schema(info->params, {}));  // seq_bn: after the FFN only, r = 384 / 16
    auto s = a->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(s.size() == 6 * 4);
    CATCH_CHECK(s.at("encoder.layer.5.output.adapters.x.adapter_down.0.weight").sizes() == at::IntArrayRef({24, 384}));
    const Tensor up = s.at("encoder.layer.0.output.adapters.x.adapter_up.weight");  // bert init: N(0, 0.02), biases 0
    CATCH_CHECK(std::abs(up.std().item<double>() - 0.02) < 0.002);
    CATCH_CHECK(s.at("encoder.layer.0.output.adapters.x.adapter_up.bias").abs().max().item<double>() == 0);
    const auto cfg = nlohmann::json::parse(a->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
    CATCH_CHECK(cfg["config"]["original_ln_before"] == true);
    CATCH_CHECK(cfg["config"]["reduction_factor"] == 16.0);
    CATCH_CHECK(cfg["config"]["mh_adapter"] == false);
    CATCH_CHECK(cfg["config"]["output_adapter"] == true);
    a->detach(*model);
  }
  {
    auto a = test::registry().create("bottleneck", "p");
    a->attach(*model, {}, apply_schema(info->params, {{"config", std::string("scaled_par_bn")}}));
    auto s = a->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(s.at("encoder.layer.0.output.adapters.p.adapter_down.0.weight").sizes() == at::IntArrayRef({192, 384}));
    CATCH_CHECK(s.at("encoder.layer.0.output.adapters.p.scaling").sizes() == at::IntArrayRef({1}));
    CATCH_CHECK(at::equal(model->forward(ids, mask).hidden, before));  // mam_adapter init: the up-projection is zero
    a->detach(*model);
  }
}

CATCH_TEST_CASE("bottleneck refuses a misshapen, foreign or missing tensor by name, and a bottleneck wider than the model with the key's place", "[plugins][bottleneck][minilm]") {
  auto model = test::load_minilm();
  const auto* info = test::registry().find("bottleneck");
  auto a = test::registry().create("bottleneck", "x");
  a->attach(*model, {}, apply_schema(info->params, {}));
  auto good = a->call("state", [](Method& m) { return m.state(); });
  auto refusal = [&](NamedTensors t) {
    try {
      a->call("load_state", [&](Method& m) { m.load_state(t); });
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  auto t = good;
  t["encoder.layer.2.output.adapters.x.adapter_up.weight"] = at::zeros({384, 12});
  CATCH_CHECK_THAT(refusal(t), Catch::Contains("tensor 'encoder.layer.2.output.adapters.x.adapter_up.weight' has shape [384, 12], expected [384, 24]"));
  t = good;
  t["base_model.model.encoder.layer.0.attention.self.key.ia3_l"] = at::ones({384, 1});
  CATCH_CHECK_THAT(refusal(t), Catch::Contains("tensor 'base_model.model.encoder.layer.0.attention.self.key.ia3_l' is not part of this bottleneck adapter"));
  t = good;
  t.erase("encoder.layer.4.output.adapters.x.adapter_down.0.bias");
  CATCH_CHECK_THAT(refusal(t), Catch::Contains("adapter lacks tensor 'encoder.layer.4.output.adapters.x.adapter_down.0.bias'"));
  // Another base prefix and another adapter name are the same tensors (AdapterHub's own rule).
  NamedTensors renamed;
  for (const auto& [k, v] : good) renamed["bert." + std::regex_replace(k, std::regex(R"(\.adapters\.x\.)"), ".adapters.sst2.")] = v;
  CATCH_CHECK(refusal(renamed) == "(loaded)");
  a->detach(*model);

  // Too wide for this model: only attach knows the hidden size; the config's place is named.
  const auto dir = test::temp_dir("bottleneck-cfg");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"bottleneck\"\n[methods.params]\n"
                         "config = \"par_bn\"\nreduction_factor = 500.0\n";
  Config c = load_config(path);
  check_methods(c, test::registry());
  CATCH_CHECK_THROWS_WITH(MethodStack(test::registry(), c.methods, *model, c.model),
                          Catch::Contains("run.toml:9:") && Catch::Contains("reduction_factor 500 is larger than the hidden size 384"));
}
