// Prompt tuning, P-tuning and prefix tuning against peft (tests/fixtures/make_prompts.py):
// adapters peft saved load and give peft's outputs — an encoder's hidden states over
// [virtual tokens ; text], a decoder's logits, loss and greedy generations, T5's logits —
// on the real MiniLM, a tiny RoBERTa, GPT-2, LLaMA (grouped-query) and T5; the prompt
// encoders themselves (MLP, LSTM, the prefix projection) given peft's weights compute peft's
// prompts; adapters we save load in PeftModel.from_pretrained; bad adapters are refused.
#include "support.h"

#include "architectures/decoder.h"
#include "architectures/generate.h"
#include "architectures/t5.h"
#include "formats/safetensors.h"
#include "runtime/peft_import.h"
#include "tasks/lm_loss.h"

#include <tessera/extensions.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

using namespace tessera;

namespace {

const char* const kMethods[] = {"prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_proj"};
constexpr std::int64_t kP = 4;  // virtual tokens in every fixture

std::string dir_of(const std::string& key) { return test::fixture("prompts/" + key); }
NamedTensors& reference() { return test::cached_tensors(test::fixture("prompts/reference.safetensors")); }

bool is_prefix(const std::string& method) { return method.rfind("prefix", 0) == 0; }
bool reparameterised(const std::string& method) { return method == "ptuning_mlp" || method == "ptuning_lstm" || method == "prefix_proj"; }

// The fixture's adapter attached the way peft's folder says; with `encoder` the prompt
// encoder's weights are loaded instead of its saved output, so the MLP, LSTM or projection runs.
std::unique_ptr<MethodInstance> attach(const std::string& key, ModelView& model, bool encoder) {
  if (!encoder) return test::attach_peft_adapter(dir_of(key), model);
  MethodConfig mc = method_from_peft_dir(dir_of(key), test::registry(), "adapter");
  auto inst = test::registry().create(mc.plugin, "adapter");
  inst->attach(model, mc.targets, mc.checked);
  auto weights = test::read_tensors(dir_of(key) + "/encoder.safetensors");
  auto ours = inst->call("trainable", [](Method& m) { return m.trainable(); });
  CATCH_REQUIRE(ours.size() == weights.size());
  at::NoGradGuard no_grad;
  for (auto& [k, t] : ours) {
    CATCH_INFO("tensor " << k);
    CATCH_REQUIRE(weights.count(k));
    CATCH_REQUIRE(weights[k].sizes() == t.sizes());
    t.copy_(weights[k]);
  }
  // What we would save is what peft saved: the encoder's output.
  auto saved = inst->call("state", [](Method& m) { return m.state(); });
  auto peft = test::read_tensors(dir_of(key) + "/adapter_model.safetensors");
  CATCH_CHECK(test::max_abs_diff(saved.at("prompt_embeddings"), peft.at("prompt_embeddings")) < 1e-5);
  return inst;
}

// A copy of peft's folder `key` whose config says shift_positions = false (Tessera's key).
std::string positionless_copy(const std::string& key) {
  const auto dir = test::temp_dir("positionless-" + key);
  for (const auto& e : std::filesystem::directory_iterator(dir_of(key)))
    std::filesystem::copy(e.path(), dir / e.path().filename(), std::filesystem::copy_options::overwrite_existing);
  std::ifstream in((dir / "adapter_config.json").string());
  auto j = nlohmann::json::parse(in);
  j["shift_positions"] = false;
  std::ofstream((dir / "adapter_config.json").string()) << j.dump(2);
  return dir.string();
}

Tensor with_prompt_mask(const Tensor& mask, const std::string& method) {
  return is_prefix(method) ? mask : at::cat({at::ones({mask.size(0), kP}, mask.options()), mask}, 1);
}

}  // namespace

