// Invertible adapters (MAD-X's NICE and GLOW coupling blocks on the first layer's input, the
// inverse before a language-model head), in the bottleneck and compacter plugins, against
// AdapterHub's `adapters` (tests/fixtures/make_adapters.py): its saved folders, its outputs —
// GLOW through a rendering of its equations (make_adapters.py's glow_forward replaces the
// block's forward: adapters' own block cannot run on (B, T, H), so for GLOW AdapterHub checks
// the names, shapes and the model around the block, the rendering the block's math) — and the
// inverse composed from AdapterHub's own block with rev=True (on T5 in our order: before the
// head's rescale, which AdapterHub's flexible head applies first; the README says so).
#include "adapterhub_parity.h"

#include "../../plugins/additive/adapterhub_bn.h"

using namespace tessera;
using test::adapters_reference;

CATCH_TEST_CASE("invertible adapters equal AdapterHub's on MiniLM: seq_bn_inv, double_seq_bn_inv, GLOW, and a PHM adapter with one", "[plugins][bottleneck][invertible][minilm][parity]") {
  auto& ref = adapters_reference();
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  for (const auto& [name, plugin] : std::vector<std::pair<std::string, std::string>>{
           {"seq_bn_inv", "bottleneck"}, {"double_seq_bn_inv", "bottleneck"}, {"seq_bn_glow", "bottleneck"}, {"compacter_inv", "compacter"}}) {
    CATCH_INFO(name);
    auto model = test::load_minilm();
    test::perturb_if_asked(*model);
    auto a = test::attach_adapterhub("minilm_" + name, *model, plugin);
    CATCH_CHECK(model->token_wise_only());  // a token-wise transform before the layers: the unpadded path stays
    at::NoGradGuard no_grad;
    const Tensor out = model->forward(ids, mask).hidden;
    TESSERA_CHECK_PARITY(test::parity(out, ref, "minilm_" + name, mask));
    // With the block's last layers zero (the identity coupling) the output moves: the block really acts.
    auto s = a->call("state", [](Method& m) { return m.state(); });
    for (auto& [k, t] : s)
      if (k.find("invertible_adapters.") != std::string::npos && k.find(".2.") != std::string::npos) t.zero_();
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, out, mask) > 1e-3);
    a->detach(*model);
  }
}

CATCH_TEST_CASE("invertible adapters on GPT-2 and Mistral: AdapterHub's static head without the inverse, and the inverse before the head", "[plugins][bottleneck][invertible][decoder][parity]") {
  auto& ref = adapters_reference();
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  const auto &ids = dec["input_ids"], &mask = dec["attention_mask"];
  for (const std::string arch : {"gpt2", "mistral"})
    for (const std::string preset : {"seq_bn_inv", "seq_bn_glow"})
      for (const bool reverse : {false, true}) {
        const std::string name = arch + "_" + preset + (reverse ? "_rev" : "");
        CATCH_INFO(name);
        auto model = DecoderModel::load(test::fixture("decoders/" + arch), test::options());
        test::perturb_if_asked(*model);
        auto a = test::attach_adapterhub(name, *model, "bottleneck", {{"inv_adapter_reverse", reverse}});
        at::NoGradGuard no_grad;
        TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, name, mask));
        CATCH_CHECK_FALSE(model->output_reads_sequence());  // the inverse is token-wise: generation keeps its KV cache
      }
}

CATCH_TEST_CASE("invertible adapters on T5: the encoder's input alone, and the inverse on the decoder's output", "[plugins][bottleneck][invertible][t5][parity]") {
  auto& ref = adapters_reference();
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  for (const bool reverse : {false, true}) {
    const std::string name = std::string("t5_seq_bn_inv") + (reverse ? "_rev" : "");
    CATCH_INFO(name);
    auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
    test::perturb_if_asked(*model);
    auto a = test::attach_adapterhub(name, *model, "bottleneck", {{"inv_adapter_reverse", reverse}});
    at::NoGradGuard no_grad;
    const Tensor logits = model->logits(model->decode(s2s["t5.decoder_input_ids"], model->encode(s2s["input_ids"], s2s["attention_mask"])));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name));
  }
}

