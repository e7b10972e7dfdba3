// LST against a plain PyTorch rendering of the paper's equations (tests/fixtures/make_lst.py):
// the same pruned initialisation from the real MiniLM's weights, and with the same side
// tensors the same output over transformers' hidden states.
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/generate.h"
#include "architectures/t5.h"
#include "runtime/method_stack.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

namespace {

std::unique_ptr<MethodInstance> attach_lst(ModelView& model, std::map<std::string, ParamValue> params = {{"reduction_factor", std::int64_t{4}}}) {
  auto inst = test::registry().create("lst", "lst");
  inst->attach(model, {}, apply_schema(test::registry().find("lst")->params, std::move(params)));
  return inst;
}

}  // namespace

CATCH_TEST_CASE("LST prunes its side network from the backbone as the reference does, and its output equals the reference's", "[plugins][lst][minilm][parity]") {
  auto model = test::load_minilm();
  auto lst = attach_lst(*model);
  auto ours = lst->call("state", [](Method& m) { return m.state(); });
  const auto pruned = test::read_tensors(test::fixture("lst/pruned.safetensors"));
  CATCH_CHECK(pruned.size() == 6 * 16);
  for (const auto& [k, t] : pruned) {
    CATCH_INFO("tensor " << k);
    CATCH_REQUIRE(ours.count(k));
    CATCH_CHECK(test::max_abs_diff(ours.at(k), t) < 1e-6);  // slices of a perturbed base differ by 1e-3 relative
  }
  lst->call("load_state", [](Method& m) { m.load_state(test::read_tensors(test::fixture("lst/adapter_model.safetensors"))); });
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  at::NoGradGuard no_grad;
  const Tensor out = model->forward(ids, mask).hidden;  // (B, T, H): the side network's, up-projected
  TESSERA_CHECK_PARITY(test::parity(out, test::cached_tensors(test::fixture("lst/reference.safetensors")), "out", mask));
}

CATCH_TEST_CASE("LST: nothing of the backbone is trained, the side network is r times narrower, its file keys are the authors' names", "[plugins][lst][minilm]") {
  auto model = test::load_minilm();
  auto lst = attach_lst(*model, {});  // r = 8: 48 wide, 12 heads of 4, FFN 192
  auto t = lst->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(t.at("side_block.0.attention.self.query.weight").sizes() == at::IntArrayRef({48, 48}));
  CATCH_CHECK(t.at("side_block.5.intermediate.dense.weight").sizes() == at::IntArrayRef({192, 48}));
  CATCH_CHECK(t.at("side_downsamples.3.weight").sizes() == at::IntArrayRef({48, 384}));
  CATCH_CHECK(t.at("side_final_upsample.weight").sizes() == at::IntArrayRef({384, 48}));
  CATCH_CHECK(t.at("side_gate_params.2").item<double>() == 0.0);  // μ = σ(0) = ½
  // What the backbone computes carries no autograd graph: a router on a middle layer (keeping
  // every token) sees that layer's input without one — and with a LoRA inside the backbone, with one.
  bool input_has_graph = true;
  auto* layer3 = model->match_layers({"layers.3"}).at(0);
  layer3->add_router(test::owner("watch"), [&](const Tensor& h) {
    input_has_graph = h.requires_grad();
    return at::ones({h.size(0), h.size(1)}, h.options());
  });
  const auto cfg = nlohmann::json::parse(lst->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["tessera"]["method"] == "lst");
  CATCH_CHECK(cfg["tessera"]["side_hidden_size"] == 48);

  // A training forward: the side network's output carries a graph, reached from its own tensors only.
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  model->train(true);
  const Tensor out = model->forward(base["input_ids"], base["attention_mask"]).hidden;
  CATCH_REQUIRE(out.requires_grad());
  CATCH_CHECK_FALSE(input_has_graph);
  out.sum().backward();
  for (const auto& [k, v] : t) {
    CATCH_INFO("tensor " << k);
    CATCH_CHECK((v.grad().defined() && v.grad().abs().sum().item<double>() > 0));
  }
  auto lora = test::registry().create("lora", "inside");
  lora->attach(*model, {"layers.0.attn.q"}, apply_schema(test::registry().find("lora")->params, {{"init_lora_weights", std::string("false")}}));
  model->forward(base["input_ids"], base["attention_mask"]);
  CATCH_CHECK(input_has_graph);  // the check above can fail
}