CATCH_TEST_CASE("soft prompts on encoders equal peft's: MiniLM and RoBERTa hidden states, from peft's files and through the prompt encoders",
                "[plugins][prompts][minilm][parity]") {
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  for (const std::string arch : {"minilm", "roberta"}) {
    for (const std::string method : kMethods) {
      if (arch == "roberta" && !is_prefix(method) && method != "prompt") continue;
      for (const bool encoder : {false, true}) {
        if (encoder && !reparameterised(method)) continue;
        const std::string key = arch + "." + method;
        CATCH_INFO(key << (encoder ? " through its encoder" : " from peft's file"));
        auto model = arch == "minilm" ? test::load_minilm() : BertModel::load(test::fixture("tiny_roberta"), test::options());
        if (arch == "roberta") test::perturb_if_asked(*model);
        const Tensor ids = enc[arch == "minilm" ? "input_ids" : "roberta.input_ids"], mask = enc[arch == "minilm" ? "attention_mask" : "roberta.attention_mask"];
        auto inst = attach(key, *model, encoder);
        at::NoGradGuard no_grad;
        Encoded e = model->forward(ids, mask);
        CATCH_CHECK(e.prompt_length == (is_prefix(method) ? 0 : kP));
        TESSERA_CHECK_PARITY(test::parity(e.hidden, reference(), key, with_prompt_mask(mask, method)));
        inst->detach(*model);
      }
    }
  }
}

CATCH_TEST_CASE("soft prompts on decoders equal peft's: GPT-2 and LLaMA logits, loss and 32 greedy tokens, the prefix cached once",
                "[plugins][prompts][decoder][parity]") {
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  std::ifstream in(test::fixture("prompts/generate.json"));
  const auto generated = nlohmann::json::parse(in);
  const Tensor ids = dec["input_ids"], mask = dec["attention_mask"];
  for (const std::string arch : {"gpt2", "llama"}) {
    for (const std::string method : kMethods) {
      for (const bool encoder : {false, true}) {
        if (encoder && !reparameterised(method)) continue;
        const std::string key = arch + "." + method;
        CATCH_INFO(key << (encoder ? " through its encoder" : " from peft's file"));
        auto model = DecoderModel::load(test::fixture("decoders/" + arch), test::options());
        test::perturb_if_asked(*model);
        auto inst = attach(key, *model, encoder);
        at::NoGradGuard no_grad;
        const Tensor logits = model->logits(model->forward(ids, mask));  // (B, P + T, V), or (B, T, V) with a prefix
        TESSERA_CHECK_PARITY(test::parity(logits, reference(), key + ".logits", with_prompt_mask(mask, method)));
        // peft's loss: labels extended with -100 over the prompt.
        Tensor labels = ids.masked_fill(mask.eq(0), -100);
        if (!is_prefix(method)) labels = at::cat({at::full({ids.size(0), kP}, -100, labels.options()), labels}, 1);
        TESSERA_CHECK_PARITY(test::parity("loss", causal_lm_loss(logits, labels).item<double>(), reference(), key + ".loss"));
        if (encoder) continue;
        GenerateOptions o;
        o.eos_token_ids = {2};
        for (const auto& run : generated[key]) {
          const auto prompts = run["prompts"].get<std::vector<std::vector<std::int64_t>>>();
          CATCH_INFO("prompts " << run["prompts"].dump());
          CATCH_CHECK(generate(*model, prompts, o) == run["tokens"].get<std::vector<std::vector<std::int64_t>>>());
        }
        if (is_prefix(method)) {  // the cache holds the prefix once, in front of the tokens
          KVCache cache;
          model->forward(ids.narrow(0, 0, 1), mask.narrow(0, 0, 1), &cache);
          model->forward(ids.narrow(0, 0, 1).narrow(1, 0, 1), mask.narrow(0, 0, 1).narrow(1, 0, 1), &cache);
          CATCH_CHECK(cache.length() == kP + ids.size(1) + 1);
        }
        inst->detach(*model);
      }
    }
  }
}

