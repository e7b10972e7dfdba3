// Training end to end on the real encoder and the real polarity data.
#include "support.h"

#include "train/trainer.h"

#include <fstream>

using namespace tessera;

namespace {

Config small_config(const std::string& name, bool with_lora, std::int64_t limit, std::int64_t max_steps) {
  auto dir = test::temp_dir(name);
  std::string body = R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 48
limit = )" + std::to_string(limit) + R"(
[train]
epochs = 1
batch_size = 16
lr = 1e-3
head_lr = 3e-3
threads = 0
max_steps = )" + std::to_string(max_steps) + "\n";
  if (with_lora)
    body += "[[methods]]\nplugin = \"lora\"\ntargets = [\"attn.q\", \"attn.k\", \"attn.v\", \"attn.o\", \"mlp.up\", \"mlp.down\"]\n"
            "[methods.params]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.1\n";
  {
    std::ofstream(dir / "run.toml") << body;
  }
  Config c = load_config((dir / "run.toml").string());
  check_methods(c, test::registry());
  c.output_dir = (dir / "run").string();
  return c;
}

}  // namespace

CATCH_TEST_CASE("training leaves the base bit-for-bit unchanged and a saved adapter reloads to identical logits", "[train]") {
  set_threads(0);
  Config c = small_config("train-save", true, 300, 4);
  Tensor logits_after;
  std::vector<std::size_t> order;
  {
    Session s(c, test::registry());
    std::map<std::string, Tensor> before;
    for (auto* p : s.model().parameter_sites()) before[p->name()] = p->base().clone();
    TrainResult r = train(s, c.output_dir);
    CATCH_CHECK(r.steps == 4);
    for (auto* p : s.model().parameter_sites()) {
      CATCH_INFO("base tensor " << p->name());
      CATCH_CHECK(at::equal(p->base(), before[p->name()]));
    }
    for (std::size_t i = 0; i < s.data().test.size(); ++i) order.push_back(i);
    at::NoGradGuard ng;
    logits_after = s.logits(s.batch(Split::Test, order, 0, order.size()));
  }
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_model.safetensors"));
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_config.json"));
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/metrics.jsonl"));
  Session reloaded(c, test::registry());
  reloaded.load_adapter(c.output_dir + "/adapter");
  at::NoGradGuard ng;
  Tensor logits = reloaded.logits(reloaded.batch(Split::Test, order, 0, order.size()));
  CATCH_CHECK(at::equal(logits, logits_after));

  // The saved LoRA folder is HF PEFT's format: peft loads it and computes what we compute.
  const std::string peft_out = c.output_dir + "/peft_hidden.safetensors";
  const std::string cmd = std::string(TESSERA_VENV_PYTHON) + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/peft_forward.py " + c.output_dir +
                          "/adapter/lora " + test::fixture("reference.safetensors") + " " + peft_out;
  CATCH_REQUIRE(std::system(cmd.c_str()) == 0);
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  Tensor ours = reloaded.encoder()->forward(ref["input_ids"], ref["attention_mask"]).hidden;
  Tensor theirs = test::read_tensors(peft_out).at("hidden");
  CATCH_CHECK(test::max_abs_diff_tokens(ours, theirs, ref["attention_mask"]) < 1e-4);
  CATCH_CHECK(test::max_abs_diff_tokens(ours, ref["hidden"], ref["attention_mask"]) > 1e-6);  // the adapter is not a no-op
}

CATCH_TEST_CASE("a short real LoRA run beats the frozen-encoder baseline", "[train][slow]") {
  set_threads(0);
  Config lora_cfg = small_config("train-lora", true, 1200, 0);
  Config frozen_cfg = small_config("train-frozen", false, 1200, 0);
  Session lora(lora_cfg, test::registry());
  Session frozen(frozen_cfg, test::registry());
  const double lora_acc = train(lora, lora_cfg.output_dir).test.accuracy;
  const double frozen_acc = train(frozen, frozen_cfg.output_dir).test.accuracy;
  CATCH_INFO("LoRA " << lora_acc << " vs frozen " << frozen_acc << " on " << lora.data().test.size() << " test sentences");
  CATCH_CHECK(lora_acc > frozen_acc);
  CATCH_CHECK(lora_acc > 0.7);
}

CATCH_TEST_CASE("causal-LM fine-tuning with LoRA lowers the perplexity of held-out text; prompts are left out of the loss", "[train][causal]") {
  set_threads(0);
  auto dir = test::temp_dir("causal");
  {
    std::ofstream(dir / "run.toml") << "[model]\npath = \"" << test::fixture("decoders/gpt2_text") << R"("
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 48
limit = 400
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = 16
lr = 3e-2
max_steps = 40
[[methods]]
plugin = "lora"
targets = ["c_attn", "attn.o", "mlp.up", "mlp.down"]
[methods.params]
r = 8
lora_alpha = 16
)";
  }
  Config c = load_config((dir / "run.toml").string());
  check_methods(c, test::registry());
  c.output_dir = (dir / "run").string();
  Session s(c, test::registry());
  CATCH_REQUIRE(s.causal());
  CATCH_CHECK(s.head().empty());
  // Every example: <s> text </s>, labelled from the first token on.
  const auto& ids = s.token_ids(Split::Train)[0];
  CATCH_CHECK(ids.front() == 1);
  CATCH_CHECK((ids.back() == 2 || ids.size() == 48));
  const EvalResult before = evaluate(s, Split::Test);
  TrainResult r = train(s, c.output_dir);
  CATCH_INFO("perplexity " << before.perplexity << " -> " << r.test.perplexity);
  CATCH_CHECK(r.test.perplexity < 0.6 * before.perplexity);
  CATCH_CHECK(std::abs(r.test.perplexity - std::exp(r.test.loss)) < 1e-6 * r.test.perplexity);
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_model.safetensors"));

  // With a prompt column the prompt tokens carry -100: only the text is learned.
  {
    std::ofstream(dir / "pairs.jsonl") << R"({"prompt": "Review: good film", "response": " positive"})" << "\n"
                                       << R"({"prompt": "Review: dull plot", "response": " negative"})" << "\n"
                                       << R"({"prompt": "Review: fine cast", "response": " positive"})" << "\n";
  }
  Config p = c;
  p.data.path = (dir / "pairs.jsonl").string();
  p.data.format = "auto";
  p.data.prompt_column = "prompt";
  p.data.text_column = "response";
  p.data.test_fraction = 0.34;
  p.data.limit = 0;
  Session sp(p, test::registry());
  const auto& pl = sp.prompt_lengths(Split::Train);
  std::vector<std::size_t> order{0, 1};
  Batch b = sp.batch(Split::Train, order, 0, 2);
  for (std::int64_t row = 0; row < 2; ++row) {
    const auto prompt = pl[static_cast<std::size_t>(row)];
    const auto len = static_cast<std::int64_t>(sp.token_ids(Split::Train)[static_cast<std::size_t>(row)].size());
    CATCH_CHECK(prompt > 1);
    CATCH_CHECK(b.lm_labels[row].narrow(0, 0, prompt).eq(-100).all().item<bool>());
    CATCH_CHECK(b.lm_labels[row].narrow(0, prompt, len - prompt).equal(b.ids[row].narrow(0, prompt, len - prompt)));
  }
}
