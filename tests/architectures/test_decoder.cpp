// Decoders (GPT-2, LLaMA family) against transformers and peft on tiny random
// checkpoints that fixtures/make_decoders.py saves with save_pretrained.
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/generate.h"
#include "runtime/peft_import.h"
#include "tasks/head_loss.h"
#include "tasks/lm_loss.h"

#include <nlohmann/json.hpp>

#include <fstream>

using namespace tessera;

namespace {

std::string decoder_fixture(const std::string& name) { return test::fixture("decoders/" + name); }

NamedTensors& reference() { return test::cached_tensors(decoder_fixture("reference.safetensors")); }

std::unique_ptr<DecoderModel> load(const std::string& name) {
  auto m = DecoderModel::load(decoder_fixture(name), test::options());
  test::perturb_if_asked(*m);
  return m;
}

Tensor labels_of(const Tensor& ids, const Tensor& mask) { return ids.masked_fill(mask.eq(0), -100); }

const char* const kArchitectures[] = {"gpt2", "llama", "qwen2", "mistral", "llama_linear", "llama_dynamic", "llama_bf16", "qwen2_yarn"};

}  // namespace

CATCH_TEST_CASE("decoder hidden states, logits and loss equal transformers", "[model][decoder][parity]") {
  auto& ref = reference();
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  for (const std::string name : kArchitectures) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    CATCH_CHECK(model->ignored_tensors().empty());
    at::NoGradGuard no_grad;
    Tensor hidden = model->forward(ids, mask);
    Tensor logits = model->logits(hidden);
    TESSERA_CHECK_PARITY(test::parity(hidden, ref, name + ".hidden", mask));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + ".logits", mask));
    const double loss = causal_lm_loss(logits, labels_of(ids, mask)).item<double>();
    TESSERA_CHECK_PARITY(test::parity("loss", loss, ref, name + ".loss"));
    // The training loss never forms the logits: chunked head + cross-entropy on labelled rows.
    const auto T = ids.size(1);
    auto [rows, next] = labelled_rows(hidden.narrow(1, 0, T - 1), labels_of(ids, mask).narrow(1, 1, T - 1));
    const double fused = (head_loss_sum(model->head(), rows, next) / static_cast<double>(next.size(0))).item<double>();
    TESSERA_CHECK_PARITY(test::parity("fused head loss", fused, ref, name + ".loss"));
  }
}