CATCH_TEST_CASE("soft prompts on T5 equal peft's: prompts in the encoder, peft's prefix in the decoder's self-attention",
                "[plugins][prompts][t5][parity]") {
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  for (const std::string method : kMethods) {
    for (const bool encoder : {false, true}) {
      if (encoder && !reparameterised(method)) continue;
      const std::string key = "t5." + method;
      CATCH_INFO(key << (encoder ? " through its encoder" : " from peft's file"));
      auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
      test::perturb_if_asked(*model);
      auto inst = attach(key, *model, encoder);
      at::NoGradGuard no_grad;
      Encoded source = model->encode(s2s["input_ids"], s2s["attention_mask"]);
      CATCH_CHECK(source.prompt_length == (is_prefix(method) ? 0 : kP));
      const Tensor logits = model->logits(model->decode(s2s["t5.decoder_input_ids"], source));
      TESSERA_CHECK_PARITY(test::parity(logits, reference(), key + ".logits"));
      // Step by step through the cache, the prefix counted before the first target token.
      Seq2SeqCache cache;
      const Tensor dec = s2s["t5.decoder_input_ids"];
      Tensor first = model->logits(model->decode(dec.narrow(1, 0, 3), source, &cache));
      Tensor rest = model->logits(model->decode(dec.narrow(1, 3, dec.size(1) - 3), source, &cache));
      CATCH_CHECK(test::max_abs_diff(at::cat({first, rest}, 1), logits) < 1e-3 * logits.abs().max().item<double>());
      inst->detach(*model);
    }
  }
}

// (A colon far into a test's name makes Catch 2.13 wrap the name of a failing case forever.)
CATCH_TEST_CASE("positionless prefixes: GPT-2, LLaMA and T5 logits equal transformers' with the tokens numbered as without the prefix (shift_positions = false), through the cache too (SDK 2.8)",
                "[plugins][prompts][decoder][t5][parity]") {
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  const Tensor ids = dec["input_ids"], mask = dec["attention_mask"];
  for (const std::string arch : {"gpt2", "llama"}) {
    const std::string key = arch + ".prefix";
    CATCH_INFO(key);
    auto model = DecoderModel::load(test::fixture("decoders/" + arch), test::options());
    test::perturb_if_asked(*model);
    auto inst = test::attach_peft_adapter(positionless_copy(key), *model);
    at::NoGradGuard no_grad;
    const Tensor logits = model->logits(model->forward(ids, mask));
    TESSERA_CHECK_PARITY(test::parity(logits, reference(), key + ".positionless.logits", mask));
    CATCH_CHECK(test::max_abs_diff_tokens(logits, reference()[key + ".logits"], mask) > 1e-3);  // peft's numbering differs
    KVCache cache;  // the cache remembers that the prefix's keys are not earlier tokens
    const Tensor first = model->logits(model->forward(ids.narrow(1, 0, 3), mask.narrow(1, 0, 3), &cache));
    const Tensor rest = model->logits(model->forward(ids.narrow(1, 3, ids.size(1) - 3), mask.narrow(1, 3, ids.size(1) - 3), &cache));
    CATCH_CHECK(test::max_abs_diff_tokens(at::cat({first, rest}, 1), logits, mask) < 1e-4 * std::max(1.0, logits.abs().max().item<double>()));
  }
  auto& s2s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
  auto model = T5Model::load(test::fixture("seq2seq/t5"), test::options());
  test::perturb_if_asked(*model);
  auto inst = test::attach_peft_adapter(positionless_copy("t5.prefix"), *model);
  at::NoGradGuard no_grad;
  Encoded source = model->encode(s2s["input_ids"], s2s["attention_mask"]);
  const Tensor target = s2s["t5.decoder_input_ids"];
  const Tensor logits = model->logits(model->decode(target, source));
  TESSERA_CHECK_PARITY(test::parity(logits, reference(), "t5.prefix.positionless.logits"));
  CATCH_CHECK(test::max_abs_diff(logits, reference()["t5.prefix.logits"]) > 1e-3);
  Seq2SeqCache cache;
  const Tensor first = model->logits(model->decode(target.narrow(1, 0, 3), source, &cache));
  const Tensor rest = model->logits(model->decode(target.narrow(1, 3, target.size(1) - 3), source, &cache));
  CATCH_CHECK(test::max_abs_diff(at::cat({first, rest}, 1), logits) < 1e-4 * std::max(1.0, logits.abs().max().item<double>()));
}