CATCH_TEST_CASE("LST refuses a reduction that does not divide the model with the key's place, another family, and a foreign tensor by name", "[plugins][lst][minilm]") {
  auto model = test::load_minilm();
  auto refusal = [&](std::int64_t r) {
    const auto dir = test::temp_dir("lst-cfg");
    const auto path = (dir / "run.toml").string();
    std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"lst\"\n[methods.params]\nreduction_factor = " << r << "\n";
    Config c = load_config(path);
    check_methods(c, test::registry());
    try {
      MethodStack stack(test::registry(), c.methods, *model, c.model);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(attached)");
  };
  CATCH_CHECK_THAT(refusal(5), Catch::Contains("run.toml:8:") && Catch::Contains("reduction_factor 5 does not divide the hidden size 384"));
  CATCH_CHECK_THAT(refusal(64), Catch::Contains("run.toml:8:") && Catch::Contains("side width of 6, which the model's 12 heads do not divide"));

  auto t5 = T5Model::load(test::fixture("seq2seq/t5"), test::options());  // d_kv 8: r = 16 leaves half a dimension per head
  CATCH_CHECK_THROWS_WITH(attach_lst(*t5, {{"reduction_factor", std::int64_t{16}}}), Catch::Contains("does not divide the attention heads' width d_kv = 8"));

  auto lst = attach_lst(*model);
  auto s = lst->call("state", [](Method& m) { return m.state(); });
  s["side_block.6.output.dense.bias"] = at::zeros({96});
  CATCH_CHECK_THROWS_WITH(lst->call("load_state", [&](Method& m) { m.load_state(s); }),
                          Catch::Contains("tensor 'side_block.6.output.dense.bias' is not part of this LST side network (6 layers"));
  s.erase("side_block.6.output.dense.bias");
  s["side_final_upsample.bias"] = at::zeros({97});
  CATCH_CHECK_THROWS_WITH(lst->call("load_state", [&](Method& m) { m.load_state(s); }),
                          Catch::Contains("tensor 'side_final_upsample.bias' has shape [97], expected [384]"));
}

// GPT-2 (fused c_attn, LayerNorm, GELU(tanh)) and LLaMA (RMSNorm, rotary, grouped-query
// attention, SwiGLU) against tests/fixtures/make_lst_decoders.py: the pruned side blocks,
// the output over transformers' hidden states, and greedy tokens for a left-padded batch.
CATCH_TEST_CASE("LST on decoders prunes causal side blocks as the reference does, its output and its greedy tokens equal the reference's", "[plugins][lst][decoder][parity]") {
  const auto& ref = test::cached_tensors(test::fixture("lst_decoders/reference.safetensors"));
  for (const auto& [name, r] : {std::pair{"gpt2", 4}, {"llama", 2}}) {
    CATCH_INFO("decoder " << name);
    auto model = DecoderModel::load(test::fixture(std::string("decoders/") + name), test::options());
    test::perturb_if_asked(*model);
    auto lst = attach_lst(*model, {{"reduction_factor", std::int64_t{r}}});
    auto ours = lst->call("state", [](Method& m) { return m.state(); });
    const auto pruned = test::read_tensors(test::fixture(std::string("lst_decoders/") + name + ".pruned.safetensors"));
    CATCH_CHECK(pruned.size() == (name == std::string("gpt2") ? 2 * 16 + 2 : 2 * 9 + 1));
    for (const auto& [k, t] : pruned) {
      CATCH_INFO("tensor " << k);
      CATCH_REQUIRE(ours.count(k));
      CATCH_CHECK(test::max_abs_diff(ours.at(k), t) < 1e-6);
    }
    lst->call("load_state", [&](Method& m) { m.load_state(test::read_tensors(test::fixture(std::string("lst_decoders/") + name + ".adapter.safetensors"))); });
    auto& base = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
    const auto &ids = base["input_ids"], &mask = base["attention_mask"];
    at::NoGradGuard no_grad;
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask), ref, std::string(name) + ".out", mask));
    // Generation recomputes the sequence at each token: the side network reads every position.
    CATCH_CHECK(model->output_reads_sequence());
    GenerateOptions o;
    o.max_new_tokens = 6;
    const auto tokens = generate(*model, {{1, 17, 42, 99, 7, 55}, {1, 23, 5}}, o);
    const Tensor expected = ref.at(std::string(name) + ".generated");
    for (std::int64_t b = 0; b < 2; ++b) {
      CATCH_INFO("prompt " << b);
      const Tensor row = expected[b];
      CATCH_CHECK(tokens[b] == std::vector<std::int64_t>(row.data_ptr<std::int64_t>(), row.data_ptr<std::int64_t>() + row.numel()));
    }
  }
}