CATCH_TEST_CASE("decoders skip padding tokens only while every method is token-wise", "[model][decoder][parity]") {
  // The reference batch is padded: the plain forward above ran on real tokens only. An
  // identity module on a sublayer site needs the (B, T, H) layout and switches that off;
  // both paths give the same real-token states, and the unpadded one zeros at padding.
  auto& ref = reference();
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  CATCH_REQUIRE(mask.eq(0).any().item<bool>());
  for (const std::string name : {"gpt2", "llama"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    at::NoGradGuard no_grad;
    Tensor unpadded = model->forward(ids, mask);
    CATCH_CHECK(unpadded.index({mask.eq(0)}).abs().max().item<double>() == 0);
    CATCH_REQUIRE(model->token_wise_only());
    bool saw_padded_layout = false;
    model->sublayer_sites()[0]->add_sequential(test::owner("identity"), [&](const Tensor& h) {
      saw_padded_layout = h.dim() == 3 && h.size(0) == ids.size(0);
      return h;
    });
    CATCH_REQUIRE(!model->token_wise_only());
    Tensor padded = model->forward(ids, mask);
    CATCH_CHECK(saw_padded_layout);
    const auto p = test::parity(padded, ref, name + ".hidden", mask);
    TESSERA_CHECK_PARITY(p);
    CATCH_CHECK(test::max_abs_diff_tokens(padded, unpadded, mask) <= p.tolerance);  // the two layouts agree as closely as each meets the truth
  }
}

CATCH_TEST_CASE("greedy generation with the KV cache equals transformers.generate token for token", "[model][decoder]") {
  nlohmann::json runs;
  std::ifstream(decoder_fixture("generate.json")) >> runs;
  CATCH_REQUIRE(runs.size() == 7);
  for (const auto& [name, cases] : runs.items()) {
    auto model = load(name);
    for (const auto& c : cases) {
      CATCH_INFO("checkpoint " << name << ", " << c["prompts"].size() << " prompt(s)");
      GenerateOptions o;
      o.max_new_tokens = 32;
      o.eos_token_ids = model->config().eos_token_ids;
      o.pad_token_id = 0;
      auto ours = generate(*model, c["prompts"].get<std::vector<std::vector<std::int64_t>>>(), o);
      CATCH_CHECK(ours == c["tokens"].get<std::vector<std::vector<std::int64_t>>>());
    }
  }
}

CATCH_TEST_CASE("the KV cache gives the logits of a full forward", "[model][decoder][parity]") {
  auto model = load("llama");
  auto& ref = reference();
  Tensor ids = ref["input_ids"].narrow(0, 0, 1), mask = ref["attention_mask"].narrow(0, 0, 1);  // (1, 12), no padding
  at::NoGradGuard no_grad;
  KVCache cache;
  model->forward(ids.narrow(1, 0, 7), mask.narrow(1, 0, 7), &cache);
  Tensor rest = model->logits(model->forward(ids.narrow(1, 7, 5), mask.narrow(1, 7, 5), &cache));  // (1, 5, V)
  CATCH_CHECK(cache.length() == 12);
  auto last5 = [&](const std::string& key) { return ref[key].narrow(0, 0, 1).narrow(1, 7, 5); };
  TESSERA_CHECK_PARITY(test::parity("logits through the cache", rest, last5("llama.logits"), last5("llama.logits.f64")));
}

CATCH_TEST_CASE("sampling is seeded and stays inside top-k", "[model][decoder]") {
  auto model = load("gpt2");
  GenerateOptions o;
  o.sample = true;
  o.top_k = 3;
  o.temperature = 0.8;
  o.seed = 5;
  auto a = generate(*model, {{1, 17, 42}}, o), b = generate(*model, {{1, 17, 42}}, o);
  CATCH_CHECK(a == b);
  o.seed = 6;
  CATCH_CHECK(generate(*model, {{1, 17, 42}}, o) != a);
  // Every sampled token is among the 3 most likely at its step.
  std::vector<std::int64_t> context{1, 17, 42};
  at::NoGradGuard no_grad;
  for (auto t : a[0]) {
    Tensor ids = at::tensor(at::ArrayRef<std::int64_t>(context), at::kLong).unsqueeze(0).to(test::device());
    Tensor logits = model->logits(model->forward(ids, at::ones_like(ids)))[0][-1];
    Tensor top = std::get<1>(logits.topk(3));
    CATCH_CHECK(top.eq(t).any().item<bool>());
    context.push_back(t);
  }
}

CATCH_TEST_CASE("top_p keeps at least the most likely token: top_p = 0 samples greedily", "[model][decoder]") {
  auto model = load("gpt2");
  GenerateOptions greedy;
  greedy.max_new_tokens = 8;
  GenerateOptions o = greedy;
  o.sample = true;
  o.top_p = 0;
  o.seed = 3;
  CATCH_CHECK(generate(*model, {{1, 17, 42}}, o) == generate(*model, {{1, 17, 42}}, greedy));
}

CATCH_TEST_CASE("generation past GPT-2's position table is refused before it starts, naming what fits", "[model][decoder]") {
  auto model = load("gpt2");
  const auto limit = model->config().max_positions;
  GenerateOptions o;
  o.max_new_tokens = limit - 2;
  CATCH_CHECK(generate(*model, {{1, 17}}, o)[0].size() == static_cast<std::size_t>(limit - 2));  // exactly fills the table
  o.max_new_tokens = limit;
  CATCH_CHECK_THROWS_WITH(generate(*model, {{1, 17}}, o), Catch::Contains("(at most " + std::to_string(limit - 2) + " new tokens)"));
}

CATCH_TEST_CASE("GPT-2's fused c_attn resolves PEFT's target and offers q, k, v sites", "[model][decoder]") {
  auto model = load("gpt2");
  CATCH_CHECK(model->match_linear({"c_attn"}).size() == 2);
  CATCH_CHECK(model->match_linear({"c_attn"})[0]->name() == "layers.0.attn.qkv");
  CATCH_CHECK(model->match_linear({"attn.q"}).size() == 2);
  CATCH_CHECK(model->match_linear({"c_proj"}).size() == 4);  // attention output and MLP down, as in PEFT
  CATCH_CHECK(model->match_linear({"head"}).at(0)->weight().name() == "embed.word.weight");  // tied
  // Split sites read row blocks of the same fused tensor.
  auto* qkv = model->match_linear({"layers.1.attn.qkv"}).at(0);
  auto* v = model->match_linear({"layers.1.attn.v"}).at(0);
  CATCH_CHECK(at::equal(v->weight().value(), qkv->weight().value().narrow(0, 128, 64)));
}

CATCH_TEST_CASE("LoRA on decoders equals peft: GPT-2 fused c_attn (Conv1D) and LLaMA", "[model][decoder][lora][parity]") {
  auto& ref = reference();
  for (const std::string name : {"gpt2", "llama"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    const auto dir = decoder_fixture(name + "_lora");
    auto lora = test::attach_peft_adapter(dir, *model);
    at::NoGradGuard no_grad;
    const auto& ids = ref["input_ids"];
    const auto& mask = ref["attention_mask"];
    Tensor logits = model->logits(model->forward(ids, mask));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + ".lora_logits", mask));
    CATCH_CHECK(test::max_abs_diff_tokens(logits, ref[name + ".logits"], mask) > 1e-3);  // the adapter changes the output
    lora->call("merge", [](Method& m) { m.merge(); });
    // Merging changes nothing in exact arithmetic: the merged model meets the same truth.
    TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, name + ".lora_logits", mask));
    lora->call("unmerge", [](Method& m) { m.unmerge(); });
    lora->detach(*model);
    TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, name + ".logits", mask));
  }
}