CATCH_TEST_CASE("a prompt and a prefix compose with LoRA through the site order: peft's prompt on the LoRA-merged model",
                "[plugins][prompts][parity]") {
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  {
    auto model = test::load_minilm();
    auto lora = test::attach_peft_adapter(test::fixture("lora_basic"), *model);
    auto prompt = attach("minilm.prompt", *model, false);
    at::NoGradGuard no_grad;
    Encoded e = model->forward(enc["input_ids"], enc["attention_mask"]);
    TESSERA_CHECK_PARITY(test::parity(e.hidden, reference(), "minilm.prompt.with_lora", e.mask));
    CATCH_CHECK(test::max_abs_diff_tokens(e.hidden, reference()["minilm.prompt"], e.mask) > 1e-3);  // LoRA is seen
  }
  {
    auto model = DecoderModel::load(test::fixture("decoders/llama"), test::options());
    test::perturb_if_asked(*model);
    auto prefix = attach("llama.prefix", *model, false);  // the other order of installation
    auto lora = test::attach_peft_adapter(test::fixture("decoders/llama_lora"), *model);
    at::NoGradGuard no_grad;
    const Tensor logits = model->logits(model->forward(dec["input_ids"], dec["attention_mask"]));
    TESSERA_CHECK_PARITY(test::parity(logits, reference(), "llama.prefix.with_lora", dec["attention_mask"]));
    CATCH_CHECK(test::max_abs_diff_tokens(logits, reference()["llama.prefix.logits"], dec["attention_mask"]) > 1e-3);
  }
}

CATCH_TEST_CASE("a prompt composes with a bottleneck adapter: AdapterHub's adapter under peft's prompt, both ours given", "[plugins][prompts][bottleneck][parity]") {
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  auto model = test::load_minilm();
  // A Pfeiffer adapter (after the FFN) and a prompt of 5 vectors, both away from their inits.
  auto adapter = test::registry().create("bottleneck", "adapter");
  adapter->attach(*model, {}, apply_schema(test::registry().find("bottleneck")->params, {{"config", std::string("seq_bn")}}));
  auto prompt = test::registry().create("prompt_tuning", "prompt");
  prompt->attach(*model, {}, apply_schema(test::registry().find("prompt_tuning")->params, {{"num_virtual_tokens", std::int64_t{5}}}));
  at::manual_seed(5);
  for (auto* inst : {adapter.get(), prompt.get()}) {
    NamedTensors moved;
    for (const auto& [k, t] : inst->call("state", [](Method& m) { return m.state(); })) moved[k] = at::randn_like(t) * 0.2;
    inst->call("load_state", [&](Method& m) { m.load_state(moved); });
  }
  // AdapterHub loads the adapter's folder; the prompt goes before the text as peft puts it.
  const auto dir = test::temp_dir("prompt-bottleneck");
  save_safetensors((dir / "adapter.safetensors").string(), adapter->call("state", [](Method& m) { return m.state(); }), {{"format", "pt"}});
  std::ofstream(dir / "adapter_config.json") << adapter->call("cfg", [](Method& m) { return m.adapter_config_json(); });
  save_safetensors((dir / "prompt.safetensors").string(), prompt->call("state", [](Method& m) { return m.state(); }));
  const auto out = (dir / "out.safetensors").string();
  const std::string cmd = std::string(TESSERA_ADAPTERS_PYTHON) + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/adapters_forward.py " + dir.string() + " minilm " +
                          test::fixture("reference.safetensors") + " " + out + " " + (dir / "prompt.safetensors").string() + " > " + (dir / "log").string() + " 2>&1";
  CATCH_REQUIRE(std::system(cmd.c_str()) == 0);
  auto theirs = test::read_tensors(out);
  at::NoGradGuard no_grad;
  Encoded e = model->forward(enc["input_ids"], enc["attention_mask"]);
  CATCH_CHECK(e.hidden.size(1) == enc["input_ids"].size(1) + 5);
  TESSERA_CHECK_PARITY(test::parity(e.hidden, theirs, "out", e.mask));
  // Each method is seen: without the adapter the output moves.
  adapter->detach(*model);
  CATCH_CHECK(test::max_abs_diff_tokens(model->forward(enc["input_ids"], enc["attention_mask"]).hidden, theirs["out"], e.mask) > 1e-3);
}