// T5, the authors' own setting (ReLU and gated-GELU FFNs) against
// tests/fixtures/make_lst_t5.py: the pruning chain through both stacks, the logits with the
// side decoder's output in place of the decoder's, and greedy targets recomputed per step.
CATCH_TEST_CASE("LST on T5: a side encoder and a side decoder pruned as the reference does, its logits and greedy targets equal the reference's", "[plugins][lst][t5][parity]") {
  const auto& ref = test::cached_tensors(test::fixture("lst_t5/reference.safetensors"));
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  const auto &ids = s2s["input_ids"], &mask = s2s["attention_mask"];
  for (const std::string name : {"t5", "t5_v1_1"}) {
    CATCH_INFO("model " << name);
    auto model = T5Model::load(test::fixture("seq2seq/" + name), test::options());
    test::perturb_if_asked(*model);
    // The tiny checkpoints bucket positions up to 20 (T5's own 128 is the key's default).
    auto lst = attach_lst(*model, {{"reduction_factor", std::int64_t{4}}, {"relative_attention_max_distance", std::int64_t{20}}});
    auto ours = lst->call("state", [](Method& m) { return m.state(); });
    const auto pruned = test::read_tensors(test::fixture("lst_t5/" + name + ".pruned.safetensors"));
    const std::size_t ffn = name == "t5" ? 3 : 4;  // norm, (gate,) up, down
    CATCH_CHECK(pruned.size() == 2 * (5 + ffn) + 2 * (10 + ffn) + 4);
    for (const auto& [k, t] : pruned) {
      CATCH_INFO("tensor " << k);
      CATCH_REQUIRE(ours.count(k));
      CATCH_CHECK(test::max_abs_diff(ours.at(k), t) < 1e-6);
    }
    lst->call("load_state", [&](Method& m) { m.load_state(test::read_tensors(test::fixture("lst_t5/" + name + ".adapter.safetensors"))); });
    at::NoGradGuard no_grad;
    const Tensor logits = model->logits(model->decode(s2s[name + ".decoder_input_ids"], model->encode(ids, mask)));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + ".logits"));
    CATCH_CHECK(model->output_reads_sequence());  // generation decodes the whole target at each step
    std::vector<std::vector<std::int64_t>> sources;
    for (std::int64_t b = 0; b < ids.size(0); ++b) {
      const auto n = mask[b].sum().item<std::int64_t>();
      sources.emplace_back(ids[b].data_ptr<std::int64_t>(), ids[b].data_ptr<std::int64_t>() + n);
    }
    GenerateOptions o;
    o.max_new_tokens = 6;
    const auto tokens = generate(*model, sources, o);
    const Tensor expected = ref.at(name + ".generated");
    for (std::int64_t b = 0; b < ids.size(0); ++b) {
      CATCH_INFO("source " << b);
      const Tensor row = expected[b].contiguous();
      CATCH_CHECK(tokens[b] == std::vector<std::int64_t>(row.data_ptr<std::int64_t>(), row.data_ptr<std::int64_t>() + row.numel()));
    }
  }
}