CATCH_TEST_CASE("(IA)3 on decoders equals peft with its default targets: GPT-2 fused c_attn (Conv1D) and LLaMA", "[model][decoder][ia3][parity]") {
  auto& ref = reference();
  for (const std::string name : {"gpt2", "llama"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    auto ia3 = test::attach_peft_adapter(decoder_fixture(name + "_ia3"), *model);
    at::NoGradGuard no_grad;
    const auto& ids = ref["input_ids"];
    const auto& mask = ref["attention_mask"];
    Tensor logits = model->logits(model->forward(ids, mask));
    TESSERA_CHECK_PARITY(test::parity(logits, ref, name + ".ia3_logits", mask));
    CATCH_CHECK(test::max_abs_diff_tokens(logits, ref[name + ".logits"], mask) > 1e-3);
    ia3->call("merge", [](Method& m) { m.merge(); });
    TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, name + ".ia3_logits", mask));
    ia3->call("unmerge", [](Method& m) { m.unmerge(); });
    ia3->detach(*model);
    TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(ids, mask)), ref, name + ".logits", mask));
  }
}

CATCH_TEST_CASE("interventions on both GPT-2's fused and split q/k/v sites are refused", "[model][decoder][lora]") {
  auto model = load("gpt2");
  const auto* info = test::registry().find("lora");
  auto a = test::registry().create("lora", "fused"), b = test::registry().create("lora", "split");
  a->attach(*model, {"layers.0.attn.qkv"}, apply_schema(info->params, {{"r", std::int64_t{2}}}));
  b->attach(*model, {"layers.0.attn.k"}, apply_schema(info->params, {{"r", std::int64_t{2}}}));
  Tensor ids = at::ones({1, 4}, test::options(at::kLong));
  CATCH_CHECK_THROWS_WITH(model->forward(ids, ids), Catch::Contains("layers.0.attn.qkv and its split sites"));
  b->detach(*model);
  CATCH_CHECK_NOTHROW(model->forward(ids, ids));
  a->detach(*model);
}

CATCH_TEST_CASE("LoRA trains every decoder through the same sites: the loss falls", "[model][decoder][lora]") {
  auto& ref = reference();
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  const auto* info = test::registry().find("lora");
  for (const std::string name : {"gpt2", "llama", "qwen2", "mistral"}) {
    CATCH_INFO("checkpoint " << name);
    auto model = load(name);
    at::manual_seed(4);  // LoRA's A init draws from the global generator
    auto lora = test::registry().create("lora", "l");
    lora->attach(*model, {"attn.q", "attn.v", "mlp.down"}, apply_schema(info->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}}));
    auto params = lora->call("trainable", [](Method& m) { return m.trainable(); });
    std::vector<Tensor> list;
    for (auto& [k, t] : params) list.push_back(t);
    auto loss_fn = [&] { return causal_lm_loss(model->logits(model->forward(ids, mask)), labels_of(ids, mask)); };
    const double first = loss_fn().item<double>();
    for (int step = 0; step < 30; ++step) {
      Tensor loss = loss_fn();
      for (auto& t : list)
        if (t.grad().defined()) t.mutable_grad().zero_();
      loss.backward();
      at::NoGradGuard ng;
      for (auto& t : list) t.sub_(t.grad() * 2.0);
    }
    const double last = loss_fn().item<double>();
    CATCH_INFO("loss " << first << " -> " << last);
    CATCH_CHECK(last < 0.93 * first);  // random-init models start near ln V; plain SGD moves slowly
    lora->detach(*model);
  }
}