CATCH_TEST_CASE("soft prompts we save load in PeftModel.from_pretrained with equal outputs", "[plugins][prompts][parity]") {
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  auto& dec = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  struct Case {
    std::string plugin, kind, model_dir;
    std::map<std::string, ParamValue> params;
  };
  const std::vector<Case> cases = {
      {"prompt_tuning", "encoder", test::model_dir(), {{"num_virtual_tokens", std::int64_t{5}}, {"prompt_tuning_init", std::string("SAMPLE_VOCAB")}}},
      {"prefix_tuning", "encoder", test::model_dir(), {{"num_virtual_tokens", std::int64_t{3}}, {"prefix_projection", true}}},
      {"p_tuning", "causal", test::fixture("decoders/llama"), {{"num_virtual_tokens", std::int64_t{3}}, {"encoder_reparameterization_type", std::string("LSTM")}}},
      {"prefix_tuning", "causal", test::fixture("decoders/llama"), {{"num_virtual_tokens", std::int64_t{6}}}},
      {"prompt_tuning", "t5", test::fixture("seq2seq/t5"), {{"num_virtual_tokens", std::int64_t{3}}}},
  };
  for (const auto& c : cases) {
    CATCH_INFO(c.plugin << " on " << c.model_dir);
    std::unique_ptr<SiteModel> model;
    if (c.kind == "encoder") model = test::load_minilm();
    else if (c.kind == "causal") model = DecoderModel::load(c.model_dir, test::options());
    else model = T5Model::load(c.model_dir, test::options());
    auto inst = test::registry().create(c.plugin, "adapter");
    at::manual_seed(3);
    inst->attach(*model, {}, apply_schema(test::registry().find(c.plugin)->params, c.params));
    std::filesystem::path dir;
    const auto reference = test::fixture(c.kind == "encoder" ? "reference.safetensors" : c.kind == "causal" ? "decoders/reference.safetensors" : "seq2seq/reference.safetensors");
    auto peft = test::peft_outputs(*inst, c.kind, c.model_dir, reference, &dir);
    const auto cfg = nlohmann::json::parse(std::ifstream(dir / "adapter_config.json"));
    CATCH_CHECK(cfg["task_type"] == (c.kind == "encoder" ? "FEATURE_EXTRACTION" : c.kind == "causal" ? "CAUSAL_LM" : "SEQ_2_SEQ_LM"));
    at::NoGradGuard no_grad;
    Tensor ours, mask;
    const std::int64_t P = std::get<std::int64_t>(c.params.at("num_virtual_tokens"));
    if (c.kind == "encoder") {
      Encoded e = dynamic_cast<BertModel&>(*model).forward(enc["input_ids"], enc["attention_mask"]);
      ours = e.hidden, mask = e.mask;
    } else if (c.kind == "causal") {
      auto& d = dynamic_cast<DecoderModel&>(*model);
      ours = d.logits(d.forward(dec["input_ids"], dec["attention_mask"]));
      mask = dec["attention_mask"];
      if (c.plugin != "prefix_tuning") mask = at::cat({at::ones({mask.size(0), P}, mask.options()), mask}, 1);
    } else {
      auto& t = dynamic_cast<T5Model&>(*model);
      auto& s = test::cached_tensors(test::fixture("seq2seq/reference.safetensors"));
      ours = t.logits(t.decode(s["t5.decoder_input_ids"], t.encode(s["input_ids"], s["attention_mask"])));
    }
    TESSERA_CHECK_PARITY(test::parity(ours, peft, "out", mask));
  }
}