CATCH_TEST_CASE("the coupling blocks invert: NICE and GLOW, odd and even widths, in f64", "[plugins][bottleneck][invertible]") {
  at::manual_seed(3);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  for (const std::string kind : {"nice", "glow"})
    for (const std::int64_t H : {8, 9}) {
      CATCH_INFO(kind << " H " << H);
      const std::int64_t h1 = H / 2, h2 = H - h1;
      NamedTensors t = kind == "nice" ? adapterhub_bn::coupling_net("F", h2, 3, h1, opts) : adapterhub_bn::coupling_net("s1", h1, 3, 2 * h2, opts);
      for (auto& kv : kind == "nice" ? adapterhub_bn::coupling_net("G", h1, 3, h2, opts) : adapterhub_bn::coupling_net("s2", h2, 3, 2 * h1, opts)) t.insert(kv);
      at::NoGradGuard no_grad;
      for (auto& [k, v] : t) v.normal_(0.0, 0.7);  // far from the identity it starts at
      const Tensor x = at::randn({2, 5, H}, opts);
      const Tensor y = adapterhub_bn::couple(kind, t, "relu", x, false);
      CATCH_CHECK(test::max_abs_diff(y, x) > 0.1);
      CATCH_CHECK(test::max_abs_diff(adapterhub_bn::couple(kind, t, "relu", y, true), x) < 1e-12);
    }
}

CATCH_TEST_CASE("invertible adapters: AdapterHub's keys, its config, a folder it loads, and refusals", "[plugins][bottleneck][invertible][minilm]") {
  const auto* info = test::registry().find("bottleneck");
  auto model = test::load_minilm();
  {  // the preset's NICE block at reduction factor 2: F and G of 192 -> 96 -> 192, N(0, 0.02) weights
    auto a = test::registry().create("bottleneck", "x");
    a->attach(*model, {}, apply_schema(info->params, {{"config", std::string("seq_bn_inv")}}));
    auto s = a->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(s.size() == 6 * 4 + 8);
    CATCH_CHECK(s.at("invertible_adapters.x.F.0.weight").sizes() == at::IntArrayRef({96, 192}));
    CATCH_CHECK(s.at("invertible_adapters.x.G.2.weight").sizes() == at::IntArrayRef({192, 96}));
    CATCH_CHECK(std::abs(s.at("invertible_adapters.x.F.2.weight").std().item<double>() - 0.02) < 0.002);
    CATCH_CHECK(a->call("trainable", [](Method& m) { return m.trainable(); }).count("invertible_adapters.x.G.0.bias") == 1);
    const auto cfg = nlohmann::json::parse(a->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
    CATCH_CHECK(cfg["config"]["inv_adapter"] == "nice");
    CATCH_CHECK(cfg["config"]["inv_adapter_reduction_factor"] == 2.0);
    // A tensor of another shape is refused by name.
    s["invertible_adapters.x.F.0.weight"] = at::zeros({48, 192});
    CATCH_CHECK_THROWS_WITH(a->call("load_state", [&](Method& m) { m.load_state(s); }), Catch::Contains("tensor 'invertible_adapters.x.F.0.weight' has shape [48, 192]"));
    a->detach(*model);
  }
  {  // GLOW at reduction factor 4 and "none" over a preset's block
    auto g = test::registry().create("bottleneck", "g");
    g->attach(*model, {}, apply_schema(info->params, {{"inv_adapter", std::string("glow")}, {"inv_adapter_reduction_factor", 4.0}}));
    auto s = g->call("state", [](Method& m) { return m.state(); });
    CATCH_CHECK(s.at("invertible_adapters.g.s1.0.weight").sizes() == at::IntArrayRef({48, 192}));
    CATCH_CHECK(s.at("invertible_adapters.g.s1.2.weight").sizes() == at::IntArrayRef({384, 48}));
    g->detach(*model);
    auto n = test::registry().create("bottleneck", "n");
    n->attach(*model, {}, apply_schema(info->params, {{"config", std::string("seq_bn_inv")}, {"inv_adapter", std::string("none")}}));
    CATCH_CHECK(n->call("state", [](Method& m) { return m.state(); }).size() == 6 * 4);
    n->detach(*model);
  }
  {  // the unified methods built on the same wiring do not offer the block: their *_inv presets are refused
    auto sa = test::registry().create("sparse_adapter", "s");
    const auto params = apply_schema(test::registry().find("sparse_adapter")->params, {{"config", std::string("seq_bn_inv")}});
    CATCH_CHECK_THROWS_WITH(sa->call("validate", [&](Method& m) { m.validate(params); }), Catch::Contains("the preset seq_bn_inv carries an invertible adapter"));
  }
  {  // an inner width of 0 is refused with the key
    auto z = test::registry().create("bottleneck", "z");
    CATCH_CHECK_THROWS_WITH(z->attach(*model, {}, apply_schema(info->params, {{"inv_adapter", std::string("nice")}, {"inv_adapter_reduction_factor", 500.0}})),
                            Catch::Contains("inv_adapter_reduction_factor 500 leaves no inner width"));
  }
  // Ours loads in AdapterHub and gives its outputs (NICE: its GLOW block cannot run).
  auto inst = test::attach_fixture_or_random("bottleneck", *model, "", {}, {{"config", std::string("double_seq_bn_inv")}}, 7);
  test::check_loads_in_adapterhub(*inst, *model, "minilm", "invertible");
}