CATCH_TEST_CASE("decoder loading: missing tensors named, unexpected listed, bad configs refused", "[model][decoder]") {
  namespace fs = std::filesystem;
  auto dir = test::temp_dir("decoder-load");
  fs::copy_file(decoder_fixture("gpt2/config.json"), dir / "config.json");
  auto tensors = test::read_tensors(decoder_fixture("gpt2/model.safetensors"), at::kCPU);
  tensors.erase("transformer.h.1.ln_2.weight");
  tensors.erase("transformer.wpe.weight");
  tensors["transformer.extra.weight"] = at::zeros({2});
  save_safetensors((dir / "model.safetensors").string(), {tensors.begin(), tensors.end()});
  CATCH_CHECK_THROWS_WITH(DecoderModel::load(dir.string(), at::TensorOptions()),
                          Catch::Contains("2 tensor(s) missing") && Catch::Contains("transformer.h.1.ln_2.weight") &&
                              Catch::Contains("transformer.wpe.weight"));
  tensors["transformer.h.1.ln_2.weight"] = at::ones({64});
  tensors["transformer.wpe.weight"] = at::zeros({64, 64});
  save_safetensors((dir / "model.safetensors").string(), {tensors.begin(), tensors.end()});
  auto model = DecoderModel::load(dir.string(), at::TensorOptions());
  CATCH_CHECK(model->ignored_tensors() == std::vector<std::string>{"transformer.extra.weight"});

  // A missing linear weight is listed like any other (the model is built around a
  // stand-in first, so the list is complete).
  tensors.erase("transformer.h.0.attn.c_attn.weight");
  tensors.erase("transformer.h.1.mlp.c_fc.weight");
  save_safetensors((dir / "model.safetensors").string(), {tensors.begin(), tensors.end()});
  CATCH_CHECK_THROWS_WITH(DecoderModel::load(dir.string(), at::TensorOptions()),
                          Catch::Contains("2 tensor(s) missing") && Catch::Contains("transformer.h.0.attn.c_attn.weight") &&
                              Catch::Contains("transformer.h.1.mlp.c_fc.weight"));

  std::ofstream((dir / "config.json").string()) << R"({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 8, "rope_scaling": {"rope_type": "longrope", "factor": 2}})";
  CATCH_CHECK_THROWS_WITH(DecoderModel::load(dir.string(), at::TensorOptions()), Catch::Contains("rope_scaling.rope_type 'longrope' is not supported"));
  std::ofstream((dir / "config.json").string()) << R"({"model_type": "bert"})";
  CATCH_CHECK_THROWS_WITH(DecoderModel::load(dir.string(), at::TensorOptions()), Catch::Contains("'bert' is not a supported decoder"));
  fs::remove(dir / "model.safetensors");
  fs::copy_file(decoder_fixture("gpt2/config.json"), dir / "config.json", fs::copy_options::overwrite_existing);
  CATCH_CHECK_THROWS_WITH(DecoderModel::load(dir.string(), at::TensorOptions()), Catch::Contains("no model.safetensors"));
}

CATCH_TEST_CASE("decoder attention prefixes: evaluated once per layer and forward, and the cache path agrees", "[model][decoder]") {
  auto model = load("llama");
  int calls = 0;
  for (auto* site : model->attention_sites())
    site->add_prefix(test::owner("t"), [&, site](std::int64_t B) {
      ++calls;
      at::manual_seed(9);
      return std::make_pair(at::randn({B, site->num_heads(), 2, site->head_dim()}).to(test::device()),
                            at::randn({B, site->num_heads(), 2, site->head_dim()}).to(test::device()));
    });
  auto& ref = reference();
  Tensor ids = ref["input_ids"].narrow(0, 0, 1), mask = ref["attention_mask"].narrow(0, 0, 1);  // (1, 12)
  at::NoGradGuard no_grad;
  Tensor full = model->logits(model->forward(ids, mask));
  CATCH_CHECK(calls == 2);  // two layers, one forward
  CATCH_CHECK(test::max_abs_diff(full, ref["llama.logits"].narrow(0, 0, 1)) > 1e-3);  // the prefix is seen
  KVCache cache;
  model->forward(ids.narrow(1, 0, 8), mask.narrow(1, 0, 8), &cache);
  Tensor rest = model->logits(model->forward(ids.narrow(1, 8, 4), mask.narrow(1, 8, 4), &cache));
  CATCH_CHECK(cache.length() == 2 + 12);
  CATCH_CHECK(test::max_abs_diff(rest, full.narrow(1, 8, 4)) < 1e-4);
  for (auto* site : model->attention_sites()) site->remove(test::owner("t"));
}