CATCH_TEST_CASE("soft prompts refuse bad input by name: virtual-token and layer counts, a prompt past the positions, an empty init text",
                "[plugins][prompts][minilm]") {
  auto model = test::load_minilm();
  auto& enc = test::cached_tensors(test::fixture("reference.safetensors"));
  auto peft = test::read_tensors(dir_of("minilm.prompt") + "/adapter_model.safetensors");
  auto create = [&](const std::string& plugin, std::map<std::string, ParamValue> params) {
    auto inst = test::registry().create(plugin, "bad");
    inst->attach(*model, {}, apply_schema(test::registry().find(plugin)->params, std::move(params)));
    return inst;
  };
  {
    auto inst = create("prompt_tuning", {{"num_virtual_tokens", std::int64_t{6}}});
    CATCH_CHECK_THROWS_WITH(inst->call("load_state", [&](Method& m) { m.load_state(peft); }),
                            Catch::Contains("'prompt_embeddings' has 4 rows, this adapter has 6 (6 virtual tokens") &&
                                Catch::Contains("another virtual-token count"));
    inst->detach(*model);
  }
  {
    auto roberta_prefix = test::read_tensors(dir_of("roberta.prefix") + "/adapter_model.safetensors");
    auto inst = create("prefix_tuning", {{"num_virtual_tokens", kP}});
    CATCH_CHECK_THROWS_WITH(inst->call("load_state", [&](Method& m) { m.load_state(roberta_prefix); }),
                            Catch::Contains("has 128 columns, this model needs 4608 (2 × 6 layers × 12 kv heads × 32 head dim)"));
    inst->detach(*model);
  }
  // AdapterHub's wide input table is the projection's: without one it is refused at its key.
  CATCH_CHECK_THROWS_AS(create("prefix_tuning", {{"embedding_width", std::string("hidden")}}), ParamError);
  CATCH_CHECK_THROWS_WITH(create("prefix_tuning", {{"embedding_width", std::string("hidden")}}), Catch::Contains("needs prefix_projection = true"));
  CATCH_CHECK_THROWS_WITH(apply_schema(test::registry().find("prompt_tuning")->params, {{"num_virtual_tokens", std::int64_t{0}}}),
                          Catch::Contains("num_virtual_tokens"));
  {
    auto inst = create("prompt_tuning", {{"num_virtual_tokens", std::int64_t{510}}});
    at::NoGradGuard no_grad;
    CATCH_CHECK_THROWS_WITH(model->forward(enc["input_ids"], enc["attention_mask"]), Catch::Contains("exceeds the 512 positions of the model"));
    inst->detach(*model);
  }
  {
    auto inst = create("prefix_tuning", {{"num_virtual_tokens", std::int64_t{510}}});
    at::NoGradGuard no_grad;
    CATCH_CHECK_THROWS_WITH(model->forward(enc["input_ids"], enc["attention_mask"]), Catch::Contains("after 510 prefix keys exceeds the 512 positions"));
    inst->detach(*model);
  }
  // A text init reads the run's tokenizer; one that gives no token is refused by its key.
  tessera_host_tokenizer_v2 tok{{sizeof(tessera_host_tokenizer_v2), 2}, nullptr, [](void*, const std::string&) { return std::vector<std::int64_t>{}; },
                                [](void*, const std::string& text) { return text == "good" ? std::vector<std::int64_t>{101, 2204, 102} : std::vector<std::int64_t>{}; }};
  model->set_extension(TESSERA_EXT_HOST_TOKENIZER, &tok);
  CATCH_CHECK_THROWS_AS(create("prompt_tuning", {{"prompt_tuning_init", std::string("TEXT")}, {"prompt_tuning_init_text", std::string("  ")}}), ParamError);
  {
    auto inst = create("prompt_tuning", {{"num_virtual_tokens", std::int64_t{5}}, {"prompt_tuning_init", std::string("TEXT")},
                                         {"prompt_tuning_init_text", std::string("good")}});
    // peft's rule: the text's ids with [CLS] and [SEP], cycled to the virtual tokens.
    const Tensor rows = inst->call("state", [](Method& m) { return m.state(); }).at("prompt_embeddings");
    const Tensor words = model->match_parameters({"embed.word.weight"})[0]->base();
    const Tensor expected = words.index_select(0, at::tensor({101, 2204, 102, 101, 2204}, at::kLong).to(words.device()));
    CATCH_CHECK(at::equal(rows, expected));
    inst->detach(*model);
  }
}