CATCH_TEST_CASE("LST on T5 trains its side network alone: no graph through either backbone stack, a gradient on every side tensor", "[plugins][lst][t5]") {
  auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
  auto lst = attach_lst(*model, {{"reduction_factor", std::int64_t{4}}, {"relative_attention_max_distance", std::int64_t{20}}});
  bool backbone_graph = false;
  for (const char* layer : {"encoder.layers.1", "decoder.layers.1"})
    model->match_layers({layer}).at(0)->add_router(test::owner("watch"), [&](const Tensor& h) {
      backbone_graph = backbone_graph || h.requires_grad();
      return at::ones({h.size(0), h.size(1)}, h.options());
    });
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  model->train(true);
  const Tensor logits = model->logits(model->decode(s2s["t5.decoder_input_ids"], model->encode(s2s["input_ids"], s2s["attention_mask"])));
  CATCH_CHECK_FALSE(backbone_graph);
  logits.pow(2).mean().backward();
  for (const auto& [k, t] : lst->call("trainable", [](Method& m) { return m.trainable(); })) {
    CATCH_INFO(k);
    CATCH_CHECK((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
  }
  const auto cfg = nlohmann::json::parse(lst->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["tessera"]["block"] == "T5 encoder and decoder");
  CATCH_CHECK(cfg["tessera"]["side_d_kv"] == 2);
}

CATCH_TEST_CASE("LST on LLaMA: no backbone graph, every side tensor trained, the file says the block's kind", "[plugins][lst][decoder]") {
  auto model = DecoderModel::load(test::fixture("decoders/llama"), test::options());
  auto lst = attach_lst(*model, {{"reduction_factor", std::int64_t{2}}});
  auto t = lst->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_CHECK(t.at("side_block.0.attn.q.weight").sizes() == at::IntArrayRef({32, 32}));
  CATCH_CHECK(t.at("side_block.0.attn.k.weight").sizes() == at::IntArrayRef({16, 32}));  // 2 kv heads of 8
  CATCH_CHECK(t.at("side_block.1.mlp.gate.weight").sizes() == at::IntArrayRef({48, 32}));
  CATCH_CHECK(t.at("side_final_layer_norm.weight").sizes() == at::IntArrayRef({32}));
  CATCH_CHECK_FALSE(t.count("side_final_layer_norm.bias"));
  const auto cfg = nlohmann::json::parse(lst->call("cfg", [](Method& m) { return m.adapter_config_json(); }));
  CATCH_CHECK(cfg["tessera"]["norm"] == "rms_norm");
  CATCH_CHECK(cfg["tessera"]["mlp"] == "swiglu");
  CATCH_CHECK(cfg["tessera"]["num_key_value_heads"] == 2);
  bool input_has_graph = true;
  model->match_layers({"layers.1"}).at(0)->add_router(test::owner("watch"), [&](const Tensor& h) {
    input_has_graph = h.requires_grad();
    return at::ones({h.size(0), h.size(1)}, h.options());
  });
  auto& base = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  model->train(true);
  const Tensor out = model->forward(base["input_ids"], base["attention_mask"]);
  CATCH_REQUIRE(out.requires_grad());
  CATCH_CHECK_FALSE(input_has_graph);
  CATCH_CHECK(at::isfinite(out).all().item<bool>());
  out.sum().backward();
  for (const auto& [k, v] : t) {
    CATCH_INFO("tensor " << k);
    CATCH_CHECK((v.grad().defined() && v.grad().abs().sum().item<double>() > 0));
  }
}
